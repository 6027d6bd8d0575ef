"""`gptjax bench` smoke run (seconds, tiny preset), the recompile guard, bad flags, and a
smoke run of the PyTorch side-by-side. Speed is never asserted here: only that the
benchmarks run and report sane, complete results."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO, benchmark_script, run_cli

from gptjax.bench import train_step as bench
from gptjax.bench.train_step import RecompileError, no_compiles
from gptjax.config import TrainConfig, preset
from gptjax.cpu import native
from gptjax.errors import GptjaxError


def _cpu_auto_attention() -> str:
    """What attention_impl="auto" is on this CPU (gptjax.model.attention.resolve_impl's rule)."""
    return "native" if native.available() and jax.device_count() == 1 else "blocked"


def test_bench_smoke_writes_json_and_appends_the_table(capsys, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    out_json = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "bench", "--preset", "tiny", "--batch-size", "2", "--steps", "2",
                             "--repeats", "1", "--warmup", "1", "--decode", "--decode-new-tokens", "3",
                             "--compile-cache", "--json", out_json, "--results", results)
    assert code == 0, err
    assert "at least 5" in out  # fewer repeats than the protocol asks for: said so
    report = json.loads(out_json.read_text())
    assert report["machine"]["jax"] == jax.__version__ and report["machine"]["cores"] >= 1
    assert "6N + 12*L*d*T" in report["flops_formula"]
    assert report["peak"]["flops_per_s"] > 0

    (row,) = report["train"]
    assert (row["preset"], row["batch"], row["context"], row["dtype"]) == ("tiny", 2, 32, "float32")
    attention = _cpu_auto_attention()
    assert row["attention"] == attention
    train = row["train"]
    assert 0 < train["tokens_per_s"]["min"] <= train["tokens_per_s"]["median"] <= train["tokens_per_s"]["max"]
    assert train["ms_per_step"]["median"] > 0 and train["flops_per_s"] > 0
    assert 0 < train["mfu"] < 10 and math.isfinite(train["last_loss"])
    assert train["no_recompile_guard"] == {"checked": True, "compiles": 0,
                                           "region": "the timed train steps"}
    compile_ = row["compile"]
    assert compile_["lower_seconds"] > 0 and compile_["compile_seconds"] > 0
    cold, cached = compile_["cold_process"], compile_["cached_process"]
    assert cold["seconds"] > 0 and cold["cache_hits"] == 0
    assert cached["cache_hits"] >= 1  # the second fresh process loaded the executable
    assert row["memory"]["temp"] > 0 and row["memory"]["argument"] > 0
    assert row["memory"]["process_peak_rss_mib"] > 0

    (dec,) = report["decode"]
    assert dec["batch"] == 1 and dec["new_tokens"] == 3
    assert dec["ttft_ms"]["median"] > 0 and dec["ms_per_token"]["median"] > 0
    assert dec["no_recompile_guard"]["checked"]

    text = results.read_text()
    assert text.startswith("# earlier results\n")  # appended, not overwritten
    assert "### gptjax bench" in text and "jaxlib" in text and "Command: `gptjax bench" in text
    assert f"| tiny | 28,576 | 2 | 32 | float32 | {attention} |" in text and "| decode: preset |" in text


def test_no_compiles_passes_on_cached_calls_and_raises_on_a_recompile():
    double = jax.jit(lambda x: 2 * x)
    three, four = jnp.ones(3), jnp.ones(4)
    double(three).block_until_ready()
    with no_compiles("a cached call") as guard:
        double(three).block_until_ready()
    assert guard.checked and guard.summary()["compiles"] == 0
    with pytest.raises(RecompileError, match="in a new shape"):
        with no_compiles("a new shape"):
            double(four).block_until_ready()  # a new shape: traced and compiled again


@pytest.mark.parametrize("flags, message", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "12,x"], "comma-separated integers"),
    (["--context-length", "0"], "--context-length values must be positive"),
    (["--preset", "tiny,nope"], "unknown preset 'nope'"),
    (["--zip", "--preset", "tiny,baby", "--batch-size", "1,2,3"], "equal lengths"),
    (["--dtype", "float16"], "invalid choice"),
    (["--preset", "tiny", "--decode", "--decode-prompt-tokens", "30", "--decode-new-tokens", "10"],
     "exceed tiny's context 32"),
    (["--json", "/no/such/dir/out.json"], "no such directory"),
])
def test_bad_flags_exit_2_with_one_line(capsys, tmp_path, flags, message):
    results = tmp_path / "RESULTS.md"
    code, out, err = run_cli(capsys, "bench", *flags, "--results", results)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not results.exists()


def test_torch_side_by_side_smoke(tmp_path):
    pytest.importorskip("torch")
    script = benchmark_script("train_throughput")
    out_json, results = tmp_path / "tt.json", tmp_path / "RESULTS.md"
    assert script.main(["--cases", "tiny:2:16", "--repeats", "2", "--steps", "1", "--warmup", "1",
                        "--threads", "1",  # torch on 2 threads crawls when CI shares the cores
                        "--json", str(out_json), "--results", str(results)]) == 0
    (row,) = json.loads(out_json.read_text())["results"]
    assert row["params"] == 28_064  # the torch reference matched gptjax's parameter count
    assert row["torch"]["tokens_per_s"]["median"] > 0 and math.isfinite(row["torch"]["last_loss"])
    assert row["gptjax"]["tokens_per_s"]["median"] > 0 and math.isfinite(row["gptjax"]["last_loss"])
    assert row["ratio"]["median"] > 0 and row["gptjax"]["matmul_fraction"] > 0
    assert row["no_recompile_guard"]["checked"]
    assert len(row["torch"]["repeat_seconds"]) == 2
    text = results.read_text()
    assert "### Train-step throughput, gptjax vs PyTorch eager" in text and "| tiny:2:16 |" in text
    assert "tiny:2:16" not in (REPO / "benchmarks" / "RESULTS.md").read_text()


def test_variant_ab_smoke_times_every_variant(capsys):
    ab = benchmark_script("train_step_ab")
    ab.main(["--case", "tiny:2:16", "--steps", "1", "--repeats", "2", "", "remat=full,lr=0.01",
             "donate=0,fused_update=0"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["| (as is)", "| remat=full,lr=0.01", "| donate=0,fused_update=0"]
    for r in rows:  # ms/step, tokens/s and MFU are positive numbers
        assert r[1] in ("native", "blocked")
        assert float(r[2].split()[0]) > 0 and float(r[3].replace(",", "")) > 0
        assert float(r[4].rstrip("%")) > 0


@pytest.mark.parametrize("impl", ["auto", "blocked"])
def test_the_attention_reported_is_the_one_compiled_into_the_step(impl):
    """TrainStepBench.attention names what the traced step runs: the native kernel's custom
    call is in the compiled step exactly when it says "native"."""
    cfg = dataclasses.replace(preset("tiny", vocab_size=65), attention_impl=impl)
    step = bench.build_train_step(cfg, TrainConfig(batch_size=2))
    expected = _cpu_auto_attention() if impl == "auto" else impl
    assert step.attention == expected
    assert ("gptjax_causal_attention_fwd" in step.step.as_text()) == (expected == "native")


def test_the_attention_reported_is_xla_when_cudnn_refused_while_tracing(monkeypatch):
    """"auto" planned cuDNN but fell back while tracing: only the lowered module shows it."""
    class Lowered:  # stands in for a jax.stages.Lowered
        def __init__(self, text):
            self.text = text

        def as_text(self):
            return self.text
    monkeypatch.setattr(bench.attention, "choose_impl", lambda qkv, impl: "cudnn")
    cfg = preset("tiny", vocab_size=65)
    called = 'stablehlo.custom_call @"__cudnn$fmhaSoftmax"(%q, %k, %v)'
    assert bench.traced_attention(cfg, 2, Lowered(called)) == "cudnn"
    assert bench.traced_attention(cfg, 2, Lowered("stablehlo.dot_general")) == "xla"


def test_the_step_jitted_apart_or_undonated_updates_as_training_does():
    """build_train_step's A/B options change how the step is jitted, not what it computes:
    two steps from the same state and batches give the same parameters and metrics."""
    cfg = preset("tiny", vocab_size=65)
    train_cfg = TrainConfig(batch_size=2, max_steps=100, warmup_steps=1)
    batches = bench.random_batches(2, 2, cfg.context_length, 65)
    results = []
    for options in ({}, {"donate": False}, {"fused_update": False},
                    {"donate": False, "fused_update": False}):
        step = bench.build_train_step(cfg, train_cfg, **options)
        state = step.init_state()
        for b in batches:
            state, metrics = step.step(state, step.put(b))
        results.append((state, metrics))
        assert (step.memory["alias"] > 0) == options.get("donate", True)
    (ref_state, ref_metrics), *others = results
    assert int(ref_state.step) == 2
    for state, metrics in others:
        assert int(state.step) == 2
        for a, b in zip(jax.tree.leaves((ref_state.params, ref_state.opt_state, ref_metrics)),
                        jax.tree.leaves((state.params, state.opt_state, metrics))):
            assert jnp.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_variant_ab_reads_step_options():
    model_cfg, train_cfg, options = benchmark_script("train_step_ab").parse_variant(
        "donate=0,lr=0.01,fused_update=no", preset("tiny", vocab_size=65), TrainConfig())
    assert options == {"donate": False, "fused_update": False} and train_cfg.lr == 0.01


@pytest.mark.parametrize("item,message", [
    ("bogus=1", "expected FIELD=VALUE"), ("remat=foo", "model.remat must be one of"),
    ("n_layer=x", "n_layer takes int values"), ("donate=maybe", "donate takes bool values")])
def test_variant_ab_rejects_bad_items(item, message):
    with pytest.raises(GptjaxError, match=message):
        benchmark_script("train_step_ab").parse_variant(item, preset("tiny", vocab_size=65), TrainConfig())


def test_decode_matmul_ab_times_every_mode_in_turn(tmp_path, capsys):
    """benchmarks/decode_matmul_ab.py on a tiny saved GPT-2: a row per decode_matmul mode."""
    import transformers  # in the test extra
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97)).save_pretrained(tmp_path / "hf")
    code = benchmark_script("decode_matmul_ab").main([
        "--weights", str(tmp_path / "hf"), "--prompt-len", "5", "--new", "4", "--repeats", "2"])
    assert code == 0
    out = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): float(ln.split("|")[2].split()[0])
            for ln in out.splitlines() if ln.startswith("| ") and "decode_matmul" not in ln}
    assert set(rows) == {"auto", "native", "xla"} and min(rows.values()) > 0
    assert "floor (weights read once, median)" in out


def test_decode_side_by_side_smoke(tmp_path):
    """benchmarks/decode.py end to end on a tiny saved GPT-2: every case gets both sides
    and a floor read next to each repeat, in the JSON and in the appended table."""
    import transformers  # in the test extra
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97)).save_pretrained(tmp_path / "hf")
    results, out_json = tmp_path / "RESULTS.md", tmp_path / "decode.json"
    code = benchmark_script("decode").main(["--weights", str(tmp_path / "hf"), "--cases", "1:float32",
                                   "2:bfloat16:xla", "--prompt-len", "5", "--new", "4",
                                   "--repeats", "3", "--json", str(out_json),
                                   "--results", str(results)])
    assert code == 0
    report = json.loads(out_json.read_text())
    assert [(r["batch"], r["gptjax_dtype"], r["decode_matmul"]) for r in report["results"]] == [
        (1, "float32", "auto"), (2, "bfloat16", "xla")]
    for r in report["results"]:
        assert r["gptjax"]["ms_per_token"] > 0 and r["transformers_float32"]["ms_per_token"] > 0
        assert r["floor_ms_per_token"] > 0 and r["read_gbs"]["min"] > 0
        assert len(r["vs_floor_per_repeat"]) == 3
        assert r["vs_floor"] == pytest.approx(statistics.median(r["vs_floor_per_repeat"]))
    assert "| 2 | bfloat16 | xla |" in results.read_text()


def test_decode_floor_is_paired_per_repeat():
    """Each repeat's ms/token is divided by the floor read next to it, scaled from the bytes
    the read covered to the bytes a step reads; a drifting floor cancels out."""
    decode = benchmark_script("decode")
    # ms/token 100 then 200 (rest over new - 1 = 9 tokens); the floor drifts the same way.
    out = decode.floor_comparison([(0.5, 0.9), (0.5, 1.8)], floors=[0.010, 0.020],
                                  floor_bytes=100, step_bytes=110, new=10)
    assert out["vs_floor_per_repeat"] == pytest.approx([100 / 11, 200 / 22])
    assert out["vs_floor"] == pytest.approx(100 / 11)
    assert out["floor_ms_per_token"] == pytest.approx(16.5)
    assert out["read_gbs"]["min"] == pytest.approx(100 / 0.020 / 1e9)


def test_host_overhead_smoke(tmp_path):
    """benchmarks/host_overhead.py times the training loop's data path against batches
    already on the device, on the step `gptjax train` compiles, and pairs them per repeat."""
    out_json, results = tmp_path / "host.json", tmp_path / "RESULTS.md"
    code = benchmark_script("host_overhead").main(["--cases", "tiny:4:16", "--steps", "3", "--repeats", "2",
                                          "--json", str(out_json), "--results", str(results)])
    assert code == 0
    (row,) = json.loads(out_json.read_text())["results"]
    for side in ("live", "ready"):
        assert row[side]["ms_per_step"] > 0 and 0 < row[side]["last_dispatch_at"] <= 1
    # ready's data path is a list lookup; live samples, gathers and puts.
    assert row["live"]["host_data_ms"] > 10 * row["ready"]["host_data_ms"] and row["ceiling"] > 0
    assert "| tiny:4:16 |" in results.read_text()


def test_host_overhead_rejects_a_bad_case_before_compiling(capsys):
    with pytest.raises(SystemExit) as exit_:
        benchmark_script("host_overhead").main(["--cases", "tiny:8:16", "tiny:4"])
    assert exit_.value.code == 2 and "bad case 'tiny:4'" in capsys.readouterr().err
