"""Text to token windows: tokenizers, corpus reading, `prepare`, and window sampling.

Owns the tokenizers (GPT-2 through tiktoken, char, byte), reading text, JSONL and folders
(`corpus`), writing prepared token files with their meta.json (`prepare`), reading them
back (`prepared`) and the deterministic sliding-window sampler (`windows`). Plain Python
and NumPy: it imports no JAX, so tokenizer worker processes start fast. Imports only
`gptjax.config` and `gptjax.errors`.
"""
