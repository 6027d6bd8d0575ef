"""Honest speed measurements: the timing protocol (`timing`: warm-up, no compiles while
the clock runs, median of repeats), the train step as training compiles it
(`train_step`), compile time in fresh processes (`compile`), decode latency (`decode`),
the MFU peak (`peak`) and the provenance of every number (`provenance`). Imports the
library below it; `gptjax bench` and benchmarks/ are its users.
"""
