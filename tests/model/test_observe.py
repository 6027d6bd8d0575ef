"""What `model.apply_observed` sees: attention weights equal to those the attention
formulations apply and to transformers' GPT-2 (eager attention), the residual stream's RMS
equal to transformers' hidden states, and the logits unchanged."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.config import preset
from gptjax.model.attention import attention_probs, causal_attention_packed


@pytest.mark.parametrize("impl", ["blocked", "xla", "native"])
def test_weights_times_values_is_what_each_formulation_computes(impl):
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.normal(size=(2, 70, 3, 3, 8)), jnp.float32)
    if impl == "native":
        from gptjax.model.attention import native_unusable
        if native_unusable(qkv):
            pytest.skip(f"the native kernel cannot run here: {native_unusable(qkv)}")
    with jax.default_matmul_precision("highest"):
        out = causal_attention_packed(qkv, impl)
        for row in range(2):
            probs = attention_probs(qkv[row])  # (head, query, key)
            np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
            assert float(jnp.abs(jnp.triu(probs, k=1)).max()) == 0.0  # causal
            by_hand = jnp.einsum("hqk,khd->qhd", probs, qkv[row, :, 2])
            np.testing.assert_allclose(by_hand, out[row], atol=2e-6)


def test_logits_unchanged_and_remat_observes_the_same():
    cfg = preset("tiny", vocab_size=40)
    params = model.init(cfg, jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 32), 0, 40)
    logits, seen = model.apply_observed(params, tokens, cfg)
    assert seen["attn_probs"].shape == (2, 2, 32, 32) and seen["resid_rms"].shape == (2,)
    np.testing.assert_array_equal(logits, model.apply(params, tokens, cfg))
    _, remat_seen = model.apply_observed(params, tokens, dataclasses.replace(cfg, remat="full"))
    for k in seen:
        np.testing.assert_allclose(remat_seen[k], seen[k], rtol=1e-6)


def test_weights_and_residual_rms_match_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gptjax.hf.io import load_hf

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=3, n_head=4, n_positions=24, vocab_size=50, bos_token_id=None,
        eos_token_id=None, attn_implementation="eager")).eval()
    with torch.no_grad():  # weights away from init, so heads attend unevenly
        for p in hf.parameters():
            p.mul_(4.0)
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        cfg, params = load_hf(folder)
    tokens = np.random.default_rng(3).integers(0, 50, (2, 24))
    with torch.no_grad():
        out = hf(torch.tensor(tokens), output_attentions=True, output_hidden_states=True)
    _, seen = model.apply_observed(params, jnp.asarray(tokens), cfg)
    theirs = np.stack([a[0].numpy() for a in out.attentions])  # first row, every layer
    assert theirs.max() > 0.9  # some head attends sharply: the comparison has teeth
    np.testing.assert_allclose(seen["attn_probs"], theirs, atol=2e-5)
    # hidden_states[i + 1] is the residual after block i (the last one has ln_f applied)
    rms = [np.sqrt(np.mean(h.numpy() ** 2)) for h in out.hidden_states[1:-1]]
    np.testing.assert_allclose(seen["resid_rms"][:-1], rms, rtol=1e-5)
