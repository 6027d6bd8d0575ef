"""Where a train step's time goes: a profiler trace of the compiled step, per XLA op.

The step is the one `gptjax train` builds (gptjax.bench.train_step.build_train_step), with one optional
variant in train_step_ab.py's FIELD=VALUE syntax. After warm-up it times `--steps` steps,
then runs as many under `jax.profiler.trace` and reads the trace back
(jax.profiler.ProfileData), so no TensorBoard is needed. Ops are named as in the compiled
HLO, each with a kind read from there (a cuBLAS or cuDNN custom call, a Triton GEMM, a
loop/input/output fusion, a plain dot...) and its output shape, which is usually enough to
say which part of the model it is.

Printed, in ms per step: the wall time untraced and traced, and how much of it some op was
running; per op kind and for the `--top` ops, each op's share of the time ops ran and the
time it was running. The line before the tables says where in the trace the ops were
read. On a GPU ops run one after another on a stream, so share and running time agree,
and the rest of the traced wall is time the device waited; XLA:GPU does not use CUDA
graphs while profiling (unless XLA_FLAGS has
--xla_enable_command_buffers_during_profiling=true), so that wait can be longer than in
the untraced step. XLA:CPU runs
independent ops side by side on the same cores (a weight gradient's product next to the
input gradient's), so there an op's running time includes time the cores spent on its
neighbours, and the share splits each instant evenly among the ops running then: an
estimate of what each op costs, whose total is the time some op ran. `--trace-dir` keeps
the trace for TensorBoard or Perfetto.

    python benchmarks/profile_step.py --case baby:12:64
    python benchmarks/profile_step.py --case gpt2:32:1024 dtype=bfloat16     # on a GPU
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import re
import sys
import tempfile
from pathlib import Path

import jax

from gptjax.bench import provenance
from gptjax.bench import train_step as bench
from gptjax.cpu import host_memory
from gptjax.errors import GptjaxError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step_ab import base_configs, machine_name, parse_variant  # noqa: E402  (shared with the A/B)

# `%name = shape opcode(operands), ..., kind=kLoop, custom_call_target="..."` in HLO text.
_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\(")
_CONTROL_FLOW = {"while", "conditional", "call"}  # their time is their body ops' time


def op_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (kind, output shape) for every instruction of the module."""
    kinds = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        kind = opcode
        if opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            kind = f"custom-call {target.group(1) if target else '?'}"
        elif opcode == "fusion":
            fusion = re.search(r"kind=(k\w+)", line)
            kind = f"fusion {fusion.group(1) if fusion else '?'}"
            backend = re.search(r'"kind":"([^"]+)"', line)  # e.g. __triton_gemm, __cudnn$fusion
            if fusion and fusion.group(1) == "kCustom" and backend:
                kind += f" {backend.group(1)}"
        kinds[name] = (kind, shape)
    return kinds


def load_trace(trace_dir: str, before: set[Path]):
    """The trace `jax.profiler.trace(trace_dir)` wrote (the file not in `before`), as a
    jax.profiler.ProfileData."""
    paths = set(Path(trace_dir).rglob("*.xplane.pb")) - before
    if len(paths) != 1:
        raise GptjaxError(f"expected one new trace file under {trace_dir}, found {len(paths)}")
    return jax.profiler.ProfileData.from_file(str(paths.pop()))


# XLA:GPU annotates each thunk's kernel launches with its op, "Thunk:#hlo_op=fusion.3#",
# under the module's "XlaModule:#hlo_module=...#"; the profiler keeps that on the kernel.
_ANNOTATED_OP = re.compile(r"hlo_op=([\w.\-]+)")
_ANNOTATED_MODULE = re.compile(r"hlo_module=([\w.\-]+)")
_DEVICE_PLANE = re.compile(r"^/device:(GPU|TPU):(\d+)$")


def module_name(hlo_text: str) -> str | None:
    """The module's name from the first line of its HLO text ("HloModule jit_train_step, ...")."""
    m = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
    return m.group(1) if m else None


def op_spans(data, module: str | None = None) -> tuple[list[tuple[str, float, float]], str]:
    """((XLA op, start ns, end ns) for every op of `module` run in a trace, where they were
    read).

    Op names repeat across modules, so an event that names another module (by an
    `hlo_module` stat or in its launch annotation) is skipped and counted, in every layout;
    events that name none are kept, and so is everything when `module` is None.

    A device plane's "XLA Ops" line (TPUs; GPUs when derived lines were added) holds one
    event per op run. Otherwise, on a GPU the first device plane's stream lines hold one
    event per kernel or copy, whose op is its `hlo_op` stat or named in its launch
    annotation; the host's events describe the same work again and are skipped. On CPU
    the executing threads' events carry the op in an `hlo_op` stat; an op that hands its
    work to XLA's thread pool (a plain `dot`, for one) returns at once, and an "end: OP"
    event, matched by correlation id, comes once that work is done (or later: see
    `end_by_consumers`); the op runs until then. Ops can overlap (XLA:CPU runs independent
    ones side by side).
    """
    others = 0

    def elsewhere(stats: dict) -> bool:
        nonlocal others
        own = _annotated(stats, "hlo_module", _ANNOTATED_MODULE)
        if module is not None and own is not None and own != module:
            others += 1
            return True
        return False

    def where(source: str) -> str:
        return source + (f"; {others} events of other modules skipped" if others else "")

    for plane in data.planes:
        for line in plane.lines:
            if line.name == "XLA Ops":
                spans = [(e.name.lstrip("%").split(" ")[0], e.start_ns, e.start_ns + e.duration_ns)
                         for e in line.events if not elsewhere(dict(e.stats))]
                return spans, where(f'{plane.name}, line "XLA Ops"')
    devices = sorted((p for p in data.planes if _DEVICE_PLANE.match(p.name)),
                     key=lambda p: int(_DEVICE_PLANE.match(p.name).group(2)))
    if devices:  # the first device only: several would overlap in time
        spans = _device_kernels(devices[0], elsewhere)
        return spans, where(f"{devices[0].name}, kernels named by their launch annotation")
    started: dict[object, list] = {}  # correlation id (or a unique key) -> [op, start, end]
    ended: dict[object, float] = {}
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                finish = event.start_ns + event.duration_ns
                if "hlo_op" in stats:
                    if not elsewhere(stats):
                        started[stats.get("_p", object())] = [stats["hlo_op"], event.start_ns, finish]
                elif event.name.startswith("end: ") and "_c" in stats:
                    ended[stats["_c"]] = max(finish, ended.get(stats["_c"], finish))
    return ([(op, start, max(finish, ended.get(key, finish)))
             for key, (op, start, finish) in started.items()], where("host threads' hlo_op events"))


def _annotated(stats: dict, key: str, pattern: re.Pattern) -> str | None:
    """A stat's value, else the last `key=...` in any string stat (the launch annotation)."""
    if key in stats:
        return stats[key]
    found = [m for v in stats.values() if isinstance(v, str) for m in pattern.findall(v)]
    return found[-1] if found else None


def _device_kernels(plane, elsewhere) -> list[tuple[str, float, float]]:
    """Spans of the kernels that name an op, except those `elsewhere(stats)` rejects."""
    spans, unnamed = [], 0
    for line in plane.lines:
        for event in line.events:
            stats = dict(event.stats)
            op = _annotated(stats, "hlo_op", _ANNOTATED_OP)
            if op is None:
                unnamed += 1
                continue
            if not elsewhere(stats):
                spans.append((op, event.start_ns, event.start_ns + event.duration_ns))
    if not spans and unnamed:
        names = sorted({k for line in plane.lines for e in line.events for k in dict(e.stats)})
        raise GptjaxError(f"{plane.name}: {unnamed} events, none naming an XLA op (lines "
                          f"{[line.name for line in plane.lines]}, stats {names})")
    return spans


def consumers(hlo_text: str, executed: set[str]) -> dict[str, set[str]]:
    """Op -> the ops in `executed` that read its output, looking through every other
    instruction between them (bitcasts, tuples, get-tuple-elements, which never run).
    Operands are read from `as_text()`'s form, `opcode(%a, %b)`, which names no shapes."""
    users: dict[str, set[str]] = collections.defaultdict(set)
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            operands = line[m.end():].split(")", 1)[0]
            for operand in re.findall(r"%([\w.\-]+)", operands):
                users[operand].add(m.group(1))
    out = {}
    for op in executed:
        found, todo, seen = set(), list(users[op]), set()
        while todo:
            user = todo.pop()
            if user in seen:
                continue
            seen.add(user)
            if user in executed:
                found.add(user)
            else:
                todo.extend(users[user])
        out[op] = found
    return out


def end_by_consumers(spans, hlo_text: str) -> list[tuple[str, float, float]]:
    """`spans` with each op's end moved no later than the first start of an op that reads
    its output. XLA:CPU logs an asynchronous op's "end:" event only after its thread has
    also run the successors it made ready, so that event can come long after the work:
    a LayerNorm's output fusion seemed to run ~15 ms, while the product reading its output
    started 0.4 ms after it did."""
    readers = consumers(hlo_text, {op for op, _, _ in spans})
    starts: dict[str, list[float]] = collections.defaultdict(list)
    for op, start, _ in spans:
        starts[op].append(start)
    for times in starts.values():
        times.sort()
    out = []
    for op, start, end in spans:
        for reader in readers[op]:
            i = bisect.bisect_left(starts[reader], start)
            if i < len(starts[reader]):
                end = min(end, max(start, starts[reader][i]))
        out.append((op, start, end))
    return out


def attribute(spans) -> tuple[dict[str, float], dict[str, float]]:
    """Per op: (its share of the time ops ran, each instant split evenly among the ops
    running then, so the shares add up to the time some op ran; the time it was running).
    """
    timed = [i for i, (_, start, end) in enumerate(spans) if end > start]
    edges = sorted([(spans[i][1], 1, i) for i in timed] + [(spans[i][2], -1, i) for i in timed],
                   key=lambda e: e[:2])
    share: dict[str, float] = collections.defaultdict(float)
    running: dict[str, float] = collections.defaultdict(float)
    for op, start, end in spans:
        running[op] += end - start
        share[op] += 0.0
    active: set[int] = set()
    last = edges[0][0] if edges else 0.0
    for when, change, i in edges:
        for j in active:
            share[spans[j][0]] += (when - last) / len(active)
        last = when
        (active.add if change > 0 else active.discard)(i)
    return dict(share), dict(running)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", nargs="?", default="", help="FIELD=VALUE[,FIELD=VALUE] ('' = as is)")
    ap.add_argument("--case", default="mini:8:256", help="preset:batch:context")
    ap.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's, else 65)")
    ap.add_argument("--steps", type=int, default=5, help="steps traced")
    ap.add_argument("--top", type=int, default=25, help="ops listed")
    ap.add_argument("--trace-dir", help="keep the trace here (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.top < 0:
        raise GptjaxError("--steps must be >= 1 and --top >= 0")
    host_memory.keep_freed_memory()  # as `gptjax train` does; before JAX's runtime starts
    model_cfg, train_cfg, options = parse_variant(args.variant, *base_configs(args.case, args.vocab))
    if options:  # the profile reads one compiled module
        raise GptjaxError(f"profile_step profiles the step as training jits it; "
                          f"{', '.join(options)} is for train_step_ab.py")
    step = bench.build_train_step(model_cfg, train_cfg)
    hlo = step.step.as_text()
    kinds = op_kinds(hlo)
    batches = [step.put(b) for b in bench.random_batches(4, train_cfg.batch_size,
                                                         model_cfg.context_length, model_cfg.vocab_size)]
    state = step.init_state()
    _, state, _ = bench.time_steps(step, state, batches, 3)  # warm-up
    wall, state, _ = bench.time_steps(step, state, batches, args.steps)
    with contextlib.ExitStack() as stack:
        trace_dir = args.trace_dir or stack.enter_context(tempfile.TemporaryDirectory())
        before = set(Path(trace_dir).rglob("*.xplane.pb"))
        with bench.no_compiles("the traced train steps"), jax.profiler.trace(trace_dir):
            traced, _, _ = bench.time_steps(step, state, batches, args.steps)
        spans, source = op_spans(load_trace(trace_dir, before), module_name(hlo))
    spans = [s for s in end_by_consumers(spans, hlo)
             if kinds.get(s[0], ("",))[0] not in _CONTROL_FLOW]
    share, running = attribute(spans)
    busy = sum(share.values())
    if busy <= 0:
        raise GptjaxError(f"the trace holds no timed XLA op events (read from: {source})")
    print(f"case {args.case} {args.variant or '(as is)'}, {args.steps} steps traced, "
          f"{step.attention} attention; {machine_name(provenance.machine_info())}, jax {jax.__version__}")
    print(f"ops read from: {source}")
    print(f"wall ms/step: {1000 * wall / args.steps:.2f} untraced, {1000 * traced / args.steps:.2f} "
          f"traced, of which some op ran {busy / 1e6 / args.steps:.2f}")
    report(kinds, {op: ns / 1e6 / args.steps for op, ns in share.items()},
           {op: ns / 1e6 / args.steps for op, ns in running.items()}, args.top)


def report(kinds: dict, share: dict[str, float], running: dict[str, float], top: int) -> None:
    """Markdown tables of time per op kind and of the `top` ops, in ms per step: each op's
    share of the time ops ran (overlapping ops split it) and the time it was running."""
    busy = sum(share.values())
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for op in share:
        kind = kinds.get(op, ("(not in the HLO)", ""))[0]
        by_kind[kind][0] += share[op]
        by_kind[kind][1] += running[op]
    print("\n| kind | share ms/step | % of op time | running ms/step |\n|---|---|---|---|")
    for kind, (ms, run_ms) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"| {kind} | {ms:.3f} | {ms / busy:.1%} | {run_ms:.3f} |")
    if top:
        print("\n| op | kind | output | share ms/step | % | running ms/step |\n|---|---|---|---|---|---|")
    for op, ms in sorted(share.items(), key=lambda kv: -kv[1])[:top]:
        kind, shape = kinds.get(op, ("(not in the HLO)", ""))
        print(f"| {op} | {kind} | {shape[:60]} | {ms:.3f} | {ms / busy:.1%} | {running[op]:.3f} |")


if __name__ == "__main__":
    try:
        main()
    except GptjaxError as e:
        raise SystemExit(f"profile_step: error: {e}") from None
