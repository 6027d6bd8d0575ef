"""gptjax: a pure-functional JAX/Flax GPT pipeline.

The public surface is plain functions of pytrees and frozen config dataclasses:

    cfg = gptjax.preset("baby", vocab_size=257)
    params = gptjax.init(cfg, jax.random.PRNGKey(0))
    logits = gptjax.apply(params, tokens, cfg)
    step = jax.jit(gptjax.make_train_step(cfg, gptjax.TrainConfig()))
"""

from gptjax.config import DataConfig, ModelConfig, RunConfig, TrainConfig, preset
from gptjax.data import WindowSampler, gather, load_prepared
from gptjax.errors import GptjaxError
from gptjax.generate import generate
from gptjax.model import apply, init, loss, param_count
from gptjax.optim import optimizer, schedule
from gptjax.prepare import prepare
from gptjax.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer
from gptjax.train import train
from gptjax.train_step import TrainState, init_state, make_eval_step, make_train_step

__all__ = [
    "ByteTokenizer", "CharTokenizer", "DataConfig", "GPT2Tokenizer", "GptjaxError",
    "ModelConfig", "RunConfig", "TrainConfig", "TrainState", "WindowSampler", "apply",
    "gather", "generate", "init", "init_state", "load_prepared", "loss", "make_eval_step",
    "make_train_step", "optimizer", "param_count", "prepare", "preset", "schedule", "train",
]
__version__ = "0.1.0"
