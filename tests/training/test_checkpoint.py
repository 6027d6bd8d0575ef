import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import TrainConfig, preset
from gptjax.errors import GptjaxError
from gptjax.training.checkpoint import Checkpoints
from gptjax.training.step import init_state

CFG = preset("tiny", vocab_size=20)


def test_keeps_the_latest_n_and_the_best(tmp_path):
    state = init_state(CFG, TrainConfig())
    ckpts = Checkpoints(tmp_path / "c", keep=2)
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.6)]:
        ckpts.save(state._replace(step=jnp.int32(step)), {"step": step}, val)
    ckpts.close()
    ckpts = Checkpoints(tmp_path / "c", create=False)
    assert ckpts.all_steps() == [2, 4, 5]
    assert ckpts.best_step() == 2 and ckpts.latest_step() == 5
    ckpts.close()


def test_restore_whole_state_or_params_only(tmp_path):
    t = TrainConfig()
    state = init_state(CFG, t)
    state = state._replace(step=jnp.int32(7), params=jax.tree.map(lambda x: x + 1.0, state.params))
    ckpts = Checkpoints(tmp_path / "c")
    ckpts.save(state, {"data_position": {"step": 7}}, 1.5)
    abstract = jax.eval_shape(lambda: init_state(CFG, t))
    restored, extra = ckpts.restore(abstract)
    assert int(restored.step) == 7 and extra == {"data_position": {"step": 7}}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    params, step = ckpts.restore_params(abstract.params)
    assert step == 7
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(GptjaxError, match="no checkpoint 3"):
        ckpts.restore_params(abstract.params, 3)
    ckpts.close()


def test_a_checkpoint_of_another_shape_is_named_as_a_mismatch_not_damage(tmp_path):
    t = TrainConfig()
    ckpts = Checkpoints(tmp_path / "c")
    ckpts.save(init_state(CFG, t), {}, 1.0)
    wider = preset("tiny", vocab_size=24)  # the embedding has 24 rows, the checkpoint 20
    abstract = jax.eval_shape(lambda: init_state(wider, t))
    with pytest.raises(GptjaxError, match="checkpoint 0 in .* does not match this model's"):
        ckpts.restore_params(abstract.params)
    with pytest.raises(GptjaxError, match="does not match this model's"):
        ckpts.restore(abstract)
    ckpts.close()
