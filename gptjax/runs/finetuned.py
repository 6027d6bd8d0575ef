"""The format of fine-tuned runs on disk: where the base came from and what trained.

A fine-tuned run is a gptjax run directory (config.json, tokenizer.json, checkpoints/)
plus finetune.json. Its checkpoint holds only what trained — a task head, LoRA adapters,
trained blocks — and finetune.json names the base (a run's checkpoint or Hugging Face
weights) with a fingerprint of its weights, which loading (`gptjax.runs.load`) checks before joining the two.
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

from gptjax import config as C
from gptjax.data import tokenizer as tok
from gptjax.errors import GptjaxError
from gptjax.model.classifier import init_head
from gptjax.model.lora import LoRAConfig, init_adapters, merge
from gptjax.model.parts import Trainable, is_trainable, split

FILE = "finetune.json"


def is_finetuned(path: str | Path) -> bool:
    return (Path(path) / FILE).is_file()


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

    task: str  # the command that made it: "cls", "sft", "lm", "dpo" or "distill"
    model: C.ModelConfig
    trainable: Trainable
    lora: LoRAConfig | None
    base: dict
    base_fingerprint: str
    classes: tuple[str, ...] = ()
    pooling: str = "last"
    settings: dict = dataclasses.field(default_factory=dict)

    @property
    def is_classifier(self) -> bool:
        """A class head replaces the language-model head (finetune-cls, or a distilled classifier)."""
        return bool(self.classes)

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
                          "the gptjax finetune-* commands and gptjax distill") from None


def full_tree(spec: Spec, gpt: dict, key: jax.Array) -> dict:
    """{"gpt", ["head"], ["lora"]}: the base's parameters plus freshly initialised new parts."""
    head_key, lora_key = jax.random.split(key)
    tree = {"gpt": gpt}
    if spec.is_classifier:
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


def describe(origin: dict) -> str:
    if origin["kind"] == "hf":
        return f"Hugging Face weights {origin['source']}"
    if origin["kind"] == "preset":
        return f"a fresh {origin['preset']} model (seed {origin['seed']})"
    return f"run {origin['path']} at step {origin['checkpoint']}"

