"""Verifying every checkpoint of a run, for `gptjax check`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from gptjax.errors import CheckpointDamaged, GptjaxError
from gptjax.training.checkpoint import Checkpoints, forget_unverified_warning


@dataclass
class CheckResult:
    step: int
    megabytes: float
    status: str  # "verified", "unverified" (written before checksums) or "damaged"
    detail: str


def check_run(directory: Path) -> list[CheckResult]:
    """Verify every checkpoint in `directory`, whole (what `gptjax check` prints)."""
    directory = Path(directory)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
        if directory.is_dir() else []
    results = []
    try:
        ckpts = Checkpoints(directory, create=False)
    except CheckpointDamaged as e:  # orbax opens no step while one's metrics are unreadable
        return [CheckResult(s, _megabytes(directory / str(s)), "damaged", str(e)) for s in steps]
    try:
        for step in steps:
            size = _megabytes(directory / str(step))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                forget_unverified_warning(ckpts.directory)
                try:
                    ckpts.verify(step)
                except GptjaxError as e:
                    results.append(CheckResult(step, size, "damaged", str(e).split(" is damaged: ")[-1]))
                    continue
            if caught:
                results.append(CheckResult(step, size, "unverified", "no checksums (written before "
                                           "gptjax recorded them)"))
            else:
                results.append(CheckResult(step, size, "verified", "every array and the JSON match"))
    finally:
        ckpts.close()
    return results


def _megabytes(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
