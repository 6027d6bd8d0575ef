"""Fine-tuning a pretrained GPT: classification, instruction following (SFT) and LoRA.

Starting points are gptjax runs or imported GPT-2 weights. Data reading, splitting and
metrics are plain Python/NumPy (cls_data, cls_metrics, sft_data); the training pieces are
pure JAX functions over (trainable, frozen) parameter trees.
"""
