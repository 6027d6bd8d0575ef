"""`gptjax bench` smoke run (seconds, tiny preset), the recompile guard, bad flags, and a
smoke run of the PyTorch side-by-side. Speed is never asserted here: only that the
benchmarks run and report sane, complete results."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import statistics

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, run_cli
from gptjax import bench, native
from gptjax.bench import RecompileError, no_compiles
from gptjax.config import TrainConfig, preset
from gptjax.errors import GptjaxError


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_auto_attention() -> str:
    """What attention_impl="auto" is on this CPU (gptjax.attention.resolve_impl's rule)."""
    return "native" if native.available() and jax.device_count() == 1 else "blocked"


def test_bench_smoke_writes_json_and_appends_the_table(capsys, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# earlier results\n")
    out_json = tmp_path / "bench.json"
    code, out, err = run_cli(capsys, "bench", "--preset", "tiny", "--batch", "2", "--steps", "2",
                             "--repeats", "1", "--warmup", "1", "--decode", "--decode-new", "3",
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
    (["--batch", "12,x"], "comma-separated integers"),
    (["--context", "0"], "--context values must be positive"),
    (["--preset", "tiny,nope"], "unknown preset 'nope'"),
    (["--zip", "--preset", "tiny,baby", "--batch", "1,2,3"], "equal lengths"),
    (["--dtype", "float16"], "invalid choice"),
    (["--preset", "tiny", "--decode", "--decode-prompt", "30", "--decode-new", "10"],
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
    script = _script("train_throughput")
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
    ab = _script("train_step_ab")
    ab.main(["--case", "tiny:2:16", "--steps", "1", "--repeats", "2", "", "remat=full,lr=0.01"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ")][1:]
    assert [r[0] for r in rows] == ["| (as is)", "| remat=full,lr=0.01"]
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


@pytest.mark.parametrize("item,message", [
    ("bogus=1", "expected FIELD=VALUE"), ("remat=foo", "model.remat must be one of"),
    ("n_layer=x", "n_layer takes int values")])
def test_variant_ab_rejects_bad_items(item, message):
    with pytest.raises(GptjaxError, match=message):
        _script("train_step_ab").parse_variant(item, preset("tiny", vocab_size=65), TrainConfig())


def test_decode_side_by_side_smoke(tmp_path):
    """benchmarks/decode.py end to end on a tiny saved GPT-2: every case gets both sides
    and a floor read next to each repeat, in the JSON and in the appended table."""
    import transformers  # in the test extra
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97)).save_pretrained(tmp_path / "hf")
    results, out_json = tmp_path / "RESULTS.md", tmp_path / "decode.json"
    code = _script("decode").main(["--weights", str(tmp_path / "hf"), "--cases", "1:float32",
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
    decode = _script("decode")
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
    code = _script("host_overhead").main(["--cases", "tiny:4:16", "--steps", "3", "--repeats", "2",
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
        _script("host_overhead").main(["--cases", "tiny:8:16", "tiny:4"])
    assert exit_.value.code == 2 and "bad case 'tiny:4'" in capsys.readouterr().err


def _xspace(planes: list[tuple[str, list[tuple[str, list[tuple]]]]]):
    """A jax.profiler.ProfileData from planes of lines of events (name, start ns, duration
    ns, {stat: int or str}), written as the XSpace text proto the profiler's format takes."""
    from jax.profiler import ProfileData
    out, names, stat_ids = [], {}, {}
    for p, (plane_name, lines) in enumerate(planes):
        body = []
        for l, (line_name, events) in enumerate(lines):
            evs = []
            for name, start, duration, stats in events:
                meta = names.setdefault((p, name), len(names) + 1)
                st = " ".join(
                    f'stats {{ metadata_id: {stat_ids.setdefault(k, len(stat_ids) + 1)} '
                    + (f'str_value: "{v}"' if isinstance(v, str) else f"uint64_value: {v}") + " }"
                    for k, v in stats.items())
                evs.append(f"events {{ metadata_id: {meta} offset_ps: {start * 1000} "
                           f"duration_ps: {duration * 1000} {st} }}")
            body.append(f'lines {{ id: {l + 1} name: "{line_name}" timestamp_ns: 0 {" ".join(evs)} }}')
        body += [f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
                 for (q, n), i in names.items() if q == p]
        body += [f'stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
                 for n, i in stat_ids.items()]
        out.append(f'planes {{ id: {p + 1} name: "{plane_name}" {" ".join(body)} }}')
    return ProfileData.from_text_proto("\n".join(out))


def test_profile_reads_gpu_ops_from_an_xla_ops_line_where_there_is_one():
    """A derived "XLA Ops" line is the record; streams and host events repeat it."""
    data = _xspace([
        ("/device:GPU:0", [("XLA Ops", [("fusion.1", 0, 5000, {}), ("custom-call.2", 6000, 2000, {})]),
                           ("Stream #7", [("fusion.1", 0, 5000, {})])]),
        ("/host:CPU", [("launcher", [("fusion.1", 0, 10, {"hlo_op": "fusion.1"})])])])
    spans, source = _script("profile_step").op_spans(data)
    assert sorted(spans) == [("custom-call.2", 6000, 8000), ("fusion.1", 0, 5000)]
    assert "XLA Ops" in source


def test_profile_reads_gpu_kernels_by_their_launch_annotation_on_the_first_device():
    """A raw GPU trace: kernels on stream lines carry their thunk's annotation; the host's
    events and a second GPU's kernels are not the first device's time."""
    annotation = "XlaModule:#hlo_module=jit_train_step,program_id=3#::Thunk:#hlo_op=fusion.{}#"
    data = _xspace([
        ("/host:CPU", [("launcher", [("fusion.1", 0, 10, {"hlo_op": "fusion.1"})])]),
        ("/device:GPU:1", [("Stream #9", [("loop_fusion", 0, 900, {"annotation": annotation.format(1)})])]),
        ("/device:GPU:0", [
            ("Stream #7", [("loop_fusion", 0, 300, {"annotation": annotation.format(1)}),
                           ("loop_fusion", 400, 100, {"annotation": annotation.format(1)}),
                           ("sm90_gemm", 600, 700, {"hlo_op": "custom-call.2"}),
                           ("memset", 1400, 5, {})]),
            ("Stream #8", [("loop_fusion", 1500, 50, {"annotation": annotation.format(4)})])])])
    spans, source = _script("profile_step").op_spans(data)
    assert sorted(spans) == [("custom-call.2", 600, 1300), ("fusion.1", 0, 300),
                             ("fusion.1", 400, 500), ("fusion.4", 1500, 1550)]
    assert source.startswith("/device:GPU:0")


def test_profile_says_what_a_gpu_trace_holds_when_no_kernel_names_an_op():
    data = _xspace([("/device:GPU:0", [("Stream #7", [("kernel", 0, 300, {"correlation_id": 5})])])])
    with pytest.raises(GptjaxError, match=r"1 events, none naming an XLA op .*Stream #7.*correlation_id"):
        _script("profile_step").op_spans(data)


def test_profile_runs_a_cpu_op_until_its_end_event():
    """A CPU op that hands its work to the thread pool returns at once; its "end:" event,
    matched by correlation id, says when the work was done. Ids are unique over steps."""
    data = _xspace([("/host:CPU", [
        ("worker/1", [("dot.3", 0, 100, {"hlo_op": "dot.3", "_p": 7}),
                      ("fusion.4", 200, 300, {"hlo_op": "fusion.4", "_p": 8}),
                      ("end: dot.3", 9000, 50, {"_c": 7}),
                      ("dot.3", 20_000, 100, {"hlo_op": "dot.3", "_p": 9}),
                      ("end: dot.3", 25_000, 0, {"_c": 9}),
                      ("end: gone.5", 26_000, 0, {"_c": 99})]),  # its op began before the trace
        ("worker/2", [("ThreadpoolListener::Record", 10, 0, {"_p": 99}),
                      ("copy.6", 30_000, 40, {"hlo_op": "copy.6"})])])])  # no correlation id
    spans, _ = _script("profile_step").op_spans(data)
    assert sorted(spans) == [("copy.6", 30_000, 30_040), ("dot.3", 0, 9050), ("dot.3", 20_000, 25_000),
                             ("fusion.4", 200, 500)]


def test_profile_splits_overlapping_time_evenly_and_counts_each_instant_once():
    share, running = _script("profile_step").attribute(
        [("c", 0, 0), ("a", 0, 10), ("b", 5, 15), ("a", 20, 22), ("d", 21, 21)])
    # A zero-length span (first, and inside another) takes no time from the others.
    assert share == pytest.approx({"a": 5 + 2.5 + 2, "b": 2.5 + 5, "c": 0, "d": 0})
    assert sum(share.values()) == pytest.approx(17)  # the union: 0-15 and 20-22
    assert running == {"a": 12, "b": 10, "c": 0, "d": 0}


def test_profile_names_each_op_kind_from_the_hlo():
    hlo = """
  %fusion.9 = bf16[16,1024,768]{2,1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.9
  %gemm_fusion.2 = bf16[768,2304]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  ROOT %custom-call.5 = (bf16[16,1024,12,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", api_version=API_VERSION_TYPED_FFI
  %dot.78 = f32[384,1536]{1,0} dot(%x, %y), lhs_contracting_dims={0}, rhs_contracting_dims={0}
"""
    kinds = _script("profile_step").op_kinds(hlo)
    assert kinds["fusion.9"] == ("fusion kLoop", "bf16[16,1024,768]{2,1,0}")
    assert kinds["gemm_fusion.2"][0] == "fusion kCustom __triton_gemm"
    assert kinds["custom-call.5"][0] == "custom-call __cudnn$fmhaSoftmax"
    assert kinds["dot.78"] == ("dot", "f32[384,1536]{1,0}")


def test_profile_smoke_accounts_for_a_real_step(capsys):
    """benchmarks/profile_step.py on a real (tiny) step: every op it lists is in the
    compiled HLO, the step's products are among them, and the time some op ran is no more
    than the traced wall time."""
    _script("profile_step").main(["--case", "tiny:2:16", "--steps", "2", "--top", "50"])
    out = capsys.readouterr().out
    traced, busy = (float(x) for x in re.search(r"([\d.]+) traced, of which some op ran ([\d.]+)", out).groups())
    assert 0 < busy <= traced
    assert "ops read from: host threads' hlo_op events" in out
    kind_rows = [line.split(" | ") for line in out.split("| kind |")[1].split("\n\n")[0].splitlines()[2:]]
    kinds = [row[0][2:] for row in kind_rows]
    assert "(not in the HLO)" not in kinds and any("dot" in k or "ynn" in k for k in kinds)
    # The kinds' shares are the busy time split up; no op's share exceeds its running time.
    assert sum(float(row[1]) for row in kind_rows) == pytest.approx(busy, rel=0.01, abs=0.01)
    op_rows = [line.split(" | ") for line in out.split("| op |")[1].strip().splitlines()[2:]]
    shares = [float(row[3]) for row in op_rows]
    assert shares == sorted(shares, reverse=True)
    assert all(float(row[3]) <= float(row[5].rstrip(" |")) + 1e-3 for row in op_rows)


def test_profile_ends_an_op_where_a_reader_of_its_output_starts():
    """An XLA:CPU "end:" event can come long after the op's work (its thread first runs the
    successors it made ready); the first start of an op reading the output bounds it,
    looking through instructions that never run (a bitcast here)."""
    hlo = """
  %ln_fusion.1 = f32[8,384]{1,0} fusion(%x), kind=kLoop, calls=%f1
  %bitcast.2 = f32[2,4,384]{2,1,0} bitcast(%ln_fusion.1)
  %ynn_fusion.3 = f32[2,4,1152]{2,1,0} fusion(%bitcast.2, %w), kind=kCustom, calls=%f3
  %dot.4 = f32[384,384]{1,0} dot(%a, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}
"""
    ps = _script("profile_step")
    spans = [("ln_fusion.1", 0, 15_000), ("ynn_fusion.3", 400, 14_000), ("dot.4", 100, 9_000),
             ("ln_fusion.1", 20_000, 20_300), ("ynn_fusion.3", 20_500, 30_000)]
    assert ps.consumers(hlo, {"ln_fusion.1", "ynn_fusion.3", "dot.4"}) == {
        "ln_fusion.1": {"ynn_fusion.3"}, "ynn_fusion.3": set(), "dot.4": set()}
    assert ps.end_by_consumers(spans, hlo) == [
        ("ln_fusion.1", 0, 400), ("ynn_fusion.3", 400, 14_000), ("dot.4", 100, 9_000),
        ("ln_fusion.1", 20_000, 20_300), ("ynn_fusion.3", 20_500, 30_000)]
