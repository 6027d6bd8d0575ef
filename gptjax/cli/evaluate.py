"""`gptjax eval`: validation loss and perplexity of a run's checkpoint."""

from __future__ import annotations

from gptjax.cli.options import add_checkpoint, add_gpt2_ranks, add_quantize


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="validation loss and perplexity of a run")
    ev.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory")
    ev.add_argument("--data", metavar="DIR", help="prepared data to evaluate on (default: the run's own)")
    add_checkpoint(ev)
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--full", action="store_true", default=None,
                       help="score every non-overlapping window of the validation split "
                            "(the default when that is a small job)")
    which.add_argument("--batches", type=int, metavar="INT",
                       help="score only the first INT validation batches, as training does "
                            "(default for a large split: the run's eval_batches)")
    add_quantize(ev, "score the loss a quantized decode has:")
    add_gpt2_ranks(ev)


def run(args) -> int:
    from gptjax.eval.loss import evaluate

    result = evaluate(args.run, args.data, args.checkpoint, args.batches, args.gpt2_ranks,
                      full=args.full, quantize=args.quantize or "none", quant_group=args.quant_group)
    weights = f" ({args.quantize} weights)" if args.quantize else ""
    print(f"step {result.step}{weights}: val loss {result.loss:.4f}, perplexity {result.perplexity:.3f} "
          f"over {result.describe()}")
    return 0
