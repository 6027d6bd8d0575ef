"""Many devices and hosts: named meshes, parameter and batch shardings, joining a
multi-process job, and agreeing on where to stop after a preemption notice.

One device is the mesh of one, so every layout runs the same train step with different
shardings. Imports `gptjax.config` and `gptjax.errors` only.
"""
