"""The GPT itself: Flax modules and the pure functions over their parameter pytrees.

Owns attention (`attention`), the KV cache (`kv_cache`), the blocks and the functional
surface (`gpt`: init, apply, apply_cached, loss, decode_params, param_count), LoRA
adapters (`lora`), the classification head (`classifier`) and splitting a parameter
tree into trained and frozen parts (`parts`). Imports `gptjax.config`, `gptjax.cpu`
(optional CPU kernels) and `gptjax.parallel` (sharding constraints on activations).

`from gptjax import model; model.init(cfg, key)` names the functions of `gpt`.
"""

from gptjax.model.gpt import (  # noqa: F401
                              GPT,
                              apply,
                              apply_cached,
                              apply_observed,
                              cast,
                              ce_sum,
                              decode_params,
                              init,
                              init_cache,
                              loss,
                              loss_sum,
                              param_count,
)
