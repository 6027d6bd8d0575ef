"""gptjax: a pure-functional JAX/Flax GPT pipeline.

The public surface is plain functions of pytrees and frozen config dataclasses:

    cfg = gptjax.preset("baby", vocab_size=257)
    params = gptjax.init(cfg, jax.random.PRNGKey(0))
    logits = gptjax.apply(params, tokens, cfg)
    step = jax.jit(gptjax.make_train_step(cfg, gptjax.TrainConfig()))

Names are imported on first use, so `import gptjax.tokenizer` (or a tokenizer worker
process) does not pay for importing JAX.
"""

import importlib

_EXPORTS = {
    "gptjax.config": ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "preset"],
    "gptjax.data": ["WindowSampler", "gather", "load_prepared"],
    "gptjax.errors": ["GptjaxError"],
    "gptjax.generate": ["Decoder", "generate", "generate_batch"],
    "gptjax.hf": ["load_hf", "load_pretrained", "save_hf"],
    "gptjax.kv_cache": ["KVCache", "init_cache"],
    "gptjax.model": ["apply", "apply_cached", "decode_params", "init", "loss", "param_count"],
    "gptjax.optim": ["optimizer", "schedule"],
    "gptjax.prepare": ["prepare"],
    "gptjax.sampling": ["Sampling"],
    "gptjax.textgen": ["generate_text"],
    "gptjax.tokenizer": ["ByteTokenizer", "CharTokenizer", "GPT2Tokenizer"],
    "gptjax.train": ["train"],
    "gptjax.train_step": ["TrainState", "init_state", "make_eval_step", "make_train_step"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
