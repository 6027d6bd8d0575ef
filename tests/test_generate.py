import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.config import preset
from gptjax.errors import GptjaxError
from gptjax.generate import generate, sample_logits

CFG = preset("tiny", vocab_size=40, context_length=16)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.PRNGKey(0))


def naive_greedy(params, prompt, n):
    """Feed the last context_length ids, take the argmax of the last position, repeat."""
    forward = jax.jit(model.apply, static_argnums=2)
    ids = list(prompt)
    for _ in range(n):
        window = jnp.array([ids[-CFG.context_length:]])
        ids.append(int(jnp.argmax(forward(params, window, CFG)[0, -1])))
    return ids[len(prompt):]


@pytest.mark.parametrize("prompt_len,new", [(3, 4), (12, 8), (30, 3)])
def test_greedy_matches_a_naive_loop_also_past_the_context(params, prompt_len, new):
    prompt = [(7 * i + 3) % 40 for i in range(prompt_len)]
    assert generate(params, CFG, prompt, new, temperature=0.0) == naive_greedy(params, prompt, new)


def test_sampling_is_seeded_and_respects_the_valid_vocabulary(params):
    a = generate(params, CFG, [1, 2, 3], 30, seed=4, temperature=1.5, valid_vocab=10)
    assert a == generate(params, CFG, [1, 2, 3], 30, seed=4, temperature=1.5, valid_vocab=10)
    assert a != generate(params, CFG, [1, 2, 3], 30, seed=5, temperature=1.5, valid_vocab=10)
    assert all(0 <= i < 10 for i in a)


def test_top_k_one_is_greedy():
    logits = jnp.array([[0.1, 3.0, 2.9, -1.0]])
    for seed in range(5):
        assert int(sample_logits(logits, jax.random.PRNGKey(seed), 1.0, 1, 4)[0]) == 1
    picks = {int(sample_logits(logits, jax.random.PRNGKey(s), 1.0, 2, 4)[0]) for s in range(40)}
    assert picks == {1, 2}


def test_empty_prompt_starts_from_end_of_text(params):
    assert generate(params, CFG, [], 4, temperature=0.0, eot_id=39) == naive_greedy(params, [39], 4)
    with pytest.raises(GptjaxError, match="empty prompt"):
        generate(params, CFG, [], 4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_settings(params, kwargs, match):
    args = {"max_new_tokens": 3, **kwargs}
    n = args.pop("max_new_tokens")
    with pytest.raises(GptjaxError, match=match):
        generate(params, CFG, [1], n, **args)


def test_prompt_ids_outside_the_vocabulary(params):
    with pytest.raises(GptjaxError, match="outside the vocabulary"):
        generate(params, CFG, [1, 45], 2)
    assert generate(params, CFG, [1], 0) == []
    np.testing.assert_array_equal(params["wte"]["embedding"].shape, (40, 32))
