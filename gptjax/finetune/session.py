"""What every fine-tuning task shares: building the parameter tree from a base, choosing
what trains, writing the run, and fitting with the best checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import config as C
from gptjax.finetune import optim, resume
from gptjax.finetune.depth import DepthPlan
from gptjax.finetune.out_dir import check_out, command
from gptjax.finetune.settings import Tuning, parse_unfreeze
from gptjax.finetune.step import init_state, make_step
from gptjax.finetune.trainer import FitResult, Schedule, fit
from gptjax.model.lora import LoRAConfig, count, parse_targets
from gptjax.model.parts import parse_trainable
from gptjax.runs import finetuned
from gptjax.runs.load import Base
from gptjax.training import run_lock, trackers
from gptjax.training.checkpoint import Checkpoints
from gptjax.training.metrics import JsonlLog


@dataclasses.dataclass
class Setup:
    spec: finetuned.Spec
    trainable: dict
    frozen: dict
    n_trainable: int
    n_total: int

    def describe(self) -> str:
        s = self.spec
        what = (f"LoRA rank {s.lora.rank} (alpha {s.lora.alpha:g}) on {', '.join(s.lora.targets)}"
                + (" + the head" if s.is_classifier else "")) if s.lora else s.trainable.describe(
                    s.model.n_layer, head=s.is_classifier)
        return (f"trainable: {self.n_trainable:,} of {self.n_total:,} parameters "
                f"({100 * self.n_trainable / self.n_total:.2f}%): {what}")


def setup(base: Base, tuning: Tuning, task: str, *, classes: tuple[str, ...] = (),
          pooling: str = "last", settings: dict | None = None) -> Setup:
    """The full parameter tree {"gpt", ["head"], ["lora"]} split into trainable and frozen;
    `classes` (a classifier's) give it a head."""
    tuning.check()
    m = dataclasses.replace(base.config.model, dropout=tuning.dropout)
    trainable_spec = parse_trainable(tuning.train, m.n_layer, head=bool(classes))
    lora = None
    if tuning.lora_rank:
        lora = LoRAConfig(tuning.lora_rank, tuning.lora_alpha, parse_targets(tuning.lora_targets)).check()
    spec = finetuned.Spec(task, m, trainable_spec, lora, base.origin, finetuned.fingerprint(base.params),
                      classes, pooling, settings or {})
    tree = finetuned.full_tree(spec, base.params, jax.random.PRNGKey(tuning.seed))
    trainable, frozen = finetuned.trainable_part(spec, tree)
    return Setup(spec, trainable, frozen, _trained_count(spec, trainable), count(tree))


def _trained_count(spec: finetuned.Spec, trainable: dict) -> int:
    """Parameters that can change: only the trained layers' rows of stacked block weights."""
    total = count(trainable)
    blocks = trainable.get("gpt", {}).get("blocks")
    if blocks is not None:
        n = count(blocks)
        total -= n - n * spec.trainable.blocks // spec.model.n_layer
    return total


def run(out: Path, s: Setup, tuning: Tuning, base: Base, loss_sum, epoch_batches,
        steps_per_epoch: int, evaluate, monitor: str, higher_is_better: bool,
        progress: bool, say=print) -> FitResult:
    """Create the run in `out` and fit; the best trainable parameters are checkpointed."""
    eval_every = tuning.eval_every or steps_per_epoch
    schedule = Schedule(tuning.epochs, steps_per_epoch, eval_every, tuning.patience, monitor,
                        higher_is_better, tuning.max_steps)
    warmup = min(tuning.warmup_steps, max(schedule.total_steps - 1, 0))
    plan = depth_plan(s, tuning, steps_per_epoch)
    tx = optim.optimizer(s.trainable, plan, lr=tuning.lr, base_lr=tuning.base_lr, warmup_steps=warmup,
                         total_steps=schedule.total_steps, weight_decay=tuning.weight_decay,
                         grad_clip=tuning.grad_clip)
    step = jax.jit(make_step(loss_sum, tx), donate_argnums=0)
    def fresh_state():  # the step donates its state: a copy of its own, so the caller's base survives
        return init_state(jax.tree.map(jnp.copy, s.trainable), tx, tuning.seed)
    data_cfg = C.DataConfig(tokenizer=base.tokenizer.spec()["kind"], gpt2_ranks=base.config.data.gpt2_ranks)
    with run_lock.hold(out, f"gptjax {command(s.spec.task)}"):  # nests inside the CLI's
        check_out(out, s.spec.task)
        if not resume.check_same_run(out, s.spec.to_json()):  # a resumed run's files stay as they are
            finetuned.write_run(out, s.spec, base.tokenizer.spec(), data_cfg)
        return _fit(out, s, tuning, fresh_state, step, schedule, plan, epoch_batches, evaluate, progress, say)


def depth_plan(s: Setup, tuning: Tuning, steps_per_epoch: int) -> DepthPlan:
    """What trains at each step, and each layer's share of the base learning rate."""
    epochs = parse_unfreeze(tuning.unfreeze)
    stage_steps = max(1, round(epochs * steps_per_epoch)) if epochs else 0
    return DepthPlan(s.spec.model.n_layer, s.spec.trainable, stage_steps, tuning.layer_lr_decay)


def _fit(out: Path, s: Setup, tuning: Tuning, fresh_state, step, schedule: Schedule, plan: DepthPlan,
         epoch_batches, evaluate, progress: bool, say) -> FitResult:
    ckpts = Checkpoints(out / "checkpoints", keep=1)
    saved = resume.ResumeState(out)
    log = trackers.tracked(JsonlLog(out / "metrics.jsonl"), trackers.parse_log_to(tuning.log_to), out,
                           out.absolute().name, _flat({"task": s.spec.task, **s.spec.settings}))

    def on_best(best, at, metrics):
        ckpts.save_params(at, best, {"metrics": _jsonable(metrics)})

    try:
        state = fresh_state()
        start = saved.load(state)
        if start is not None:
            state = start.state  # the fresh arrays are freed: a resumed run needs no more memory
        resume.reconcile(ckpts, saved, start, on_best, log)
        if start is not None:
            p = start.progress
            say(f"resuming {out} at step {p.step} of {schedule.total_steps}"
                + (" (it had finished: reporting its best checkpoint)"
                   if p.stopped or p.step >= schedule.total_steps else "")
                + f"; best {schedule.monitor} so far {p.best_value:.4f} at step {p.best_step}")
        say(s.describe())
        for line in plan.describe(schedule.total_steps, head=s.spec.is_classifier):
            say(line)
        say(f"{schedule.describe()}, validating every "
            f"{schedule.eval_every} steps on {schedule.monitor}"
            + (f", stopping after {tuning.patience} without improvement" if tuning.patience else ""))
        return fit(state, s.frozen, step, epoch_batches, evaluate, schedule, on_best=on_best,
                   on_validated=saved.save, start=start, log=log, progress=progress, say=say)
    finally:
        saved.close()
        ckpts.close()  # waits for the asynchronous save of the best checkpoint
        if isinstance(log, trackers.Tracked):
            log.close()  # sends what is queued


def _flat(settings: dict, prefix: str = "") -> dict:
    """{"tuning.lr": 1e-3, ...}: a tracker's parameters are flat."""
    out = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _jsonable(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in metrics.items()
            if isinstance(v, (int, float, str, np.floating)) and not (isinstance(v, float) and math.isnan(v))}
