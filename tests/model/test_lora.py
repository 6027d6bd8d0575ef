"""LoRA adapters: equal to the base at initialisation, merge exactly, train alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gptjax import config as C
from gptjax import model
from gptjax.errors import GptjaxError
from gptjax.finetune import optim
from gptjax.finetune.depth import DepthPlan
from gptjax.finetune.lm_loss import make_loss_sum
from gptjax.finetune.step import init_state, make_step
from gptjax.model import lora as L
from gptjax.model.parts import Trainable, parse_trainable
from gptjax.runs import finetuned

CFG = C.preset("tiny", vocab_size=61)


def tokens(seed=2, rows=3, length=20):
    return jax.random.randint(jax.random.PRNGKey(seed), (rows, length), 0, CFG.vocab_size)


@pytest.fixture(scope="module")
def base():
    return model.init(CFG, jax.random.PRNGKey(0))


def test_fresh_adapters_leave_outputs_exactly_unchanged(base):
    lora = L.LoRAConfig(4, 8.0, L.parse_targets("all"))
    adapters = L.init_adapters(CFG, lora, jax.random.PRNGKey(1))
    assert set(adapters["blocks"]["attn"]) == {"qkv_lora", "out_lora"}
    assert set(adapters["blocks"]["mlp"]) == {"fc_lora", "proj_lora"}
    # a is random (else nothing could learn), b is zero (so nothing changes yet)
    assert np.abs(adapters["blocks"]["attn"]["qkv_lora"]["a"]).max() > 0
    plain = model.apply(base, tokens(), CFG)
    adapted = model.apply(base, tokens(), CFG, lora=lora, adapters=adapters)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(adapted))


def test_merged_weights_compute_what_the_adapters_do(base):
    lora = L.LoRAConfig(4, 16.0, L.parse_targets("all"))
    adapters = L.init_adapters(CFG, lora, jax.random.PRNGKey(1))
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 64))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), adapters)
    unmerged = model.apply(base, tokens(), CFG, lora=lora, adapters=adapters)
    merged = model.apply(L.merge(base, adapters, lora), tokens(), CFG)
    assert np.abs(np.asarray(unmerged) - np.asarray(model.apply(base, tokens(), CFG))).max() > 1e-2
    np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)


def test_targets_are_checked():
    assert L.parse_targets("attn,fc") == ("qkv", "out", "fc")
    with pytest.raises(GptjaxError, match="'wte' matches no layer"):
        L.parse_targets("attn,wte")
    with pytest.raises(GptjaxError, match="at least one target"):
        L.parse_targets(" , ")
    with pytest.raises(GptjaxError, match="rank"):
        L.LoRAConfig(0).check()


def test_training_changes_only_the_adapters(base):
    spec = finetuned.Spec("lm", CFG, Trainable(0, False), L.LoRAConfig(4, 8.0, ("qkv", "fc")), {}, "")
    trainable, frozen = finetuned.trainable_part(spec, finetuned.full_tree(spec, base, jax.random.PRNGKey(1)))
    assert set(trainable) == {"lora"} and set(frozen) == {"gpt"}
    before = jax.tree.map(np.array, frozen)
    tx = optim.optimizer(trainable, DepthPlan(CFG.n_layer, spec.trainable), lr=1e-2, base_lr=1e-3,
                         warmup_steps=0, total_steps=10, weight_decay=0.1, grad_clip=1.0)
    step = jax.jit(make_step(make_loss_sum(CFG, spec.lora), tx), donate_argnums=0)
    state = init_state(trainable, tx, 0)
    t = tokens(length=CFG.context_length + 1)
    batch = {"inputs": t[:, :-1], "targets": t[:, 1:]}
    losses = []
    for _ in range(5):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):
        assert x.tobytes() == np.asarray(y).tobytes()  # bitwise, not just close
    assert np.abs(np.asarray(state.trainable["lora"]["blocks"]["attn"]["qkv_lora"]["b"])).max() > 0


def test_last_n_trains_only_the_last_layers(base):
    cfg = CFG  # two layers: the first stays, the second trains
    params = base
    spec = finetuned.Spec("lm", cfg, parse_trainable("last-1", 2), None, {}, "")
    trainable, frozen = finetuned.trainable_part(spec, finetuned.full_tree(spec, params, jax.random.PRNGKey(1)))
    assert set(trainable["gpt"]) == {"blocks", "ln_f"} and set(frozen["gpt"]) == {"wte", "wpe"}
    tx = optim.optimizer(trainable, DepthPlan(2, spec.trainable), lr=1e-2, base_lr=1e-2, warmup_steps=0,
                         total_steps=10, weight_decay=0.1, grad_clip=1.0)
    step = jax.jit(make_step(make_loss_sum(cfg), tx))
    t = tokens(length=cfg.context_length + 1)
    state, _ = step(init_state(trainable, tx, 0), frozen, {"inputs": t[:, :-1], "targets": t[:, 1:]})
    old, new = params["blocks"]["mlp"]["fc"]["kernel"], state.trainable["gpt"]["blocks"]["mlp"]["fc"]["kernel"]
    np.testing.assert_array_equal(np.asarray(old[0]), np.asarray(new[0]))  # weight decay included
    assert np.abs(np.asarray(old[1]) - np.asarray(new[1])).max() > 0


def test_trainable_choices_are_checked():
    assert parse_trainable("head", 4) == Trainable(0, False)
    assert parse_trainable("last-4", 4) == Trainable(4, False)
    with pytest.raises(GptjaxError, match="all, head or last-N with 1 <= N <= 4"):
        parse_trainable("last-5", 4)
    with pytest.raises(GptjaxError, match="--train must be all or last-N"):
        parse_trainable("head", 4, head=False)
