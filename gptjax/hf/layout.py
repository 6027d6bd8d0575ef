"""How gptjax's parameter tree maps onto GPT-2's tensor names in the Hugging Face layout.

Every mapping is a plain reshape in C order: HF's Conv1D stores weights as (in, out) like
Flax kernels, its fused c_attn columns are [q | k | v] with heads contiguous inside each,
which is gptjax's (d, 3, heads, head_dim), and c_proj's rows are the concatenated heads,
gptjax's (heads, head_dim, d). gptjax stacks the blocks along a leading layer axis (the
model scans over them); the HF layout has one tensor per layer, named h.<i>.<...>.
Names here are OpenAI's published ones, without transformers' "transformer." prefix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np

from gptjax import model
from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError


@dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]     # in gptjax's parameter tree
    names: tuple[str, ...]    # HF tensors, one per layer for stacked leaves
    hf_shape: tuple[int, ...]  # of each HF tensor

    @property
    def size(self) -> int:
        return len(self.names) * math.prod(self.hf_shape)


def leaves(cfg: ModelConfig) -> list[Leaf]:
    """Every parameter of a bias=True gptjax model with its HF tensor names and shapes."""
    d, f = cfg.d_model, cfg.d_mlp
    per_layer = [
        ("ln_1.weight", ("ln1", "scale"), (d,)),
        ("ln_1.bias", ("ln1", "bias"), (d,)),
        ("attn.c_attn.weight", ("attn", "qkv", "kernel"), (d, 3 * d)),
        ("attn.c_attn.bias", ("attn", "qkv", "bias"), (3 * d,)),
        ("attn.c_proj.weight", ("attn", "out", "kernel"), (d, d)),
        ("attn.c_proj.bias", ("attn", "out", "bias"), (d,)),
        ("ln_2.weight", ("ln2", "scale"), (d,)),
        ("ln_2.bias", ("ln2", "bias"), (d,)),
        ("mlp.c_fc.weight", ("mlp", "fc", "kernel"), (d, f)),
        ("mlp.c_fc.bias", ("mlp", "fc", "bias"), (f,)),
        ("mlp.c_proj.weight", ("mlp", "proj", "kernel"), (f, d)),
        ("mlp.c_proj.bias", ("mlp", "proj", "bias"), (d,)),
    ]
    stacked = [Leaf(("blocks", *path), tuple(f"h.{i}.{name}" for i in range(cfg.n_layer)), shape)
               for name, path, shape in per_layer]
    single = [
        Leaf(("wte", "embedding"), ("wte.weight",), (cfg.vocab_size, d)),
        Leaf(("wpe", "embedding"), ("wpe.weight",), (cfg.context_length, d)),
        Leaf(("ln_f", "scale"), ("ln_f.weight",), (d,)),
        Leaf(("ln_f", "bias"), ("ln_f.bias",), (d,)),
    ]
    return stacked + single


def abstract_params(cfg: ModelConfig) -> dict:
    """Shapes and dtypes of `cfg`'s parameters, nothing allocated."""
    return jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))


def get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def check_params(params: dict, cfg: ModelConfig) -> None:
    """One error naming every leaf of `params` that is missing, extra or misshapen for `cfg`."""
    want = _flat(abstract_params(cfg))
    got = _flat(params)
    problems = [f"missing {k} {list(s)}" for k, s in want.items() if k not in got]
    problems += [f"unexpected {k} {list(s)}" for k, s in got.items() if k not in want]
    problems += [f"{k} has shape {list(got[k])}, expected {list(s)}"
                 for k, s in want.items() if k in got and got[k] != s]
    if problems:
        raise GptjaxError(f"parameters do not match the model config: {'; '.join(problems)}")


def to_hf_tensors(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF-named numpy tensors (host copies) of gptjax parameters."""
    check_params(params, cfg)
    tensors = {}
    for leaf in leaves(cfg):
        value = np.asarray(jax.device_get(get_path(params, leaf.path)))
        per_tensor = value.reshape((len(leaf.names), *leaf.hf_shape))
        for name, tensor in zip(leaf.names, per_tensor):
            tensors[name] = np.ascontiguousarray(tensor)
    return tensors


def _flat(tree: dict) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x)) for path, x in flat}
