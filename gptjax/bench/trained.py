"""A small trained run for benchmarks that need real weights (quantization, pruning):
`gptjax train` on the embedded corpus in a subprocess, so its memory and compiles stay
out of the measuring process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gptjax.errors import GptjaxError


def train_small_run(out: Path, steps: int, preset: str = "baby") -> Path:
    """Train `preset` for `steps` steps into `out` (a new folder); returns it."""
    done = subprocess.run([sys.executable, "-m", "gptjax", "train", "--preset", preset,
                           "--max-steps", str(steps), "--warmup-steps", str(max(1, steps // 10)),
                           "--eval-every", str(steps), "--max-new-tokens", "0", "--no-progress",
                           "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode:
        raise GptjaxError(f"training the {preset} run failed: {done.stderr.strip()[-300:]}")
    return out
