"""Fine-tuned runs on disk: where the base came from, what trained, and loading it back.

A fine-tuned run is a gptjax run directory (config.json, tokenizer.json, checkpoints/)
plus finetune.json. Its checkpoint holds only what trained — a task head, LoRA adapters,
trained blocks — and finetune.json names the base (a run's checkpoint or Hugging Face
weights) with a fingerprint of its weights, which loading checks before joining the two.
A LoRA run's checkpoint is therefore the size of its adapters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from gptjax import config as C
from gptjax import model
from gptjax import tokenizer as tok
from gptjax.checkpoint import Checkpoints
from gptjax.errors import GptjaxError
from gptjax.finetune.classifier import init_head
from gptjax.finetune.lora import LoRAConfig, init_adapters, merge
from gptjax.finetune.params import Trainable, is_trainable, join, split

FILE = "finetune.json"


def is_finetuned(path: str | Path) -> bool:
    return (Path(path) / FILE).is_file()


@dataclass
class Base:
    """The pretrained starting point: its run config, tokenizer, parameters and origin."""

    config: C.RunConfig
    tokenizer: tok.Tokenizer
    params: dict
    origin: dict  # {"kind": "run", "path", "checkpoint"} or {"kind": "hf", "source"}


def load_base(run_dir: str | None = None, hf: str | None = None, checkpoint: str = "latest",
              gpt2_ranks: str | None = None) -> Base:
    """A gptjax run's checkpoint (fine-tuned runs included) or GPT-2 weights (dir or Hub name)."""
    from gptjax import run
    if (run_dir is None) == (hf is None):
        raise GptjaxError("give the starting point as --base RUN_DIR or --hf DIR_OR_NAME (one of them)")
    if hf is not None:
        from gptjax.hf import load_pretrained
        loaded = load_pretrained(hf, gpt2_ranks)
        source = str(Path(hf).absolute()) if Path(hf).exists() else hf
        origin = {"kind": "hf", "source": source}
        return Base(loaded.config, loaded.tokenizer, loaded.params, origin)
    if is_finetuned(run_dir):  # a classifier too: its fine-tuned trunk is the starting point
        tuned = load(run_dir, checkpoint, gpt2_ranks)
        config, tokenizer, params, step = tuned.config, tuned.tokenizer, tuned.lm_params(), tuned.step
    else:
        loaded = run.load(run_dir, checkpoint, gpt2_ranks)
        config, tokenizer, params, step = loaded.config, loaded.tokenizer, loaded.params, loaded.step
    origin = {"kind": "run", "path": str(Path(run_dir).absolute()), "checkpoint": step}
    return Base(config, tokenizer, params, origin)


def fingerprint(params: dict) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                             key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Spec:
    """Everything finetune.json records, from which the parameter tree can be rebuilt."""

    task: str  # "cls", "sft" or "lm"
    model: C.ModelConfig
    trainable: Trainable
    lora: LoRAConfig | None
    base: dict
    base_fingerprint: str
    classes: tuple[str, ...] = ()
    pooling: str = "last"
    settings: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = dataclasses.asdict(self.model)
        return d

    @classmethod
    def from_json(cls, raw: dict) -> "Spec":
        lora = raw.get("lora")
        return cls(task=raw["task"], model=C.ModelConfig(**raw["model"]),
                   trainable=Trainable(**raw["trainable"]),
                   lora=LoRAConfig(lora["rank"], lora["alpha"], tuple(lora["targets"])) if lora else None,
                   base=raw["base"], base_fingerprint=raw["base_fingerprint"],
                   classes=tuple(raw.get("classes", ())), pooling=raw.get("pooling", "last"),
                   settings=raw.get("settings", {}))


def read_spec(run_dir: str | Path) -> Spec:
    """The run's finetune.json, or one line naming what is wrong with it."""
    path = Path(run_dir) / FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise GptjaxError(f"cannot read {path}: {e}") from None
    try:
        if not isinstance(raw.get("settings", {}), dict):
            raise TypeError("settings is not an object")
        return Spec.from_json(raw)
    except (KeyError, TypeError, AttributeError) as e:  # valid JSON, not what write_run wrote
        raise GptjaxError(f"{path} is malformed ({type(e).__name__}: {e}); it is written by "
                          "gptjax finetune-cls, finetune-sft and finetune-lm") from None


def full_tree(spec: Spec, gpt: dict, key: jax.Array) -> dict:
    """{"gpt", ["head"], ["lora"]}: the base's parameters plus freshly initialised new parts."""
    head_key, lora_key = jax.random.split(key)
    tree = {"gpt": gpt}
    if spec.task == "cls":
        tree["head"] = init_head(head_key, spec.model.d_model, len(spec.classes))
    if spec.lora is not None:
        tree["lora"] = init_adapters(spec.model, spec.lora, lora_key)
    return tree


def trainable_part(spec: Spec, tree: dict) -> tuple[dict, dict]:
    """(trainable, frozen) parts of a full tree under the spec's choices."""
    return split(tree, lambda path: is_trainable(path, spec.trainable, spec.lora is not None))


def write_run(out: Path, spec: Spec, tokenizer_spec: dict, data_cfg: C.DataConfig) -> None:
    """The run's files other than checkpoints (config.json makes it loadable as a run)."""
    out.mkdir(parents=True, exist_ok=True)
    C.save(C.RunConfig(model=spec.model, data=data_cfg), out / "config.json")
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_spec, ensure_ascii=False) + "\n")
    (out / FILE).write_text(json.dumps(spec.to_json(), indent=2, ensure_ascii=False) + "\n")


@dataclass
class Finetuned:
    path: Path
    spec: Spec
    config: C.RunConfig
    tokenizer: tok.Tokenizer
    params: dict  # the full tree {"gpt", ["head"], ["lora"]}
    step: int

    def lm_params(self) -> dict:
        """The language model with any adapters merged in (for generation and export)."""
        if self.spec.lora is None:
            return self.params["gpt"]
        return merge(self.params["gpt"], self.params["lora"], self.spec.lora)


def load(run_dir: str | Path, which: str | int = "latest", gpt2_ranks: str | None = None) -> Finetuned:
    """A fine-tuned run's parameters: its checkpoint joined with its (checked) base."""
    from gptjax.run import parse_checkpoint
    path = Path(run_dir)
    spec = read_spec(path)
    cfg = C.load(path / "config.json")
    gpt2_ranks = gpt2_ranks or cfg.data.gpt2_ranks or None
    tokenizer = tok.from_spec(json.loads((path / "tokenizer.json").read_text()), gpt2_ranks)
    one = SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: full_tree(spec, model.init(spec.model, jax.random.PRNGKey(0)),
                                              jax.random.PRNGKey(0)))
    abstract, _ = trainable_part(spec, shapes)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    which = parse_checkpoint(str(which))
    ckpts = Checkpoints(path / "checkpoints", create=False)
    try:
        step = ckpts.best_step() if which == "best" else None if which == "latest" else which
        trained, step = ckpts.restore_params(abstract, step)
    finally:
        ckpts.close()
    _, frozen_shapes = trainable_part(spec, shapes)
    frozen = {}
    if frozen_shapes:  # something of the base did not train: it comes from the base
        base = _base_of(spec, gpt2_ranks)
        if fingerprint(base.params) != spec.base_fingerprint:
            raise GptjaxError(f"the base weights of {path} ({_describe(spec.base)}) changed after "
                              "fine-tuning; they no longer match this run's checkpoint")
        _, frozen = trainable_part(spec, {"gpt": base.params})
    params = join(trained, frozen)
    return Finetuned(path, spec, cfg, tokenizer, params, step)


def _base_of(spec: Spec, gpt2_ranks: str | None) -> Base:
    origin = spec.base
    try:
        if origin["kind"] == "hf":
            return load_base(hf=origin["source"], gpt2_ranks=gpt2_ranks)
        return load_base(run_dir=origin["path"], checkpoint=str(origin["checkpoint"]),
                         gpt2_ranks=gpt2_ranks)
    except GptjaxError as e:
        raise GptjaxError(f"cannot load this run's base ({_describe(origin)}): {e}") from None


def _describe(origin: dict) -> str:
    if origin["kind"] == "hf":
        return f"Hugging Face weights {origin['source']}"
    return f"run {origin['path']} at step {origin['checkpoint']}"

