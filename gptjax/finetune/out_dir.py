"""Where a fine-tuning run may be written: a new folder, or the same run again to resume.

Kept free of JAX so that the CLI can refuse a bad --out before anything heavy is imported.
A folder is resumable when it holds a run of the same task with its resume state
(`resume/`), or is a cross-validation's parent holding only fold runs. Anything else is
refused, so no unrelated files are ever written over.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gptjax.errors import GptjaxError

SPEC_FILE = "finetune.json"  # gptjax.runs.finetuned.FILE, repeated here to stay JAX-free
RESUME_DIR = "resume"
_FOLD_ENTRY = re.compile(r"fold-\d+|folds\.json")


def command(task: str) -> str:
    """The gptjax command that makes runs of `task` (finetune.json's "task")."""
    return "distill" if task == "distill" else f"finetune-{task}"


def check_out(out: str | Path, task: str, cross_validation: bool = False) -> None:
    """Raise GptjaxError unless `out` is absent, empty, or a `task` run that can resume
    (with `cross_validation`, a folder of fold runs; without, a single run)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise GptjaxError(f"{out} exists and is not a folder; choose another --out")
    entries = [e.name for e in out.iterdir()]
    if not entries:
        return
    if SPEC_FILE in entries:
        try:
            recorded = json.loads((out / SPEC_FILE).read_text()).get("task")
        except (OSError, ValueError, AttributeError) as e:
            raise GptjaxError(f"cannot read {out / SPEC_FILE} ({e}); choose another --out") from None
        if recorded != task:
            what = f"a {command(recorded)} run" if isinstance(recorded, str) else "not a fine-tuning run"
            raise GptjaxError(f"{out} is {what}, not {command(task)}; choose another --out")
        if cross_validation:
            raise GptjaxError(f"{out} is a single classifier run; --folds needs another --out")
        if not (out / RESUME_DIR).is_dir() and _has_checkpoints(out / "checkpoints"):
            raise GptjaxError(f"{out} holds a checkpoint but no resume state (a run from before "
                              "gptjax saved one, or its resume/ was deleted); choose another --out")
        return
    if task == "cls" and all(_FOLD_ENTRY.fullmatch(name) for name in entries):
        if not cross_validation:
            raise GptjaxError(f"{out} holds a cross-validation (fold-* runs); resume it with its "
                              "--folds, or choose another --out")
        return  # each fold's folder is checked as that fold starts
    raise GptjaxError(f"{out} already exists and is not a fine-tuning run to resume; choose another --out")


def first_difference(old, new, where: str = "") -> str | None:
    """The first key path at which two JSON values differ, with both values; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if old == new else f"{where or 'value'} was {old!r}, now {new!r}"


def _has_checkpoints(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())
