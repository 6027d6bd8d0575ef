"""`gptjax convert`: GPT-2 weights between gptjax runs and the Hugging Face layout.

The direction follows the source: a gptjax run is exported, anything else (a directory
with config.json + model.safetensors, or a Hub name) is imported as a new run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptjax.cli.options import add_checkpoint, add_gpt2_ranks

DESCRIPTION = """\
Convert GPT-2 weights between gptjax and Hugging Face's layout.

  export:  gptjax convert RUN_DIR --out HF_DIR [--checkpoint latest|best|N]
           writes config.json + model.safetensors (OpenAI's GPT-2 tensor names), loadable
           with transformers' GPT2LMHeadModel.from_pretrained; GPT-2-tokenizer runs also
           get vocab.json, merges.txt and tokenizer_config.json. A classifier run (gptjax
           finetune-cls, last-token pooling) becomes a GPT2ForSequenceClassification with
           its class names as id2label.
  import:  gptjax convert HF_DIR_OR_NAME --out RUN_DIR
           reads a directory with config.json + model.safetensors, or downloads a Hub
           model (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or any GPT-2 repo id; needs
           `pip install 'gptjax[hf]'` and network), and writes a gptjax run at step 0 for
           `gptjax generate --run RUN_DIR` and `gptjax eval --run RUN_DIR --data DATA`.

--out must not exist (or be empty); nothing is left behind when conversion fails."""


def add_parser(sub) -> None:
    """Register the `convert` subcommand on the CLI's subparsers."""
    p = sub.add_parser("convert", help="GPT-2 weights between gptjax runs and Hugging Face files",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="a gptjax run directory (export), or a Hugging "
                   "Face GPT-2 directory or Hub model name (import)")
    p.add_argument("--out", required=True, metavar="DIR", help="new directory: a Hugging Face "
                   "model (export) or a gptjax run (import)")
    add_checkpoint(p, when="export: ")
    add_gpt2_ranks(p)


def run(args) -> int:
    from gptjax.hf.io import check_new_dir

    src, out = Path(args.source), Path(args.out)
    check_new_dir(out)  # before any weight is read
    if _is_gptjax_run(src):
        return _export(src, out, args)
    return _import(args.source, out, args)


def _is_gptjax_run(path: Path) -> bool:
    """Both kinds have a config.json; only Hugging Face's names a model_type."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "model" in raw and "model_type" not in raw


def _export(src: Path, out: Path, args) -> int:
    from gptjax.data.tokenizer import GPT2Tokenizer
    from gptjax.hf.io import save_hf
    from gptjax.model.gpt import param_count
    from gptjax.runs import finetuned
    from gptjax.runs.load import load as load_run
    if finetuned.is_finetuned(src) and finetuned.read_spec(src).is_classifier:
        return _export_classifier(src, out, args)
    loaded = load_run(src, args.checkpoint, args.gpt2_ranks)
    written = save_hf(loaded.params, loaded.config.model, out, tokenizer=loaded.tokenizer)
    print(f"exported step {loaded.step} of {src} ({param_count(loaded.config.model):,} parameters) "
          f"to {out}: {', '.join(p.name for p in written)}")
    if not isinstance(loaded.tokenizer, GPT2Tokenizer):
        print(f"(the run's {loaded.tokenizer.kind} tokenizer has no transformers equivalent; "
              "no tokenizer files were written)")
    return 0


def _export_classifier(src: Path, out: Path, args) -> int:
    from gptjax.hf.classifier import check_exportable, save_classifier
    from gptjax.model.lora import merge
    from gptjax.runs.finetuned import read_spec
    from gptjax.runs.load import load_finetuned

    check_exportable(read_spec(src).pooling)  # before any weight is read
    ft = load_finetuned(src, args.checkpoint, args.gpt2_ranks)
    spec = ft.spec
    gpt = merge(ft.params["gpt"], ft.params["lora"], spec.lora) if spec.lora else ft.params["gpt"]
    pad = ft.tokenizer.eot_id if ft.tokenizer.eot_id is not None else 0
    written = save_classifier(gpt, spec.model, ft.params["head"], spec.classes, spec.pooling, out,
                              pad_id=pad, tokenizer=ft.tokenizer)
    print(f"exported classifier step {ft.step} of {src} ({len(spec.classes)} classes: "
          f"{', '.join(spec.classes)}) as GPT2ForSequenceClassification to {out}: "
          f"{', '.join(p.name for p in written)}")
    return 0


def _import(source: str, out: Path, args) -> int:
    from gptjax import config as C
    from gptjax.hf.io import new_dir
    from gptjax.model.gpt import param_count
    from gptjax.runs.load import load_pretrained
    from gptjax.training.checkpoint import Checkpoints

    ranks = str(Path(args.gpt2_ranks).resolve()) if args.gpt2_ranks else None
    loaded = load_pretrained(source, ranks)
    with new_dir(out) as tmp:
        C.save(loaded.config, tmp / "config.json")
        (tmp / "tokenizer.json").write_text(json.dumps(loaded.tokenizer.spec()) + "\n")
        ckpts = Checkpoints(tmp / "checkpoints")
        try:
            ckpts.save_params(0, loaded.params, {"config": C.to_dict(loaded.config),
                                                 "imported_from": str(loaded.path)})
        finally:
            ckpts.close()
    print(f"imported {loaded.path} ({param_count(loaded.config.model):,} parameters) as run {out}: "
          "config.json, tokenizer.json, checkpoints/0")
    print(f"try: gptjax generate --run {out} --prompt 'Hello'")
    return 0
