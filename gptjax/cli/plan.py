"""`gptjax plan`: the largest micro-batch and the remat policy that fit each candidate mesh,
with predicted tokens/s, MFU, ETA and device-hours for a token budget, from ahead-of-time
compiles on abstract shapes."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from gptjax import config as C
from gptjax.cli.options import add_config_flags, apply_overrides, explicit_overrides
from gptjax.errors import GptjaxError

GPT2_VOCAB = 50257


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="pick the micro-batch, remat and mesh for a model before training",
        description="For each candidate mesh and remat policy (none, dots_no_batch, full), "
        "compile the train step ahead of time on abstract shapes (nothing is allocated), "
        "find the largest micro-batch whose XLA memory plan fits 90%% of a device's memory, "
        "and predict its step time as a roofline over XLA's cost analysis: flops / peak or "
        "bytes accessed / memory bandwidth, whichever is larger. The prediction is an upper "
        "bound on speed (benchmarks/plan_accuracy.py measures how far real steps fall short). "
        "On a CPU, --devices N simulates N devices in this process. A preset whose "
        "vocabulary comes from its data is planned with GPT-2's 50257 (set --vocab-size).")
    p.add_argument("--preset", choices=list(C.PRESETS), default=C.DEFAULT_PRESET,
                   help=f"model preset (default: {C.DEFAULT_PRESET}; model flags override it)")
    p.add_argument("--tokens", required=True, metavar="COUNT", help="token budget, e.g. 10B, "
                   "300M or 2e9: sets the ETA and device-hours")
    p.add_argument("--devices", type=int, default=0, metavar="INT", help="devices to plan for "
                   "(default: all there are; on a CPU, more are simulated)")
    p.add_argument("--mesh", default="", metavar="MESH", help="plan this mesh only (default: "
                   "data parallel, FSDP, and data x fsdp=2 on 4+ devices)")
    p.add_argument("--remats", default=",".join(("none", "dots_no_batch", "full")), metavar="LIST",
                   help="remat policies to try (default: none,dots_no_batch,full; a --remat "
                   "model flag is ignored here)")
    p.add_argument("--max-batch", type=int, default=1024, metavar="INT",
                   help="largest micro-batch to consider, sequences over all devices (default: 1024)")
    p.add_argument("--device-memory", type=float, default=0, metavar="GIB", help="memory per "
                   "device (default: the allocator's limit; CPU: host RAM / devices)")
    p.add_argument("--peak-flops", type=float, default=0, metavar="FLOAT", help="peak FLOP/s "
                   "per device (default: the data sheet's dense bf16, else this CPU's record)")
    p.add_argument("--bandwidth", type=float, default=0, metavar="FLOAT", help="memory bytes/s "
                   "per device (default: the data sheet's, else a measured host copy)")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    add_config_flags(p, sections=("model",))


def run(args) -> int:
    from gptjax.bench.plan import parse_tokens

    tokens = parse_tokens(args.tokens)
    remats = [r.strip() for r in args.remats.split(",") if r.strip()]
    bad = [r for r in remats if r not in ("none", "full", "dots", "dots_no_batch")]
    if bad or not remats:
        raise GptjaxError(f"--remats takes none, dots, dots_no_batch and full, got {args.remats!r}")
    if args.devices < 0 or args.max_batch < 1:
        raise GptjaxError("--devices and --max-batch must be positive")
    _simulate_devices(args.devices)
    import jax

    from gptjax.bench import plan as P

    if args.devices and args.devices != jax.device_count():
        raise GptjaxError(f"--devices {args.devices}: this process has {jax.device_count()} "
                          f"{jax.devices()[0].platform} device(s); plan on a machine with that many")
    cfg = apply_overrides(C.RunConfig(model=C.preset(args.preset)), explicit_overrides(args)).model
    if not cfg.vocab_size:  # a preset that takes its data's: plan for GPT-2's BPE
        cfg = dataclasses.replace(cfg, vocab_size=GPT2_VOCAB)
    C.validate(C.RunConfig(model=cfg))
    dev = P.device(args.device_memory, args.peak_flops, args.bandwidth)
    meshes = P.candidate_meshes(dev.count, args.mesh)
    print(f"planning {args.preset} ({cfg.n_layer} layers x {cfg.d_model}, context "
          f"{cfg.context_length}) for {dev.count} x {dev.kind}: {dev.memory_bytes / 2**30:.1f} GiB "
          f"({dev.sources['memory']}), {dev.peak_flops / 1e12:.3g} TFLOP/s ({dev.sources['peak']}), "
          f"{dev.bandwidth / 1e9:.0f} GB/s ({dev.sources['bandwidth']})", flush=True)
    found = P.plan(cfg, dev, meshes=meshes, remats=remats, max_rows=args.max_batch,
                   progress=lambda mesh, remat: print(f"  compiling {mesh}, remat {remat} ...",
                                                      file=sys.stderr, flush=True))
    best = P.best_per_mesh(found)
    print(_table(found, best, tokens, dev.count))
    if best:
        top = max(best.values(), key=lambda c: c.tokens_per_s)
        print(f"best: --mesh {top.mesh} --remat {top.remat} --batch-size {top.rows} (a larger "
              f"batch keeps this micro-batch as --batch-size {top.rows}k --grad-accum k): "
              f"{_hours(top.eta_seconds(tokens))} for {args.tokens} tokens")
    else:
        print("nothing fits: even one sequence per replica exceeds the memory under every remat")
    if args.json:
        rows = [c.__dict__ if isinstance(c, P.Candidate) else {"mesh": c[0], "remat": c[1], "fits": False}
                for c in found]
        with open(args.json, "w") as fh:
            json.dump({"device": dev.__dict__, "model": C.to_dict(C.RunConfig(model=cfg))["model"],
                       "tokens": tokens, "candidates": rows}, fh, indent=2)
    return 0 if best else 1


def _simulate_devices(n: int) -> None:
    """On a CPU, N devices in this process: XLA reads XLA_FLAGS when its backends start,
    which nothing before this command needed."""
    from jax._src import xla_bridge  # the one public-enough way to ask whether they started

    if n > 1 and not xla_bridge.backends_are_initialized() \
            and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        flag = f"--xla_force_host_platform_device_count={n}"
        if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _table(found, best, tokens: float, devices: int) -> str:
    from gptjax.bench.plan import Candidate
    head = ("| mesh | remat | micro-batch | memory/device GiB | predicted step ms | tokens/s | MFU "
            "| ETA | device-hours | |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for c in found:
        if not isinstance(c, Candidate):
            lines.append(f"| {c[0]} | {c[1]} | does not fit | | | | | | | |")
            continue
        eta = c.eta_seconds(tokens)
        mark = "best for this mesh" if best.get(c.mesh) is c else ""
        rows = str(c.rows) if c.largest else f"{c.rows} (search stopped)"
        lines.append(f"| {c.mesh} | {c.remat} | {rows} | {c.memory_bytes / 2**30:.2f} | "
                     f"{1000 * c.step_seconds:.2f} | {c.tokens_per_s:,.0f} | {c.mfu:.1%} | "
                     f"{_hours(eta)} | {eta * devices / 3600:,.1f} | {mark} |")
    return "\n".join(lines)


def _hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


COMMANDS = {"plan": run}
