"""Optional speed-ups for JAX's CPU backend; nothing here is needed on a GPU or TPU.

Owns the native C++ kernels (`native/`, built on first use, skipped where no compiler is
found), the per-machine timing choice between equivalent paths (`measured_choice`), the
decode layout's product forms (`products`), the glibc policy of keeping freed host memory
(`host_memory`) and what the machine is (`machine`). Imports only `gptjax.config` and
`gptjax.errors`; the model imports it, never the other way round.
"""
