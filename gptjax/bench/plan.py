"""The planner behind `gptjax plan`: for each candidate mesh and remat policy, the largest
micro-batch whose compiled train step fits a device's memory, and a prediction of its
speed, all from ahead-of-time compiles on abstract shapes (nothing is allocated).

Memory is XLA's plan for the step (arguments + outputs - donated + temporaries, per
device). It grows about linearly with the rows: compiles at one and two rows per data
replica give a line, and each further compile lands where the line through the nearest
fitting and failing batches meets the limit, until the largest fitting batch is one row per
replica below a failing one (or MAX_COMPILES is reached). Speed is a roofline over XLA's cost analysis of that
step: a step takes at least flops / peak and at least bytes accessed / memory bandwidth,
the flops being at least the model's (PaLM's formula): the cost analysis cannot see
inside custom calls such as the native attention kernel.
The prediction is an upper bound; benchmarks/plan_accuracy.py measures how far real steps
fall short of it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import jax
import numpy as np

from gptjax import model
from gptjax.bench.train_step import build_train_step, memory_stats
from gptjax.config import ModelConfig, TrainConfig
from gptjax.errors import GptjaxError
from gptjax.parallel.mesh import AXES, BATCH_AXES, parse_mesh, resolve_sizes
from gptjax.training.metrics import PEAK_BF16, data_sheet_chip, flops_per_token
from gptjax.training.metrics import peak_flops as job_peak

REMATS = ("none", "dots_no_batch", "full")
# Data-sheet HBM bandwidth, bytes/s, for the chips metrics.PEAK_BF16 knows.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L4": 0.3e12,
             "TPU v6": 1.64e12, "TPU v5p": 2.765e12, "TPU v5 lite": 0.819e12, "TPU v5e": 0.819e12,
             "TPU v4": 1.2e12}
MAX_COMPILES = 6  # per mesh and remat: the search stops there, with the largest found
HEADROOM = 0.9  # of a device's memory the plan may fill: allocators fragment, runtimes keep some


@dataclass
class Device:
    """What a plan is for: per-device memory, peak FLOP/s and memory bandwidth."""

    kind: str
    count: int
    memory_bytes: float
    peak_flops: float
    bandwidth: float
    sources: dict


@dataclass
class Candidate:
    mesh: str
    remat: str
    rows: int  # the micro-batch: sequences per step, over all devices
    memory_bytes: int  # XLA's plan per device at those rows
    flops: float  # XLA's cost analysis of the step, per device
    bytes_accessed: float
    step_seconds: float
    tokens_per_s: float
    mfu: float
    compiles: int
    compile_seconds: float
    largest: bool = True  # one more row per replica was compiled and did not fit (or the cap)

    def eta_seconds(self, tokens: float) -> float:
        return tokens / self.tokens_per_s


def parse_tokens(text: str) -> float:
    """'10B', '300M', '1.5T', '2e9' as a number of tokens."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = text.strip().upper()
    try:
        value = float(t[:-1]) * scale[t[-1]] if t and t[-1] in scale else float(t)
    except ValueError:
        value = -1
    if not value > 0:
        raise GptjaxError(f"--tokens takes a positive count like 10B, 300M or 2e9, got {text!r}")
    return value


def device(memory_gib: float = 0, peak_flops: float = 0, bandwidth: float = 0) -> Device:
    """The local devices, with each figure given, from a data sheet, or measured/estimated
    (CPU: host RAM shared by the devices, the float32 matmul rate, a copy's bandwidth)."""
    d = jax.devices()[0]
    n = jax.device_count()
    sources = {}
    stats = (d.memory_stats() or {}) if hasattr(d, "memory_stats") else {}
    if memory_gib > 0:
        memory, sources["memory"] = memory_gib * 2**30, "given"
    elif stats.get("bytes_limit"):
        memory, sources["memory"] = float(stats["bytes_limit"]), "the device's allocator limit"
    else:
        memory = _host_ram() / n
        sources["memory"] = f"host RAM / {n} device(s)"
    sheet = data_sheet_chip(d.device_kind)
    if peak_flops > 0:
        peak, sources["peak"] = peak_flops, "given"
    elif sheet:
        peak, sources["peak"] = PEAK_BF16[sheet], f"data sheet: {sheet} dense bf16"
    else:
        p = job_peak("float32")  # the machine's rate: simulated devices share it
        peak, sources["peak"] = p.flops / n, f"{p.source}, / {n} device(s)"
    if bandwidth > 0:
        bw, sources["bandwidth"] = bandwidth, "given"
    elif sheet:
        bw, sources["bandwidth"] = BANDWIDTH[sheet], f"data sheet: {sheet} HBM"
    else:
        bw, sources["bandwidth"] = measure_copy_bandwidth() / n, f"measured host copy, / {n} device(s)"
    return Device(d.device_kind, n, memory, peak, bw, sources)


def candidate_meshes(devices: int, given: str = "") -> list[str]:
    """The given mesh, else data parallel, FSDP and (on 4+ devices) half and half."""
    if given:
        return [_spec(resolve_sizes(parse_mesh(given), devices))]
    meshes = [f"data={devices}"]
    if devices > 1:
        meshes.append(f"fsdp={devices}")
    if devices >= 4 and devices % 2 == 0:
        meshes.append(f"data={devices // 2},fsdp=2")
    return meshes


def fit(model_cfg: ModelConfig, mesh: str, remat: str, dev: Device, max_rows: int) -> Candidate | None:
    """The largest micro-batch (a multiple of the data replicas, at most max_rows) whose
    step fits dev.memory_bytes * HEADROOM under this mesh and remat, or None if even one
    row per replica does not."""
    sizes = resolve_sizes(parse_mesh(mesh), dev.count)
    replicas = math.prod(sizes[a] for a in BATCH_AXES)
    limit = dev.memory_bytes * HEADROOM
    cfg = dataclasses.replace(model_cfg, remat=remat)
    compiles, started = [], time.perf_counter()

    def compile_at(rows):
        b = build_train_step(cfg, TrainConfig(batch_size=rows, mesh=mesh, max_steps=1000, warmup_steps=1))
        compiles.append(rows)
        planned = memory_stats(b.step)
        if not planned:
            raise GptjaxError(f"XLA on {jax.default_backend()} reports no memory plan to fit against")
        return b, planned["total"]

    if max_rows < replicas:
        raise GptjaxError(f"a largest batch of {max_rows} is fewer rows than the {replicas} data "
                          f"replicas of mesh {mesh}: each needs at least one")
    one, m1 = compile_at(replicas)
    if m1 > limit:
        return None
    cap = max(max_rows // replicas, 1)  # in rows per replica from here on
    lo, lo_mem, best = 1, m1, one  # the largest that fits so far
    hi, hi_mem = None, None  # the smallest that does not
    if cap > 1:
        b2, m2 = compile_at(2 * replicas)
        lo, lo_mem, best = (2, m2, b2) if m2 <= limit else (lo, lo_mem, best)
        hi, hi_mem = (None, None) if m2 <= limit else (2, m2)
        slope = max(m2 - m1, 1)
        while len(compiles) < MAX_COMPILES and (hi is None or hi - lo > 1) and lo < cap:
            # The line through the nearest points, kept strictly between them: memory is
            # close to linear in the rows, but not exactly (buffers are padded and tiled).
            if hi is not None:
                slope = max((hi_mem - lo_mem) / (hi - lo), 1)
            guess = lo + int((limit - lo_mem) // slope)
            guess = min(guess, cap, hi - 1 if hi is not None else cap)
            guess = max(guess, lo + 1)
            b, m = compile_at(guess * replicas)
            if m <= limit:
                lo, lo_mem, best = guess, m, b
            else:
                hi, hi_mem = guess, m
    rows = lo * replicas
    proven = lo >= cap or (hi is not None and hi - lo == 1)
    return dataclasses.replace(
        predict(cfg, mesh, remat, rows, best, dev, len(compiles), time.perf_counter() - started),
        largest=proven)


def predict(cfg: ModelConfig, mesh: str, remat: str, rows: int, bench, dev: Device,
             compiles: int, seconds: float) -> Candidate:
    cost = bench.step.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    model_flops = flops_per_token(cfg, model.param_count(cfg, exclude_position=True))
    # Custom calls (the native attention kernel, cuDNN's) are invisible to the cost
    # analysis: the model's own FLOPs per device are the floor of the work.
    floor = model_flops * rows * cfg.context_length / dev.count
    flops = max(float(cost.get("flops", 0)), floor)
    moved = float(cost.get("bytes accessed", 0))
    step = max(flops / dev.peak_flops, moved / dev.bandwidth, 1e-9)
    tokens_per_s = rows * cfg.context_length / step
    mfu = tokens_per_s * model_flops / (dev.peak_flops * dev.count)
    return Candidate(mesh, remat, rows, memory_stats(bench.step).get("total", 0), flops, moved,
                     step, tokens_per_s, mfu, compiles, seconds)


def plan(model_cfg: ModelConfig, dev: Device, *, meshes: list[str], remats=REMATS,
         max_rows: int = 1024, progress=None) -> list[Candidate | tuple[str, str]]:
    """A Candidate for every (mesh, remat) that fits, else (mesh, remat) for one that does
    not fit even one row per replica. `progress(mesh, remat)` is called before each."""
    out = []
    for mesh in meshes:
        for remat in remats:
            if progress:
                progress(mesh, remat)
            found = fit(model_cfg, mesh, remat, dev, max_rows)
            out.append(found if found is not None else (mesh, remat))
    return out


def best_per_mesh(found: list) -> dict[str, Candidate]:
    """The fastest predicted candidate of each mesh."""
    best: dict[str, Candidate] = {}
    for c in found:
        if isinstance(c, Candidate) and (c.mesh not in best or c.tokens_per_s > best[c.mesh].tokens_per_s):
            best[c.mesh] = c
    return best


def measure_copy_bandwidth(n_bytes: int = 1 << 28) -> float:
    """Bytes/s of a large array copy (read + write), the best of three."""
    a = np.ones(n_bytes // 8)
    b = np.empty_like(a)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def _host_ram() -> float:
    import os
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _spec(sizes: dict) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in AXES if sizes[a] > 1) or "data=1"
