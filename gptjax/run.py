"""Run directories: resolving a config against its data, creating, checking and loading runs.

A run directory holds config.json (the resolved config), tokenizer.json, checkpoints/,
metrics.jsonl, loss.png and sample.txt, plus data/ when it trains on the embedded corpus.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import jax

from gptjax import config as C
from gptjax import tokenizer as tok
from gptjax.checkpoint import Checkpoints
from gptjax.data import PreparedData, load_prepared
from gptjax.errors import GptjaxError
from gptjax.train_step import init_state

EMBEDDED_DATA = "data"


def is_run(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def check_out_dir(out: Path) -> bool:
    """True when `out` is an existing run to resume; error if it is something else."""
    if is_run(out):
        return True
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptjaxError(f"{out} exists and is not a gptjax run; choose another --out")
    return False


def resolve(cfg: C.RunConfig, data: PreparedData) -> C.RunConfig:
    """Fill in what the data decides (vocabulary, tokenizer) and check the rest agrees."""
    kind = data.meta["tokenizer"]["kind"]
    if cfg.data.tokenizer and cfg.data.tokenizer != kind:
        raise GptjaxError(f"prepared data {data.path} uses the {kind} tokenizer, "
                          f"but the run uses {cfg.data.tokenizer}")
    vocab = cfg.model.vocab_size or data.vocab_size
    if vocab < data.vocab_size:
        raise GptjaxError(f"model.vocab_size {vocab} is smaller than the data's vocabulary "
                          f"({data.vocab_size})")
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab),
        data=dataclasses.replace(cfg.data, tokenizer=kind))


def check_resume(out: Path, cfg: C.RunConfig, data: PreparedData) -> None:
    """A resumed run must train on the same trajectory and the same tokens."""
    saved = C.load(out / "config.json")
    diffs = C.training_differences(saved, cfg)
    if diffs:
        raise GptjaxError(f"{out} was created with a different config: {'; '.join(diffs)}; "
                          "use a new --out for a new run")
    check_tokenizer(out, data)


def check_tokenizer(run_dir: Path, data: PreparedData) -> None:
    """Same kind is not enough: two char vocabularies map the same id to different text."""
    saved = json.loads((Path(run_dir) / "tokenizer.json").read_text())
    if saved != data.meta["tokenizer"]:
        raise GptjaxError(f"prepared data {data.path} uses a different {data.meta['tokenizer']['kind']} "
                          f"tokenizer than run {run_dir} ({saved['kind']})")


def data_fingerprint(data: PreparedData) -> dict:
    return {"path": str(data.path), "train_tokens": int(data.meta["train_tokens"]),
            "val_tokens": int(data.meta["val_tokens"]), "tokenizer": data.meta["tokenizer"]["kind"]}


def create(out: Path, cfg: C.RunConfig, data: PreparedData) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data.meta["tokenizer"], ensure_ascii=False) + "\n")
    C.save(cfg, out / "config.json")


@dataclass
class LoadedRun:
    path: Path
    config: C.RunConfig
    tokenizer: tok.Tokenizer
    params: dict
    step: int


def load(run_dir: str | Path, which: str = "latest", gpt2_ranks: str | None = None) -> LoadedRun:
    """Parameters and tokenizer of a run's checkpoint: "latest", "best" or a step number."""
    path = Path(run_dir)
    if not is_run(path):
        raise GptjaxError(f"{path} is not a gptjax run (no config.json)")
    cfg = C.load(path / "config.json")
    tokenizer = tok.from_spec(json.loads((path / "tokenizer.json").read_text()),
                              gpt2_ranks or cfg.data.gpt2_ranks or None)
    ckpts = Checkpoints(path / "checkpoints", read_only=True)
    try:
        if which == "latest":
            step = ckpts.latest_step()
        elif which == "best":
            step = ckpts.best_step()
        else:
            step = int(which)
        abstract = jax.eval_shape(lambda: init_state(cfg.model, cfg.train))
        state, _ = ckpts.restore(abstract, step)
    finally:
        ckpts.close()
    return LoadedRun(path, cfg, tokenizer, state.params, int(state.step))


def training_data(cfg: C.RunConfig, out: Path, resuming: bool, progress: bool) -> PreparedData:
    """The run's prepared data: --data, or the embedded corpus prepared inside the run."""
    if cfg.data.data:
        return load_prepared(cfg.data.data)
    embedded = out / EMBEDDED_DATA
    if not resuming:
        from gptjax.prepare import prepare
        prepare(None, embedded, cfg.data.tokenizer or "char", val_fraction=cfg.data.val_fraction,
                gpt2_ranks=cfg.data.gpt2_ranks or None, progress=progress)
    return load_prepared(embedded)
