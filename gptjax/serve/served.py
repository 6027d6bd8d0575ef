"""What a server serves: a run or GPT-2 weights, loaded once, and how chat messages become
its prompt.

Instruction-tuned runs (gptjax finetune-sft, and DPO on top of one) were trained on the
Alpaca template, so chat uses it: the last user message is the instruction, and earlier
turns (system included) are its input. Other models have no chat format; they get a plain
transcript ("user: ...\\nassistant:") and stop where the next "\\nuser:" would begin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from gptjax import config as C
from gptjax.data.tokenizer import Tokenizer
from gptjax.errors import GptjaxError
from gptjax.finetune.sft_data import format_prompt
from gptjax.runs import finetuned

INSTRUCTION_TASKS = ("sft", "dpo")


@dataclass
class Served:
    name: str
    config: C.ModelConfig
    tokenizer: Tokenizer
    params: dict
    template: str  # "alpaca" or "transcript"

    def chat_prompt(self, messages: list[dict]) -> tuple[str, tuple[str, ...]]:
        """(the prompt text, stop strings the template adds)."""
        if self.template == "alpaca":
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
            if last_user is None:
                raise ValueError("a chat needs a user message")
            before = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last_user])
            return format_prompt({"instruction": messages[last_user]["content"], "input": before}), ()
        lines = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return lines + "assistant:", ("\nuser:",)


def load_served(run: str | None = None, hf: str | None = None, checkpoint: str = "latest",
                gpt2_ranks: str | None = None, dtype: str | None = None,
                name: str | None = None, quantize: str | None = None,
                quant_group: int = 64) -> Served:
    """The model, in the decode layout (quantized with `quantize`), ready for an Engine."""
    from gptjax.model.gpt import cast, decode_params
    from gptjax.model.quantize import quantized_config
    from gptjax.runs.load import load, load_pretrained

    if (run is None) == (hf is None):
        raise GptjaxError("serve one model: --run RUN_DIR or --hf DIR_OR_NAME")
    if hf is not None:
        loaded, template = load_pretrained(hf, gpt2_ranks), "transcript"
    else:
        loaded = load(run, checkpoint, gpt2_ranks)
        tuned = finetuned.is_finetuned(run) and finetuned.read_spec(Path(run)).task in INSTRUCTION_TASKS
        template = "alpaca" if tuned else "transcript"
    params, cfg = loaded.params, loaded.config.model
    if dtype:
        params, cfg = cast(params, cfg, dtype)
    if quantize:
        cfg = quantized_config(cfg, quantize, quant_group)
    params = decode_params(params, cfg)
    default_name = Path(run or hf).resolve().name if Path(run or hf).exists() else str(hf)
    return Served(name or default_name, dataclasses.replace(cfg, dropout=0.0), loaded.tokenizer,
                  params, template)
