"""`gptjax distill`: train a student (a fresh preset or a run) to mimic a teacher run."""

from __future__ import annotations

from gptjax.cli.finetune import _add_tuning, _common, _split, locked_out, tuning_from
from gptjax.cli.options import add_checkpoint, add_gpt2_ranks
from gptjax.errors import GptjaxError
from gptjax.finetune.settings import Tuning

# Flags that only a classifier teacher reads, with what they mean when left out.
CLASSIFIER_DEFAULTS = {"text_column": "text", "label_column": "label", "format": None,
                       "split": "0.7,0.1,0.2", "metric": "accuracy", "class_weights": False}

DEFAULTS = Tuning(lr=1e-3, base_lr=1e-3, epochs=1, batch_size=8, eval_every=100, patience=0)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="train a smaller student to mimic a teacher run (knowledge distillation)",
        description="Knowledge distillation. The student learns the teacher's predictions "
        "softened by --temperature T, mixed with the true labels: per example, alpha * T^2 * "
        "KL(teacher_T || student_T) + (1 - alpha) * cross-entropy; --alpha 0 trains on the "
        "labels alone, the same student without a teacher (its steps never run the teacher; "
        "validation still reports the KL to it). A language-model teacher is "
        "distilled on prepared data, next token by next token; a classifier teacher (a "
        "finetune-cls run) on labelled texts, through its class probabilities, and the "
        "student becomes a classifier with the same classes. Teacher and student must share "
        "a tokenizer. A preset student starts from random weights (--seed) and trains whole, "
        "at --base-lr; a student run is fine-tuned like a --base.")
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", required=True, metavar="RUN_DIR", help="the model to mimic: a "
                   "gptjax run (trained, imported or fine-tuned), or a finetune-cls classifier")
    add_checkpoint(g, "--teacher-checkpoint", when="of the teacher: ")
    g.add_argument("--student", required=True, metavar="PRESET|RUN_DIR",
                   help="a preset (tiny, baby, mini, gpt2, ...: fresh weights, with the teacher's "
                   "vocabulary and at most its context) or a gptjax run to start from")
    add_checkpoint(g, "--student-checkpoint", when="with a student run: ")
    add_gpt2_ranks(g)
    d = p.add_argument_group("data and loss")
    d.add_argument("--data", required=True, metavar="DIR|FILE", help="a language-model teacher: "
                   "a prepared data folder (gptjax prepare, the teacher's tokenizer); a classifier "
                   "teacher: a CSV, TSV or JSONL file of texts labelled with the teacher's classes")
    d.add_argument("--alpha", type=float, default=0.5, metavar="FLOAT",
                   help="weight of the teacher's term, in [0, 1]; 0 = the labels alone (default: 0.5)")
    d.add_argument("--temperature", type=float, default=2.0, metavar="FLOAT",
                   help="softens both distributions before the KL; above 1 shows the student "
                   "more of the teacher's ranking of wrong answers (default: 2)")
    c = p.add_argument_group("a classifier teacher's data (as in finetune-cls)")
    c.add_argument("--text-column", metavar="COLUMN",
                   help="the text column's name or 0-based number (default: text)")
    c.add_argument("--label-column", metavar="COLUMN",
                   help="the label column's name or 0-based number (default: label)")
    c.add_argument("--format", choices=("csv", "tsv", "jsonl"), help="file format (default: from the suffix)")
    c.add_argument("--split", metavar="FRACTIONS", help="train,val,test fractions (default: 0.7,0.1,0.2)")
    c.add_argument("--metric", choices=("accuracy", "macro_f1", "loss"),
                   help="validation metric for the best checkpoint (default: accuracy)")
    c.add_argument("--class-weights", action="store_true", default=None,
                   help="weight every example by its class's inverse frequency")
    _add_tuning(p, DEFAULTS)
    _common(p, "top-level teacher, student, data, alpha and the other flags' names, and "
               "[tuning]; or a distilled run's finetune.json")


def run(args) -> int:
    from gptjax.finetune.distill_loss import DistillLoss
    kd = DistillLoss(args.alpha, args.temperature).check()
    tuning = tuning_from(args).check()
    given = {k: getattr(args, k) for k in CLASSIFIER_DEFAULTS if getattr(args, k) is not None}
    cls_args = {**CLASSIFIER_DEFAULTS, **given}
    split = _split(cls_args["split"])

    def load(args):
        from gptjax.finetune.distill import load_student, load_teacher
        teacher = load_teacher(args.teacher, args.teacher_checkpoint, args.gpt2_ranks)
        if given and not teacher.is_classifier:
            flag = "--" + next(iter(given)).replace("_", "-")
            where = " (from --config)" if next(iter(given)) in getattr(args, "from_config", ()) else ""
            raise GptjaxError(f"{flag}{where} is for a classifier teacher; {args.teacher} is a "
                              "language model")
        return teacher, load_student(args.student, teacher, tuning, args.student_checkpoint, args.gpt2_ranks)

    def train(pair):
        from gptjax.finetune import distill
        teacher, student = pair
        if not teacher.is_classifier:
            return distill.distill_lm(teacher, student, args.data, kd, tuning, args.out,
                                      progress=not args.no_progress)
        from gptjax.finetune.cls import ClsData
        data = ClsData(args.data, cls_args["text_column"], cls_args["label_column"], cls_args["format"],
                       split, metric=cls_args["metric"], class_weights=cls_args["class_weights"])
        return distill.distill_cls(teacher, student, data, kd, tuning, args.out,
                                   progress=not args.no_progress)

    return locked_out(args, "distill", train, load=load)
