"""gptjax plan: the micro-batch it picks is the largest whose compiled step fits (one row
more does not), its predictions follow from the cost analysis it reports, and bad input is
one line."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, fails_cleanly, run_cli

from gptjax.bench import plan as P
from gptjax.bench.train_step import build_train_step, memory_stats
from gptjax.config import TrainConfig, preset
from gptjax.errors import GptjaxError
from gptjax.training.metrics import PEAK_BF16, data_sheet_chip

TINY = preset("tiny", vocab_size=65)


def _planned_bytes(rows):
    return memory_stats(build_train_step(TINY, TrainConfig(batch_size=rows, max_steps=9,
                                                          warmup_steps=1)).step)["total"]


def test_the_batch_is_the_largest_that_fits_and_one_more_row_does_not():
    limit = 2.5e6  # bytes: between the tiny step's plans at 8 and 9 rows
    dev = P.Device("cpu", 1, limit / P.HEADROOM, 1e11, 1e10, {})
    c = P.fit(TINY, "data=1", "none", dev, 1024)
    assert c.largest and c.memory_bytes == _planned_bytes(c.rows) <= limit
    assert _planned_bytes(c.rows + 1) > limit
    # the roofline from the numbers it reports
    assert c.step_seconds == pytest.approx(max(c.flops / dev.peak_flops, c.bytes_accessed / dev.bandwidth))
    assert c.tokens_per_s == pytest.approx(c.rows * TINY.context_length / c.step_seconds)
    assert 0 < c.mfu <= 1


@pytest.mark.parametrize("text, tokens", [("10B", 1e10), ("300m", 3e8), ("1.5T", 1.5e12), ("2e9", 2e9)])
def test_token_budgets_read_as_people_write_them(text, tokens):
    assert P.parse_tokens(text) == tokens


def test_plan_prints_a_table_and_writes_the_json(tmp_path, capsys):
    code, out, err = run_cli(capsys, "plan", "--preset", "tiny", "--vocab-size", "65", "--tokens",
                             "20M", "--max-batch", "8", "--remats", "none,full",
                             "--device-memory", "1", "--json", tmp_path / "plan.json")
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    rows = plan["candidates"]
    assert [(r["mesh"], r["remat"]) for r in rows] == [("data=1", "none"), ("data=1", "full")]
    assert all(r["rows"] == 8 and r["largest"] for r in rows)  # 1 GiB holds the cap
    best = max(rows, key=lambda r: r["tokens_per_s"])
    hours = 2e7 / best["tokens_per_s"] / 3600
    assert f"best: --mesh data=1 --remat {best['remat']} --batch-size 8" in out
    assert "| data=1 | full | 8 |" in out and f"{hours:,.1f} |" in out


def test_four_simulated_devices_get_three_meshes_and_whole_replicas(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "gptjax", "plan", "--preset", "tiny", "--vocab-size",
                           "65", "--tokens", "1B", "--devices", "4", "--remats", "none",
                           "--max-batch", "4", "--json", str(tmp_path / "p.json")],
                          env={**env, "JAX_PLATFORMS": "cpu"}, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "p.json").read_text())["candidates"]
    assert [r["mesh"] for r in rows] == ["data=4", "fsdp=4", "data=2,fsdp=2"]
    assert all(r["rows"] == 4 and r["compiles"] == 1 for r in rows) and "for 4 x cpu" in done.stdout


@pytest.mark.parametrize("flags, match", [
    (["--tokens", "lots"], "--tokens takes a positive count"),
    (["--tokens", "1B", "--remats", "some"], "--remats takes none, dots"),
    (["--tokens", "1B", "--mesh", "data=3"], "mesh data=3,fsdp=1,tensor=1 needs 3 devices"),
])
def test_bad_plans_are_one_line(capsys, flags, match):
    fails_cleanly(capsys, "plan", "--preset", "tiny", *flags, match=match)


def test_a_model_that_never_fits_says_so_and_exits_1(capsys):
    code, out, _ = run_cli(capsys, "plan", "--preset", "tiny", "--vocab-size", "65", "--tokens",
                           "1B", "--remats", "none", "--device-memory", "0.00001")
    assert code == 1 and "nothing fits" in out and "does not fit" in out


def test_parse_tokens_refuses_zero():
    with pytest.raises(GptjaxError):
        P.parse_tokens("0")


@pytest.mark.parametrize("kind, chip", [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA L4", "L4"),
                                        ("NVIDIA L40S", None), ("TPU v5 lite", "TPU v5 lite"),
                                        ("TPU v6 lite", "TPU v6"), ("TPU v5p", "TPU v5p"),
                                        ("cpu", None)])
def test_a_data_sheet_chip_is_a_whole_word_of_the_device_kind(kind, chip):
    assert data_sheet_chip(kind) == chip


def test_every_chip_with_a_peak_has_a_bandwidth():
    assert set(P.BANDWIDTH) == set(PEAK_BF16)


def test_a_largest_batch_below_the_replicas_is_refused():
    dev = P.Device("cpu", 4, 1e9, 1e11, 1e10, {})
    with pytest.raises(GptjaxError, match="a largest batch of 2 is fewer rows than the 4 data replicas"):
        P.fit(TINY, "data=4", "none", dev, 2)
