"""The next-token loss of a fine-tuned language model ({"gpt", ["lora"]} parameters)."""

from __future__ import annotations

from gptjax import model
from gptjax.config import ModelConfig


def make_loss_sum(config: ModelConfig, lora=None):
    """loss_sum(params, batch, rng) over {"inputs", "targets", ["weights"]}: summed
    weighted token cross-entropy and the summed weight."""
    dropout = config.dropout > 0

    def loss_sum(params, batch, rng):
        return model.loss_sum(params["gpt"], batch, config, deterministic=not (dropout and rng is not None),
                              rng=rng, lora=lora, adapters=params.get("lora"))

    return loss_sum


def mean_loss(eval_fn, params: dict, batches) -> float:
    """Weighted mean of eval_fn's (sum, weight) over batches, synced once."""
    import jax
    parts = [eval_fn(params, b) for b in batches]
    total = sum(float(t) for t, _ in jax.device_get(parts))
    weight = sum(float(w) for _, w in jax.device_get(parts))
    return total / max(weight, 1e-9)
