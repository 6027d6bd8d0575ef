"""A fine-tuning run's resume state: OUT/resume/ holds the latest validation's optimizer
state, trainable parameters, best parameters so far and trainer progress, in one atomic
orbax checkpoint (keep 1). Rerunning the same command with the same --out continues from
it, bit for bit: the data order is a function of the epoch, dropout keys of the step.

The best checkpoint (OUT/checkpoints, what loaders read) is always saved after the resume
state that contains it, so after a kill it is never ahead of what a resumed run replays;
`reconcile` makes the two agree again. Only OUT/checkpoints is read by loaders: OUT/resume
may be deleted once a run is finished (it then cannot be rerun into).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from gptjax.errors import CheckpointDamaged, GptjaxError
from gptjax.finetune.out_dir import RESUME_DIR, SPEC_FILE, first_difference
from gptjax.finetune.step import FinetuneState
from gptjax.finetune.trainer import Progress, Start
from gptjax.training.checkpoint import Checkpoints
from gptjax.training.metrics import JsonlLog
from gptjax.training.step import TrainState


class ResumeState:
    def __init__(self, out: Path):
        self.ckpts = Checkpoints(Path(out) / RESUME_DIR, keep=1, keep_best=False)

    def load(self, fresh: FinetuneState) -> Start | None:
        """The saved fit, shaped like `fresh` (a newly initialised state); None if none."""
        if self.ckpts.latest_step() is None:
            return None
        target = TrainState(fresh.step, {"now": fresh.trainable, "best": fresh.trainable},
                            fresh.opt_state, fresh.rng)
        try:
            saved, extra = self.ckpts.restore(target)
        except CheckpointDamaged as e:
            raise GptjaxError(f"{e}; to start this run over, delete {self.ckpts.directory.parent} "
                              "or choose another --out") from None
        state = FinetuneState(saved.step, saved.params["now"], saved.opt_state, saved.rng)
        return Start(state, saved.params["best"], Progress(**extra["progress"]))

    def save(self, state: FinetuneState, best: dict, progress: Progress) -> None:
        """Written and waited for: the caller donates `state` to the next step."""
        self.ckpts.save(TrainState(state.step, {"now": state.trainable, "best": best}, state.opt_state,
                                   state.rng), {"progress": dataclasses.asdict(progress)}, None)
        self.ckpts.wait()

    def close(self) -> None:
        self.ckpts.close()


def reconcile(best_ckpts: Checkpoints, saved: ResumeState, start: Start | None, save_best,
              log: JsonlLog) -> None:
    """Bring the best checkpoint and metrics.jsonl back to the resume point: remove what
    killed saves left half-written, keep only the resume point's best (a kill can land
    after a new best is written and before the one it replaces is deleted), save it if it
    is missing, and drop log records of the steps that will be replayed."""
    best_ckpts.remove_partial()
    saved.ckpts.remove_partial()
    progress = start.progress if start else Progress()
    if start is None and best_ckpts.all_steps():
        raise GptjaxError(f"{best_ckpts.directory} holds checkpoints but there is no resume state "
                          "beside it; choose another --out")
    for step in best_ckpts.all_steps():
        if step != progress.best_step:
            best_ckpts.discard(step)
    if start is not None and progress.best_step not in best_ckpts.all_steps():
        save_best(start.best, progress.best_step, progress.best_metrics)
    log.truncate_after(progress.step)


def check_same_run(out: Path, spec_json: dict) -> bool:
    """False for a new run; True for a run started with the same settings, base and
    data path (the path's contents are not compared); else GptjaxError naming the first
    difference."""
    path = Path(out) / SPEC_FILE
    if not path.is_file():
        return False
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GptjaxError(f"cannot read {path} ({e}); choose another --out") from None
    found = first_difference(recorded, json.loads(json.dumps(spec_json)))  # tuples as JSON lists
    if found:
        raise GptjaxError(f"{out} was started with other settings ({found}); rerun with the same "
                          "ones to resume it, or choose another --out")
    return True
