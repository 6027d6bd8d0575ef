"""FLOPs and MFU accounting, the JSONL metrics log, and the loss-curve plot."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig
from gptjax.errors import RunFailed

MFU_FORMULA = "PaLM: 6N + 12*L*d*T FLOPs per token (N excludes position embeddings)"

# Dense bf16 peaks per chip from vendor data sheets, matched by device_kind substring.
PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def flops_per_token(cfg: ModelConfig, n_params_no_pos: int) -> float:
    """Training FLOPs per token, forward and backward, by the PaLM appendix-B formula."""
    return 6.0 * n_params_no_pos + 12.0 * cfg.n_layer * cfg.d_model * cfg.context_length


def measure_matmul_flops(n: int = 1024, repeats: int = 10, min_seconds: float = 0.5) -> float:
    """Float32 matmul FLOP/s of the default device (for CPU MFU): the best of at least
    `repeats` products and at least `min_seconds` of them. Ten ~10 ms products (0.1 s)
    once read half the usual rate, and a training log then showed MFU 1.10; a longer
    window is harder for a burst of other work on the machine to cover."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    return matmul_rate(lambda: mm(a).block_until_ready(), n, repeats, min_seconds)


def matmul_rate(product, n: int, repeats: int = 10, min_seconds: float = 0.5) -> float:
    """FLOP/s of `product()`, one finished n x n x n product per call (any library): the
    best call of at least `repeats` and at least `min_seconds`, after one untimed call."""
    product()
    best, done, start = float("inf"), 0, time.perf_counter()
    while done < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t0)
        done += 1
    return 2.0 * n ** 3 / best


def peak_flops(configured: float = 0.0) -> float:
    """Peak FLOP/s for MFU: configured, else the data sheet of a known chip, else measured."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_BF16.items():
        if name.lower() in kind.lower():
            return peak * jax.device_count()
    return measure_matmul_flops() * jax.device_count()


class JsonlLog:
    """Append-only JSONL writer (one record per line, flushed so a crash loses nothing)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk, a read-only mount: stop the run in one line
            raise RunFailed(f"cannot write {self.path}: {e.strerror or e}; the run stops here "
                            "(its checkpoints are intact)") from None

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (atomically, via a renamed temporary file)."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], path: Path, title: str = "") -> Path:
    """Train and validation loss against step, saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5, ms=4)
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
