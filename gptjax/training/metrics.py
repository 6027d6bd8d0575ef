"""FLOPs and MFU accounting, the JSONL metrics log, and the loss-curve plot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax

from gptjax.config import ModelConfig
from gptjax.cpu.peak import Peak, cpu_peak, matmul_rate, measure_matmul  # noqa: F401 (matmul_rate: benchmarks)
from gptjax.errors import RunFailed

MFU_FORMULA = "PaLM: 6N + 12*L*d*T FLOPs per token (N excludes position embeddings)"

# Dense bf16 peaks per chip from vendor data sheets, matched by whole words of device_kind.
PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def data_sheet_chip(device_kind: str) -> str | None:
    """The PEAK_BF16 chip named in a device_kind, as whole words ("L4" is not "L40S")."""
    return next((name for name in PEAK_BF16
                 if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", device_kind, re.I)), None)


def flops_per_token(cfg: ModelConfig, n_params_no_pos: int) -> float:
    """Training FLOPs per token, forward and backward, by the PaLM appendix-B formula."""
    return 6.0 * n_params_no_pos + 12.0 * cfg.n_layer * cfg.d_model * cfg.context_length


def measure_matmul_flops(n: int = 1024, min_seconds: float = 0.5) -> float:
    """Float32 matmul FLOP/s of the default device, measured now (benchmarks compare this
    in-run rate side by side; training uses this machine's recorded peak, `cpu.peak`)."""
    return measure_matmul("float32", min_seconds=min_seconds, n=n)


def peak_flops(dtype: str = "float32") -> Peak:
    """The job's peak FLOP/s for MFU: the data sheet of a known accelerator (all devices),
    else this CPU's recorded matmul rate for `dtype` (times the job's processes; simulated
    devices share one machine's cores)."""
    name = data_sheet_chip(jax.devices()[0].device_kind)
    if name:
        return Peak(PEAK_BF16[name] * jax.device_count(),
                    f"data sheet: {name} dense bf16 x {jax.device_count()} device(s)")
    cpu = cpu_peak(dtype)
    processes = jax.process_count()
    return Peak(cpu.flops * processes, cpu.source + (f"; x {processes} processes" if processes > 1 else ""))


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
        lines = self.path.read_text().splitlines()
        if lines:  # a torn last line (a write cut short by a full disk) is dropped, not fatal
            try:
                json.loads(lines[-1])
            except ValueError:
                lines.pop()
        kept = [r for r in map(json.loads, filter(str.strip, lines)) if r.get("step", 0) <= step]
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
