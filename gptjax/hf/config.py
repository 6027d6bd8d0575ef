"""GPT-2 model configs in Hugging Face's config.json form, to and from ModelConfig.

Only what gptjax computes exactly is accepted: a config asking for anything else (another
activation, per-layer attention scaling, untied embeddings) is an error rather than a
model that loads and then computes something different.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from gptjax.config import ModelConfig
from gptjax.data.tokenizer import GPT2_EOT_ID
from gptjax.errors import GptjaxError

# Both names are GPT-2's tanh-approximated GELU, which is what gptjax's MLP uses.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
SHAPE_FIELDS = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
# Settings that change the computation, with the only value gptjax implements
# (transformers' default applies when a field is absent, as in OpenAI's older files).
REQUIRED_FLAGS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "tie_word_embeddings": True,
    "add_cross_attention": False,
}


def config_from_hf(hf: dict) -> ModelConfig:
    """A ModelConfig (bias on, no dropout) from a GPT-2 config.json dict."""
    if hf.get("model_type") != "gpt2":
        raise GptjaxError(f"config.json has model_type {hf.get('model_type')!r}; only 'gpt2' "
                          "models can be imported")
    bad = [f"{k}={hf.get(k)!r}" for k in SHAPE_FIELDS
           if not (isinstance(hf.get(k), int) and not isinstance(hf.get(k), bool) and hf[k] > 0)]
    if bad:
        raise GptjaxError(f"config.json needs positive integers for {', '.join(SHAPE_FIELDS)}; "
                          f"got {', '.join(bad)}")
    d, heads = hf["n_embd"], hf["n_head"]
    if d % heads:
        raise GptjaxError(f"config.json: n_embd ({d}) is not divisible by n_head ({heads})")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELU:
        raise GptjaxError(f"config.json: activation_function {act!r} is not supported; gptjax "
                          f"computes GPT-2's tanh GELU ({' or '.join(TANH_GELU)})")
    for key, want in REQUIRED_FLAGS.items():
        if hf.get(key, want) != want:
            raise GptjaxError(f"config.json: {key} must be {json.dumps(want)} for gptjax, "
                              f"got {json.dumps(hf[key])}")
    inner = hf.get("n_inner")
    if inner is None:
        ratio = 4
    elif isinstance(inner, int) and inner > 0 and inner % d == 0:
        ratio = inner // d
    else:
        raise GptjaxError(f"config.json: n_inner {inner!r} is not a whole multiple of n_embd ({d}), "
                          "which gptjax's mlp_ratio needs")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise GptjaxError(f"config.json: layer_norm_epsilon must be a positive number, got {eps!r}")
    return ModelConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"],
                       n_layer=hf["n_layer"], n_head=heads, d_model=d, mlp_ratio=ratio,
                       dropout=0.0, bias=True, layer_norm_eps=float(eps))


def config_to_hf(cfg: ModelConfig, *, eot_id: int | None = None) -> dict:
    """The config.json transformers needs to build GPT2LMHeadModel for `cfg`."""
    if not cfg.bias:
        raise GptjaxError("GPT-2's layout has a bias in every linear layer and LayerNorm; this "
                          "model was built with model.bias false, so it cannot be exported to it")
    if eot_id is None and cfg.vocab_size > GPT2_EOT_ID:
        eot_id = GPT2_EOT_ID
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None if cfg.mlp_ratio == 4 else cfg.d_mlp,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_eps,
        # gptjax drops out embeddings and residual branches, never attention weights.
        "embd_pdrop": cfg.dropout,
        "resid_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        **REQUIRED_FLAGS,
        "initializer_range": 0.02,
        # Explicit nulls: GPT2Config would otherwise default both to 50256, an id a small
        # vocabulary does not have.
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": cfg.param_dtype,
        "use_cache": True,
    }


def read_hf_config(directory: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory's config.json."""
    path = Path(directory) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise GptjaxError(f"{path} not found: a GPT-2 model directory needs config.json and "
                          "model.safetensors") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GptjaxError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise GptjaxError(f"{path} is not a JSON object")
    return config_from_hf(raw)
