"""Gradual unfreezing and layer-wise learning rates: at every stage exactly the leaves and
rows that should train move (the rest stay bitwise), and each layer's update is its
learning-rate factor times the undecayed one."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from gptjax import config as C
from gptjax import model
from gptjax.errors import GptjaxError
from gptjax.finetune import optim
from gptjax.finetune.depth import DepthPlan
from gptjax.finetune.settings import Tuning, parse_unfreeze
from gptjax.model.parts import Trainable, parse_trainable
from gptjax.runs import finetuned
from gptjax.training.optim import decay_mask

CFG = C.preset("tiny", vocab_size=61)  # two blocks
L = CFG.n_layer


def _classifier(train: str = "all") -> tuple[dict, Trainable]:
    spec = finetuned.Spec("cls", CFG, parse_trainable(train, L), None, {}, "", classes=("a", "b", "c"))
    tree = finetuned.full_tree(spec, model.init(CFG, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    return finetuned.trainable_part(spec, tree)[0], spec.trainable


def _tx(trainable, plan):
    return optim.optimizer(trainable, plan, lr=1e-2, base_lr=1e-2, warmup_steps=0, total_steps=50,
                           weight_decay=0.1, grad_clip=1.0)


def _grads(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _moved(before: dict, after: dict) -> dict:
    """Per depth-bearing part: which rows (blocks) or whether the leaves changed at all."""
    def changed(a, b):
        return bool(np.any(np.asarray(a) != np.asarray(b)))
    return {"embeddings": any(changed(before["gpt"][k]["embedding"], after["gpt"][k]["embedding"])
                              for k in ("wte", "wpe")),
            "blocks": _rows_moved(before, after),
            "ln_f": any(changed(a, b) for a, b in zip(jax.tree.leaves(before["gpt"]["ln_f"]),
                                                      jax.tree.leaves(after["gpt"]["ln_f"]))),
            "head": any(changed(a, b) for a, b in zip(jax.tree.leaves(before["head"]),
                                                      jax.tree.leaves(after["head"])))}


def test_gradual_unfreezing_opens_one_layer_per_stage_from_the_top():
    params, trainable = _classifier()
    plan = DepthPlan(L, trainable, stage_steps=2)
    tx = _tx(params, plan)
    state = tx.init(params)
    update = jax.jit(tx.update)
    expected = [  # per stage: embeddings, blocks (bottom first), final norm, head
        (False, [False, False], True, True),
        (False, [False, True], True, True),
        (False, [True, True], True, True),
        (True, [True, True], True, True),
    ]
    for step in range(2 * len(expected)):
        updates, state = update(_grads(params, step), state, params)
        new = jax.tree.map(lambda p, u: p + u, params, updates)
        moved = _moved(params, new)
        got = (moved["embeddings"], moved["blocks"], moved["ln_f"], moved["head"])
        assert got == expected[step // 2], step
        params = new
    assert plan.stages == len(expected)


def test_unfreezing_stops_at_what_train_last_n_allows():
    params, trainable = _classifier("last-1")
    plan = DepthPlan(L, trainable, stage_steps=1)
    assert plan.stages == 2
    tx = _tx(params, plan)
    state = tx.init(params)
    for step in range(4):
        updates, state = tx.update(_grads(params, step), state, params)
        new = jax.tree.map(lambda p, u: p + u, params, updates)
        assert _rows_moved(params, new) == ([False, False] if step == 0 else [False, True]), step
        params = new


def _rows_moved(before: dict, after: dict) -> list[bool]:
    """Per block (bottom first): whether any of its rows in the stacked weights changed."""
    pairs = list(zip(jax.tree.leaves(before["gpt"]["blocks"]), jax.tree.leaves(after["gpt"]["blocks"])))
    return [any(np.any(np.asarray(a[i]) != np.asarray(b[i])) for a, b in pairs) for i in range(L)]


@pytest.mark.parametrize("decay", [0.5, 0.8])
def test_layer_lr_decay_scales_each_layers_update_by_its_factor(decay):
    params, trainable = _classifier()
    plain = _tx(params, DepthPlan(L, trainable))
    decayed = _tx(params, DepthPlan(L, trainable, lr_decay=decay))
    s_plain, s_decayed = plain.init(params), decayed.init(params)
    for step in range(3):  # AdamW's moments are the same in both: the factors come after it
        g = _grads(params, step)
        u_plain, s_plain = plain.update(g, s_plain, params)
        u_decayed, s_decayed = decayed.update(g, s_decayed, params)
        block_factor = decay ** (L - np.arange(1, L + 1))  # block i of L at decay^(L-i)
        blocks = zip(jax.tree.leaves(u_plain["gpt"]["blocks"]), jax.tree.leaves(u_decayed["gpt"]["blocks"]))
        for a, b in blocks:
            want = np.asarray(a) * block_factor.reshape(-1, *[1] * (a.ndim - 1))
            np.testing.assert_allclose(np.asarray(b), want, rtol=1e-6, atol=1e-12)
        for k in ("wte", "wpe"):
            np.testing.assert_allclose(np.asarray(u_decayed["gpt"][k]["embedding"]),
                                       np.asarray(u_plain["gpt"][k]["embedding"]) * decay ** L, rtol=1e-6)
        for top in ("ln_f", "head"):  # the top and the new head keep the full rate
            for a, b in zip(jax.tree.leaves(u_plain.get(top) or u_plain["gpt"][top]),
                            jax.tree.leaves(u_decayed.get(top) or u_decayed["gpt"][top])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert DepthPlan(4, parse_trainable("all", 4), lr_decay=0.5).lr_factors().tolist() == [
        0.0625, 0.125, 0.25, 0.5, 1.0, 1.0]


def test_without_schedules_the_updates_are_plain_adamw_bitwise():
    params, trainable = _classifier()
    tx = _tx(params, DepthPlan(L, trainable))
    assert "DepthState" not in repr(tx.init(params))  # everything open at rate 1: no depth factors

    def adamw(peak):
        return optax.adamw(optim.schedule(peak, 0, 50), b1=0.9, b2=0.999, weight_decay=0.1, mask=decay_mask)
    labels = {k: jax.tree.map(lambda _, k=k: "new" if k == "head" else "base", v) for k, v in params.items()}
    plain = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.multi_transform({"new": adamw(1e-2), "base": adamw(1e-2)}, labels))
    s_tx, s_plain = tx.init(params), plain.init(params)
    for step in range(3):
        g = _grads(params, step)
        u_tx, s_tx = tx.update(g, s_tx, params)
        u_plain, s_plain = plain.update(g, s_plain, params)
        for a, b in zip(jax.tree.leaves(u_tx), jax.tree.leaves(u_plain)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("text", ["gradual", "gradual:0", "gradual:-1", "gradual:x", "linear:2",
                                  "gradual:1:2"])
def test_bad_unfreeze_schedules_are_refused(text):
    with pytest.raises(GptjaxError, match="--unfreeze must be gradual:EPOCHS"):
        parse_unfreeze(text)


def test_unfreeze_epochs_parse():
    assert parse_unfreeze("") == 0 and parse_unfreeze("gradual:2") == 2
    assert parse_unfreeze("gradual:0.5") == 0.5


@pytest.mark.parametrize("fields, match", [
    ({"layer_lr_decay": 0.0}, r"--layer-lr-decay must be in \(0, 1\], got 0.0"),
    ({"layer_lr_decay": 1.5}, r"--layer-lr-decay must be in \(0, 1\], got 1.5"),
    ({"layer_lr_decay": float("nan")}, "--layer-lr-decay must be in"),
    ({"unfreeze": "gradual:1", "lora_rank": 4}, "--unfreeze schedules the pretrained layers, which LoRA"),
    ({"layer_lr_decay": 0.9, "lora_rank": 4}, "--layer-lr-decay schedules the pretrained layers"),
    ({"unfreeze": "gradual:1", "train": "head"}, "--unfreeze schedules layers that --train head keeps"),
    ({"layer_lr_decay": 0.5, "train": "head"}, "--layer-lr-decay schedules layers that --train head"),
])
def test_schedule_settings_are_checked(fields, match):
    with pytest.raises(GptjaxError, match=match):
        Tuning(**fields).check()
