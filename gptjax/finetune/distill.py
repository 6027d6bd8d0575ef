"""Knowledge distillation: a student (a fresh preset or an existing run) trained to match
a teacher run's softened predictions, mixed with the true labels.

    distill_lm(teacher, student, "data/prepared", DistillLoss(0.5, 2.0), Tuning(), "runs/s")
    distill_cls(teacher, student, ClsData("texts.csv"), DistillLoss(), Tuning(), "runs/s")

A language-model teacher runs beside the student in every step (its parameters travel
with the frozen part, never differentiated or donated). A classifier teacher's class
logits are computed once for every text before training. The result is a fine-tuned run
(finetune.json's task is "distill"): generate, evaluate, classify and convert it as any
other. A preset student trains whole, so its checkpoint holds every weight and needs no
base on disk.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import numpy as np

from gptjax import config as C
from gptjax import model
from gptjax.errors import GptjaxError
from gptjax.finetune import cls, lm, session
from gptjax.finetune.distill_loss import DistillLoss, make_cls_loss_sum, make_lm_loss_sum, make_lm_val_sums
from gptjax.finetune.lm_loss import make_loss_sum, mean_loss
from gptjax.finetune.out_dir import check_out
from gptjax.finetune.settings import Tuning
from gptjax.finetune.step import make_eval
from gptjax.finetune.trainer import perplexity
from gptjax.model.classifier import logits as class_logits
from gptjax.model.parts import join
from gptjax.runs import finetuned
from gptjax.runs.load import Base, load, load_base, load_finetuned
from gptjax.training import run_dir as layout


@dataclass
class Teacher:
    path: Path
    config: C.RunConfig
    tokenizer: object
    params: dict  # a language model's parameters, or a classifier's {"gpt", "head", ["lora"]}
    step: int
    spec: finetuned.Spec | None = None  # a classifier's finetune.json

    @property
    def is_classifier(self) -> bool:
        return self.spec is not None

    def origin(self) -> dict:
        return {"path": str(self.path.absolute()), "checkpoint": self.step}


def load_teacher(path: str | Path, checkpoint: str = "latest", gpt2_ranks: str | None = None) -> Teacher:
    """A run as a teacher: a language model (trained, imported or fine-tuned) or a classifier."""
    path = Path(path)
    if not layout.is_run(path):
        raise GptjaxError(f"--teacher {path} is not a gptjax run (no config.json)")
    if finetuned.is_finetuned(path) and finetuned.read_spec(path).is_classifier:
        ft = load_finetuned(path, checkpoint, gpt2_ranks)
        return Teacher(path, ft.config, ft.tokenizer, ft.params, ft.step, ft.spec)
    run = load(path, checkpoint, gpt2_ranks)
    return Teacher(path, run.config, run.tokenizer, run.params, run.step)


def load_student(student: str, teacher: Teacher, tuning: Tuning, checkpoint: str = "latest",
                 gpt2_ranks: str | None = None, say=print) -> Base:
    """The student as a fine-tuning base: a gptjax run (same tokenizer as the teacher), or a
    preset initialised with --seed, shaped for the teacher's tokenizer and context."""
    t = teacher.config.model
    if not layout.is_run(Path(student)) and student not in C.PRESETS:
        raise GptjaxError(f"--student {student!r} is neither a gptjax run folder nor a preset "
                          f"({', '.join(C.PRESETS)})")
    if layout.is_run(Path(student)):  # a run in a folder named like a preset is the run
        base = load_base(run_dir=student, checkpoint=checkpoint, gpt2_ranks=gpt2_ranks)
        check_same_tokenizer(base.tokenizer.spec(), teacher.tokenizer.spec(), student, teacher.path)
        if not teacher.is_classifier and base.config.model.context_length > t.context_length:
            raise GptjaxError(f"the student's context ({base.config.model.context_length}) is longer "
                              f"than the teacher's ({t.context_length}): the teacher cannot score its "
                              f"windows; use a student with a context of at most {t.context_length}")
        return base
    if checkpoint != "latest":
        raise GptjaxError(f"--student-checkpoint is for a student run; {student} is a preset")
    check_whole(tuning, student)
    own = C.preset(student)
    m = C.preset(student, vocab_size=t.vocab_size, context_length=min(own.context_length, t.context_length))
    if m.context_length < own.context_length:
        say(f"student: preset {student} with the teacher's context of {m.context_length} tokens "
            f"(the preset's is {own.context_length})")
    params = model.init(m, jax.random.PRNGKey(tuning.seed))
    data = C.DataConfig(tokenizer=teacher.tokenizer.spec()["kind"], gpt2_ranks=teacher.config.data.gpt2_ranks)
    return Base(C.RunConfig(model=m, data=data), teacher.tokenizer, params,
                {"kind": "preset", "preset": student, "seed": tuning.seed})


def check_whole(tuning: Tuning, preset: str) -> None:
    """A preset student starts from random weights: all of it trains from the first step
    (nothing random is left frozen, and its run needs no base on disk)."""
    for on, flag in ((tuning.lora_rank, "--lora-rank"), (tuning.train != "all", "--train"),
                     (tuning.unfreeze, "--unfreeze"), (tuning.layer_lr_decay != 1, "--layer-lr-decay")):
        if on:
            raise GptjaxError(f"the preset student {preset} starts from random weights and trains "
                              f"whole from the first step: {flag} needs a student run")


def _check_student(base: Base, tuning: Tuning) -> None:
    if base.origin["kind"] == "preset":
        check_whole(tuning, base.origin["preset"])


def check_same_tokenizer(student: dict, teacher: dict, student_path, teacher_path) -> None:
    """Distillation compares the two models' predictions id by id: one vocabulary for both."""
    if student == teacher:
        return
    if student["kind"] != teacher["kind"]:
        what = f"the {student['kind']} tokenizer and the teacher {teacher_path} the {teacher['kind']} one"
    else:
        what = f"a different {student['kind']} vocabulary than the teacher {teacher_path}"
    raise GptjaxError(f"the student {student_path} uses {what}; distillation compares their "
                      "predictions id by id, so both must use the same tokenizer")


def _settings(teacher: Teacher, kd: DistillLoss) -> dict:
    return {**asdict(kd), "teacher": teacher.origin()}


def distill_lm(teacher: Teacher, base: Base, data_dir: str, kd: DistillLoss, tuning: Tuning,
               out: str | Path, *, progress: bool = True, say=print) -> dict:
    """Train the student `base` on prepared data towards the language-model `teacher`."""
    out = Path(out)
    check_out(out, "distill")
    tuning.check()
    kd.check()
    if teacher.is_classifier:
        raise GptjaxError(f"{teacher.path} is a classifier: distil it with labelled texts (distill_cls)")
    _check_student(base, tuning)
    if not Path(data_dir).is_dir():
        raise GptjaxError(f"--data {data_dir} is not a folder: a language-model teacher is distilled "
                          "on prepared data (gptjax prepare)")
    check_same_tokenizer(base.tokenizer.spec(), teacher.tokenizer.spec(), "model", teacher.path)
    d = lm.lm_data(base, data_dir, tuning)
    s = session.setup(base, tuning, "distill", settings={
        "data": str(Path(data_dir).absolute()), "tuning": tuning.settings(),
        "distill": _settings(teacher, kd)})
    t_cfg = dataclasses.replace(teacher.config.model, dropout=0.0)
    s.frozen["teacher"] = teacher.params
    n_vocab = base.tokenizer.vocab_size
    loss_sum = make_lm_loss_sum(s.spec.model, t_cfg, n_vocab, kd, s.spec.lora)
    val_sums = jax.jit(make_lm_val_sums(s.spec.model, t_cfg, n_vocab, s.spec.lora))

    def evaluate(trainable):
        parts = jax.device_get([val_sums(join(trainable, s.frozen), b) for b in d.val])  # synced once
        weight = max(sum(float(w) for _, _, w in parts), 1e-9)
        loss = sum(float(ce) for ce, _, _ in parts) / weight
        return {"val_loss": loss, "val_ppl": perplexity(loss),
                "val_kl": sum(float(kl) for _, kl, _ in parts) / weight}

    teacher_loss = mean_loss(jax.jit(make_eval(make_loss_sum(t_cfg))), {"gpt": teacher.params}, d.val)
    before = evaluate(s.trainable)
    say(f"data: {len(d.data.train):,} train / {len(d.data.val):,} val tokens; teacher {teacher.path} "
        f"(step {teacher.step}): val loss {teacher_loss:.4f}; student before training: val loss "
        f"{before['val_loss']:.4f}, KL to the teacher {before['val_kl']:.4f}; "
        f"alpha {kd.alpha:g}, temperature {kd.temperature:g}")
    result = session.run(out, s, tuning, base, loss_sum, d.epoch_batches, d.steps_per_epoch, evaluate,
                         "val_loss", False, progress, say)
    best = result.best_metrics
    say(f"student val loss {before['val_loss']:.4f} -> {best['val_loss']:.4f} (teacher {teacher_loss:.4f}), "
        f"KL to the teacher {before['val_kl']:.4f} -> {best['val_kl']:.4f}, best at step "
        f"{result.best_step}; generate with: gptjax generate --run {out}")
    return {"teacher_val_loss": teacher_loss, "val_loss_before": before["val_loss"], **best}


@dataclass(frozen=True)
class ClsRecipe:
    """What cls.train_and_test needs to distil rather than fine-tune: the loss and the record."""

    kd: DistillLoss
    settings: dict

    def loss_sum(self, spec: finetuned.Spec, pooling: str):
        return make_cls_loss_sum(spec.model, pooling, self.kd, spec.lora)


def distill_cls(teacher: Teacher, base: Base, data: cls.ClsData, kd: DistillLoss, tuning: Tuning,
                out: str | Path, *, progress: bool = True, say=print) -> dict:
    """Train the student `base` as a classifier towards the classifier `teacher`'s class
    probabilities on `data` (labelled texts with the teacher's classes); returns the test
    report of the best checkpoint. The student reads the texts as the teacher did: its
    pooling and at most its number of tokens."""
    out = Path(out)
    check_out(out, "distill")
    tuning.check()
    kd.check()
    if not teacher.is_classifier:
        raise GptjaxError(f"{teacher.path} is a language model, not a classifier: distil it on "
                          "prepared data (distill_lm)")
    _check_student(base, tuning)
    if Path(data.path).is_dir():
        raise GptjaxError(f"--data {data.path} is a folder: a classifier teacher is distilled on a "
                          "CSV, TSV or JSONL file of labelled texts")
    check_same_tokenizer(base.tokenizer.spec(), teacher.tokenizer.spec(), "model", teacher.path)
    t_model = dataclasses.replace(teacher.spec.model, dropout=0.0)
    t_limit = teacher.spec.settings.get("data", {}).get("max_length") or t_model.context_length
    m = base.config.model
    data = dataclasses.replace(data, pooling=teacher.spec.pooling,
                               max_length=min(t_limit, t_model.context_length, m.context_length))
    p = cls.prepare(data, base.tokenizer, m.context_length, tuning.seed)
    if p.classes != teacher.spec.classes:
        raise GptjaxError(f"{data.path} has the classes {', '.join(p.classes)}, the teacher "
                          f"{teacher.path} {', '.join(teacher.spec.classes)}: they must be the same")
    if p.truncated:
        warnings.warn(f"{p.truncated} of {len(p.ids)} texts are longer than {data.max_length} tokens "
                      "and were cut to that length")
    predict = jax.jit(lambda params, tokens, lengths: class_logits(
        params, tokens, lengths, t_model, pooling=teacher.spec.pooling, lora=teacher.spec.lora))
    pad = base.tokenizer.eot_id if base.tokenizer.eot_id is not None else 0
    p.teacher_logits = cls.predict_rows(predict, teacher.params, p, np.arange(len(p.ids)),
                                        tuning.batch_size, t_model.context_length, pad)
    agree = (p.teacher_logits[p.test].argmax(-1) == p.labels[p.test]).mean() if len(p.test) else float("nan")
    say(f"teacher {teacher.path} (step {teacher.step}): accuracy {agree:.4f} on this run's test "
        f"split; alpha {kd.alpha:g}, temperature {kd.temperature:g}")
    return cls.train_and_test(base, data, tuning, p, out, progress=progress, say=say,
                              recipe=ClsRecipe(kd, _settings(teacher, kd)))
