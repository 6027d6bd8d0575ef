"""A gptjax classifier run as Hugging Face's GPT2ForSequenceClassification.

transformers' head (`score`) is a linear map with no bias that reads the last non-padding
token's final hidden state. gptjax's head has a bias. In the exported model the final
LayerNorm feeds only that head, so the bias moves into the norm's shift: beta' = beta + v
with W v = b (the least-norm solution; W is classes x d_model, of full row rank when the
head is trained). The logits are then W(gamma * x_hat + beta') = the gptjax logits.
Mean pooling has no transformers equivalent and is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gptjax.errors import GptjaxError
from gptjax.hf.config import config_to_hf
from gptjax.hf.layout import to_hf_tensors

PREFIX = "transformer."  # GPT2ForSequenceClassification's base_model_prefix


def classifier_tensors(params: dict, cfg, head: dict) -> dict[str, np.ndarray]:
    """HF tensors: the trunk under `transformer.`, `score.weight`, the bias folded into ln_f."""
    kernel = np.asarray(head["kernel"], np.float64)  # (d_model, classes)
    bias = np.asarray(head["bias"], np.float64)
    shift, *_ = np.linalg.lstsq(kernel.T, bias, rcond=None)
    if np.abs(kernel.T @ shift - bias).max() > 1e-6 * max(1.0, np.abs(bias).max()):
        raise GptjaxError("the classification head's bias cannot be folded into the final norm "
                          "(its kernel is rank-deficient); this classifier cannot be exported")
    tensors = {PREFIX + k: v for k, v in to_hf_tensors(params, cfg).items()}
    beta = tensors[PREFIX + "ln_f.bias"]
    tensors[PREFIX + "ln_f.bias"] = (beta.astype(np.float64) + shift).astype(beta.dtype)
    tensors["score.weight"] = np.ascontiguousarray(kernel.T.astype(beta.dtype))
    return tensors


def check_exportable(pooling: str) -> None:
    if pooling != "last":
        raise GptjaxError(f"this classifier pools by {pooling!r}; transformers' "
                          "GPT2ForSequenceClassification reads the last token only, so only "
                          "--pooling last classifiers can be exported")


def save_classifier(params: dict, cfg, head: dict, classes: tuple[str, ...], pooling: str,
                    out_dir: str | os.PathLike, *, pad_id: int, tokenizer=None) -> list[Path]:
    """Write config.json + model.safetensors (+ GPT-2 tokenizer files) for transformers'
    GPT2ForSequenceClassification; the paths written."""
    from gptjax.hf.io import check_new_dir, write_model
    check_exportable(pooling)
    out = Path(out_dir)
    check_new_dir(out)
    hf_config = config_to_hf(cfg, eot_id=getattr(tokenizer, "eot_id", None))
    hf_config.update({
        "architectures": ["GPT2ForSequenceClassification"],
        "num_labels": len(classes),
        "id2label": {str(i): c for i, c in enumerate(classes)},
        "label2id": {c: i for i, c in enumerate(classes)},
        # The last token that is not padding is the one the head reads; gptjax pads with
        # this id too. Without it transformers refuses batches of more than one text.
        "pad_token_id": pad_id,
        "problem_type": "single_label_classification",
    })
    return write_model(out, hf_config, classifier_tensors(params, cfg, head), tokenizer, cfg.context_length)
