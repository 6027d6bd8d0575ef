"""`gptjax finetune-cls`, `classify`, `finetune-sft`, `respond` and `judge`: fine-tuning
from a gptjax run or GPT-2 weights, and using the results."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from gptjax.cli.config_file import add_config_option
from gptjax.cli.options import METAVARS, add_checkpoint, add_gpt2_ranks
from gptjax.errors import GptjaxError
from gptjax.finetune.settings import Tuning

TUNING_HELP = {
    "train": "what of the pretrained model trains: all, head (classification only: the new "
             "head alone) or last-N (the last N blocks and the final norm, plus the head of a "
             "classifier); ignored with LoRA, which freezes the base",
    "lora_rank": "LoRA adapter rank; 0 = no LoRA (full or partial fine-tuning)",
    "lora_alpha": "LoRA scale numerator: updates are scaled by alpha / rank",
    "lora_targets": "comma-separated layers that get adapters: attn (= qkv,out), mlp (= fc,proj), "
                    "all, or single projections qkv, out, fc, proj",
    "lr": "peak learning rate of new parameters (task head, LoRA adapters)",
    "base_lr": "peak learning rate of pretrained weights that train",
    "epochs": "passes over the training split (unless --max-steps is set)",
    "max_steps": "train exactly this many steps, passing over the training split as often as "
                 "that takes (--epochs is then unused); 0 = --epochs passes",
    "batch_size": "rows per step",
    "warmup_steps": "linear warm-up steps before the cosine decay (to a tenth of the peak)",
    "weight_decay": "AdamW decoupled weight decay on kernels",
    "grad_clip": "clip gradients to this global norm; 0 disables",
    "dropout": "dropout on embeddings and residual branches while fine-tuning",
    "eval_every": "steps between validations; 0 = once per epoch",
    "patience": "stop after this many validations without improvement; 0 = never stop early",
    "seed": "seed for the split, the new parameters, shuffling and dropout",
    "unfreeze": "gradual:EPOCHS = gradual unfreezing: the head and final norm train first, then "
                "one more block from the top every EPOCHS epochs, the embeddings last; '' = "
                "everything --train allows trains from the start",
    "layer_lr_decay": "discriminative learning rates: block i of L trains at this^(L-i) times "
                      "--base-lr (the embeddings at this^L); in (0, 1], 1 = the same everywhere",
    "log_to": "where metrics go besides metrics.jsonl: comma-separated jsonl, tensorboard, wandb, "
              "mlflow, as for gptjax train; may change on resume",
}


TUNING_METAVARS = {"train": "all|head|last-N", "lora_targets": "TARGETS", "unfreeze": "gradual:EPOCHS",
                   "log_to": "SINKS"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_base(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("starting point (one of)")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", metavar="RUN_DIR", help="a gptjax run (trained, imported or fine-tuned)")
    source.add_argument("--hf", metavar="DIR_OR_NAME", help="GPT-2 weights: a Hugging Face folder "
                        "(config.json + model.safetensors) or a Hub name such as gpt2")
    add_checkpoint(g, "--base-checkpoint", when="with --base: ")
    add_gpt2_ranks(g)


def _add_tuning(p: argparse.ArgumentParser, defaults: Tuning) -> None:
    g = p.add_argument_group("training")
    for f in dataclasses.fields(Tuning):
        default = getattr(defaults, f.name)
        kind = type(default)
        g.add_argument(_flag(f.name), type=kind, default=default, dest=f"tuning.{f.name}",
                       metavar=TUNING_METAVARS.get(f.name, METAVARS[kind]),
                       help=f"{TUNING_HELP[f.name]} (default: {default!r})")


def tuning_from(args) -> Tuning:
    return Tuning(**{k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("tuning.")})


def _common(p: argparse.ArgumentParser,
            config: str = "[base], [data] and [tuning], as in a fine-tuned run's finetune.json") -> None:
    add_config_option(p, config)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: new (absent or empty), or an interrupted run of the "
                   "same command, which resumes from its last validation with the same settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_parsers(sub) -> None:
    fc = sub.add_parser(
        "finetune-cls", help="fine-tune a pretrained GPT as a text classifier",
        description="Replace the language-model head with a classification head and fine-tune "
        "on labelled texts (CSV, TSV or JSONL). The data is split train/val/test (stratified, "
        "seeded); training stops early when the validation metric stops improving, keeping the "
        "best checkpoint; the test split is then reported (accuracy, per-class precision, recall "
        "and F1, macro F1, confusion matrix as a table and confusion.png).")
    _add_base(fc)
    d = fc.add_argument_group("data")
    d.add_argument("--data", required=True, metavar="FILE", help="CSV, TSV or JSONL file of texts and labels")
    d.add_argument("--text-column", default="text", metavar="COLUMN",
                   help="header name of the text column, or its "
                   "0-based number for a file without a header (default: text)")
    d.add_argument("--label-column", default="label", metavar="COLUMN",
                   help="header name or 0-based number of the "
                   "label column (default: label). The SMS Spam Collection (label<TAB>text, no "
                   "header): --label-column 0 --text-column 1")
    d.add_argument("--format", choices=("csv", "tsv", "jsonl"), help="file format (default: from the suffix)")
    d.add_argument("--split", default="0.7,0.1,0.2", metavar="FRACTIONS",
                   help="train,val,test fractions (default: 0.7,0.1,0.2)")
    d.add_argument("--balance", action="store_true", help="undersample the training split so every "
                   "class has as many texts as the rarest")
    d.add_argument("--class-weights", action="store_true", help="weight the loss by inverse class frequency")
    d.add_argument("--pooling", choices=("last", "mean"), default="last", help="what the head reads: "
                   "the last real token's hidden state, or the mean over real tokens (default: last)")
    d.add_argument("--metric", choices=("accuracy", "macro_f1", "loss"), default="accuracy",
                   help="validation metric for early stopping and the best checkpoint (default: accuracy)")
    d.add_argument("--max-length", type=int, default=0, metavar="INT",
                   help="tokens kept per text, at most the "
                   "model's context (longer ones are cut, with a count); 0 = the model's context "
                   "(default: 0)")
    d.add_argument("--loss", choices=("ce", "focal"), default="ce", help="ce = cross-entropy; "
                   "focal = focal loss, which down-weights texts the model already classifies "
                   "well, for imbalanced classes; either is weighted by --class-weights (default: ce)")
    d.add_argument("--focal-gamma", type=float, default=2.0, metavar="FLOAT",
                   help="with --loss focal: the exponent of (1 - p_true); 0 = cross-entropy (default: 2)")
    d.add_argument("--folds", type=int, default=0, metavar="INT",
                   help="stratified K-fold cross-validation: K fine-tunes, each tested on one fold "
                   "(the --split train:val ratio divides the rest), written to OUT/fold-1..K with "
                   "the mean ± std of every metric in OUT/folds.json; 0 = one split (default: 0)")
    _add_tuning(fc, Tuning())
    _common(fc)

    cl = sub.add_parser("classify", help="label texts with a fine-tuned classifier",
                        description="Print each text's predicted label and the class probabilities.")
    cl.add_argument("--run", required=True, metavar="RUN_DIR", help="a run made by gptjax finetune-cls")
    cl.add_argument("texts", nargs="+", metavar="TEXT", help="texts to classify")
    add_checkpoint(cl)
    add_gpt2_ranks(cl)
    cl.add_argument("--json", action="store_true", help="print JSON lines instead of a table")

    fs = sub.add_parser(
        "finetune-sft", help="instruction-tune a pretrained GPT on Alpaca-style records",
        description="Fine-tune on {instruction, input, output} records (a JSON array or JSONL) "
        "formatted with the Alpaca prompt template of 'Build a Large Language Model (From "
        "Scratch)'. Records are split train/val/test (seeded); batches are padded with "
        "end-of-text, with no loss on the padding (the record's own end-of-text counts). "
        "Reports the validation loss before and after; the test records are kept in the run "
        "for `gptjax respond`.")
    _add_base(fs)
    d = fs.add_argument_group("data")
    d.add_argument("--data", required=True, metavar="FILE", help="JSON array or JSONL of instruction records")
    d.add_argument("--split", default="0.85,0.05,0.1", metavar="FRACTIONS",
                   help="train,val,test fractions (default: 0.85,0.05,0.1)")
    d.add_argument("--mask-prompt", action="store_true", help="no loss on the prompt's tokens")
    _add_tuning(fs, Tuning(lr=1e-3, base_lr=1e-4, epochs=2, batch_size=8, patience=0))
    _common(fs)

    fl = sub.add_parser(
        "finetune-lm", help="continue pretraining a GPT on prepared data (fully or with LoRA)",
        description="More next-token training of a pretrained model on data prepared with its "
        "tokenizer (gptjax prepare). With --lora-rank the base stays frozen and only the "
        "adapters train and are saved; generate or convert the result like any run.")
    _add_base(fl)
    fl.add_argument("--data", required=True, metavar="DIR", help="prepared data directory (gptjax prepare)")
    _add_tuning(fl, Tuning(base_lr=1e-4, epochs=1, batch_size=8, eval_every=200, patience=0))
    _common(fl)

    fd = sub.add_parser(
        "finetune-dpo", help="tune a GPT towards preferred answers (DPO)",
        description="Direct preference optimisation on {instruction, input, chosen, rejected} "
        "records (JSON array or JSONL), formatted with the same Alpaca template as "
        "finetune-sft, so it follows an instruction-tuned run. The reference model is the "
        "base, frozen: its log-probabilities of every answer are computed once. Each "
        "validation reports the loss, preference accuracy, reward margin, both rewards and "
        "both answers' log-probabilities.")
    _add_base(fd)
    d = fd.add_argument_group("data and loss")
    d.add_argument("--data", required=True, metavar="FILE",
                   help="JSON array or JSONL of preference records")
    d.add_argument("--split", default="0.85,0.05,0.1", metavar="FRACTIONS",
                   help="train,val,test fractions (default: 0.85,0.05,0.1)")
    d.add_argument("--beta", type=float, default=0.1, metavar="FLOAT",
                   help="how far the policy may move from the reference: the scale of the "
                   "log-probability ratios (default: 0.1)")
    d.add_argument("--dpo-loss", choices=("sigmoid", "ipo"), default="sigmoid",
                   help="sigmoid = DPO (with --label-smoothing: conservative DPO), ipo = IPO's "
                   "squared loss (default: sigmoid)")
    d.add_argument("--label-smoothing", type=float, default=0.0, metavar="FLOAT",
                   help="with the sigmoid loss: the assumed share of flipped preferences, in "
                   "[0, 0.5) (default: 0)")
    d.add_argument("--drop-identical", action="store_true", help="leave out records whose "
                   "chosen and rejected answers are the same text (else they are refused)")
    _add_tuning(fd, Tuning(lr=1e-3, base_lr=5e-5, epochs=1, batch_size=8, patience=0))
    _common(fd)

    rs = sub.add_parser("respond", help="answer instruction records with an instruction-tuned run",
                        description="Greedy answers to each record's formatted prompt, written as "
                        "JSON: the records with a model_response field. Default records: the test "
                        "split kept by gptjax finetune-sft.")
    rs.add_argument("--run", required=True, metavar="RUN_DIR",
                    help="a run (typically from gptjax finetune-sft)")
    rs.add_argument("--records", metavar="FILE",
                    help="JSON or JSONL records to answer (default: the run's test split)")
    rs.add_argument("--out", required=True, metavar="FILE", help="JSON file to write (must not exist)")
    rs.add_argument("--max-new-tokens", type=int, default=256, metavar="INT",
                    help="most new tokens per answer (default: 256)")
    add_checkpoint(rs)
    add_gpt2_ranks(rs)
    rs.add_argument("--no-progress", action="store_true", help="no progress bar")

    ju = sub.add_parser("judge", help="score responses with an LLM behind an OpenAI-compatible API",
                        description="Ask a judge model to score each model_response against the "
                        "reference output from 0 to 100, and write the records with a score. The "
                        "endpoint is any OpenAI-compatible chat-completions API (OpenAI, vLLM, "
                        "Ollama's /v1, llama.cpp server).")
    ju.add_argument("--responses", required=True, metavar="FILE", help="JSON written by gptjax respond")
    ju.add_argument("--out", required=True, metavar="FILE", help="JSON file to write (must not exist)")
    ju.add_argument("--judge-url", default=os.environ.get("GPTJAX_JUDGE_URL"), metavar="URL",
                    help="API base URL, e.g. http://localhost:11434/v1 (default: $GPTJAX_JUDGE_URL)")
    ju.add_argument("--judge-model", default=os.environ.get("GPTJAX_JUDGE_MODEL"), metavar="NAME",
                    help="model name at that endpoint (default: $GPTJAX_JUDGE_MODEL)")
    ju.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the "
                    "endpoint's API key, e.g. OPENAI_API_KEY; sent as a bearer token only when "
                    "given (default: no key, as local servers need none)")
    ju.add_argument("--no-progress", action="store_true", help="no progress bar")


def _split(text: str, n: int = 3) -> tuple[float, ...]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != n:
        raise GptjaxError(f"--split must be {n} comma-separated fractions, got {text!r}")
    return parts


def _base(args):
    from gptjax.runs.load import load_base
    return load_base(args.base, args.hf, args.base_checkpoint, args.gpt2_ranks)


def locked_out(args, task: str, train, cross_validation: bool = False, load=_base) -> int:
    """Hold --out's lock and check it (new, or this task's run to resume) before the base
    loads, so a second writer or a wrong folder is refused before any work; then
    `train(load(args))`."""
    from gptjax.finetune.out_dir import check_out
    from gptjax.training.run_lock import hold
    with hold(args.out, f"gptjax {task}"):
        check_out(args.out, task.removeprefix("finetune-"), cross_validation)
        train(load(args))
    return 0


def run_finetune_cls(args) -> int:
    from gptjax.finetune.cls import ClsData, finetune_cls
    data = ClsData(args.data, args.text_column, args.label_column, args.format, _split(args.split),
                   args.balance, args.class_weights, args.pooling, args.metric, args.max_length,
                   args.loss, args.focal_gamma, args.folds)
    tuning = tuning_from(args).check()
    return locked_out(args, "finetune-cls", lambda base: finetune_cls(
        base, data, tuning, args.out, progress=not args.no_progress), cross_validation=data.folds > 0)


def run_classify(args) -> int:
    from gptjax.finetune.cls import classify
    classes, probs = classify(args.run, args.texts, checkpoint=args.checkpoint, gpt2_ranks=args.gpt2_ranks)
    width = max(len(c) for c in classes)
    for text, row in zip(args.texts, probs):
        label = classes[int(row.argmax())]
        if args.json:
            print(json.dumps({"text": text, "label": label,
                              "probabilities": {c: round(float(q), 6) for c, q in zip(classes, row)}}))
        else:
            shown = "  ".join(f"{c}={q:.4f}" for c, q in zip(classes, row))
            one_line = text.replace("\n", " ")
            print(f"{label:<{width}}  {shown}  {one_line[:80]}")
    sys.stdout.flush()
    return 0


def run_finetune_sft(args) -> int:
    from gptjax.finetune.sft import SftData, finetune_sft
    data = SftData(args.data, _split(args.split), args.mask_prompt)
    tuning = tuning_from(args).check()
    return locked_out(args, "finetune-sft", lambda base: finetune_sft(
        base, data, tuning, args.out, progress=not args.no_progress))


def run_finetune_dpo(args) -> int:
    from gptjax.finetune.dpo import DpoData, finetune_dpo
    data = DpoData(args.data, _split(args.split), args.beta, args.dpo_loss, args.label_smoothing,
                   args.drop_identical).check()
    tuning = tuning_from(args).check()
    return locked_out(args, "finetune-dpo", lambda base: finetune_dpo(
        base, data, tuning, args.out, progress=not args.no_progress))


def run_finetune_lm(args) -> int:
    from gptjax.finetune.lm import finetune_lm
    tuning = tuning_from(args).check()
    return locked_out(args, "finetune-lm", lambda base: finetune_lm(
        base, args.data, tuning, args.out, progress=not args.no_progress))


def _new_file(path: str) -> Path:
    out = Path(path)
    if out.exists():
        raise GptjaxError(f"{out} already exists; choose another --out")
    if not out.parent.is_dir():
        raise GptjaxError(f"folder {out.parent} does not exist")
    return out


def _write_json(out: Path, value) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def run_respond(args) -> int:
    from gptjax.finetune.sft import respond, test_records
    from gptjax.finetune.sft_data import read_records
    out = _new_file(args.out)
    records = read_records(args.records) if args.records else test_records(args.run)
    answered = respond(args.run, records, max_new_tokens=args.max_new_tokens,
                       checkpoint=args.checkpoint, gpt2_ranks=args.gpt2_ranks,
                       progress=not args.no_progress)
    _write_json(out, answered)
    for r in answered[:3]:
        print(f"### {r['instruction']}\n{r.get('input', '')}\n-> {r['model_response']}\n"
              f"(reference: {r['output']})\n")
    print(f"wrote {len(answered)} responses to {out}")
    return 0


def run_judge(args) -> int:
    from gptjax.eval.judge import judge_config, score_responses
    from gptjax.finetune.sft_data import read_records
    cfg = judge_config(args.judge_url, args.judge_model, args.api_key_env)
    out = _new_file(args.out)
    records = read_records(args.responses)
    missing = [i for i, r in enumerate(records) if not isinstance(r.get("model_response"), str)]
    if missing:
        raise GptjaxError(f"record {missing[0]} of {args.responses} has no model_response "
                          "(write the file with gptjax respond)")
    scores = score_responses(records, [r["model_response"] for r in records], cfg,
                             progress=not args.no_progress)
    _write_json(out, [{**r, "score": s} for r, s in zip(records, scores)])
    valid = [s for s in scores if s is not None]
    mean = f"{sum(valid) / len(valid):.1f}" if valid else "n/a"
    print(f"mean score {mean} over {len(valid)} of {len(scores)} responses "
          f"({len(scores) - len(valid)} unparsable); wrote {out}")
    return 0


COMMANDS = {"finetune-cls": run_finetune_cls, "classify": run_classify,
            "finetune-sft": run_finetune_sft, "finetune-lm": run_finetune_lm,
            "finetune-dpo": run_finetune_dpo,
            "respond": run_respond, "judge": run_judge}
