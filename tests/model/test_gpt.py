import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import preset
from gptjax.model import gpt as model

CFG = preset("tiny", vocab_size=97)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.PRNGKey(0))


def test_shapes_and_dtype(params):
    tokens = jnp.zeros((3, CFG.context_length), jnp.int32)
    logits = model.apply(params, tokens, CFG)
    assert logits.shape == (3, CFG.context_length, 97) and logits.dtype == jnp.float32
    assert model.apply(params, tokens[:, :5], CFG).shape == (3, 5, 97)
    assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 3, 2, 16)


def test_causality(params):
    key = jax.random.PRNGKey(1)
    tokens = jax.random.randint(key, (2, CFG.context_length), 0, 97)
    t = 11
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 97)
    a, b = model.apply(params, tokens, CFG), model.apply(params, changed, CFG)
    np.testing.assert_array_equal(a[:, :t + 1], b[:, :t + 1])
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_initial_loss_is_close_to_uniform(params):
    tokens = jax.random.randint(jax.random.PRNGKey(2), (8, CFG.context_length + 1), 0, 97)
    loss = model.loss(params, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, CFG)
    assert abs(float(loss) - math.log(97)) < 0.05


def test_weighted_loss_ignores_zero_weight_tokens(params):
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 9), 0, 97)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    weights = jnp.zeros((2, 8)).at[0].set(1.0)
    weighted = model.loss(params, {**batch, "weights": weights}, CFG)
    first_row = model.loss(params, {k: v[:1] for k, v in batch.items()}, CFG)
    np.testing.assert_allclose(weighted, first_row, rtol=1e-6)


def test_dropout_is_active_only_when_asked(params):
    cfg = dataclasses.replace(CFG, dropout=0.5)
    tokens = jnp.ones((1, 8), jnp.int32)
    base = model.apply(params, tokens, cfg)
    np.testing.assert_array_equal(base, model.apply(params, tokens, CFG))
    dropped = model.apply(params, tokens, cfg, deterministic=False, rng=jax.random.PRNGKey(0))
    assert not np.allclose(base, dropped)


def test_rolled_and_unrolled_scans_have_the_same_parameters_and_outputs(params):
    assert model.layers_per_scan_step(CFG) == CFG.n_layer  # auto: small models unroll
    rolled = dataclasses.replace(CFG, scan_unroll=1)
    tokens = jnp.arange(16)[None] % 97
    np.testing.assert_allclose(model.apply(params, tokens, rolled), model.apply(params, tokens, CFG),
                               atol=1e-6)


def test_auto_unrolls_up_to_twelve_layers_and_remat_always_rolls():
    steps = model.layers_per_scan_step
    assert steps(preset("gpt2")) == 12 and steps(preset("gpt2-medium")) == 1
    assert steps(preset("gpt2", n_layer=13)) == 1 and steps(preset("gpt2", scan_unroll=4)) == 4
    assert steps(preset("gpt2", scan_unroll=4, remat="dots")) == 1


def _loss_and_grads(params, adapters, config, tokens, lora):
    """Loss and gradients with respect to the parameters and the LoRA adapters."""
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    return jax.jit(jax.value_and_grad(lambda p, a: model.loss_sum(
        p, batch, config, deterministic=False, rng=jax.random.PRNGKey(1), lora=lora,
        adapters=a)[0], argnums=(0, 1)))(params, adapters)


def test_rematerialised_blocks_give_the_same_loss_and_gradients(params):
    from gptjax.model import lora as L
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 17)), jnp.int32)
    # A rolled scan (where remat saves memory), dropout (the recomputed masks must be the
    # forward's) and LoRA adapters (a second variable collection the scan must carry).
    plain = dataclasses.replace(CFG, scan_unroll=1, dropout=0.1)
    lora = L.LoRAConfig(2, 4.0, L.parse_targets("all"))
    adapters = L.init_adapters(plain, lora, jax.random.PRNGKey(2))
    loss, grads = _loss_and_grads(params, adapters, plain, tokens, lora)
    for remat in ("full", "dots", "dots_no_batch"):
        loss_r, grads_r = _loss_and_grads(params, adapters, dataclasses.replace(plain, remat=remat),
                                          tokens, lora)
        np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
        assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(grads_r))
        for x, y in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
            np.testing.assert_allclose(x, y, atol=2e-6)


def _barrier_operand_shapes(jaxpr) -> list:
    """Shapes entering every optimization_barrier in `jaxpr`, nested jaxprs (scan bodies,
    pjit calls) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "optimization_barrier":
            shapes += [v.aval.shape for v in eqn.invars]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _barrier_operand_shapes(inner)
    return shapes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_narrowing_projection_gradient_is_unchanged_by_its_cpu_orientation(params, monkeypatch,
                                                                           dtype):
    # On CPU the MLP's proj (d_mlp -> d_model) reads its kernel through a transposed copy
    # behind an optimization barrier, so its weight gradient is formed (out, in); no other
    # projection may be touched, and the gradients must be the plain product's.
    config = dataclasses.replace(CFG, dtype=dtype)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 17)), jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def grad_fn(p):
        return jax.grad(lambda p: model.loss(p, batch, config))(p)

    # Traces of the model's inner functions are cached across calls: clear them whenever
    # dense_dot changes, so each side is traced with its own product.
    jax.clear_caches()
    barriers = _barrier_operand_shapes(jax.make_jaxpr(grad_fn)(params).jaxpr)
    grads = jax.jit(grad_fn)(params)
    monkeypatch.setattr(model, "dense_dot", jax.lax.dot_general)
    jax.clear_caches()
    assert _barrier_operand_shapes(jax.make_jaxpr(grad_fn)(params).jaxpr) == []
    plain = jax.jit(grad_fn)(params)
    monkeypatch.undo()
    jax.clear_caches()
    if jax.default_backend() == "cpu":
        # the transposed proj kernel going forward, its gradient coming back
        assert barriers and set(barriers) == {(CFG.d_model, CFG.d_mlp)}
    else:
        assert barriers == []
    for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(plain)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scan_unroll", [0, 2])  # auto and explicit: both unroll "tiny" fully
def test_full_remat_plans_fewer_temporary_bytes_whatever_the_unroll_asked(scan_unroll):
    # Remat rolls the layer scan (fully unrolled, XLA:CPU planned no saving).
    config = preset("tiny", vocab_size=97, context_length=128, d_model=128, n_head=4,
                    scan_unroll=scan_unroll)
    params = jax.eval_shape(lambda: model.init(config, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((8, 129), jnp.int32)

    def temp_bytes(cfg):
        fn = jax.jit(jax.grad(lambda p, t: model.loss(p, {"inputs": t[:, :-1], "targets": t[:, 1:]}, cfg)))
        return fn.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(dataclasses.replace(config, remat="full")) < 0.7 * temp_bytes(config)


@pytest.mark.parametrize("name,count", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_parameter_counts_are_exact(name, count):
    # The presets pad the 50,257-token vocabulary for speed; with it unpadded, OpenAI's counts.
    assert model.param_count(preset(name, vocab_size=50257)) == count
    padded = preset(name).vocab_size
    assert padded % 128 == 0 and 50257 < padded < 50257 + 128
    assert model.param_count(preset(name)) == count + (padded - 50257) * preset(name).d_model


def test_param_count_matches_the_arrays(params):
    assert model.param_count(CFG) == sum(x.size for x in jax.tree.leaves(params))
    assert model.param_count(CFG, exclude_position=True) == model.param_count(CFG) - 32 * 32
