"""The `gptjax` command: a thin shell over library calls.

Exit codes: 0 success, 2 bad input (one line on stderr, nothing written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

from gptjax import cli_bench, cli_convert, cli_finetune
from gptjax import config as C
from gptjax.cli_options import add_config_flags, apply_overrides, explicit_overrides
from gptjax.errors import GptjaxError, Preempted
from gptjax.tokenizer import KINDS


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line, with exit code 2."""

    def error(self, message):
        self.exit(2, f"gptjax: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptjax", description="Build, train and sample GPTs in JAX.")
    from gptjax import __version__
    p.add_argument("--version", action="version", version=f"gptjax {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    tr = sub.add_parser("train", help="train a GPT (resumes when --out is an existing run)",
                        description="Train a GPT. With no arguments: a 0.8M-parameter model on "
                        "the Python reference docs from the standard library, char tokenizer. "
                        "Every config field below is a flag; unset flags keep the preset's "
                        "value (new run) or the saved value (resumed run). On Linux, freed "
                        "host memory is kept for reuse, which made XLA:CPU steps 10-20% faster "
                        "and resident memory higher; GPTJAX_KEEP_FREED_MEMORY=0 turns that off.")
    tr.add_argument("--out", help="run directory (default: runs/<date-time>); an existing run "
                    "is resumed with its saved config")
    tr.add_argument("--preset", choices=list(C.PRESETS), help="model preset (default: baby; "
                    "explicit model flags override it)")
    tr.add_argument("--stop-at", type=int, metavar="STEP", help="stop (with a checkpoint) at this "
                    "step without changing the schedule; rerun to continue")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    hosts = tr.add_argument_group(
        "many processes", "every process runs the same command (see scripts/); the mesh spans "
        "all their devices, each reads only its rows, process 0 writes the run's files")
    hosts.add_argument("--distributed", action="store_true", help="join a multi-process job "
                       "detected from the environment (TPU VM slices, SLURM, ...)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="explicit job: process 0's "
                       "address (with --num-processes and --process-id)")
    hosts.add_argument("--num-processes", type=int, help="explicit job: number of processes")
    hosts.add_argument("--process-id", type=int, help="explicit job: this process, 0..N-1")
    hosts.add_argument("--join-timeout", type=int, default=300, metavar="SECONDS",
                       help="give up joining after this long (default: 300)")
    add_config_flags(tr)

    pr = sub.add_parser("prepare", help="tokenize text/JSONL files into train/val token files")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, folders, JSONL files")
    pr.add_argument("--out", required=True, help="new output folder")
    pr.add_argument("--tokenizer", default="gpt2", choices=KINDS,
                    help="tokenizer (default: gpt2)")
    pr.add_argument("--val-fraction", type=float, default=0.1,
                    help="last share of tokens held out for validation (default: 0.1)")
    pr.add_argument("--text-field", default="text", help="JSONL field with the text (default: text)")
    pr.add_argument("--gpt2-ranks", help="local GPT-2 ranks file (else $GPTJAX_GPT2_RANKS)")
    pr.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="tokenizer processes for corpora over 4 MiB (default: all cores)")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")

    ge = sub.add_parser(
        "generate", help="sample text from a trained run or GPT-2 weights",
        description="Continue prompts with a KV cache (one compiled prefill, one compiled decode "
        "loop). One prompt streams to the terminal; several run as one batch. Rows end at "
        "end-of-text, at a --stop string or after --max-new-tokens. A prompt longer than the "
        "context keeps its last context-length tokens (with a warning); once a row's next "
        "position would pass the context, the window slides (slower: recomputed, no cache).")
    source = ge.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="gptjax run directory")
    source.add_argument("--hf", metavar="DIR_OR_NAME", help="GPT-2 weights in the Hugging Face "
                        "layout: a folder with config.json + model.safetensors, or a Hub name "
                        "such as gpt2 (downloads; needs `pip install 'gptjax[hf]'`)")
    ge.add_argument("--prompt", action="append", help="prompt text; repeat for a batch "
                    "(default: one empty prompt = start of a document)")
    ge.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    ge.add_argument("--temperature", type=float, default=0.8,
                    help="softmax temperature; 0 = greedy (default: 0.8)")
    ge.add_argument("--top-k", type=int, help="sample among the k most likely ids (default: all)")
    ge.add_argument("--top-p", type=float, help="sample from the smallest set of ids whose "
                    "probability reaches p, in (0, 1] (default: off)")
    ge.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="end a row where this text appears (not printed); repeatable")
    ge.add_argument("--ignore-eot", action="store_true", help="do not stop at end-of-text")
    ge.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    ge.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast weights and compute "
                    "to this dtype (default: as stored)")
    ge.add_argument("--decode-matmul",
                    choices=C.ModelConfig.__dataclass_fields__["decode_matmul"].metadata["choices"],
                    help="decode steps' products: "
                    "auto = the native CPU kernel where it builds, xla = XLA's (default: the "
                    "run's config, normally auto)")
    ge.add_argument("--no-stream", action="store_true", help="print only when finished")
    ge.add_argument("--checkpoint", help="with --run: latest, best or a step (default: latest)")
    ge.add_argument("--gpt2-ranks", help="local GPT-2 ranks file (else $GPTJAX_GPT2_RANKS)")

    ev = sub.add_parser("eval", help="validation loss and perplexity of a run")
    ev.add_argument("--run", required=True, help="run directory")
    ev.add_argument("--data", help="prepared data to evaluate on (default: the run's own)")
    ev.add_argument("--checkpoint", default="latest", help="latest, best or a step (default: latest)")
    ev.add_argument("--batches", type=int, help="validation batches (default: the run's eval_batches)")
    ev.add_argument("--gpt2-ranks", help="local GPT-2 ranks file (else $GPTJAX_GPT2_RANKS)")
    cli_convert.add_parser(sub)
    cli_bench.add_parser(sub)
    cli_finetune.add_parsers(sub)
    return p


def _train(args) -> int:
    from gptjax import run
    from gptjax.train import train

    if args.stop_at is not None and args.stop_at < 1:
        raise GptjaxError(f"--stop-at must be a positive step, got {args.stop_at}")
    from gptjax.distributed import initialize
    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
               timeout=args.join_timeout)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = explicit_overrides(args)
    if run.is_run(out):
        base = C.load(out / "config.json")
        if args.preset:
            overrides["model"] = {**C.PRESETS[args.preset], **overrides.get("model", {})}
    else:
        base = C.RunConfig(model=C.preset(args.preset or C.DEFAULT_PRESET))
    cfg = apply_overrides(base, overrides)
    train(cfg, out, stop_at=args.stop_at, progress=not args.no_progress)
    return 0


def _prepare(args) -> int:
    from gptjax.prepare import prepare

    meta = prepare(args.inputs, args.out, args.tokenizer, val_fraction=args.val_fraction,
                   gpt2_ranks=args.gpt2_ranks, text_field=args.text_field, workers=args.workers,
                   progress=not args.no_progress)
    print(f"{args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']['kind']}, vocabulary {meta['vocab_size']:,}, {meta['dtype']}); "
          f"{len(meta['sources'])} file(s), {meta['replaced_invalid_utf8_bytes']} invalid UTF-8 "
          "byte(s) replaced")
    return 0


def _generate(args) -> int:
    from gptjax import run
    from gptjax.model import cast, decode_params
    from gptjax.sampling import Sampling, check_max_new_tokens
    from gptjax.textgen import generate_text

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed).check()
    check_max_new_tokens(args.max_new_tokens)
    prompts = args.prompt or [""]
    for text in prompts + args.stop:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise GptjaxError(f"not valid UTF-8: {text[:40]!r}") from None
    if args.hf and args.checkpoint:
        raise GptjaxError("--checkpoint picks a checkpoint of a --run; --hf folders have none")
    if args.hf:
        from gptjax.hf import load_pretrained
        loaded = load_pretrained(args.hf, args.gpt2_ranks)
    else:
        loaded = run.load(args.run, args.checkpoint or "latest", args.gpt2_ranks)
    params, model_cfg = loaded.params, loaded.config.model
    if args.dtype:
        params, model_cfg = cast(params, model_cfg, args.dtype)
    if args.decode_matmul:
        model_cfg = dataclasses.replace(model_cfg, decode_matmul=args.decode_matmul)
    params = decode_params(params)  # the decode layout, once (see gptjax.generate)
    loaded.params = None  # let the stacked copy go
    for text in prompts:  # text the tokenizer refuses fails here, before any is echoed
        loaded.tokenizer.encode(text)
    stream = len(prompts) == 1 and not args.no_stream

    def show(_row, piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    if stream:
        show(0, prompts[0])
    texts = generate_text(params, model_cfg, loaded.tokenizer, prompts, args.max_new_tokens,
                          sampling, stop=args.stop, on_text=show if stream else None,
                          stop_at_eot=not args.ignore_eot)
    if stream:
        print()
        return 0
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if len(prompts) > 1:
            print(f"--- {i + 1} ---")
        print(prompt + text)
    return 0


def _eval(args) -> int:
    import jax

    from gptjax import run
    from gptjax.data import eval_batches
    from gptjax.train_step import make_eval_step, mean_loss

    if args.batches is not None and args.batches < 1:
        raise GptjaxError(f"--batches must be positive, got {args.batches}")
    loaded = run.load(args.run, args.checkpoint, args.gpt2_ranks)
    data = run.run_data(loaded, args.data)
    m, t = loaded.config.model, loaded.config.train
    rows = t.batch_size // t.grad_accum  # the micro-batch: what training fitted in memory
    try:
        batches = eval_batches(data.val, m.context_length, rows,
                               (args.batches or t.eval_batches) * t.grad_accum)
    except GptjaxError as e:
        raise GptjaxError(f"validation split of {data.path}: {e}") from None
    loss = mean_loss(jax.jit(make_eval_step(m)), loaded.params, batches)
    tokens = int(sum(b["weights"].sum() for b in batches))
    print(f"step {loaded.step}: val loss {loss:.4f}, perplexity {math.exp(min(loss, 50)):.3f} "
          f"({tokens:,} tokens of {data.path})")
    return 0


# Commands that repeat one compiled step and check its temporaries against the RAM
# (host_memory.fit_to_step): they keep freed host memory (host_memory.py).
STEP_COMMANDS = {"train", "bench"}

COMMANDS = {"train": _train, "prepare": _prepare, "generate": _generate, "eval": _eval,
            "convert": cli_convert.run, "bench": cli_bench.run, **cli_finetune.COMMANDS}


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings for a CLI user: one line, no pointer into library source."""
    print(f"gptjax: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings
    warnings.showwarning = _one_line_warning
    args = _parser().parse_args(argv)
    if args.command in STEP_COMMANDS:
        from gptjax.host_memory import keep_freed_memory
        keep_freed_memory()  # before anything starts JAX's runtime
    try:
        return COMMANDS[args.command](args)
    except GptjaxError as e:
        print(f"gptjax: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable or impossible paths, full disks: say so in one line
        print(f"gptjax: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        saved = " (checkpoint saved; rerun the same command to resume)" if args.command == "train" else ""
        what = f"preempted at step {e.step}" if isinstance(e, Preempted) else "interrupted"
        print(f"gptjax: {what}{saved}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
