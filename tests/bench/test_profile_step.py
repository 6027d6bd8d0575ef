"""benchmarks/profile_step.py: reading jax.profiler traces (GPU and CPU layouts, built here
as XSpace text protos), bounding ops by their readers, splitting overlapped time, naming op
kinds from HLO text, and a smoke run on a real step."""

from __future__ import annotations

import re

import pytest
from conftest import benchmark_script

from gptjax.errors import GptjaxError


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
        ("/device:GPU:0", [("XLA Ops", [("fusion.1", 0, 5000, {}), ("custom-call.2", 6000, 2000, {}),
                                        ("fusion.1", 9000, 100, {"hlo_module": "jit_init"})]),
                           ("Stream #7", [("fusion.1", 0, 5000, {})])]),
        ("/host:CPU", [("launcher", [("fusion.1", 0, 10, {"hlo_op": "fusion.1"})])])])
    spans, source = benchmark_script("profile_step").op_spans(data, "jit_train_step")
    assert sorted(spans) == [("custom-call.2", 6000, 8000), ("fusion.1", 0, 5000)]
    assert source == '/device:GPU:0, line "XLA Ops"; 1 events of other modules skipped'


def test_profile_reads_gpu_kernels_by_their_launch_annotation_on_the_first_device():
    """A raw GPU trace: kernels on stream lines carry their thunk's annotation; the host's
    events, a second GPU's kernels and other modules' kernels (whose op names repeat the
    step's) are not the step's time on the first device."""
    annotation = "XlaModule:#hlo_module=jit_train_step,program_id=3#::Thunk:#hlo_op=fusion.{}#"
    other_module = "XlaModule:#hlo_module=jit_sample,program_id=4#::Thunk:#hlo_op=fusion.1#"
    data = _xspace([
        ("/host:CPU", [("launcher", [("fusion.1", 0, 10, {"hlo_op": "fusion.1"})])]),
        ("/device:GPU:1", [("Stream #9", [("loop_fusion", 0, 900, {"annotation": annotation.format(1)})])]),
        ("/device:GPU:0", [
            ("Stream #7", [("loop_fusion", 0, 300, {"annotation": annotation.format(1)}),
                           ("loop_fusion", 400, 100, {"annotation": annotation.format(1)}),
                           ("sm90_gemm", 600, 700, {"hlo_op": "custom-call.2"}),
                           ("memset", 1400, 5, {})]),
            ("Stream #8", [("loop_fusion", 1500, 50, {"annotation": annotation.format(4)}),
                           ("loop_fusion", 1600, 80, {"annotation": other_module}),
                           ("rng", 1700, 20, {"hlo_op": "fusion.1", "hlo_module": "jit_init"})])])])
    profile_step = benchmark_script("profile_step")
    spans, source = profile_step.op_spans(data, "jit_train_step")
    assert sorted(spans) == [("custom-call.2", 600, 1300), ("fusion.1", 0, 300),
                             ("fusion.1", 400, 500), ("fusion.4", 1500, 1550)]
    assert source.startswith("/device:GPU:0") and "2 events of other modules skipped" in source
    everything, _ = profile_step.op_spans(data)  # no module given: every named kernel
    assert len(everything) == len(spans) + 2
    assert profile_step.module_name("HloModule jit_train_step, is_scheduled=true\n") == "jit_train_step"


def test_profile_says_what_a_gpu_trace_holds_when_no_kernel_names_an_op():
    data = _xspace([("/device:GPU:0", [("Stream #7", [("kernel", 0, 300, {"correlation_id": 5})])])])
    with pytest.raises(GptjaxError, match=r"1 events, none naming an XLA op .*Stream #7.*correlation_id"):
        benchmark_script("profile_step").op_spans(data)


def test_profile_runs_a_cpu_op_until_its_end_event():
    """A CPU op that hands its work to the thread pool returns at once; its "end:" event,
    matched by correlation id, says when the work was done. Ids are unique over steps.
    Another module's op of the same name is not the step's."""
    data = _xspace([("/host:CPU", [
        ("worker/1", [("dot.3", 0, 100, {"hlo_op": "dot.3", "_p": 7, "hlo_module": "jit_train_step"}),
                      ("fusion.4", 200, 300, {"hlo_op": "fusion.4", "_p": 8}),
                      ("end: dot.3", 9000, 50, {"_c": 7}),
                      ("dot.3", 20_000, 100, {"hlo_op": "dot.3", "_p": 9}),
                      ("end: dot.3", 25_000, 0, {"_c": 9}),
                      ("end: gone.5", 26_000, 0, {"_c": 99})]),  # its op began before the trace
        ("worker/2", [("ThreadpoolListener::Record", 10, 0, {"_p": 99}),
                      ("copy.6", 30_000, 40, {"hlo_op": "copy.6"}),  # no correlation id
                      ("fusion.4", 40_000, 90, {"hlo_op": "fusion.4", "_p": 11,
                                                "hlo_module": "jit_init"})])])])
    spans, source = benchmark_script("profile_step").op_spans(data, "jit_train_step")
    assert sorted(spans) == [("copy.6", 30_000, 30_040), ("dot.3", 0, 9050), ("dot.3", 20_000, 25_000),
                             ("fusion.4", 200, 500)]
    assert source == "host threads' hlo_op events; 1 events of other modules skipped"


def test_profile_splits_overlapping_time_evenly_and_counts_each_instant_once():
    share, running = benchmark_script("profile_step").attribute(
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
    kinds = benchmark_script("profile_step").op_kinds(hlo)
    assert kinds["fusion.9"] == ("fusion kLoop", "bf16[16,1024,768]{2,1,0}")
    assert kinds["gemm_fusion.2"][0] == "fusion kCustom __triton_gemm"
    assert kinds["custom-call.5"][0] == "custom-call __cudnn$fmhaSoftmax"
    assert kinds["dot.78"] == ("dot", "f32[384,1536]{1,0}")


def test_profile_smoke_accounts_for_a_real_step(capsys):
    """benchmarks/profile_step.py on a real (tiny) step: every op it lists is in the
    compiled HLO, the step's products are among them, and the time some op ran is no more
    than the traced wall time."""
    benchmark_script("profile_step").main(["--case", "tiny:2:16", "--steps", "2", "--top", "50"])
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


def test_profile_refuses_a_step_jitted_other_than_training_jits_it():
    with pytest.raises(GptjaxError, match="fused_update is for train_step_ab.py"):
        benchmark_script("profile_step").main(["--case", "tiny:2:16", "fused_update=0"])


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
    ps = benchmark_script("profile_step")
    spans = [("ln_fusion.1", 0, 15_000), ("ynn_fusion.3", 400, 14_000), ("dot.4", 100, 9_000),
             ("ln_fusion.1", 20_000, 20_300), ("ynn_fusion.3", 20_500, 30_000)]
    assert ps.consumers(hlo, {"ln_fusion.1", "ynn_fusion.3", "dot.4"}) == {
        "ln_fusion.1": {"ynn_fusion.3"}, "ynn_fusion.3": set(), "dot.4": set()}
    assert ps.end_by_consumers(spans, hlo) == [
        ("ln_fusion.1", 0, 400), ("ynn_fusion.3", 400, 14_000), ("dot.4", 100, 9_000),
        ("ln_fusion.1", 20_000, 20_300), ("ynn_fusion.3", 20_500, 30_000)]
