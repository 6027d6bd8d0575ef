"""Sampling from a model: sampling settings and their checks (`sampling`), the batched
KV-cache decoder in jitted device loops (`decoder`), and text in / text out with
streaming and stop strings (`textgen`). Imports `gptjax.model` and the tokenizer
interface of `gptjax.data`.

The package is called `generation` because `gptjax.generate` is a public function.
"""
