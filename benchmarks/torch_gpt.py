"""A plain PyTorch (eager) GPT matching gptjax's architecture, init and optimizer.

Benchmarks only (the `[bench]` extra): the side-by-side reference for quality and speed.
Same shapes as gptjax.model.gpt (pre-LN blocks, tanh-GELU MLP, tied head, GPT-2 init with
scaled residual projections), AdamW with decay on linear weights only, and the same
warmup-cosine schedule as optax.warmup_cosine_decay_schedule.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptjax.config import ModelConfig, TrainConfig


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps), nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, cfg.d_mlp), nn.Linear(cfg.d_mlp, d)

    def forward(self, x_btd):
        b, t, d = x_btd.shape
        qkv = self.qkv(self.ln1(x_btd)).view(b, t, 3, self.n_head, d // self.n_head)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (b, heads, t, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x_btd = x_btd + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x_btd + self.proj(F.gelu(self.fc(self.ln2(x_btd)), approximate="tanh"))


class TorchGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "ln" in name:
                nn.init.ones_(p)
            elif name.endswith(("out.weight", "proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
            else:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens_bt):
        pos = torch.arange(tokens_bt.shape[1], device=tokens_bt.device)
        x_btd = self.wte(tokens_bt) + self.wpe(pos)
        for block in self.blocks:
            x_btd = block(x_btd)
        return self.ln_f(x_btd) @ self.wte.weight.T

    def loss(self, inputs, targets):
        logits = self(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def lr_at(step: int, t: TrainConfig) -> float:
    """The optax warmup_cosine_decay_schedule formula."""
    if step < t.warmup_steps:
        return t.lr * step / t.warmup_steps
    frac = (step - t.warmup_steps) / (t.max_steps - t.warmup_steps)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def optimizer(model: TorchGPT, t: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
             and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters() if all(p is not q for q in decay)]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def train_step(model: TorchGPT, opt, step: int, t: TrainConfig, inputs, targets) -> float:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, t)
    loss = model.loss(inputs, targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    return loss.detach()
