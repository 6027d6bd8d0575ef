"""Weight-only quantization: the grid's round trip is within half a step, int4 packs
exactly, a quantized decode computes what the fake-quantized float model computes (the
native int8 kernel and XLA's path alike), and the decoders take quantized weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.config import RunConfig, preset, validate
from gptjax.cpu import native
from gptjax.errors import GptjaxError
from gptjax.generation.decoder import generate
from gptjax.model.quantize import (
    dequantize_rows,
    fake_quantize,
    quantize_decode_params,
    quantize_rows,
    quantized_config,
    unpack_int4,
    weight_bytes,
)
from gptjax.serve.engine import Engine

CFG = preset("baby", vocab_size=257)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.PRNGKey(0))


@pytest.mark.parametrize("mode, group", [("int8", 64), ("int4", 32), ("int4", 8)])
def test_the_round_trip_is_within_half_a_step(mode, group):
    w = jax.random.normal(jax.random.PRNGKey(1), (48, 64)) * jnp.linspace(0.1, 3, 48)[:, None]
    q, scale = quantize_rows(w, mode, group)
    back = dequantize_rows(q, scale, mode, group)
    step = scale[:, None] if mode == "int8" else jnp.repeat(scale, group, axis=1)
    assert q.dtype == (jnp.int8 if mode == "int8" else jnp.uint8)
    assert jnp.all(jnp.abs(back - w) <= step / 2 + 1e-6)
    # the extremes are exact
    assert jnp.allclose(jnp.abs(back).max(axis=1), jnp.abs(w).max(axis=1), rtol=1e-6)


def test_int4_packs_two_values_a_byte_exactly():
    values = jnp.arange(-7, 8, dtype=jnp.int8)[jnp.arange(64) % 15].reshape(2, 32)
    q, scale = quantize_rows(values.astype(jnp.float32), "int4", 32)
    assert q.shape == (2, 16) and jnp.array_equal(unpack_int4(q), values)
    assert jnp.allclose(scale, 1.0)


@pytest.mark.parametrize("mode, matmul", [("int8", "auto"), ("int8", "xla"), ("int4", "auto")])
def test_a_quantized_decode_computes_the_fake_quantized_model(params, mode, matmul):
    cfg = dataclasses.replace(quantized_config(CFG, mode, 32), decode_matmul=matmul)
    tokens = jnp.asarray([[1, 5, 9, 33, 70, 100, 200, 3], [4, 4, 4, 4, 4, 4, 4, 4]])

    def logits(p, c):
        cache = model.init_cache(c, 2, 8)
        return np.asarray(model.apply_cached(p, tokens, jnp.tile(jnp.arange(8), (2, 1)), cache, c)[0])

    quantized = quantize_decode_params(model.decode_params(params), cfg)
    fake = logits(model.decode_params(fake_quantize(params, cfg)), CFG)
    np.testing.assert_allclose(logits(quantized, cfg), fake, atol=2e-5)
    assert not np.allclose(fake, logits(model.decode_params(params), CFG), atol=1e-4)  # it did round
    assert weight_bytes(quantized) < weight_bytes(model.decode_params(params)) / (3 if mode == "int8" else 5)


def test_int8_decode_steps_use_the_native_kernel_where_it_runs(params):
    cfg = quantized_config(CFG, "int8")
    quantized = quantize_decode_params(model.decode_params(params), cfg)
    one = jnp.ones((1, 1), jnp.int32)
    text = jax.jit(lambda p, c: model.apply_cached(p, one, one, c, cfg)).lower(
        quantized, model.init_cache(cfg, 1, 8)).as_text()
    assert (native.INT8_TARGET in text) == (native.available() and jax.default_backend() == "cpu")


def test_the_decoder_and_the_serving_engine_take_a_quantized_config(params):
    cfg = quantized_config(CFG, "int8")
    want = generate(fake_quantize(params, cfg), CFG, [1, 5, 9], 12, temperature=0)
    assert generate(params, cfg, [1, 5, 9], 12, temperature=0) == want  # quantized on the way in
    engine = Engine(params, cfg, 2, 257)
    got = [int(engine.start(1, [1, 5, 9], 0.0, 0, 1.0, 0).ids[0])]
    got += [int(engine.step().ids[1]) for _ in range(11)]
    assert got == want


def test_a_quant_group_that_does_not_tile_the_inputs_is_refused():
    with pytest.raises(GptjaxError, match="model.quant_group 48 must be even and divide d_model"):
        validate(RunConfig(model=dataclasses.replace(CFG, quantize="int4", quant_group=48)))
