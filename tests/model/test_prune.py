"""Pruning: magnitude masks drop exactly the smallest share of each layer, structure masks
drop whole heads and neurons, Taylor scores are |w * dL/dw| summed per structure and rank
what matters, and recovery trains with the pruned weights held at zero."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.config import preset
from gptjax.model import prune as P
from gptjax.training.prune_recovery import recover

CFG = preset("tiny", vocab_size=65)


@pytest.fixture(scope="module")
def params():
    return model.init(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    text = np.tile(np.arange(65), 40)  # a learnable sequence: each id follows the last
    starts = rng.integers(0, len(text) - 33, (4, 8))
    return [{"inputs": jnp.asarray(np.stack([text[s:s + 32] for s in row])),
             "targets": jnp.asarray(np.stack([text[s + 1:s + 33] for s in row]))} for row in starts]


def test_magnitude_masks_drop_the_smallest_share_of_each_layer(params):
    masks = P.magnitude_masks(params, 0.3)
    for module, proj in P.KERNELS:
        w = np.abs(np.asarray(params["blocks"][module][proj]["kernel"]))
        keep = np.asarray(masks["blocks"][module][proj]["kernel"])
        for layer in range(CFG.n_layer):
            kept, dropped = w[layer][keep[layer]], w[layer][~keep[layer]]
            assert dropped.size == round(0.3 * w[layer].size) and kept.min() > dropped.max()
    assert np.asarray(masks["wte"]["embedding"]).all() and P.sparsity(params, masks)["kernels"] == \
        pytest.approx(0.3, abs=1e-3)


def test_structure_masks_drop_whole_heads_and_neurons(params):
    drop_heads = jnp.array([[True, False], [False, False]])
    heads = P.head_structure_masks(params, drop_heads)
    qkv = np.asarray(heads["blocks"]["attn"]["qkv"]["kernel"])  # (layers, d, 3, heads, hd)
    assert not qkv[0, :, :, 0].any() and qkv[0, :, :, 1].all() and qkv[1].all()
    assert not np.asarray(heads["blocks"]["attn"]["out"]["kernel"])[0, 0].any()
    drop = jnp.zeros((CFG.n_layer, CFG.d_mlp), bool).at[1, :10].set(True)
    neurons = P.neuron_structure_masks(params, drop)
    fc, proj = (np.asarray(neurons["blocks"]["mlp"][k]["kernel"]) for k in ("fc", "proj"))
    assert not fc[1, :, :10].any() and fc[1, :, 10:].all() and not proj[1, :10].any()
    assert not np.asarray(neurons["blocks"]["mlp"]["fc"]["bias"])[1, :10].any()


def test_taylor_scores_sum_w_times_gradient_over_each_structure(params, batches):
    scores = P.taylor_scores(params, batches[:1], CFG)
    g = jax.grad(lambda p: model.loss(p, batches[0], CFG))(params)
    s = jax.tree.map(lambda w, d: np.abs(np.asarray(w * d)), params, g)
    a = s["blocks"]["attn"]
    head = (a["qkv"]["kernel"][1, :, :, 0].sum() + a["out"]["kernel"][1, 0].sum()
            + a["qkv"]["bias"][1, :, 0].sum())
    m = s["blocks"]["mlp"]
    neuron = m["fc"]["kernel"][0, :, 7].sum() + m["proj"]["kernel"][0, 7].sum() + m["fc"]["bias"][0, 7]
    np.testing.assert_allclose(scores["heads"][1, 0], head, rtol=1e-5)
    np.testing.assert_allclose(scores["neurons"][0, 7], neuron, rtol=1e-5)


def test_the_lowest_taylor_scores_are_the_cheapest_to_drop(params, batches):
    trained = recover(params, P.ones_like(params), CFG, itertools.cycle(batches), 60, lr=3e-3)
    scores = P.taylor_scores(trained, batches, CFG)

    def loss_without(drop):
        masked = P.apply_masks(trained, P.neuron_structure_masks(trained, drop))
        return np.mean([float(model.loss(masked, b, CFG)) for b in batches])
    low = P.lowest(scores["neurons"], 0.5)
    assert loss_without(low) < loss_without(~low)


def test_recovery_keeps_pruned_weights_at_zero_and_lowers_the_loss(params, batches):
    masks = P.magnitude_masks(params, 0.5)
    pruned = P.apply_masks(params, masks)
    losses = []
    out = recover(pruned, masks, CFG, itertools.cycle(batches), 20, lr=3e-3,
                  on_step=lambda i, loss: losses.append(loss))
    for module, proj in P.KERNELS:
        kernel, keep = out["blocks"][module][proj]["kernel"], masks["blocks"][module][proj]["kernel"]
        assert not np.asarray(kernel)[~np.asarray(keep)].any()
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_shares_outside_zero_to_one_are_refused(params, share):
    with pytest.raises(ValueError, match="must be in"):
        P.magnitude_masks(params, share)
    with pytest.raises(ValueError, match="must be in"):
        P.lowest(jnp.ones((2, 4)), share)
