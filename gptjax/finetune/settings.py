"""Settings shared by every fine-tuning task: what trains, how fast, for how long.

Plain frozen dataclasses (recorded in finetune.json); `check` reports the first bad
value as one GptjaxError before anything is loaded or written.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from gptjax.errors import GptjaxError
from gptjax.training import trackers


@dataclass(frozen=True)
class Tuning:
    train: str = "all"  # all | head (classification) | last-N
    lora_rank: int = 0  # 0 = no LoRA; else adapters train and the base is frozen
    lora_alpha: float = 16.0
    lora_targets: str = "attn"  # attn, mlp, all, or projection names (qkv, out, fc, proj)
    lr: float = 1e-3  # new parameters: the task head, LoRA adapters
    base_lr: float = 1e-4  # pretrained weights that train
    epochs: int = 5
    max_steps: int = 0  # 0 = `epochs` passes; else exactly this many steps (epochs repeat)
    batch_size: int = 16
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dropout: float = 0.0
    eval_every: int = 0  # steps between validations; 0 = once per epoch
    patience: int = 3  # validations without improvement before stopping; 0 = run all epochs
    seed: int = 0
    unfreeze: str = ""  # "" = what --train says from the start; gradual:EPOCHS = one layer per stage
    layer_lr_decay: float = 1.0  # block i trains at layer_lr_decay^(L-i) x base_lr; 1 = off
    log_to: str = "jsonl"  # trackers besides metrics.jsonl; not a setting of the run (settings())

    def settings(self) -> dict:
        """What the run records and a resume compares: every field but where the metrics
        go, which may change from one part of a run to the next."""
        return {k: v for k, v in asdict(self).items() if k != "log_to"}

    def check(self) -> "Tuning":
        for name in ("epochs", "batch_size"):
            _require(getattr(self, name) >= 1, f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "base_lr", "lora_alpha"):
            v = getattr(self, name)
            _require(math.isfinite(v) and v > 0, f"--{_flag(name)} must be positive, got {v}")
        for name in ("lora_rank", "warmup_steps", "eval_every", "patience", "seed", "max_steps"):
            _require(getattr(self, name) >= 0, f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            _require(math.isfinite(v) and v >= 0, f"--{_flag(name)} must be >= 0, got {v}")
        _require(0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}")
        _require(self.seed < 2**31, f"--seed must be below 2**31, got {self.seed}")
        _require(math.isfinite(self.layer_lr_decay) and 0 < self.layer_lr_decay <= 1,
                 f"--layer-lr-decay must be in (0, 1], got {self.layer_lr_decay}")
        parse_unfreeze(self.unfreeze)
        trackers.parse_log_to(self.log_to)  # a missing tracker package: refused before any work
        if self.lora_rank and (self.unfreeze or self.layer_lr_decay != 1):
            raise GptjaxError(f"--{'unfreeze' if self.unfreeze else 'layer-lr-decay'} schedules the "
                              "pretrained layers, which LoRA freezes; drop it or --lora-rank")
        if self.train == "head" and (self.unfreeze or self.layer_lr_decay != 1):
            raise GptjaxError(f"--{'unfreeze' if self.unfreeze else 'layer-lr-decay'} schedules layers "
                              "that --train head keeps frozen; use --train all or last-N with it")
        return self


def parse_unfreeze(text: str) -> float:
    """'' (off) -> 0, or 'gradual:E' -> E epochs per stage (E > 0)."""
    if not text:
        return 0.0
    match = re.fullmatch(r"gradual:(\d+(?:\.\d*)?|\.\d+)", text)
    epochs = float(match.group(1)) if match else 0.0
    if not (epochs > 0 and math.isfinite(epochs)):
        raise GptjaxError(f"--unfreeze must be gradual:EPOCHS with EPOCHS > 0 (epochs per stage), "
                          f"got {text!r}")
    return epochs


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise GptjaxError(message)
