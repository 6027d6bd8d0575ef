"""GPT-2 weights in and out of gptjax, in the Hugging Face (transformers/safetensors) layout.

    cfg, params = load_hf("path/to/gpt2")          # config.json + model.safetensors
    save_hf(params, cfg, "out/gpt2", tokenizer=GPT2Tokenizer())

Imports check everything before reading any weight and report every mismatch at once;
exports build the directory beside its destination and rename it into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import jax.numpy as jnp
from safetensors.numpy import save_file

from gptjax import config as C
from gptjax.data.tokenizer import GPT2Tokenizer
from gptjax.errors import GptjaxError
from gptjax.hf.config import config_from_hf, config_to_hf, read_hf_config
from gptjax.hf.layout import to_hf_tensors
from gptjax.hf.source import resolve_source
from gptjax.hf.weights import Tensors, check, check_tied, read_params

__all__ = ["check_new_dir", "config_from_hf", "config_to_hf", "load_hf", "new_dir",
           "resolve_source", "save_hf"]


def load_hf(source: str | os.PathLike, *, dtype=None) -> tuple[C.ModelConfig, dict]:
    """(ModelConfig, params) of a GPT-2 directory; `dtype` ("bfloat16") casts each leaf."""
    directory = Path(source)
    if not directory.is_dir():
        raise GptjaxError(f"{directory} is not a directory with config.json and model.safetensors")
    cfg = read_hf_config(directory)
    cfg = dataclasses.replace(cfg, param_dtype=_param_dtype(dtype))
    tensors = Tensors(directory)
    check(tensors, cfg)
    check_tied(tensors)
    return cfg, read_params(tensors, cfg, jnp.dtype(cfg.param_dtype))


def _param_dtype(dtype) -> str:
    """ModelConfig records the parameter dtype, so only its choices can be loaded into."""
    name = "float32" if dtype is None else jnp.dtype(dtype).name
    choices = C.ModelConfig.__dataclass_fields__["param_dtype"].metadata["choices"]
    if name not in choices:
        raise GptjaxError(f"parameter dtype {name} is not supported; choose {' or '.join(choices)}")
    return name


def save_hf(params: dict, cfg: C.ModelConfig, out_dir: str | os.PathLike, *,
            tokenizer=None) -> list[Path]:
    """Write config.json + model.safetensors (+ tokenizer files for GPT-2's); the paths written."""
    out = Path(out_dir)
    check_new_dir(out)
    hf_config = config_to_hf(cfg, eot_id=getattr(tokenizer, "eot_id", None))
    return write_model(out, hf_config, to_hf_tensors(params, cfg), tokenizer, cfg.context_length)


def write_model(out: Path, hf_config: dict, tensors: dict, tokenizer, context_length: int) -> list[Path]:
    """config.json + model.safetensors (+ GPT-2 tokenizer files) into the new folder `out`,
    renamed into place only when complete; the paths written."""
    with new_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        # transformers refuses safetensors files without this metadata.
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _mode_like(tmp / "model.safetensors", tmp / "config.json")
        del tensors
        if isinstance(tokenizer, GPT2Tokenizer):
            from gptjax.hf.tokenizer import save_tokenizer
            save_tokenizer(tokenizer, tmp, model_max_length=context_length)
        names = sorted(p.name for p in tmp.iterdir())
    return [out / name for name in names]


def _mode_like(path: Path, sibling: Path) -> None:
    """safetensors creates its file owner-only (0600): give it the mode `sibling` got from
    the umask."""
    path.chmod(sibling.stat().st_mode & 0o777)


def check_new_dir(out: Path) -> None:
    """Outputs never overwrite: `out` must not exist, or be an empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptjaxError(f"{out} already exists and is not empty; choose another --out")


@contextmanager
def new_dir(out: str | os.PathLike):
    """A directory built beside `out` and renamed into place only when complete."""
    out = Path(out).absolute()
    check_new_dir(out)
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, out)  # rename(2) also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:  # folders made for `out` go too: nothing is left behind
            shutil.rmtree(created, ignore_errors=True)
        raise
