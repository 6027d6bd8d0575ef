"""Any run as a model in memory: trained, imported, fine-tuned, or GPT-2 weights.

    loaded = load_run("runs/x")              # latest checkpoint; or "best", or a step
    loaded = load_pretrained("path/to/gpt2")  # a directory, or a Hub name (downloads)
    base = load_base(run_dir="runs/x")        # a fine-tuning starting point, with its origin

A trained or imported run restores its parameters from its checkpoint. A fine-tuned run's
checkpoint holds only what trained, so its base is loaded too (recursively: a base may be
fine-tuned itself), checked against the fingerprint recorded at tuning time, and joined.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import jax
from jax.sharding import SingleDeviceSharding

from gptjax import config as C
from gptjax import model
from gptjax.data import tokenizer as tok
from gptjax.data.prepared import PreparedData, load_prepared
from gptjax.errors import GptjaxError
from gptjax.hf.config import read_hf_config
from gptjax.hf.io import load_hf
from gptjax.hf.source import resolve_source
from gptjax.model.parts import join
from gptjax.runs import finetuned
from gptjax.training import run_dir as layout
from gptjax.training.checkpoint import Checkpoints


@dataclass
class LoadedRun:
    path: Path
    config: C.RunConfig
    tokenizer: tok.Tokenizer
    params: dict
    step: int


@dataclass
class Base:
    """The pretrained starting point: its run config, tokenizer, parameters and origin."""

    config: C.RunConfig
    tokenizer: tok.Tokenizer
    params: dict
    origin: dict  # {"kind": "run", "path", "checkpoint"} or {"kind": "hf", "source"}


def parse_checkpoint(which: str) -> str | int:
    if which in ("latest", "best"):
        return which
    if which.isdigit():
        return int(which)
    raise GptjaxError(f"--checkpoint must be latest, best or a step number, got {which!r}")


def load(run_dir: str | Path, which: str | int = "latest", gpt2_ranks: str | None = None) -> LoadedRun:
    """Parameters and tokenizer of a run's checkpoint: "latest", "best" or a step number."""
    path = Path(run_dir)
    if not layout.is_run(path):
        raise GptjaxError(f"{path} is not a gptjax run (no config.json)")
    which = parse_checkpoint(str(which))
    if finetuned.is_finetuned(path):
        tuned = load_finetuned(path, which, gpt2_ranks)
        if tuned.spec.is_classifier:
            raise GptjaxError(f"{path} is a classifier, not a language model: use gptjax classify")
        return LoadedRun(path, tuned.config, tuned.tokenizer, tuned.lm_params(), tuned.step)
    cfg = C.load(path / "config.json")
    tokenizer = _tokenizer(path, gpt2_ranks or cfg.data.gpt2_ranks or None)
    abstract = _on_one_device(jax.eval_shape(lambda: model.init(cfg.model, jax.random.PRNGKey(0))))
    params, step = _restore(path, abstract, which)
    return LoadedRun(path, cfg, tokenizer, params, step)


def load_run(path: str | Path, checkpoint: str | int = "latest",
             gpt2_ranks: str | None = None) -> LoadedRun:
    """A gptjax run as `.config` (RunConfig), `.tokenizer`, `.params` and `.step`: trained,
    imported, or fine-tuned for language (a LoRA or partly frozen run comes joined with its
    base). `checkpoint` is "latest", "best" or a step number. A damaged "latest" falls back
    to the newest checkpoint that verifies, with a warning."""
    return load(path, checkpoint, gpt2_ranks)


def load_finetuned(run_dir: str | Path, which: str | int = "latest",
                   gpt2_ranks: str | None = None) -> finetuned.Finetuned:
    """A fine-tuned run's parameters: its checkpoint joined with its (checked) base."""
    path = Path(run_dir)
    spec = finetuned.read_spec(path)
    cfg = C.load(path / "config.json")
    gpt2_ranks = gpt2_ranks or cfg.data.gpt2_ranks or None
    tokenizer = _tokenizer(path, gpt2_ranks)
    shapes = jax.eval_shape(lambda: finetuned.full_tree(
        spec, model.init(spec.model, jax.random.PRNGKey(0)), jax.random.PRNGKey(0)))
    abstract, frozen_shapes = finetuned.trainable_part(spec, shapes)
    trained, step = _restore(path, _on_one_device(abstract), parse_checkpoint(str(which)))
    frozen = {}
    if frozen_shapes:  # something of the base did not train: it comes from the base
        base = _base_of(spec, gpt2_ranks)
        if finetuned.fingerprint(base.params) != spec.base_fingerprint:
            raise GptjaxError(f"the base weights of {path} ({finetuned.describe(spec.base)}) "
                              "changed after fine-tuning; they no longer match this run's checkpoint")
        _, frozen = finetuned.trainable_part(spec, {"gpt": base.params})
    return finetuned.Finetuned(path, spec, cfg, tokenizer, join(trained, frozen), step)


def load_pretrained(source: str | os.PathLike, gpt2_ranks: str | None = None, dtype=None) -> LoadedRun:
    """A GPT-2 directory or Hub name as a gptjax LoadedRun (GPT-2 tokenizer, step 0)."""
    path = resolve_source(source)
    tokenizer = tok.GPT2Tokenizer(gpt2_ranks)  # fail on missing ranks before reading weights
    vocab = read_hf_config(path).vocab_size
    # A padded vocabulary (e.g. 50304, exported from a run trained that way) loads: its
    # extra rows are never sampled. Fewer rows than the tokenizer's ids cannot be GPT-2.
    if vocab < tokenizer.vocab_size:
        raise GptjaxError(f"{path} has vocab_size {vocab}, fewer than the GPT-2 tokenizer's "
                          f"{tokenizer.vocab_size} ids; only GPT-2-vocabulary models load here")
    model_cfg, params = load_hf(path, dtype=dtype)
    cfg = C.RunConfig(model=model_cfg, data=C.DataConfig(tokenizer="gpt2", gpt2_ranks=gpt2_ranks or ""))
    return LoadedRun(path, C.validate(cfg), tokenizer, params, 0)


def load_base(run_dir: str | None = None, hf: str | None = None, checkpoint: str = "latest",
              gpt2_ranks: str | None = None) -> Base:
    """A gptjax run's checkpoint (fine-tuned runs included) or GPT-2 weights (dir or Hub name)."""
    if (run_dir is None) == (hf is None):
        raise GptjaxError("give the starting point as --base RUN_DIR or --hf DIR_OR_NAME (one of them)")
    if hf is not None:
        loaded = load_pretrained(hf, gpt2_ranks)
        source = str(Path(hf).absolute()) if Path(hf).exists() else hf
        return Base(loaded.config, loaded.tokenizer, loaded.params, {"kind": "hf", "source": source})
    if finetuned.is_finetuned(run_dir):  # a classifier too: its fine-tuned trunk is the starting point
        tuned = load_finetuned(run_dir, checkpoint, gpt2_ranks)
        config, tokenizer, params, step = tuned.config, tuned.tokenizer, tuned.lm_params(), tuned.step
    else:
        loaded = load(run_dir, checkpoint, gpt2_ranks)
        config, tokenizer, params, step = loaded.config, loaded.tokenizer, loaded.params, loaded.step
    origin = {"kind": "run", "path": str(Path(run_dir).absolute()), "checkpoint": step}
    return Base(config, tokenizer, params, origin)


def _base_of(spec: finetuned.Spec, gpt2_ranks: str | None) -> Base:
    origin = spec.base
    if origin["kind"] == "preset":  # only a hand-edited finetune.json freezes random weights
        raise GptjaxError(f"this run's base is {finetuned.describe(origin)}, which is not on disk, "
                          "yet its finetune.json says part of it stayed frozen")
    try:
        if origin["kind"] == "hf":
            return load_base(hf=origin["source"], gpt2_ranks=gpt2_ranks)
        return load_base(run_dir=origin["path"], checkpoint=str(origin["checkpoint"]),
                         gpt2_ranks=gpt2_ranks)
    except GptjaxError as e:
        raise GptjaxError(f"cannot load this run's base ({finetuned.describe(origin)}): {e}") from None


def _tokenizer(path: Path, gpt2_ranks: str | None) -> tok.Tokenizer:
    return tok.from_spec(json.loads((path / "tokenizer.json").read_text()), gpt2_ranks)


def _on_one_device(shapes):
    # Said explicitly: a checkpoint saved from a mesh restores only onto a target that
    # names its own layout.
    one = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), shapes)


def _restore(path: Path, abstract, which: str | int):
    """(params, step) restored from the run's "latest", "best" or numbered checkpoint."""
    ckpts = Checkpoints(path / "checkpoints", create=False)
    try:
        step = ckpts.best_step() if which == "best" else None if which == "latest" else which
        return ckpts.restore_params(abstract, step, fallback=_use_the_previous)
    finally:
        ckpts.close()


def _use_the_previous(damaged, step: int) -> None:
    """Reading "latest" goes on to the newest checkpoint that verifies, and says so."""
    warnings.warn(f"{damaged}; using checkpoint {step} instead (nothing is deleted: remove "
                  "the damaged one, or move it out of the checkpoints folder, once you have "
                  "looked at it)", stacklevel=2)


def own_data(path: Path) -> Path:
    """Where a run without a `data` setting keeps its prepared data: its embedded copy, or
    for a finetune-lm run or a distilled language model the data it was tuned on. Other
    fine-tuned runs (instruction and classification data is not prepared data) and imported
    runs have none."""
    if (path / layout.EMBEDDED_DATA).exists():
        return path / layout.EMBEDDED_DATA
    if finetuned.is_finetuned(path):
        spec = finetuned.read_spec(path)
        tuned_on = spec.settings.get("data") if spec.task in ("lm", "distill") else None
        tuned_on = tuned_on if isinstance(tuned_on, str) else None  # a classifier's is a file
        if tuned_on and not Path(tuned_on).is_dir():
            raise GptjaxError(f"the data {path} was tuned on ({tuned_on}) is gone; pass --data")
        if tuned_on:
            return Path(tuned_on)
    raise GptjaxError(f"{path} has no prepared data of its own (fine-tuned and imported runs "
                      "have none): pass --data")


def run_data(run: LoadedRun, data_dir: str | None = None) -> PreparedData:
    """The run's own prepared data, or `data_dir` checked against the run's tokenizer."""
    data = load_prepared(data_dir or run.config.data.data or own_data(run.path))
    layout.check_tokenizer(run.path, data)  # first: a different vocabulary is the real mismatch
    layout.resolve(run.config, data)  # vocabulary fits
    return data
