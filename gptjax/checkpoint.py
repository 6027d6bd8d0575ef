"""Checkpoints through orbax's CheckpointManager.

Each checkpoint holds two items: "state" (the TrainState pytree: params, optimizer state,
step, RNG key) and "extra" (JSON: the run config, the data position and the validation
loss). Orbax writes into a temporary folder and renames it when complete, so an
interrupted save never leaves a half-written checkpoint; `close()` waits for pending
asynchronous saves, which a normal exit must not skip. The most recent `keep`
checkpoints are preserved, plus the one with the lowest validation loss.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gptjax.errors import GptjaxError
from gptjax.train_step import TrainState


def _val_loss(metrics) -> float:
    return metrics["val_loss"]


class Checkpoints:
    def __init__(self, directory: Path, keep: int = 3, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            best_fn=_val_loss, best_mode="min", create=not read_only,
            preservation_policy=policies.AnyPreservationPolicy([
                policies.LatestN(n=keep),
                policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1,
                               keep_checkpoints_without_metrics=False),
            ]),
        )
        self.directory = Path(directory).absolute()
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra"))

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def best_step(self) -> int | None:
        return self._mgr.best_step()

    def save(self, state: TrainState, extra: dict, val_loss: float) -> None:
        step = int(state.step)
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()), extra=ocp.args.JsonSave(extra)),
            metrics={"val_loss": float(val_loss)}, force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore `step` (default: latest) into the structure/shardings of abstract_state."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self._mgr.all_steps():
            raise GptjaxError(f"no checkpoint {'' if step is None else step} in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state._asdict())
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
        return TrainState(**out["state"]), out["extra"]

    def read_extra(self, step: int) -> dict:
        return self._mgr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
