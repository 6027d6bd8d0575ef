"""`gptjax train` and `gptjax prepare`: pretraining a GPT and tokenizing its corpus."""

from __future__ import annotations

import os
import time
from pathlib import Path

from gptjax import config as C
from gptjax.cli.config_file import add_config_option
from gptjax.cli.options import (
    add_config_flags,
    add_gpt2_ranks,
    add_old_spellings,
    apply_overrides,
    explicit_overrides,
)
from gptjax.config import TOKENIZER_KINDS
from gptjax.errors import GptjaxError


def add_parsers(sub) -> None:
    tr = sub.add_parser("train", help="train a GPT (resumes when --out is an existing run)",
                        description="Train a GPT. With no arguments: a 0.8M-parameter model on "
                        "the Python reference docs from the standard library, char tokenizer. "
                        "Every config field below is a flag; unset flags keep the preset's "
                        "value (new run) or the saved value (resumed run). On Linux, freed "
                        "host memory is kept for reuse, which made XLA:CPU steps 10-20% faster "
                        "and resident memory higher; GPTJAX_KEEP_FREED_MEMORY=0 turns that off.")
    tr.add_argument("--out", metavar="DIR", help="run directory (default: runs/<date-time>); an existing run "
                    "is resumed with its saved config")
    add_run_config_source(tr)
    tr.add_argument("--stop-at", type=int, metavar="STEP", help="stop (with a checkpoint) at this "
                    "step without changing the schedule; rerun to continue")
    tr.add_argument("--extend-to", type=int, metavar="STEPS", help="train an existing run on "
                    "to this many steps: from its latest checkpoint the learning rate decays "
                    "again along a new cosine, from its value there to min_lr at STEPS "
                    "(recorded as train.lr_tails)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    hosts = tr.add_argument_group(
        "many processes", "every process runs the same command (see scripts/); the mesh spans "
        "all their devices, each reads only its rows, process 0 writes the run's files")
    hosts.add_argument("--distributed", action="store_true", help="join a multi-process job "
                       "detected from the environment (TPU VM slices, SLURM, ...)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="explicit job: process 0's "
                       "address (with --num-processes and --process-id)")
    hosts.add_argument("--num-processes", type=int, metavar="INT", help="explicit job: number of processes")
    hosts.add_argument("--process-id", type=int, metavar="INT", help="explicit job: this process, 0..N-1")
    hosts.add_argument("--join-timeout", type=int, default=300, metavar="SECONDS",
                       help="give up joining after this long (default: 300)")
    add_config_flags(tr)
    add_old_spellings(tr)

    pr = sub.add_parser("prepare", help="tokenize text/JSONL files into train/val token files")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, folders, JSONL files")
    pr.add_argument("--out", required=True, metavar="DIR", help="new output folder")
    pr.add_argument("--tokenizer", default="gpt2", choices=TOKENIZER_KINDS,
                    help="tokenizer (default: gpt2)")
    pr.add_argument("--val-fraction", type=float, default=0.1, metavar="FLOAT",
                    help="last share of tokens held out for validation (default: 0.1)")
    pr.add_argument("--text-field", default="text", metavar="NAME",
                    help="JSONL field with the text (default: text)")
    add_gpt2_ranks(pr)
    pr.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="INT",
                    help="tokenizer processes for corpora over 4 MiB (default: all cores)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")



def add_run_config_source(parser) -> None:
    """--config and --preset, where a run's config starts (train, sweep)."""
    add_config_option(parser, "[model], [train] and [data] fields, as in a run's config.json")
    parser.add_argument("--preset", choices=list(C.PRESETS), help="model preset (default: "
                        "baby; explicit model flags override it)")


def run_train(args) -> int:
    from gptjax.parallel.distributed import initialize
    from gptjax.training.run_dir import is_run
    from gptjax.training.train import train

    if args.stop_at is not None and args.stop_at < 1:
        raise GptjaxError(f"--stop-at must be a positive step, got {args.stop_at}")
    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
               timeout=args.join_timeout)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = preset_overrides(args)
    from_file = getattr(args, "from_config", set())
    if args.extend_to is not None and "train.max_steps" in from_file:
        del overrides["train"]["max_steps"]  # a run's config.json always has one
    if is_run(out):
        base = C.load(out / "config.json")
    else:
        base = C.RunConfig(model=C.preset(args.preset or C.DEFAULT_PRESET))
    cfg = apply_overrides(base, overrides)
    if args.extend_to is not None:
        cfg = _extended(cfg, out, args.extend_to, overrides)
    train(cfg, out, stop_at=args.stop_at, progress=not args.no_progress)
    return 0


def preset_overrides(args) -> dict[str, dict]:
    """The config flags given, with --preset's model fields merged in: a typed flag beats
    the --config file: typed model flags, then a typed --preset, then the file's [model]
    fields, then a preset the file names."""
    overrides = explicit_overrides(args)
    if "peak_flops" in overrides.get("train", {}):  # given now: say so in config.json
        overrides["train"].setdefault("peak_source", "flag")
    from_file = getattr(args, "from_config", set())
    if args.preset:
        file_model = {k: v for k, v in overrides.get("model", {}).items()
                      if f"model.{k}" in from_file}
        typed_model = {k: v for k, v in overrides.get("model", {}).items() if k not in file_model}
        preset = C.PRESETS[args.preset]
        overrides["model"] = ({**file_model, **preset, **typed_model} if "preset" not in from_file
                              else {**preset, **file_model, **typed_model})
    return overrides


def _extended(cfg: C.RunConfig, out: Path, to: int, overrides: dict) -> C.RunConfig:
    from gptjax.config import parse_tails
    from gptjax.parallel.distributed import is_main
    from gptjax.training.extend import describe, extended
    from gptjax.training.run_dir import latest_step

    if "max_steps" in overrides.get("train", {}):
        raise GptjaxError("give --extend-to or --max-steps, not both (--extend-to sets the "
                          "run's new max_steps)")
    latest = latest_step(out)
    if not latest:
        raise GptjaxError(f"--extend-to trains an existing run for longer, and {out} has no "
                          "checkpoint to go on from")
    cfg = extended(cfg, latest, to)
    if is_main():
        tail = parse_tails(cfg.train.lr_tails)[-1]
        print(f"extending {out} to {to} steps: {describe(tail, cfg.train.min_lr)}")
    return cfg


def run_prepare(args) -> int:
    from gptjax.data.prepare import prepare

    meta = prepare(args.inputs, args.out, args.tokenizer, val_fraction=args.val_fraction,
                   gpt2_ranks=args.gpt2_ranks, text_field=args.text_field, workers=args.workers,
                   progress=not args.no_progress)
    print(f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']['kind']}, vocabulary {meta['vocab_size']:,}, {meta['dtype']}); "
          f"{len(meta['sources'])} file(s), {meta['replaced_invalid_utf8_bytes']} invalid UTF-8 "
          "byte(s) replaced")
    return 0


COMMANDS = {"train": run_train, "prepare": run_prepare}
