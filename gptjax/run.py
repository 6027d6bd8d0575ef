"""Run directories: resolving a config against its data, creating, checking and loading runs.

A run directory holds config.json (the resolved config), tokenizer.json, checkpoints/,
metrics.jsonl, loss.png and sample.txt, plus data/ when it trains on the embedded corpus.
A run directory with no checkpoint yet holds no training, so it may be started over.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
from jax.sharding import SingleDeviceSharding

from gptjax import config as C
from gptjax import tokenizer as tok
from gptjax.checkpoint import Checkpoints
from gptjax.data import PreparedData, load_prepared
from gptjax.errors import GptjaxError
from gptjax.model import init as init_params

EMBEDDED_DATA = "data"
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "sample.txt")


def is_run(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def has_checkpoint(path: Path) -> bool:
    ckpt = Path(path) / "checkpoints"
    return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def has_train_state(path: Path) -> bool:
    """False for a params-only run (imported weights): there is no optimizer state to resume."""
    steps = [p for p in (Path(path) / "checkpoints").iterdir() if p.name.isdigit()]
    return (max(steps, key=lambda p: int(p.name)) / "train").is_dir()


def check_out_dir(out: Path) -> bool:
    """True when `out` is a run with a checkpoint to resume; error if it is something else."""
    if is_run(out):
        if has_checkpoint(out) and not has_train_state(out):
            raise GptjaxError(f"{out} holds imported or fine-tuned weights without optimizer "
                              "state, so gptjax train cannot resume it; to train it further, "
                              "start a new run from it with gptjax finetune-lm/-sft/-cls --base")
        return has_checkpoint(out)
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
    path = str(Path(cfg.data.data).resolve()) if cfg.data.data else ""
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab),
        data=dataclasses.replace(cfg.data, tokenizer=kind, data=path))


def check_resume(out: Path, cfg: C.RunConfig, data: PreparedData) -> None:
    """A resumed run must train on the same trajectory and the same tokens."""
    diffs = C.training_differences(C.load(out / "config.json"), cfg)
    if diffs:
        raise GptjaxError(f"{out} was created with a different config: {'; '.join(diffs)}; "
                          "use a new --out for a new run")
    check_tokenizer(out, data)


def check_tokenizer(run_dir: Path, data: PreparedData) -> None:
    """Same kind is not enough: two char vocabularies map the same id to different text."""
    saved = json.loads((Path(run_dir) / "tokenizer.json").read_text())
    kind = data.meta["tokenizer"]["kind"]
    if saved["kind"] != kind:
        raise GptjaxError(f"prepared data {data.path} uses the {kind} tokenizer, but run "
                          f"{run_dir} uses {saved['kind']}")
    if saved != data.meta["tokenizer"]:
        raise GptjaxError(f"prepared data {data.path} uses a different {data.meta['tokenizer']['kind']} "
                          f"tokenizer than run {run_dir} ({saved['kind']})")


def data_fingerprint(data: PreparedData) -> dict:
    """What identifies the training tokens, independent of where the folder lives."""
    meta = data.meta
    return {"train_tokens": int(meta["train_tokens"]), "val_tokens": int(meta["val_tokens"]),
            "tokenizer": meta["tokenizer"]["kind"],
            "sources_sha256": [s["sha256"] for s in meta["sources"]]}


def start_over(out: Path) -> None:
    """Remove what an unstarted run (no checkpoint) wrote, so it can be created anew."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in (EMBEDDED_DATA, "checkpoints"):
        shutil.rmtree(out / name, ignore_errors=True)


def create(out: Path, cfg: C.RunConfig, data: PreparedData) -> PreparedData:
    """Write the run's files; an embedded corpus prepared aside moves into the run."""
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.data:
        os.replace(data.path, out / EMBEDDED_DATA)
        data = load_prepared(out / EMBEDDED_DATA, check_ids=False)
    (out / "tokenizer.json").write_text(json.dumps(data.meta["tokenizer"], ensure_ascii=False) + "\n")
    C.save(cfg, out / "config.json")
    return data


def prepare_embedded(cfg: C.RunConfig, scratch: Path, progress: bool) -> PreparedData:
    from gptjax.prepare import prepare
    prepare(None, scratch, cfg.data.tokenizer or "char", val_fraction=cfg.data.val_fraction,
            gpt2_ranks=cfg.data.gpt2_ranks or None, progress=progress)
    return load_prepared(scratch)


@dataclass
class LoadedRun:
    path: Path
    config: C.RunConfig
    tokenizer: tok.Tokenizer
    params: dict
    step: int


def parse_checkpoint(which: str) -> str | int:
    if which in ("latest", "best"):
        return which
    if which.isdigit():
        return int(which)
    raise GptjaxError(f"--checkpoint must be latest, best or a step number, got {which!r}")


def load(run_dir: str | Path, which: str | int = "latest", gpt2_ranks: str | None = None) -> LoadedRun:
    """Parameters and tokenizer of a run's checkpoint: "latest", "best" or a step number."""
    path = Path(run_dir)
    if not is_run(path):
        raise GptjaxError(f"{path} is not a gptjax run (no config.json)")
    which = parse_checkpoint(str(which))
    from gptjax.finetune import store
    if store.is_finetuned(path):  # its checkpoint holds what trained; the rest is its base's
        tuned = store.load(path, which, gpt2_ranks)
        if tuned.spec.task == "cls":
            raise GptjaxError(f"{path} is a classifier (gptjax finetune-cls): use gptjax classify")
        return LoadedRun(path, tuned.config, tuned.tokenizer, tuned.lm_params(), tuned.step)
    cfg = C.load(path / "config.json")
    tokenizer = tok.from_spec(json.loads((path / "tokenizer.json").read_text()),
                              gpt2_ranks or cfg.data.gpt2_ranks or None)
    ckpts = Checkpoints(path / "checkpoints", create=False)
    try:
        if which == "latest":
            step = ckpts.latest_step()
        elif which == "best":
            step = ckpts.best_step()
        else:
            step = which
        # One device, said explicitly: a checkpoint saved from a mesh restores only onto a
        # target that names its own layout.
        one = SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
            jax.eval_shape(lambda: init_params(cfg.model, jax.random.PRNGKey(0))))
        params, step = ckpts.restore_params(abstract, step)
    finally:
        ckpts.close()
    return LoadedRun(path, cfg, tokenizer, params, step)


def own_data(path: Path) -> Path:
    """Where a run without a `data` setting keeps its prepared data: its embedded copy, or
    for a finetune-lm run the data it was tuned on. Other fine-tuned runs (instruction and
    classification data is not prepared data) and imported runs have none."""
    if (path / EMBEDDED_DATA).exists():
        return path / EMBEDDED_DATA
    from gptjax.finetune import store
    if store.is_finetuned(path):
        spec = store.read_spec(path)
        tuned_on = spec.settings.get("data") if spec.task == "lm" else None
        if tuned_on and not Path(tuned_on).is_dir():
            raise GptjaxError(f"the data {path} was tuned on ({tuned_on}) is gone; pass --data")
        if tuned_on:
            return Path(tuned_on)
    raise GptjaxError(f"{path} has no prepared data of its own (fine-tuned and imported runs "
                      "have none): pass --data")


def run_data(run: LoadedRun, data_dir: str | None = None) -> PreparedData:
    """The run's own prepared data, or `data_dir` checked against the run's tokenizer."""
    data = load_prepared(data_dir or run.config.data.data or own_data(run.path))
    check_tokenizer(run.path, data)  # first: a different vocabulary is the real mismatch
    resolve(run.config, data)  # vocabulary fits
    return data
