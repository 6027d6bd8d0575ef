"""The vmapped sweep step: every member starts where its own single run starts and trains
as that run trains (its learning rate, weight decay, seed and windows), and a diverging
member leaves the others untouched."""

import dataclasses

import jax
import numpy as np
import pytest

from gptjax import config as C
from gptjax.data.windows import WindowSampler, gather
from gptjax.errors import GptjaxError
from gptjax.training import sweep
from gptjax.training.step import init_state, make_train_step

MODEL = C.preset("tiny", vocab_size=50)
TRAIN = C.TrainConfig(batch_size=4, grad_accum=2, warmup_steps=2, max_steps=6, min_lr=1e-5)
RUN = C.RunConfig(model=MODEL, train=TRAIN)
TOKENS = np.random.default_rng(0).integers(0, 50, 4000).astype(np.uint16)


def windows(member_cfg, step):
    s = WindowSampler(len(TOKENS), MODEL.context_length, member_cfg.batch_size,
                      member_cfg.sampler, member_cfg.stride, member_cfg.seed)
    return gather(TOKENS, s.starts(step), MODEL.context_length)


def test_grid_is_the_product_and_each_member_is_validated():
    members = sweep.grid(RUN, lrs=[1e-3, 3e-4], seeds=[0, 1, 2])
    assert [(m.lr, m.seed) for m in members] == [(1e-3, 0), (1e-3, 1), (1e-3, 2),
                                                  (3e-4, 0), (3e-4, 1), (3e-4, 2)]
    assert {m.weight_decay for m in members} == {TRAIN.weight_decay}
    with pytest.raises(GptjaxError, match="lr=1e-06.*min_lr"):
        sweep.grid(RUN, lrs=[1e-3, 1e-6])
    # the base's own lr (1e-3, below this min_lr) is no member's: only the members' count
    high = dataclasses.replace(RUN, train=dataclasses.replace(TRAIN, min_lr=2e-3))
    assert [m.lr for m in sweep.grid(high, lrs=[3e-3, 1e-2])] == [3e-3, 1e-2]
    with pytest.raises(GptjaxError, match="seed values repeat"):
        sweep.grid(RUN, seeds=[1, 1])


def test_every_member_trains_exactly_as_its_own_single_run():
    members = sweep.grid(RUN, lrs=[2e-3, 5e-4], weight_decays=[0.0, 0.3], seeds=[0, 7])[::3]
    states = sweep.init_states(MODEL, TRAIN, members)
    for i, m in enumerate(members):  # the same initial values, bit for bit
        for a, b in zip(jax.tree.leaves(sweep.member(states, i)), jax.tree.leaves(init_state(MODEL, m))):
            np.testing.assert_array_equal(a, b)
    step = jax.jit(sweep.make_sweep_step(MODEL, TRAIN))
    hp = sweep.hparams(members)
    singles = [jax.jit(make_train_step(MODEL, m)) for m in members]
    alone = [init_state(MODEL, m) for m in members]
    for n in range(TRAIN.max_steps):
        batches = [windows(m, n) for m in members]
        states, metrics = step(states, sweep.stack_batches(batches), hp)
        for i, m in enumerate(members):
            alone[i], mine = singles[i](alone[i], batches[i])
            for key in ("loss", "grad_norm", "lr"):
                np.testing.assert_allclose(metrics[key][i], mine[key], rtol=2e-5, err_msg=key)
    # Adam moves a weight by about lr whatever its gradient's size, so rounding in the
    # batched matmuls shows in the near-zero weights at ~1e-6, against updates of ~1e-3.
    for i in range(len(members)):
        for a, b in zip(jax.tree.leaves(sweep.member(states, i).params), jax.tree.leaves(alone[i].params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the members really differ: distinct learning rates, decays and seeds
    assert len({round(float(x), 6) for x in metrics["loss"]}) == len(members)


def test_a_diverging_member_leaves_the_others_alone():
    members = sweep.grid(dataclasses.replace(RUN, train=dataclasses.replace(TRAIN, grad_accum=1)),
                         lrs=[1e-3, 1e30])
    t = members[0]
    states = sweep.init_states(MODEL, t, members)
    step = jax.jit(sweep.make_sweep_step(MODEL, t))
    single = jax.jit(make_train_step(MODEL, members[0]))
    alone = init_state(MODEL, members[0])
    for n in range(4):
        b = windows(t, n)
        states, metrics = step(states, sweep.stack_batches([b, b]), sweep.hparams(members))
        alone, mine = single(alone, b)
    assert not np.isfinite(metrics["loss"][1])
    np.testing.assert_allclose(metrics["loss"][0], mine["loss"], rtol=2e-5)
