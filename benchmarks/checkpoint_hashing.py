"""What checksums cost: hashing a GPT-2 124M TrainState (parameters and AdamW state) at
save and verifying it at restore, beside the orbax save and restore it rides on, in one
process (ratios, since these machines are noisy).

    python benchmarks/checkpoint_hashing.py [--preset gpt2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax

from gptjax import config as C
from gptjax.training import integrity
from gptjax.training.checkpoint import Checkpoints
from gptjax.training.step import init_state


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    m = C.preset(args.preset)
    t = C.TrainConfig()
    state = jax.block_until_ready(init_state(m, t))
    trees = {"params": state.params, "train": {"step": state.step, "opt_state": state.opt_state,
                                               "rng": state.rng}}
    nbytes = sum(x.nbytes for x in jax.tree.leaves(trees))
    recorded = integrity.digests(trees)
    hash_s = best_of(lambda: integrity.digests(trees), args.repeats)
    verify_s = best_of(lambda: integrity.first_mismatch(trees, recorded), args.repeats)
    work = Path(tempfile.mkdtemp(prefix="gptjax-hashing-"))
    abstract = jax.eval_shape(lambda: init_state(m, t))
    try:
        def save():
            shutil.rmtree(work / "c", ignore_errors=True)
            ckpts = Checkpoints(work / "c")
            ckpts.save(state, {}, 1.0)
            ckpts.close()
        save_s = best_of(save, args.repeats)

        def restore():
            ckpts = Checkpoints(work / "c", create=False)
            jax.block_until_ready(ckpts.restore(abstract)[0])
            ckpts.close()
        restore_s = best_of(restore, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.preset}: {nbytes / 1e9:.2f} GB of arrays (parameters + AdamW state); "
          f"best of {args.repeats}; {os.cpu_count()} CPUs, jax {jax.__version__}")
    print(f"  hash at save:   {hash_s:6.2f} s ({nbytes / hash_s / 1e9:.2f} GB/s); the whole save, "
          f"hashing included, {save_s:6.2f} s: hashing is {hash_s / save_s:.0%} of it")
    print(f"  verify at load: {verify_s:6.2f} s ({nbytes / verify_s / 1e9:.2f} GB/s); the whole "
          f"restore, verification included, {restore_s:6.2f} s: verifying is "
          f"{verify_s / restore_s:.0%} of it")


if __name__ == "__main__":
    main()
