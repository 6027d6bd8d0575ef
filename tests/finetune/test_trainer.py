"""The fine-tuning loop's early stopping: patience counts validations without
improvement, and reaching the last step is not an early stop."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from gptjax.finetune.step import FinetuneState
from gptjax.finetune.trainer import Schedule, fit


def _fit(patience: int, steps: int = 3):
    state = FinetuneState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(2)}, None, None)

    def step_fn(state, frozen, batch):
        return state._replace(step=state.step + 1), {"loss": jnp.float32(1.0)}
    schedule = Schedule(epochs=1, steps_per_epoch=steps, eval_every=1, patience=patience,
                        monitor="val_loss", higher_is_better=False)
    said = []
    result = fit(state, {}, step_fn, lambda epoch: iter([{}] * steps), lambda t: {"val_loss": 1.0},
                 schedule, progress=False, say=said.append)
    return result, said


@pytest.mark.parametrize("patience, steps, stopped", [(1, 3, True), (2, 3, False), (0, 3, False)])
def test_early_stopping_counts_validations_and_not_the_last_step(patience, steps, stopped):
    result, said = _fit(patience, steps)
    assert result.stopped_early is stopped
    assert result.steps == (2 if stopped else 3) and result.best_step == 1
    assert any("stopped early" in line for line in said) is stopped
