"""The blocked causal attention equals jax.nn.dot_product_attention, values and gradients;
which formulation "auto" picks. The native kernel's own tests are in test_native.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.attention import QUERY_BLOCK, causal_attention, native_unusable, resolve_impl


def _qkv(t: int, dtype=jnp.float32, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(2, t, 3, 16)), dtype) for _ in range(3))


@pytest.mark.parametrize("t", [1, 7, QUERY_BLOCK, QUERY_BLOCK + 1, 3 * QUERY_BLOCK - 5])
def test_blocked_equals_dot_product_attention(t):
    q, k, v = _qkv(t)
    np.testing.assert_allclose(causal_attention(q, k, v, "blocked"),
                               causal_attention(q, k, v, "xla"), atol=1e-6)


def _grads(impl, q, k, v):
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), q.dtype)
    loss = lambda *qkv: jnp.sum((w * causal_attention(*qkv, impl)).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def test_blocked_gradients_equal_dot_product_attention_gradients():
    qkv = _qkv(2 * QUERY_BLOCK + 3, seed=1)
    for a, b in zip(_grads("blocked", *qkv), _grads("xla", *qkv)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_blocked_bfloat16_is_as_close_to_float32_as_dot_product_attention():
    q, k, v = _qkv(QUERY_BLOCK + 9, jnp.bfloat16)
    out = causal_attention(q, k, v, "blocked")
    assert out.dtype == jnp.bfloat16
    exact = causal_attention(*(x.astype(jnp.float32) for x in (q, k, v)), "xla")
    np.testing.assert_allclose(out.astype(jnp.float32), exact, atol=3e-2)
    # Gradients: within twice the error jax's own bfloat16 attention makes.
    exact_grads = _grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    for blocked, xla, want in zip(_grads("blocked", q, k, v), _grads("xla", q, k, v), exact_grads):
        assert blocked.dtype == jnp.bfloat16
        err = float(jnp.max(jnp.abs(blocked.astype(jnp.float32) - want)))
        assert err <= 2 * float(jnp.max(jnp.abs(xla.astype(jnp.float32) - want))) + 1e-3


def test_an_empty_sequence_gives_an_empty_output():
    q, k, v = _qkv(0)
    for impl in ("blocked", "auto"):  # auto: the native kernel where it can run
        assert causal_attention(q, k, v, impl).shape == q.shape


def test_a_query_never_sees_later_keys():
    q, k, v = _qkv(QUERY_BLOCK + 10)
    changed = v.at[:, -1].set(100.0)  # only the last position's value differs
    a, b = causal_attention(q, k, v, "blocked"), causal_attention(q, k, changed, "blocked")
    np.testing.assert_array_equal(a[:, :-1], b[:, :-1])
    assert not np.allclose(a[:, -1], b[:, -1])


def test_auto_is_native_or_blocked_on_cpu_and_xla_elsewhere():
    assert resolve_impl("auto", "cpu") == "blocked"
    assert resolve_impl("auto", "cpu", native_ok=True) == "native"
    assert resolve_impl("auto", "gpu") == resolve_impl("auto", "tpu") == "xla"
    assert resolve_impl("auto", "gpu", native_ok=True) == "xla"
    assert resolve_impl("cudnn", "gpu") == "cudnn" and resolve_impl("xla", "cpu") == "xla"
    q, k, v = _qkv(QUERY_BLOCK + 3)
    expected = resolve_impl("auto", jax.default_backend(), native_unusable(q) is None)
    np.testing.assert_array_equal(causal_attention(q, k, v, "auto"),
                                  causal_attention(q, k, v, expected))
