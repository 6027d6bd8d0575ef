"""The directory a training run writes, and starting or resuming one in it.

A run directory holds config.json (the resolved config), tokenizer.json, checkpoints/,
metrics.jsonl, loss.png and sample.txt, plus data/ when it trains on the embedded corpus.
A run directory with no checkpoint yet holds no training, so it may be started over.
Imported and fine-tuned runs use the same layout; `gptjax.runs` loads runs of every kind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from gptjax import config as C
from gptjax.data.prepared import PreparedData, load_prepared
from gptjax.errors import GptjaxError
from gptjax.training.extend import is_extension

EMBEDDED_DATA = "data"
# What --extend-to changes in a run's config: the schedule's length, nothing before it.
SCHEDULE_LENGTH = ("train.max_steps", "train.decay_steps", "train.lr_tails")
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "loss.png", "stats.png", "sample.txt")


def is_run(path: Path) -> bool:
    return (Path(path) / "config.json").is_file()


def has_checkpoint(path: Path) -> bool:
    return latest_step(path) is not None


def latest_step(path: Path) -> int | None:
    """The newest committed checkpoint's step (orbax commits by renaming to the step)."""
    ckpt = Path(path) / "checkpoints"
    steps = [int(p.name) for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []
    return max(steps, default=None)


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
    saved = C.load(out / "config.json")
    diffs = C.training_differences(saved, cfg)
    schedule_only = all(d.split(" ")[0] in SCHEDULE_LENGTH for d in diffs)
    if diffs and not (schedule_only and is_extension(saved.train, cfg.train, latest_step(out) or 0)):
        hint = "use a new --out for a new run"
        if cfg.train.max_steps > saved.train.max_steps:
            hint = f"to train this run for longer, use --extend-to {cfg.train.max_steps}"
        elif cfg.train.max_steps < saved.train.max_steps:
            hint = f"to stop it earlier, use --stop-at {cfg.train.max_steps}"
        raise GptjaxError(f"{out} was created with a different config: {'; '.join(diffs)}; {hint}")
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
        shutil.move(data.path, out / EMBEDDED_DATA)  # a rename, or a copy across filesystems
        data = load_prepared(out / EMBEDDED_DATA, check_ids=False)
    (out / "tokenizer.json").write_text(json.dumps(data.meta["tokenizer"], ensure_ascii=False) + "\n")
    C.save(cfg, out / "config.json")
    return data
