"""Knowledge distillation's losses: the student learns the teacher's temperature-softened
distribution (Hinton, Vinyals and Dean 2015) mixed with the true labels' cross-entropy.

    per example = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
                  + (1 - alpha) * cross-entropy(student, label)

The KL's gradient with respect to the student's logits is (q - p) / T, where q and p are
the softened distributions; the T^2 makes it T * (q - p), which for large T is about the
gradient of matching the logits themselves, so alpha weighs the two terms about the same
way at every temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError


@dataclass(frozen=True)
class DistillLoss:
    alpha: float = 0.5  # weight of the teacher's term; 0 = the labels alone (no teacher)
    temperature: float = 2.0

    def check(self) -> "DistillLoss":
        if not (math.isfinite(self.alpha) and 0 <= self.alpha <= 1):
            raise GptjaxError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise GptjaxError(f"--temperature must be positive, got {self.temperature}")
        return self


def soft_kl(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """T^2 * KL(teacher_T || student_T) over the last axis, per row; the teacher gets no gradient."""
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature,
                               axis=-1)
    return temperature ** 2 * optax.losses.kl_divergence_with_log_targets(log_q, log_p)


def mixed(kl: jax.Array, ce: jax.Array, alpha: float) -> jax.Array:
    return alpha * kl + (1 - alpha) * ce if alpha < 1 else kl


def make_lm_loss_sum(student: ModelConfig, teacher: ModelConfig, n_vocab: int, kd: DistillLoss,
                     lora=None):
    """loss_sum(params, batch, rng) for a language model: params {"gpt", ["lora"], "teacher"}
    (the teacher's parameters arrive with the frozen part, so they are never differentiated
    or donated). The KL is taken over the tokenizer's `n_vocab` ids: two models may pad
    their vocabularies differently. alpha = 0 never runs the teacher."""
    dropout = student.dropout > 0

    def loss_sum(params, batch, rng):
        s_btv = model.apply(params["gpt"], batch["inputs"], student,
                            deterministic=not (dropout and rng is not None), rng=rng, lora=lora,
                            adapters=params.get("lora"))
        per_bt = optax.softmax_cross_entropy_with_integer_labels(s_btv, batch["targets"])
        if kd.alpha > 0:
            t_btv = model.apply(params["teacher"], batch["inputs"], teacher)
            per_bt = mixed(soft_kl(s_btv[..., :n_vocab], t_btv[..., :n_vocab], kd.temperature),
                           per_bt, kd.alpha)
        return _weighted(per_bt, batch)

    return loss_sum


def _weighted(per_bt: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(weighted sum, total weight): validation batches mark their padding rows with weight 0."""
    weights_bt = batch.get("weights")
    if weights_bt is None:
        return per_bt.sum(), jnp.asarray(per_bt.size, jnp.float32)
    return (per_bt * weights_bt).sum(), weights_bt.sum()


def make_lm_val_sums(student: ModelConfig, teacher: ModelConfig, n_vocab: int, lora=None):
    """val_sums(params, batch) -> (summed cross-entropy, summed KL(teacher || student) at
    T = 1, token weight), from one pass of each model: the student's loss and how far its
    next-token distribution is from the teacher's, for validation."""
    def val_sums(params, batch):
        s_btv = model.apply(params["gpt"], batch["inputs"], student, lora=lora, adapters=params.get("lora"))
        t_btv = model.apply(params["teacher"], batch["inputs"], teacher)
        ce_bt = optax.softmax_cross_entropy_with_integer_labels(s_btv, batch["targets"])
        ce, weight = _weighted(ce_bt, batch)
        kl, _ = _weighted(soft_kl(s_btv[..., :n_vocab], t_btv[..., :n_vocab], 1.0), batch)
        return ce, kl, weight
    return val_sums


def make_cls_loss_sum(student: ModelConfig, pooling: str, kd: DistillLoss, lora=None):
    """loss_sum(params, batch, rng) for a classifier: the batch carries the teacher's class
    logits ("teacher_logits", computed once before training) beside the labels; "weights"
    holds class weights and zero for padding rows."""
    from gptjax.model.classifier import logits
    deterministic = student.dropout == 0.0

    def loss_sum(params, batch, rng):
        z_bc = logits(params, batch["tokens"], batch["lengths"], student, pooling=pooling, lora=lora,
                      deterministic=deterministic or rng is None, rng=rng)
        per_b = optax.softmax_cross_entropy_with_integer_labels(z_bc, batch["labels"])
        if kd.alpha > 0:
            per_b = mixed(soft_kl(z_bc, batch["teacher_logits"], kd.temperature), per_b, kd.alpha)
        return (per_b * batch["weights"]).sum(), batch["weights"].sum()

    return loss_sum
