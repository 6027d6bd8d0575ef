"""Reading GPT-2 safetensors files: checking them against the config, then leaf by leaf.

Files are read through safetensors' numpy interface (no torch). safe_open memory-maps a
file, and the pages it touches count as resident until it is closed, so tensors are read
in bounded pieces, each from a freshly opened file, straight into one preallocated array
per leaf: peak memory stays near the parameters' own size instead of file + parameters.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from gptjax.config import ModelConfig
from gptjax.errors import GptjaxError
from gptjax.hf.layout import abstract_params, get_path, leaves, set_path

PREFIX = "transformer."  # what transformers' save_pretrained puts before the body's names
# Causal-mask buffers in OpenAI's published files (attn.bias is (1, 1, n_positions,
# n_positions)); not parameters, so not in gptjax's tree.
BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
CHUNK_BYTES = 16 << 20


class Tensors:
    """Which file holds each tensor, with its shape and dtype, read from the headers only."""

    def __init__(self, directory: Path):
        single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            try:
                shards = json.loads(index.read_text())["weight_map"].values()
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise GptjaxError(f"cannot read {index}: {type(e).__name__}: {e}") from None
            files = sorted({directory / name for name in shards})
        else:
            raise GptjaxError(f"{directory} has no model.safetensors (nor a sharded "
                              "model.safetensors.index.json); only safetensors weights are read")
        self.where: dict[str, tuple[Path, str]] = {}  # name without prefix -> (file, stored key)
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        self.duplicates: list[str] = []
        for file in files:
            with _open(file) as f:
                for key in f.keys():
                    name = key.removeprefix(PREFIX)
                    if name in self.where:
                        self.duplicates.append(key)
                        continue
                    meta = f.get_slice(key)
                    self.where[name] = (file, key)
                    self.shape[name] = tuple(meta.get_shape())
                    self.dtype[name] = meta.get_dtype()


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise GptjaxError(f"cannot read {file}: {e}") from None


def check(tensors: Tensors, cfg: ModelConfig) -> None:
    """One error listing every missing, unexpected, misshapen or non-float tensor."""
    expected = {name: leaf.hf_shape for leaf in leaves(cfg) for name in leaf.names}
    expected["lm_head.weight"] = expected["wte.weight"]  # optional, checked if present
    hints = {"wte.weight": f" (config.json vocab_size is {cfg.vocab_size})",
             "lm_head.weight": f" (config.json vocab_size is {cfg.vocab_size})",
             "wpe.weight": f" (config.json n_positions is {cfg.context_length})"}
    problems = [f"missing {n} {list(s)}" for n, s in expected.items()
                if n not in tensors.where and n != "lm_head.weight"]
    problems += [f"duplicate {k}" for k in tensors.duplicates]
    for name, shape in tensors.shape.items():
        if name not in expected:
            if not BUFFER.fullmatch(name):
                problems.append(f"unexpected {name} {list(shape)}")
        elif shape != expected[name]:
            problems.append(f"{name} has shape {list(shape)}, expected {list(expected[name])}"
                            + hints.get(name, ""))
        elif tensors.dtype[name] not in FLOAT_DTYPES:
            problems.append(f"{name} has dtype {tensors.dtype[name]}, not a float type")
    if problems:
        raise GptjaxError(f"the weights do not match config.json (n_layer {cfg.n_layer}, n_embd "
                          f"{cfg.d_model}, vocab_size {cfg.vocab_size}, n_positions "
                          f"{cfg.context_length}): {'; '.join(problems)}")


def check_tied(tensors: Tensors) -> None:
    """gptjax always ties the output head to wte, so a separate lm_head must equal it."""
    if "lm_head.weight" not in tensors.where:
        return
    for (_, wte), (_, head) in zip(_chunks(tensors, "wte.weight"), _chunks(tensors, "lm_head.weight")):
        if not np.array_equal(wte, head):
            raise GptjaxError("lm_head.weight differs from wte.weight; gptjax ties the output "
                              "head to the token embedding, so untied models cannot be imported")


def read_params(tensors: Tensors, cfg: ModelConfig, dtype) -> dict:
    """The parameter tree, one leaf resident on the host at a time, largest leaves first."""
    abstract = abstract_params(cfg)
    params: dict = {}
    # Largest first: the leaf being assembled is largest while little else is loaded.
    for leaf in sorted(leaves(cfg), key=lambda l: -l.size):
        host = _aligned_empty((len(leaf.names), *leaf.hf_shape), dtype)
        for i, name in enumerate(leaf.names):
            for rows, chunk in _chunks(tensors, name):
                host[i, rows] = chunk  # casts to `dtype` on assignment
        # On CPU, device_put adopts an aligned buffer without copying; on an accelerator
        # it copies, and dropping `host` frees the host side before the next leaf.
        value = jax.device_put(host.reshape(get_path(abstract, leaf.path).shape))
        set_path(params, leaf.path, value.block_until_ready())
        del host
    return params


def _chunks(tensors: Tensors, name: str):
    """(row slice, array) pieces of a tensor, each read from a freshly opened file.

    Reopening bounds the resident mapped pages, and slicing bounds the temporary copy,
    to CHUNK_BYTES (a whole wte read at once would be resident twice more).
    """
    file, key = tensors.where[name]
    shape = tensors.shape[name]
    rows = shape[0]  # every tensor read is at least 1-D
    row_bytes = max(1, math.prod(shape[1:]) * 8)  # 8: the widest float dtype read
    step = max(1, CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        stop = min(rows, start + step)  # safetensors rejects slices past the end
        with _open(file) as f:
            piece = f.get_slice(key)[start:stop]
        yield slice(start, stop), piece


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data is 64-byte aligned, as XLA:CPU needs to share it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)
