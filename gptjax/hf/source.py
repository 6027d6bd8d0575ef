"""Where a Hugging Face model comes from: a local directory, or a name on the Hub.

Kept apart from the weight mapping so that resolving a name does not import JAX, and
huggingface_hub stays an optional extra (`pip install gptjax[hf]`).
"""

from __future__ import annotations

import re
from pathlib import Path

from gptjax.errors import GptjaxError

# "name" or "owner/name", as the Hub spells repository ids; anything else is a path.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A single file, or the sharded layout (an index naming the shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")


def resolve_source(name_or_dir: str | Path) -> Path:
    """An existing directory as is; otherwise download config.json + weights of a Hub name."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if path.exists():
        raise GptjaxError(f"{path} is a file; pass the directory holding config.json and "
                          "model.safetensors, or a Hugging Face model name")
    name = str(name_or_dir)
    if not HUB_NAME.fullmatch(name):
        raise GptjaxError(f"{name} not found: it is neither a directory nor a Hugging Face model "
                          "name; pass a directory holding config.json and model.safetensors")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise GptjaxError(_unavailable(name, "huggingface_hub is not installed: "
                                             "pip install 'gptjax[hf]'")) from None
    try:
        local = Path(snapshot_download(repo_id=name, allow_patterns=["config.json", *WEIGHT_FILES]))
    except Exception as e:  # offline, unknown repo, invalid name: errors vary by version
        raise GptjaxError(_unavailable(name, f"{type(e).__name__}: offline, or no such "
                                             "model?")) from None
    if not (local / "config.json").is_file() or not any(local.glob("model*.safetensors*")):
        raise GptjaxError(f"https://huggingface.co/{name} has no config.json + model.safetensors "
                          "(only safetensors weights are read)")
    return local


def _unavailable(name: str, reason: str) -> str:
    owner, _, rest = name.rpartition("/")
    if owner and Path(owner).is_dir():  # most likely a mistyped local path, not a Hub name
        return (f"{name} not found: {owner}/ has no {rest} (nor could a Hugging Face model of that "
                f"name be downloaded: {reason})")
    return (f"{name} is not a directory and could not be downloaded from "
            f"https://huggingface.co/{name} ({reason}); put its config.json and "
            "model.safetensors in a directory and pass that directory instead")
