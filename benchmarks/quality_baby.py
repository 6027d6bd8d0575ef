"""Quality side by side: gptjax vs the PyTorch reference with nanoGPT's "baby" settings.

Both train on the same prepared data with the same batches (gptjax's WindowSampler) and
are evaluated on the same validation batches; gptjax trains through its real entry point
(`gptjax.training.train`). Prints a markdown table of validation loss per evaluation and seed.

    python benchmarks/quality_baby.py [--data DIR] [--seeds 0 1 2] [--steps 2000]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch
from torch_gpt import TorchGPT, optimizer, train_step

import gptjax
from gptjax.config import RunConfig, TrainConfig, preset
from gptjax.data.prepared import load_prepared
from gptjax.data.windows import WindowSampler, eval_batches, gather
from gptjax.training.metrics import JsonlLog


def torch_run(cfg: RunConfig, data, evals_at: list[int]) -> dict[int, float]:
    m, t = cfg.model, cfg.train
    torch.manual_seed(t.seed)
    model = TorchGPT(m)
    opt = optimizer(model, t)
    sampler = WindowSampler(len(data.train), m.context_length, t.batch_size, t.sampler, t.stride, t.seed)
    val = eval_batches(data.val, m.context_length, t.batch_size, t.eval_batches)
    out = {}
    for step in range(t.max_steps):
        b = gather(data.train, sampler.starts(step), m.context_length)
        train_step(model, opt, step, t, torch.from_numpy(b["inputs"]).long(),
                   torch.from_numpy(b["targets"]).long())
        if step + 1 in evals_at:
            out[step + 1] = evaluate_torch(model, val)
    return out


@torch.no_grad()
def evaluate_torch(model, batches) -> float:
    total = count = 0.0
    for b in batches:
        logits = model(torch.from_numpy(b["inputs"]).long())
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(b["targets"]).long().flatten(),
                                               reduction="none")
        w = torch.from_numpy(b["weights"]).flatten()
        total += float((ce * w).sum())
        count += float(w.sum())
    return total / count


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared data (default: the embedded corpus, char-level)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quality-"))
    data_dir = args.data or str(work / "data")
    if not args.data:
        gptjax.data.prepare(None, data_dir, "char", progress=False)
    data = load_prepared(data_dir)
    evals_at = list(range(250, args.steps + 1, 250))
    rows = []
    for seed in args.seeds:
        cfg = RunConfig(model=preset("baby", vocab_size=data.vocab_size),
                        train=TrainConfig(seed=seed, max_steps=args.steps, max_new_tokens=0),
                        data=dataclasses.replace(RunConfig().data, data=data_dir))
        t0 = time.perf_counter()
        gptjax.training.train(cfg, work / f"gptjax-{seed}", progress=False, echo=lambda *_: None)
        jax_s = time.perf_counter() - t0
        records = JsonlLog(work / f"gptjax-{seed}" / "metrics.jsonl").read()
        jax_val = {r["step"]: r["val_loss"] for r in records if r["kind"] == "eval"}
        t0 = time.perf_counter()
        torch_val = torch_run(cfg, data, evals_at)
        torch_s = time.perf_counter() - t0
        rows.append((seed, jax_val, torch_val, jax_s, torch_s))
        print(f"seed {seed}: gptjax {jax_val[args.steps]:.4f} ({jax_s:.0f}s), "
              f"torch {torch_val[args.steps]:.4f} ({torch_s:.0f}s)", flush=True)

    print(f"\n{data.meta['sources'][0]['path']}, {data.meta['train_tokens']:,} train / "
          f"{data.meta['val_tokens']:,} val tokens, vocabulary {data.vocab_size}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"jax {jax.__version__}, torch {torch.__version__}\n")
    print("| step | " + " | ".join(f"gptjax s{s} | torch s{s}" for s, *_ in rows) + " |")
    print("|---|" + "---|---|" * len(rows))
    for step in evals_at:
        print(f"| {step} | " + " | ".join(f"{j[step]:.4f} | {t[step]:.4f}" for _, j, t, *_ in rows) + " |")
    finals_j = [j[args.steps] for _, j, *_ in rows]
    finals_t = [t[args.steps] for _, _, t, *_ in rows]
    print(f"\nfinal val loss: gptjax {np.mean(finals_j):.4f} ± {np.std(finals_j):.4f}, "
          f"torch {np.mean(finals_t):.4f} ± {np.std(finals_t):.4f} (mean ± std over seeds)")
    print(f"wall time per run: gptjax {np.mean([r[3] for r in rows]):.0f}s, "
          f"torch {np.mean([r[4] for r in rows]):.0f}s")
    assert all(math.isfinite(x) for x in finals_j + finals_t)


if __name__ == "__main__":
    main()
