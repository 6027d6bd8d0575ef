"""Step time on simulated meshes against one device: the cost of sharding's collectives.

The 8 simulated CPU devices share this machine's cores, so a mesh cannot be faster here;
the ratio shows the overhead the layout adds (partitioned ops, all-reduces, gathers).

    python benchmarks/mesh_overhead.py [--preset baby] [--batch 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from gptjax import config as C  # noqa: E402
from gptjax.parallel.mesh import make_mesh  # noqa: E402
from gptjax.parallel.sharding import make_sharded_train_step  # noqa: E402
from gptjax.training.step import init_state, make_train_step  # noqa: E402

MESHES = ["data=1", "data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "data=2,tensor=4"]


def step_seconds(model_cfg, train_cfg, spec: str, steps: int, repeats: int) -> float:
    devices = jax.devices()[:1] if spec == "data=1" else None
    mesh = make_mesh(spec, devices)
    state = init_state(model_cfg, train_cfg)
    step, state_sh = make_sharded_train_step(make_train_step(model_cfg, train_cfg), state, mesh)
    state = jax.device_put(state, state_sh)
    rng = np.random.default_rng(0)
    shape = (train_cfg.batch_size, model_cfg.context_length)
    batch = {"inputs": rng.integers(0, model_cfg.vocab_size, shape, dtype=np.int32),
             "targets": rng.integers(0, model_cfg.vocab_size, shape, dtype=np.int32)}
    for _ in range(3):  # compile and warm up
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)  # block once, at the end
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="baby")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    m = C.preset(args.preset, vocab_size=256)
    t = C.TrainConfig(batch_size=args.batch, max_steps=1000, warmup_steps=1)
    print(f"{jax.device_count()} simulated CPU devices on {os.cpu_count()} cores, jax "
          f"{jax.__version__}; {args.preset} (vocab 256), batch {args.batch}, median of "
          f"{args.repeats} x {args.steps} steps")
    print("| mesh | ms/step | vs one device |")
    print("|---|---|---|")
    base = None
    for spec in MESHES:
        seconds = step_seconds(m, t, spec, args.steps, args.repeats)
        base = base or seconds
        print(f"| {spec} | {1000 * seconds:.1f} | {seconds / base:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
