"""Per-device memory of a train step under data parallelism vs FSDP, from XLA's own
memory analysis of the compiled step (nothing is allocated, so GPT-2 XL fits a laptop).

Runs itself on 8 simulated CPU devices:

    python benchmarks/mesh_memory.py                      # gpt2 and gpt2-xl, data=8 vs fsdp=8
    python benchmarks/mesh_memory.py --presets gpt2 --meshes data=8 fsdp=8 data=2,fsdp=2,tensor=2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __name__ == "__main__" and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from gptjax import config as C  # noqa: E402
from gptjax.model.gpt import param_count  # noqa: E402
from gptjax.parallel.mesh import make_mesh  # noqa: E402
from gptjax.parallel.sharding import batch_sharding, check_batch, check_divisible, shardings  # noqa: E402
from gptjax.training import optim  # noqa: E402
from gptjax.training.step import init_state, make_train_step  # noqa: E402

GIB = 2**30


def analyse(preset: str, mesh_spec: str, batch: int) -> dict:
    m = C.preset(preset)
    t = C.TrainConfig(batch_size=batch, max_steps=10, warmup_steps=1)
    mesh = make_mesh(mesh_spec)
    check_divisible(m, mesh)
    check_batch(batch, mesh)
    tx = optim.optimizer(t)
    abstract = jax.eval_shape(lambda: init_state(m, t, tx))
    state_sh = shardings(abstract, mesh)
    tokens = jax.ShapeDtypeStruct((batch, m.context_length), jnp.int32)
    started = time.perf_counter()
    with jax.set_mesh(mesh):  # activations are constrained to the mesh's batch axes
        compiled = jax.jit(make_train_step(m, t, tx), donate_argnums=0,
                           in_shardings=(state_sh, batch_sharding(mesh)),
                           out_shardings=(state_sh, NamedSharding(mesh, P()))).lower(
            abstract, {"inputs": tokens, "targets": tokens}).compile()
    seconds = time.perf_counter() - started
    mem = compiled.memory_analysis()
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    return {"preset": preset, "params": param_count(m), "mesh": mesh_spec, "batch": batch,
            "state_gib": state_bytes / GIB, "arguments_gib": mem.argument_size_in_bytes / GIB,
            "temp_gib": mem.temp_size_in_bytes / GIB, "compile_s": seconds}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["gpt2", "gpt2-xl"])
    ap.add_argument("--meshes", nargs="+", default=["data=8", "fsdp=8"])
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences of 1024)")
    args = ap.parse_args(argv)
    print(f"{jax.device_count()} simulated {jax.devices()[0].platform} devices, jax {jax.__version__}; "
          f"float32 params + AdamW moments, global batch {args.batch} x context")
    print("| preset | params | mesh | state (params+Adam), all devices GiB | per-device arguments GiB "
          "| per-device temporaries GiB | compile s |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for spec in args.meshes:
            r = analyse(preset, spec, args.batch)
            print(f"| {preset} | {r['params']:,} | {spec} | {r['state_gib']:.2f} | "
                  f"{r['arguments_gib']:.2f} | {r['temp_gib']:.2f} | {r['compile_s']:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
