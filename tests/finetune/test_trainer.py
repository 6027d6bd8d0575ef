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


@pytest.mark.parametrize("patience, steps, best_step, validations", [(3, 10, 4, 5), (0, 13, 13, 7)])
def test_a_fit_started_from_any_validation_ends_as_the_whole_fit(patience, steps, best_step, validations):
    """Resuming from each saved point, with early stopping, a partial last epoch and an
    off-cadence last validation, gives the same batches, history, best and stop."""
    import copy

    from gptjax.finetune.trainer import Start
    values = [3.0, 2.0, 2.5, 2.4, 2.6, 2.7, 1.0]
    schedule = Schedule(epochs=3, steps_per_epoch=5, eval_every=2, patience=patience, monitor="val_loss",
                        higher_is_better=False, max_steps=13)

    def run(start=None):
        seen, saved = [], []

        def step_fn(state, frozen, batch):
            seen.append(batch["i"])
            return state._replace(step=state.step + 1, trainable={"w": state.trainable["w"] + batch["i"]}), \
                {"loss": jnp.float32(batch["i"])}

        def on_validated(state, best, progress):
            saved.append(Start(state, best, copy.deepcopy(progress)))
        evals = iter(values[len(start.progress.history):] if start else values)
        state = FinetuneState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(())}, None, None)
        result = fit(state, {}, step_fn, lambda e: iter([{"i": 10 * e + j} for j in range(5)]),
                     lambda t: {"val_loss": next(evals)}, schedule, on_validated=on_validated,
                     start=start, progress=False, say=lambda line: None)
        return result, seen, saved

    whole, seen, saved = run()
    # patience 3: three worse after step 4; patience 0: the last (off-cadence) validation is best
    assert (whole.steps, whole.best_step, whole.stopped_early) == (steps, best_step, patience > 0)
    assert len(saved) == validations and saved[-1].progress.step == steps
    for i, point in enumerate(saved):
        result, rest, _ = run(copy.deepcopy(point))
        assert seen[:point.progress.step] + rest == seen, i
        assert (result.steps, result.best_step, result.stopped_early) == (steps, best_step, patience > 0)
        assert result.history == whole.history and float(result.best["w"]) == float(whole.best["w"])
