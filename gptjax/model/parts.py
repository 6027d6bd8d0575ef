"""Which parameters train: splitting one tree into trainable and frozen parts, and back.

A fine-tuned model is one nested dict: {"gpt": the language model, "head": a task head,
"lora": adapters} (the last two when present). Training differentiates and updates only
the trainable part; the frozen part is passed to each step as a separate argument, so it
is neither differentiated nor written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptjax.errors import GptjaxError

NEW_PARTS = ("head", "lora")  # parameters that did not come from the pretrained model


@dataclass(frozen=True)
class Trainable:
    """What of the pretrained model trains: its last `blocks` blocks (with the final
    LayerNorm), and the embeddings when `embeddings` ("all")."""

    blocks: int
    embeddings: bool

    def describe(self, n_layer: int, head: bool) -> str:
        if self.embeddings:
            return "everything"
        if self.blocks == 0:
            return "the head only"
        return (f"the last {self.blocks} of {n_layer} blocks and the final norm"
                + (", and the head" if head else ""))


def parse_trainable(text: str, n_layer: int, *, head: bool = True) -> Trainable:
    """'all', 'head' (only with a task head) or 'last-N' (1 <= N <= n_layer)."""
    if text == "all":
        return Trainable(n_layer, True)
    if text == "head" and head:
        return Trainable(0, False)
    match = re.fullmatch(r"last-(\d+)", text)
    if match and 1 <= int(match.group(1)) <= n_layer:
        return Trainable(int(match.group(1)), False)
    choices = ("all, head " if head else "all ") + f"or last-N with 1 <= N <= {n_layer}"
    raise GptjaxError(f"--train must be {choices}; got {text!r}")


def is_trainable(path: tuple[str, ...], trainable: Trainable, lora: bool) -> bool:
    if path[0] in NEW_PARTS:
        return True
    if lora:  # adapters replace training the base weights
        return False
    if path[1] in ("blocks", "ln_f"):
        return trainable.blocks > 0
    return trainable.embeddings


def split(tree: dict, keep, path: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(leaves where keep(path) is true, the rest), both keeping the nesting."""
    yes, no = {}, {}
    for key, value in tree.items():
        sub = (*path, key)
        if isinstance(value, dict):
            a, b = split(value, keep, sub)
            if a:
                yes[key] = a
            if b:
                no[key] = b
        else:
            (yes if keep(sub) else no)[key] = value
    return yes, no


def join(a: dict, b: dict) -> dict:
    """The union of two trees with disjoint leaves (the inverse of split)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = join(out[key], value) if key in out else value
    return out
