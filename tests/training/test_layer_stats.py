"""Per-layer statistics: the statistics step trains exactly as the plain one, its norms add
up to the global gradient norm and match numpy per block, entropies are right at their
extremes, and `gptjax train --stats-every` writes them at the asked steps."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from conftest import TINY_RUN, run_cli

from gptjax.config import TrainConfig, preset
from gptjax.training import layer_stats
from gptjax.training.step import init_state, make_train_step

CFG = preset("tiny", vocab_size=50)


def batch_of(seed, rows=8):
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (rows, CFG.context_length + 1), 0, 50)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def test_the_statistics_step_trains_as_the_plain_step_and_its_norms_add_up():
    t = TrainConfig(batch_size=8, grad_accum=2, warmup_steps=0, max_steps=10)
    plain, observed = (jax.jit(make_train_step(CFG, t, stats=s)) for s in (False, True))
    state = init_state(CFG, t)
    batch = batch_of(0)
    new_plain, m_plain = plain(state, batch)
    new_obs, m_obs = observed(state, batch)
    for a, b in zip(jax.tree.leaves(new_plain), jax.tree.leaves(new_obs)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
    assert "stats" not in m_plain and float(m_obs["loss"]) == float(m_plain["loss"])
    stats = m_obs["stats"]
    kinds = np.array([stats["grad_norm"][k] for k in layer_stats.KINDS])
    np.testing.assert_allclose(np.sqrt((kinds ** 2).sum()), m_plain["grad_norm"], rtol=1e-5)
    # per block: the norm of each layer's slice of every stacked parameter, by numpy
    blocks = state.params["blocks"]
    by_hand = np.sqrt(sum(np.square(np.asarray(x).reshape(x.shape[0], -1)).sum(1)
                          for x in jax.tree.leaves(blocks)))
    np.testing.assert_allclose(stats["param_norm"]["block"], by_hand, rtol=1e-5)
    from gptjax import model
    grads = jax.grad(model.loss)(state.params, batch, CFG)  # equal-sized micro-batches: the same mean
    g = np.sqrt(sum(np.square(np.asarray(x).reshape(x.shape[0], -1)).sum(1)
                    for x in jax.tree.leaves(grads["blocks"])))
    np.testing.assert_allclose(stats["grad_norm"]["block"], g, rtol=1e-4)
    updates = jax.tree.map(lambda new, old: np.asarray(new) - np.asarray(old),
                           new_obs.params["blocks"], blocks)
    upd = np.sqrt(sum(np.square(x.reshape(x.shape[0], -1)).sum(1) for x in jax.tree.leaves(updates)))
    np.testing.assert_allclose(stats["update_norm"]["block"], upd, rtol=1e-4)
    np.testing.assert_allclose(stats["update_ratio"]["block"], upd / by_hand, rtol=1e-4)
    assert stats["act_rms"].shape == (2,) and stats["attn_entropy"].shape == (2, 2)
    flat = layer_stats.flatten(jax.device_get(stats))
    assert {"grad_norm/block1", "update_ratio/mlp", "act_rms/block0",
            "attn_entropy/layer1/head1"} <= set(flat)


def test_attention_entropy_is_zero_for_one_key_and_log_positions_for_uniform():
    t = 6
    sharp = jnp.zeros((1, 1, t, t)).at[..., 0].set(1.0)
    uniform = jnp.tril(jnp.ones((t, t))) / jnp.arange(1, t + 1)[:, None]
    assert float(layer_stats.attention_entropy(sharp)[0, 0]) == 0.0
    expected = np.mean([math.log(i + 1) for i in range(t)])
    np.testing.assert_allclose(layer_stats.attention_entropy(uniform[None, None])[0, 0], expected,
                               rtol=1e-6)


def test_train_writes_statistics_at_the_asked_steps_only_when_asked(tmp_path, capsys, char_data):
    args = ["train", "--data", char_data, *TINY_RUN, "--max-steps", "6", "--max-new-tokens", "0"]
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "on", "--stats-every", "2")
    assert code == 0, err
    records = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in records if r["kind"] == "stats"]
    assert [r["step"] for r in stats] == [2, 4, 6]
    assert all(v > 0 for r in stats for k, v in r.items() if k.startswith(("grad_norm/", "act_rms/")))
    assert (tmp_path / "on" / "stats.png").stat().st_size > 10_000
    code, _, err = run_cli(capsys, *args, "--out", tmp_path / "off")
    assert code == 0, err
    off = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in off if r["kind"] == "stats"]
    assert not (tmp_path / "off" / "stats.png").exists()
    # the statistics steps trained as the plain ones did
    losses = [[r["loss"] for r in rs if r["kind"] == "train"] for rs in (records, off)]
    np.testing.assert_allclose(*losses, rtol=1e-6)
