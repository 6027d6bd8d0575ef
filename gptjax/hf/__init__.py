"""GPT-2 weights in and out in the Hugging Face layout (config.json + model.safetensors,
and the tokenizer files).

Owns reading and writing transformers' config (`config`), the tensor layout both ways
(`layout`), checked weight reading (`weights`), finding a directory or Hub name
(`source`), GPT-2's tokenizer files (`tokenizer`), and the two entry points `load_hf` and
`save_hf` (`io`). Imports `gptjax.model` and `gptjax.data`; loading HF weights as a run
(`load_pretrained`) lives in `gptjax.runs`.
"""

from gptjax.hf.io import check_new_dir, load_hf, new_dir, save_hf  # noqa: F401
