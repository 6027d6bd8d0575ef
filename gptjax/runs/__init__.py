"""Runs on disk, of every kind, as models in memory.

`load` opens any run directory (trained, imported, fine-tuned) or GPT-2 weights as a
`LoadedRun` (config, tokenizer, parameters, step) and finds the data a run evaluates on;
`finetuned` is the format of fine-tuned runs (finetune.json: the base, what trained) and
joins their checkpoint with their checked base. Imports `gptjax.training` (checkpoints,
the run directory format), `gptjax.hf` and `gptjax.model`.
"""
