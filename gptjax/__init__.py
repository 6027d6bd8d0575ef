"""gptjax: a pure-functional JAX/Flax GPT pipeline.

The public surface is plain functions of pytrees and frozen config dataclasses:

    cfg = gptjax.preset("baby", vocab_size=257)
    params = gptjax.init(cfg, jax.random.PRNGKey(0))
    logits = gptjax.apply(params, tokens, cfg)
    step = jax.jit(gptjax.make_train_step(cfg, gptjax.TrainConfig()))

Names are imported on first use, so `import gptjax.data.tokenizer` (or a tokenizer worker
process) does not pay for importing JAX.
"""

import importlib

from gptjax.version import __version__  # noqa: F401

_EXPORTS = {
    "gptjax.config": ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "preset"],
    "gptjax.errors": ["GptjaxError"],
    "gptjax.data.prepare": ["prepare"],
    "gptjax.data.prepared": ["load_prepared"],
    "gptjax.data.tokenizer": ["ByteTokenizer", "CharTokenizer", "GPT2Tokenizer"],
    "gptjax.data.windows": ["WindowSampler", "gather"],
    "gptjax.model.gpt": ["apply", "apply_cached", "decode_params", "init", "loss", "param_count"],
    "gptjax.model.kv_cache": ["KVCache", "init_cache"],
    "gptjax.generation.decoder": ["Decoder", "generate", "generate_batch"],
    "gptjax.generation.sampling": ["Sampling"],
    "gptjax.generation.textgen": ["generate_text"],
    "gptjax.training.optim": ["optimizer", "schedule"],
    "gptjax.training.step": ["TrainState", "init_state", "make_eval_step", "make_train_step"],
    "gptjax.training.train": ["train"],
    "gptjax.hf.io": ["load_hf", "save_hf"],
    "gptjax.runs.load": ["load_pretrained", "load_run"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'gptjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
