"""`gptjax inspect attention` (heatmaps of a prompt's attention weights) and `gptjax inspect
gradcheck` (autodiff against finite differences in float64)."""

from __future__ import annotations

import argparse

from gptjax.cli.options import add_checkpoint, add_gpt2_ranks


def add_parser(sub) -> None:
    ins = sub.add_parser("inspect", help="look inside a model: attention maps, gradient check",
                         description="Tools for looking inside a model. See `gptjax inspect "
                         "attention --help` and `gptjax inspect gradcheck --help`.")
    tools = ins.add_subparsers(dest="tool", required=True, parser_class=sub._parser_class)

    att = tools.add_parser(
        "attention", help="PNG heatmaps of a prompt's attention weights per layer and head",
        description="Run the prompt through the model and write, into --out, one PNG per layer "
        "(a heatmap per head: queries down, keys across, the tokens on both axes) and "
        "attention.npz with every layer's and head's weights (probs: layer x head x query x "
        "key) and the token labels. The weights are the causal softmax of q k^T, recomputed "
        "from the model's own q and k.")
    source = att.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR",
                        help="a gptjax run: trained, imported or fine-tuned (a classifier's trunk)")
    source.add_argument("--hf", metavar="DIR_OR_NAME", help="GPT-2 weights in the Hugging Face "
                        "layout (a folder, or a Hub name, which downloads)")
    att.add_argument("--prompt", required=True, metavar="TEXT", help="the text to look at")
    att.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and attention.npz")
    att.add_argument("--layers", default="all", metavar="LIST",
                     help="layers to plot: all, or indices such as 0,2,-1 (default: all)")
    att.add_argument("--heads", default="all", metavar="LIST",
                     help="heads to plot in each layer: all, or indices (default: all)")
    add_checkpoint(att, when="with --run: ")
    add_gpt2_ranks(att)

    gc = tools.add_parser(
        "gradcheck", help="autodiff gradients against float64 finite differences",
        description="Compute the next-token loss of a small model on random tokens in float64, "
        "and compare its autodiff gradient with central finite differences: --coords random "
        "coordinates of every parameter, and --directions random unit directions through all "
        "of them. Prints the worst relative error per parameter; exits 1 if the worst "
        "exceeds --tolerance. Gradients below 1e-6 are compared absolutely.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = gc.add_mutually_exclusive_group()
    model.add_argument("--preset", default="tiny", help="model shape to build with random weights")
    model.add_argument("--run", metavar="RUN_DIR", help="check this run's model and weights instead")
    add_checkpoint(gc, when="with --run: ")
    gc.add_argument("--vocab-size", type=int, default=64, metavar="INT",
                    help="vocabulary of a --preset model")
    gc.add_argument("--length", type=int, default=16, metavar="INT", help="tokens per sequence")
    gc.add_argument("--batch-size", type=int, default=2, metavar="INT", help="sequences")
    gc.add_argument("--coords", type=int, default=4, metavar="INT",
                    help="random coordinates probed per parameter")
    gc.add_argument("--directions", type=int, default=4, metavar="INT",
                    help="random directions through all parameters")
    gc.add_argument("--eps", type=float, default=1e-4, metavar="FLOAT", help="finite-difference step")
    gc.add_argument("--tolerance", type=float, default=1e-4, metavar="FLOAT",
                    help="worst relative error that still passes")
    gc.add_argument("--seed", type=int, default=0, metavar="INT", help="weights, tokens and probes")
    add_gpt2_ranks(gc)


def run(args) -> int:
    return {"attention": _attention, "gradcheck": _gradcheck}[args.tool](args)


def _attention(args) -> int:
    from pathlib import Path

    from gptjax.inspection.attention import attention_maps, parse_selection, token_labels, write_maps
    from gptjax.runs.load import load_base

    base = load_base(args.run, args.hf, args.checkpoint, args.gpt2_ranks)
    cfg = base.config.model
    layers = parse_selection(args.layers, cfg.n_layer, "layers")
    heads = parse_selection(args.heads, cfg.n_head, "heads")
    ids = base.tokenizer.encode(args.prompt)
    probs = attention_maps(base.params, cfg, ids)
    labels = token_labels(base.tokenizer, ids)
    title = Path(args.run or args.hf).name
    paths = write_maps(probs, labels, Path(args.out), layers, heads, title)
    print(f"{len(ids)} tokens, {cfg.n_layer} layers x {cfg.n_head} heads: wrote "
          f"{Path(args.out) / 'attention.npz'} and {len(paths)} PNG(s): "
          + ", ".join(p.name for p in paths))
    return 0


def _gradcheck(args) -> int:
    from gptjax.config import preset
    from gptjax.errors import GptjaxError, RunFailed
    from gptjax.inspection.gradcheck import check_model

    for name in ("coords", "directions", "length", "batch_size", "vocab_size"):
        least = 0 if name in ("coords", "directions") else 1
        if getattr(args, name) < least:
            flag = "--" + name.replace("_", "-")
            raise GptjaxError(f"{flag} must be at least {least}, got {getattr(args, name)}")
    if args.coords + args.directions == 0:
        raise GptjaxError("--coords and --directions are both 0: nothing would be checked")
    if args.eps <= 0 or args.tolerance <= 0:
        raise GptjaxError("--eps and --tolerance must be positive")
    if args.run is not None:
        from gptjax.runs.load import load_base
        base = load_base(args.run, None, args.checkpoint, args.gpt2_ranks)
        cfg, params, what = base.config.model, base.params, args.run
    else:
        cfg, params, what = preset(args.preset, vocab_size=args.vocab_size), None, f"preset {args.preset}"
    report = check_model(cfg, params, batch=args.batch_size, length=args.length, seed=args.seed,
                         coords=args.coords, directions=args.directions, eps=args.eps)
    width = max(len(leaf.name) for leaf in report.leaves)
    print(f"gradcheck of {what}: float64, eps {args.eps:g}, {args.batch_size} x {args.length} tokens")
    print(f"{'parameter':<{width}}  coords  worst rel. error  autodiff / numeric there")
    for leaf in report.leaves:
        print(f"{leaf.name:<{width}}  {leaf.coords:>6}  {leaf.worst:>16.2e}  "
              f"{leaf.autodiff:.6e} / {leaf.numeric:.6e}")
    if report.directions:
        print(f"{report.directions} random directions: worst rel. error {report.direction_worst:.2e}")
    verdict = "passes" if report.worst <= args.tolerance else "FAILS"
    print(f"worst relative error {report.worst:.2e}: {verdict} (tolerance {args.tolerance:g})")
    if report.worst > args.tolerance:
        raise RunFailed(f"gradcheck: worst relative error {report.worst:.2e} exceeds "
                        f"--tolerance {args.tolerance:g}")
    return 0
