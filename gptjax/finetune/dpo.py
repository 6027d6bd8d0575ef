"""Direct preference optimisation (Rafailov et al., 2023) on {instruction, input, chosen,
rejected} records: `gptjax finetune-dpo`.

The policy starts as the base and trains (fully, partly or through LoRA adapters, as every
fine-tuning command allows); the reference is the base itself, frozen. Its log-probability
of every answer is computed once, before training, and travels with the batches, so the
reference is never run, donated or changed afterwards.

With h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)) per
pair, the losses are:
  sigmoid (DPO):  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h), e = label smoothing
                  (0 is the paper's DPO; e > 0 the "conservative" variant for noisy labels);
  ipo:            (h - 1 / (2 beta))^2 (Azar et al., 2023).
Rewards are beta (log pi - log ref) of each answer; a pair is ranked right when the chosen
answer's reward is the higher. Each validation reports the loss, that accuracy, the mean
reward margin, both rewards and both answers' log-probabilities.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import model
from gptjax.errors import GptjaxError
from gptjax.finetune import batching, dpo_data, session, sft_data
from gptjax.finetune.out_dir import check_out
from gptjax.finetune.settings import Tuning
from gptjax.finetune.sft import TEST_RECORDS
from gptjax.model.parts import join
from gptjax.runs.load import Base

LOSSES = ("sigmoid", "ipo")
METRICS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp",
           "rejected_logp")


@dataclass(frozen=True)
class DpoData:
    path: str
    split: tuple[float, float, float] = (0.85, 0.05, 0.10)
    beta: float = 0.1
    dpo_loss: str = "sigmoid"  # named as its flag, so finetune.json is a valid --config
    label_smoothing: float = 0.0
    drop_identical: bool = False  # leave out records whose answers are the same text

    def check(self) -> "DpoData":
        if not self.beta > 0:
            raise GptjaxError(f"--beta must be positive, got {self.beta}")
        if self.dpo_loss not in LOSSES:
            raise GptjaxError(f"--dpo-loss must be one of {', '.join(LOSSES)}, got {self.dpo_loss!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise GptjaxError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.dpo_loss == "ipo" and self.label_smoothing:
            raise GptjaxError("--label-smoothing belongs to the sigmoid loss, not ipo")
        return self


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0):
    """(per-pair losses, chosen rewards, rejected rewards) from per-pair log-probabilities."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    return losses, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def make_answer_logps(config, lora=None):
    """answer_logps(params, batch, rng) -> (log p(chosen), log p(rejected)) per pair: the
    summed log-probabilities of each answer's tokens given its prompt, both answers in one
    forward pass."""
    dropout = config.dropout > 0

    def answer_logps(params, batch, rng):
        c, r = batch["chosen"], batch["rejected"]
        rows = c["inputs"].shape[0]
        both = {k: jnp.concatenate([c[k], r[k]]) for k in ("inputs", "targets", "weights")}
        logits = model.apply(params["gpt"], both["inputs"], config,
                             deterministic=not (dropout and rng is not None), rng=rng, lora=lora,
                             adapters=params.get("lora"))
        token_logp = -optax.softmax_cross_entropy_with_integer_labels(logits, both["targets"])
        per_row = (token_logp * both["weights"]).sum(-1)
        return per_row[:rows], per_row[rows:]

    return answer_logps


def make_losses(config, data: DpoData, lora=None):
    """(loss_sum for the fine-tuning step, metric_sums for validation), over batches that
    carry the reference's log-probabilities ("ref_chosen", "ref_rejected")."""
    answer_logps = make_answer_logps(config, lora)

    def parts(params, batch, rng):
        pc, pr = answer_logps(params, batch, rng)
        losses, rc, rr = dpo_loss(pc, pr, batch["ref_chosen"], batch["ref_rejected"], data.beta,
                                  data.dpo_loss, data.label_smoothing)
        return pc, pr, losses, rc, rr

    def loss_sum(params, batch, rng):
        w = batch["pair_weight"]
        return (parts(params, batch, rng)[2] * w).sum(), w.sum()

    def metric_sums(params, batch):
        pc, pr, losses, rc, rr = parts(params, batch, None)
        w = batch["pair_weight"]
        values = {"loss": losses, "accuracy": (rc > rr).astype(jnp.float32), "margin": rc - rr,
                  "chosen_reward": rc, "rejected_reward": rr, "chosen_logp": pc,
                  "rejected_logp": pr}
        return {k: (v * w).sum() for k, v in values.items()}, w.sum()

    return loss_sum, metric_sums


def _reference_logps(answer_logps, params, pairs, indices, eot, rows, context):
    """The frozen reference's (log p(chosen), log p(rejected)) of each pair in `indices`."""
    ref = np.zeros((len(pairs), 2), np.float64)
    logps = jax.jit(answer_logps)  # parameters as an argument, not baked in as constants
    lengths = np.array([_length(pairs[i]) for i in indices])
    for chunk in batching.by_length(lengths, rows):
        picked = indices[chunk]
        batch = dpo_data.pair_batch([pairs[i] for i in picked], eot, rows, context)
        c, r = jax.device_get(logps(params, batch, None))
        ref[picked, 0], ref[picked, 1] = c[:len(picked)], r[:len(picked)]
    return ref


def _length(pair: dpo_data.Pair) -> int:
    return max(len(pair.chosen.ids), len(pair.rejected.ids))


def _batch(pairs, indices, ref, eot, rows, context) -> dict:
    b = dpo_data.pair_batch([pairs[i] for i in indices], eot, rows, context)
    for col, name in enumerate(("ref_chosen", "ref_rejected")):
        values = np.zeros(rows, np.float32)
        values[:len(indices)] = ref[indices, col]
        b[name] = values
    return b


def finetune_dpo(base: Base, data: DpoData, tuning: Tuning, out: str | Path, *,
                 progress: bool = True, say=print) -> dict:
    """Tune `base` towards the chosen answers; returns the validation metrics before and after."""
    out = Path(out)
    check_out(out, "dpo")  # new, or this run again: it resumes
    tuning.check()
    data.check()
    tokenizer, m = base.tokenizer, base.config.model
    if tokenizer.eot_id is None:
        raise GptjaxError("preference tuning needs a tokenizer with an end-of-text id")
    records, identical = dpo_data.read_preferences(data.path, data.drop_identical)
    if identical:
        warnings.warn(f"left out {identical} records whose chosen and rejected answers are the same")
    train, val, test = sft_data.split_records(len(records), data.split, tuning.seed)
    pairs, cut = dpo_data.encode_pairs(records, tokenizer.encode, tokenizer.eot_id, m.context_length)
    ok = dpo_data.comparable(pairs)
    if not ok[train].any() or not ok[val].any():
        raise GptjaxError(f"no {'training' if not ok[train].any() else 'validation'} record keeps "
                          f"tokens of both answers within the context ({m.context_length} tokens): "
                          "use a base with a longer context, or shorter records")
    if cut:
        warnings.warn(f"{cut} of {2 * len(pairs)} answers are longer than the context "
                      f"({m.context_length} tokens) and were cut; {int((~ok).sum())} records lose "
                      "an answer entirely and are left out")
    train, val = train[ok[train]], val[ok[val]]
    if len(train) < tuning.batch_size:
        raise GptjaxError(f"the training split has {len(train)} comparable records, fewer than "
                          f"--batch-size {tuning.batch_size}")
    s = session.setup(base, tuning, "dpo", settings={
        "data": {**asdict(data), "path": str(Path(data.path).absolute())}, "tuning": tuning.settings()})
    loss_sum, metric_sums = make_losses(s.spec.model, data, s.spec.lora)
    size, T, eot = tuning.batch_size, m.context_length, tokenizer.eot_id
    # The reference: the starting parameters, before any update (adapters start at zero).
    reference = join(s.trainable, s.frozen)
    answer_logps = make_answer_logps(s.spec.model, s.spec.lora)
    ref = _reference_logps(answer_logps, reference, pairs, np.concatenate([train, val]), eot, size, T)
    del reference
    val_lengths = np.array([_length(pairs[i]) for i in val])
    val_batches = [_batch(pairs, val[c], ref, eot, size, T) for c in batching.by_length(val_lengths, size)]
    train_lengths = np.array([_length(pairs[i]) for i in train])
    sums = jax.jit(metric_sums)

    def epoch_batches(epoch):
        rng = np.random.default_rng([tuning.seed, epoch])
        for chunk in batching.grouped_order(train_lengths, size, rng):
            yield _batch(pairs, train[chunk], ref, eot, size, T)

    def evaluate(trainable):
        params = join(trainable, s.frozen)
        parts = jax.device_get([sums(params, b) for b in val_batches])
        count = sum(float(n) for _, n in parts)
        return {f"val_{k}": sum(float(p[k]) for p, _ in parts) / count for k in METRICS}

    say(f"data: {len(records):,} preference records; split {len(train):,} train / {len(val):,} "
        f"val (comparable pairs) / {len(test):,} test (seed {tuning.seed}); {data.dpo_loss} loss, "
        f"beta {data.beta:g}"
        + (f", label smoothing {data.label_smoothing:g}" if data.label_smoothing else ""))
    before = evaluate(s.trainable)
    say("before tuning: " + _shown(before))
    result = session.run(out, s, tuning, base, loss_sum, epoch_batches, len(train) // size,
                         evaluate, "val_loss", False, progress, say)
    (out / TEST_RECORDS).write_text(json.dumps([records[i] for i in test], indent=1,
                                                       ensure_ascii=False) + "\n")
    after = result.best_metrics
    report = {"before": before, "after": {k: v for k, v in after.items() if k.startswith("val_")},
              "best_step": result.best_step, "steps": result.steps, "cut_answers": cut,
              "left_out": int((~ok).sum()), "identical_left_out": identical}
    (out / "dpo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    say(f"preference accuracy {before['val_accuracy']:.3f} -> {after['val_accuracy']:.3f}, reward "
        f"margin {before['val_margin']:.4f} -> {after['val_margin']:.4f}, best at step "
        f"{result.best_step}; wrote {out / 'dpo_report.json'}")
    return report


def _shown(metrics: dict) -> str:
    return ", ".join(f"{k[4:]} {v:.4f}" for k, v in metrics.items())
