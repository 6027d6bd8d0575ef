"""This CPU's recorded matmul peak (MFU's denominator) and what a run does with it."""

import json

import pytest
from conftest import TINY_RUN, run_cli

from gptjax.cpu import peak


@pytest.fixture
def record(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "peak-flops.json"
    monkeypatch.setattr(peak, "record_path", lambda: path)
    return path


def _measuring(*rates):
    """A stand-in for the matmul measurement: these rates in turn, and what it was asked."""
    asked = []

    def measure(dtype, min_seconds):
        asked.append((dtype, min_seconds))
        return rates[len(asked) - 1]
    return measure, asked


def test_the_first_run_on_a_machine_measures_thoroughly_and_records(record):
    measure, asked = _measuring(2e11)
    got = peak.cpu_peak("float32", measure)
    assert got.flops == 2e11 and "measured on this machine now (recorded)" in got.source
    assert asked == [("float32", peak.THOROUGH_SECONDS)]
    entry = json.loads(record.read_text())[peak.key("float32")]
    assert entry["flops"] == 2e11 and entry["measured"]
    assert peak.recorded("bfloat16") is None  # one record per dtype


def test_a_busy_start_uses_the_record_and_warns_and_a_better_one_replaces_it(record):
    peak.cpu_peak("float32", _measuring(2e11)[0])
    measure, asked = _measuring(0.5e11)
    got = peak.cpu_peak("float32", measure)
    assert got.flops == 2e11 and asked == [("float32", peak.QUICK_SECONDS)]
    assert got.source.endswith("the machine looks busy: 0.05 at start, so the record is used")
    assert peak.recorded("float32")["flops"] == 2e11  # a worse rate never replaces it
    assert peak.cpu_peak("float32", _measuring(3e11)[0]).flops == 3e11
    assert peak.recorded("float32")["flops"] == 3e11
    assert not peak.raise_record("float32", 2.5e11) and peak.raise_record("float32", 4e11)
    old, new, saved = peak.remeasure("float32", _measuring(1e11)[0])  # asked for: replaces
    assert (old, new, saved) == (4e11, 1e11, True) and peak.recorded("float32")["flops"] == 1e11


def test_a_cache_that_cannot_be_written_still_gives_a_peak(tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(peak, "record_path", lambda: blocked / "native" / "peak-flops.json")
    got = peak.cpu_peak("float32", _measuring(2e11)[0])
    assert got.flops == 2e11 and "not recorded: the cache is not writable" in got.source
    assert peak.remeasure("float32", _measuring(1e11)[0]) == (None, 1e11, False)


def test_a_run_uses_the_record_says_so_and_keeps_its_source(record, tmp_path, char_data, capsys):
    """A record far above the start-up rate (as after a busy start): the run says the
    machine looks busy, uses the record, and config.json and metrics.jsonl say where the
    peak came from."""
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({peak.key("float32"): {"flops": 5e14, "measured": "2026-01-02"}}))
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", char_data, "--out", out, *TINY_RUN,
                                "--max-steps", "3")
    assert code == 0 and not err.strip(), err  # stderr stays for errors and warnings
    assert "peak 500 TFLOP/s (float32 matmul measured on this machine, 2026-01-02; gptjax bench " \
           "--remeasure-peak to redo; the machine looks busy: " in stdout
    t = json.loads((out / "config.json").read_text())["train"]
    assert t["peak_flops"] == 5e14 and "2026-01-02" in t["peak_source"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peaks = [r for r in records if r["kind"] == "peak"]
    assert peaks[0] == {"kind": "peak", "step": 0, "peak_flops": 5e14, "source": t["peak_source"]}


def test_a_step_faster_than_the_peak_raises_it_and_mfu_never_passes_100(record, tmp_path, char_data,
                                                                         capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "train", "--data", char_data, "--out", out, *TINY_RUN,
                                "--max-steps", "4", "--peak-flops", "1e6")
    assert code == 0, err
    assert "peak 1e-06 TFLOP/s (flag)" in stdout and "the peak is raised to it" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] <= 1.0 for r in records if r["kind"] == "train" and r["mfu"] is not None)
    raised = [r for r in records if r["kind"] == "peak" and r["step"] > 0]
    t = json.loads((out / "config.json").read_text())["train"]
    assert raised and t["peak_flops"] == raised[-1]["peak_flops"] and t["peak_source"].startswith("raised")
    assert not record.exists()  # a training rate never makes the machine's first record


def test_bench_remeasure_peak_replaces_both_records(record, monkeypatch, capsys):
    peak.cpu_peak("float32", _measuring(9e11)[0])
    monkeypatch.setattr(peak, "measure_matmul", lambda dtype, min_seconds: {"float32": 1e11,
                                                                           "bfloat16": 5e10}[dtype])
    code, out, err = run_cli(capsys, "bench", "--remeasure-peak")
    assert code == 0, err
    assert "float32 matmul: 0.1 TFLOP/s (was 0.9)" in out
    assert "bfloat16 matmul: 0.05 TFLOP/s (none recorded before)" in out
    assert peak.recorded("float32")["flops"] == 1e11 and peak.recorded("bfloat16")["flops"] == 5e10
