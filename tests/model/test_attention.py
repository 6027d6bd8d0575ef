"""The blocked causal attention equals jax.nn.dot_product_attention, values and gradients;
which formulation "auto" picks. The native kernel's own tests are in test_native.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.errors import GptjaxError
from gptjax.model.attention import (
    QUERY_BLOCK,
    causal_attention,
    cudnn_unchosen,
    cudnn_unusable,
    native_unusable,
    resolve_impl,
)


def _qkv(t: int, dtype=jnp.float32, seed: int = 0, heads: int = 3, head_dim: int = 16):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(2, t, heads, head_dim)), dtype) for _ in range(3))


# Float32 products at full precision: GPUs otherwise round their operands (TF32), and the
# two formulations round differently (measured on an H100: 1.9e-5 apart in the gradients).
full_precision = jax.default_matmul_precision("highest")


@pytest.mark.parametrize("t", [1, 7, QUERY_BLOCK, QUERY_BLOCK + 1, 3 * QUERY_BLOCK - 5])
def test_blocked_equals_dot_product_attention(t):
    q, k, v = _qkv(t)
    with full_precision:
        np.testing.assert_allclose(causal_attention(q, k, v, "blocked"),
                                   causal_attention(q, k, v, "xla"), atol=1e-6)


def _grads(impl, q, k, v):
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), q.dtype)
    loss = lambda *qkv: jnp.sum((w * causal_attention(*qkv, impl)).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def test_blocked_gradients_equal_dot_product_attention_gradients():
    qkv = _qkv(2 * QUERY_BLOCK + 3, seed=1)
    with full_precision:
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


def test_auto_is_native_or_blocked_on_cpu_cudnn_or_xla_on_gpus_and_xla_elsewhere():
    assert resolve_impl("auto", "cpu") == "blocked"
    assert resolve_impl("auto", "cpu", native_ok=True, cudnn_ok=True) == "native"
    assert resolve_impl("auto", "gpu") == resolve_impl("auto", "tpu") == "xla"
    assert resolve_impl("auto", "gpu", native_ok=True) == "xla"
    assert resolve_impl("auto", "gpu", cudnn_ok=True) == "cudnn"
    assert resolve_impl("cudnn", "gpu") == "cudnn" and resolve_impl("xla", "cpu") == "xla"
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = _qkv(QUERY_BLOCK + 3, dtype, heads=2, head_dim=64)
        expected = resolve_impl("auto", jax.default_backend(), native_unusable(q) is None,
                                cudnn_unchosen(q) is None)
        np.testing.assert_array_equal(causal_attention(q, k, v, "auto"),
                                      causal_attention(q, k, v, expected))


def test_auto_tries_cudnn_only_where_it_can_run():
    q = _qkv(8, jnp.bfloat16, heads=2, head_dim=64)[0]
    assert "float32" in cudnn_unusable(q.astype(jnp.float32))
    assert "head dims" in cudnn_unusable(_qkv(8, jnp.bfloat16, head_dim=12)[0])
    assert "head dims" in cudnn_unusable(_qkv(8, jnp.bfloat16, head_dim=136)[0])
    if jax.default_backend() != "gpu":
        assert cudnn_unusable(q) == "it needs an NVIDIA GPU"
        with pytest.raises(GptjaxError, match="attention_impl=cudnn cannot run here: it needs an NVIDIA GPU"):
            causal_attention(q, q, q, "cudnn")  # asked for by name: refused in one line


def test_auto_takes_xla_with_a_warning_when_cudnn_refuses_while_tracing(monkeypatch):
    import gptjax.model.attention as A
    real = jax.nn.dot_product_attention

    def refusing(*args, implementation=None, **kw):
        if implementation == "cudnn":
            raise RuntimeError("cuDNN version too old")
        return real(*args, implementation=implementation, **kw)
    # Pretend to be a GPU that "auto" would send to cuDNN.
    monkeypatch.setattr(A, "cudnn_unusable", lambda x: None)
    monkeypatch.setattr(A, "native_unusable", lambda x: "not on this pretend GPU")
    monkeypatch.setattr(A, "resolve_impl", lambda impl, backend, **kw: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
    q, k, v = _qkv(QUERY_BLOCK + 3, jnp.bfloat16, heads=2, head_dim=64)
    with pytest.warns(UserWarning, match="cuDNN's attention refused .*too old.*using XLA's"):
        out = causal_attention(q, k, v, "auto")
    np.testing.assert_array_equal(out, real(q, k, v, is_causal=True, implementation="xla"))
    with pytest.raises(RuntimeError, match="too old"):  # asked for by name: no fallback
        causal_attention(q, k, v, "cudnn")


@pytest.mark.skipif(cudnn_unusable(jax.ShapeDtypeStruct((1, 1, 1, 64), jnp.bfloat16)) is not None,
                    reason="cuDNN's attention needs an NVIDIA GPU of compute capability 8.0+")
def test_cudnn_bfloat16_is_as_close_to_float32_as_the_other_formulations():
    # Runs on a GPU machine only (CI has none): the check behind "auto" choosing cuDNN there.
    q, k, v = _qkv(4 * QUERY_BLOCK, jnp.bfloat16, seed=3, heads=2, head_dim=64)
    with full_precision:
        want = causal_attention(*(x.astype(jnp.float32) for x in (q, k, v)), "xla")
        exact_grads = _grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))
    errors = {impl: float(jnp.max(jnp.abs(causal_attention(q, k, v, impl).astype(jnp.float32)
                                              - want))) for impl in ("cudnn", "xla", "blocked")}
    assert errors["cudnn"] <= 2 * max(errors["xla"], errors["blocked"]), errors
    per_impl = {impl: _grads(impl, q, k, v) for impl in ("cudnn", "xla", "blocked")}
    for i, want_grad in enumerate(exact_grads):
        err = {impl: float(jnp.max(jnp.abs(g[i].astype(jnp.float32) - want_grad)))
               for impl, g in per_impl.items()}
        assert err["cudnn"] <= 2 * max(err["xla"], err["blocked"]) + 1e-3, (i, err)
