"""Train-step throughput: gptjax against the plain PyTorch eager reference, side by side.

Both sides get the same model config (benchmarks/torch_gpt.py mirrors gptjax's
architecture, init and optimizer), the same batches (WindowSampler windows of one random
token array, built once as numpy and handed to both), float32, and the same thread count
(XLA:CPU sizes its pool to the usable cores; torch.set_num_threads is set to that), and
one allocator policy, set per process before either runtime starts: freed host memory
kept, as in `gptjax train` (gptjax/cpu/host_memory.py), or with --system-malloc glibc's default.
Each side's step is a whole optimizer step: forward, backward, global-norm clipping,
AdamW with the warmup-cosine learning rate (torch: zero_grad included; no torch.compile).

Protocol (as `gptjax bench`, GUIDE.md §5): warm-up steps for both, then `--repeats`
repeats; in each, gptjax dispatches `--steps` steps back to back and blocks once at the
end, then torch runs the same number of steps (the order alternates between repeats so
drift on a shared machine hits both alike). No JAX trace or compile may happen while the
repeats run (asserted). Both sides live in this process by default; with --isolate each
runs in its own worker process, driven alternately, so neither shares threads, allocator
or caches with the other. Checked on the 2-core machine: after a repeat neither runtime's
threads burn measurable CPU (< 10 ms in the next 50 ms), and in-process and isolated runs
agreed within the noise, so one process is the default.

Load from other work matters far more, and not evenly: with a core taken by another
process, torch's two OpenMP threads wait on each other at every parallel region (measured:
baby 75 ms/step with 1 thread, 0.2-2.4 s/step with 2), while XLA's pool degrades gently.
Ratios taken under load overstate gptjax; the script records the load average and each
side's cores busy per repeat, and warns when the machine is busy at the start.

The reported ratio is the median over repeats of gptjax tokens/s divided by torch
tokens/s in the same repeat. gptjax's achieved FLOP/s (PaLM formula) is also given as a
fraction of the float32 matmul rate measured in the same run (the better of a
measurement before and one after the cases). PyTorch's own matmul rate is measured the same
way and reported beside it: the two libraries need not reach the same rate on one CPU.

    python benchmarks/train_throughput.py                       # the issue's CPU cases
    python benchmarks/train_throughput.py --cases tiny:4:32 --repeats 2 --steps 2
    python benchmarks/train_throughput.py --results benchmarks/RESULTS.md   # append the table
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from gptjax import model
from gptjax.bench import provenance
from gptjax.bench import train_step as bench
from gptjax.config import TrainConfig, preset
from gptjax.cpu import host_memory
from gptjax.errors import GptjaxError
from gptjax.training.metrics import MFU_FORMULA, flops_per_token, matmul_rate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch_gpt  # noqa: E402  (the reference lives next to this script)
from throughput_table import markdown  # noqa: E402

# preset:batch:context. nanoGPT's CPU "baby" config and the ~10M config of the issue.
DEFAULT_CASES = ["baby:12:64", "mini:8:256"]
# The CPU targets for exactly these cases (float32, vocab 65).
TARGETS = {("baby", 12, 64): {"ratio": 1.25},
           ("mini", 8, 256): {"ratio": 1.25, "matmul_fraction": 0.70}}


class TorchSide:
    """The reference model, its optimizer and the torch copies of the shared batches."""

    def __init__(self, model_cfg, train_cfg, host_batches, seed: int = 0):
        torch.manual_seed(seed)
        self.model = torch_gpt.TorchGPT(model_cfg)
        self.opt = torch_gpt.optimizer(self.model, train_cfg)
        self.train_cfg = train_cfg
        self.batches = [(torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long())
                        for b in host_batches]
        self.step_index = 0
        self.last_loss = float("nan")
        self.cpu_seconds = []
        self.info = {"params": sum(p.numel() for p in self.model.parameters())}

    def run(self, steps: int) -> float:
        """Seconds for `steps` optimizer steps (eager CPU torch is synchronous: no sync needed)."""
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss = None
        for _ in range(steps):
            i = self.step_index
            loss = torch_gpt.train_step(self.model, self.opt, i, self.train_cfg,
                                        *self.batches[i % len(self.batches)])
            self.step_index += 1
        elapsed = time.perf_counter() - t0
        self.cpu_seconds.append(time.process_time() - cpu0)
        if loss is not None:
            self.last_loss = float(loss)
        return elapsed

    def begin_timed(self) -> None:
        self.cpu_seconds = []

    def end_timed(self) -> dict:
        return {"last_loss": self.last_loss, "cpu_seconds": self.cpu_seconds}


class JaxSide:
    """gptjax's compiled train step, its state and the device copies of the shared batches."""

    def __init__(self, model_cfg, train_cfg, host_batches):
        self.bench = bench.build_train_step(model_cfg, train_cfg)
        self.batches = [self.bench.put(b) for b in host_batches]
        self.state = self.bench.init_state()
        self.metrics = None
        self.guard = None
        self.cpu_seconds = []
        self.info = {"params": model.param_count(model_cfg),
                     "compile_seconds": self.bench.lower_seconds + self.bench.compile_seconds}

    def run(self, steps: int) -> float:
        cpu0 = time.process_time()
        elapsed, self.state, self.metrics = bench.time_steps(self.bench, self.state, self.batches, steps)
        self.cpu_seconds.append(time.process_time() - cpu0)
        return elapsed

    def begin_timed(self) -> None:
        """From here until end_timed, any JAX trace or compile is an error."""
        self.cpu_seconds = []
        self.guard = bench.no_compiles("the timed repeats")
        self.guard_state = self.guard.__enter__()

    def end_timed(self) -> dict:
        self.guard.__exit__(None, None, None)  # raises RecompileError if anything compiled
        return {"last_loss": float(self.metrics["loss"]),  # read after the timed region
                "no_recompile_guard": self.guard_state.summary(), "cpu_seconds": self.cpu_seconds}


SIDES = {"gptjax": JaxSide, "torch": TorchSide}


class WorkerSide:
    """A side in its own Python process (--isolate), driven over stdin/stdout one line at a
    time: idle while the other side runs, sharing no threads, allocator or caches with it."""

    def __init__(self, kind: str, case: dict):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind, "--worker-case", json.dumps(case)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._reply()

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(WORKER_PREFIX):
                reply = json.loads(line[len(WORKER_PREFIX):])
                if "error" in reply:
                    raise RuntimeError(f"worker failed: {reply['error']}")
                return reply
        raise RuntimeError(f"worker exited ({self.proc.wait()}) without replying")

    def _ask(self, *words) -> dict:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def run(self, steps: int) -> float:
        return self._ask("run", steps)["seconds"]

    def begin_timed(self) -> None:
        self._ask("begin")

    def end_timed(self) -> dict:
        out = self._ask("end")
        self.proc.stdin.close()
        self.proc.wait()
        return out


WORKER_PREFIX = "@@worker "


def worker(kind: str, case: dict) -> int:
    """The --isolate child: build one side, then serve run/begin/end requests."""
    def say(obj):
        print(WORKER_PREFIX + json.dumps(obj), flush=True)

    try:
        torch.set_num_threads(case["threads"])
        m, t, host_batches = case_setup(case)
        side = SIDES[kind](m, t, host_batches)
        say(side.info)
        for line in sys.stdin:
            cmd, *rest = line.split()
            if cmd == "run":
                say({"seconds": side.run(int(rest[0]))})
            elif cmd == "begin":
                side.begin_timed()
                say({})
            elif cmd == "end":
                say(side.end_timed())
                return 0
    except Exception as e:  # reported to the parent, which stops with it
        say({"error": f"{type(e).__name__}: {e}"})
        return 1
    return 0


def case_setup(case: dict):
    """Model config, train config and host batches of a case: identical in every process."""
    m = preset(case["preset"], vocab_size=case["vocab"], context_length=case["context"])
    t = TrainConfig(batch_size=case["batch"], seed=0)
    host_batches = bench.random_batches(case["batches"], case["batch"], case["context"],
                                        case["vocab"], seed=0)
    return m, t, host_batches


def run_case(name: str, batch: int, context: int, args) -> dict:
    case = {"preset": name, "batch": batch, "context": context, "vocab": args.vocab,
            "batches": args.batches, "threads": args.threads, "system_malloc": args.system_malloc}
    if args.isolate:
        jx, th = WorkerSide("gptjax", case), WorkerSide("torch", case)
        m = case_setup(case)[0]
    else:
        m, t, host_batches = case_setup(case)
        jx, th = JaxSide(m, t, host_batches), TorchSide(m, t, host_batches)
    if th.info["params"] != jx.info["params"]:
        raise SystemExit(f"{name}: torch reference has {th.info['params']:,} parameters, "
                         f"gptjax {jx.info['params']:,}")

    # Warm-up (both compiled or built already; first runs touch fresh buffers) and step count.
    per_step = max(jx.run(args.warmup), th.run(args.warmup)) / args.warmup
    steps = args.steps or max(3, math.ceil(args.repeat_seconds / per_step))
    times = {jx: [], th: []}
    jx.begin_timed()
    th.begin_timed()
    for r in range(args.repeats):
        for side in ((jx, th) if r % 2 == 0 else (th, jx)):
            times[side].append(side.run(steps))
    jax_end, torch_end = jx.end_timed(), th.end_timed()
    tokens = batch * context * steps
    jax_tok = [tokens / s for s in times[jx]]
    torch_tok = [tokens / s for s in times[th]]
    fpt = flops_per_token(m, model.param_count(m, exclude_position=True))
    row = {"case": f"{name}:{batch}:{context}", "preset": name, "batch": batch, "context": context,
           "n_layer": m.n_layer, "n_head": m.n_head, "d_model": m.d_model, "vocab": m.vocab_size,
           "params": jx.info["params"], "flops_per_token": fpt, "steps_per_repeat": steps,
           "repeats": args.repeats, "warmup_steps": args.warmup,
           "processes": "one process per side" if args.isolate else "both in one process",
           "gptjax": {"tokens_per_s": bench.median_min_max(jax_tok),
                      "ms_per_step": 1000 * statistics.median(times[jx]) / steps,
                      "flops_per_s": statistics.median(jax_tok) * fpt, "repeat_seconds": times[jx],
                      "compile_seconds": jx.info["compile_seconds"],
                      "cpu_per_wall": _cpu_per_wall(jax_end["cpu_seconds"], times[jx]),
                      "last_loss": jax_end["last_loss"]},
           "torch": {"tokens_per_s": bench.median_min_max(torch_tok),
                     "ms_per_step": 1000 * statistics.median(times[th]) / steps,
                     "flops_per_s": statistics.median(torch_tok) * fpt,
                     "repeat_seconds": times[th], "last_loss": torch_end["last_loss"],
                     "cpu_per_wall": _cpu_per_wall(torch_end["cpu_seconds"], times[th])},
           "ratio": bench.median_min_max(a / b for a, b in zip(jax_tok, torch_tok)),
           "ratio_of_medians": statistics.median(jax_tok) / statistics.median(torch_tok),
           "no_recompile_guard": jax_end["no_recompile_guard"]}
    row["targets"] = TARGETS.get((name, batch, context)) if args.vocab == 65 else None
    return row


def _set_host_memory(system_malloc: bool) -> None:
    """The same allocator policy for both sides (and every worker), set before JAX starts."""
    if not system_malloc and (state := host_memory.keep_freed_memory()) != host_memory.KEPT:
        print(f"note: freed host memory not kept: {state}", file=sys.stderr)


def _cpu_per_wall(cpu: list[float], wall: list[float]) -> float:
    """Median cores busy during a repeat: below the thread count when the machine is shared."""
    return statistics.median(c / w for c, w in zip(cpu, wall))


def torch_matmul_flops(n: int = 1024) -> float:
    """PyTorch's own float32 matmul rate, measured as `measure_matmul_flops` measures XLA's:
    the two libraries need not reach the same rate on one CPU (MKL on AMD, for one)."""
    a = torch.ones(n, n)
    return matmul_rate(lambda: a @ a, n)


def finish(rows: list[dict], peak: float) -> None:
    """Fractions of the final matmul rate, and the targets' verdicts."""
    for row in rows:
        row["gptjax"]["matmul_fraction"] = row["gptjax"]["flops_per_s"] / peak
        row["torch"]["matmul_fraction"] = row["torch"]["flops_per_s"] / peak
        targets = row["targets"] or {}
        verdicts = {}
        if "ratio" in targets:
            verdicts["ratio"] = row["ratio"]["median"] >= targets["ratio"]
        if "matmul_fraction" in targets:
            verdicts["matmul_fraction"] = row["gptjax"]["matmul_fraction"] >= targets["matmul_fraction"]
        row["met"] = verdicts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="PRESET:BATCH:CONTEXT")
    ap.add_argument("--vocab", type=int, default=65,
                    help="vocabulary size (default: 65, nanoGPT's shakespeare_char)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per side (default: 5)")
    ap.add_argument("--steps", type=int, help="steps per repeat (default: enough for "
                    "--repeat-seconds)")
    ap.add_argument("--repeat-seconds", type=float, default=2.0,
                    help="target length of one side's repeat when --steps is not given")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    ap.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    ap.add_argument("--threads", type=int, default=provenance.usable_cores(),
                    help="torch threads (default: the usable cores, as XLA:CPU uses)")
    ap.add_argument("--isolate", action="store_true", help="run each side in its own worker "
                    "process (still alternating) instead of both in this one")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's allocator as it is (default: both sides keep freed host "
                    "memory, as `gptjax train` does; see gptjax/cpu/host_memory.py)")
    ap.add_argument("--worker", choices=sorted(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--worker-case", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="write the full results here")
    ap.add_argument("--results", type=Path, help="append the markdown table to this file "
                    "(e.g. benchmarks/RESULTS.md); default: print only")
    args = ap.parse_args(argv)
    if args.worker:
        case = json.loads(args.worker_case)
        _set_host_memory(case["system_malloc"])
        return worker(args.worker, case)
    _set_host_memory(args.system_malloc)
    if args.repeats < 1 or args.warmup < 1 or (args.steps is not None and args.steps < 1):
        ap.error("--repeats, --warmup and --steps must be positive")
    if args.repeats < 5:
        print(f"note: {args.repeats} repeat(s); the protocol asks for >= 5", file=sys.stderr)
    try:
        cases = [bench.parse_case(c) for c in args.cases]
    except GptjaxError as e:
        ap.error(str(e))
    torch.set_num_threads(args.threads)

    load_start = provenance.machine_info()["load_average_1min"]
    if load_start is not None and load_start > 0.5 * provenance.usable_cores():
        print(f"warning: the machine is busy (1-min load average {load_start:.1f} on "
              f"{provenance.usable_cores()} cores); torch's OpenMP threads slow down badly under "
              "contention, so ratios will overstate gptjax", file=sys.stderr)
    peak = bench.resolve_peak()
    torch_rates = [torch_matmul_flops()]
    rows = []
    for name, batch, context in cases:
        row = run_case(name, batch, context, args)
        rows.append(row)
        print(f"{row['case']}: gptjax {row['gptjax']['tokens_per_s']['median']:,.0f} tok/s, "
              f"torch {row['torch']['tokens_per_s']['median']:,.0f} tok/s, "
              f"ratio {row['ratio']['median']:.2f}x", flush=True)
    peak = bench.remeasure_peak(peak)
    torch_rates.append(torch_matmul_flops())
    finish(rows, peak["flops_per_s"])
    machine = {**provenance.machine_info(), "load_average_1min_start": load_start, "torch": torch.__version__,
               "torch_threads": torch.get_num_threads()}
    report = {"machine": machine, "command": " ".join(["python", "benchmarks/train_throughput.py",
                                                       *(argv if argv is not None else sys.argv[1:])]),
              "flops_formula": MFU_FORMULA, "matmul_peak": peak,
              "torch_matmul": {"flops_per_s": max(torch_rates), "measured": torch_rates,
                               "source": "torch float32 matmul (1024^3, best of 10)"},
              "dtype": "float32", "results": rows}
    provenance.publish(report, markdown(report), args.json, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
