"""Pretraining: the optimizer, the jitted train and eval steps, the loop, checkpoints and
the metrics it reports.

The path a run takes, one way: `run_dir` (a new or resumed run directory, its config
resolved against the data) -> `compiled` (the steps compiled for the mesh) -> `loop`
(step, log, evaluate, checkpoint) -> `train` (the end sample from the state in memory,
the loss plot, the report). `step` and `optim` are the pure pieces research code reuses;
`checkpoint` wraps orbax; `metrics` counts FLOPs and MFU and writes metrics.jsonl.
Imports `gptjax.model`, `gptjax.data`, `gptjax.parallel`, `gptjax.generation` and
`gptjax.cpu`; nothing that loads other kinds of runs.

The package is called `training` because `gptjax.train` is a public function.
"""
