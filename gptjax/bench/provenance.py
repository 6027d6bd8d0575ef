"""Where and with what benchmark numbers were taken (hardware, versions, flags, the host's
load), and writing a report: JSON, the markdown table printed and appended to a results
file. Shared by `gptjax bench` and the scripts in benchmarks/."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax

from gptjax.cpu import host_memory, native
from gptjax.cpu.machine import cpu_model, usable_cores  # noqa: F401  (part of every record)


def publish(report: dict, table: str, json_path=None, results_path=None) -> None:
    """Write the JSON report, print the markdown table, and append it to a results file."""
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    if results_path:
        with open(results_path, "a") as f:
            f.write("\n" + table)


def native_kernels() -> str:
    if jax.default_backend() != "cpu":
        return "not used (not CPU)"
    return "built" if native.available() else "unavailable (XLA's products and attention)"


def machine_info() -> dict:
    """Hardware, versions and flags to record with every result."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    dev = jax.devices()[0]
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "backend": jax.default_backend(),
            "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "cpu": cpu_model(), "cores": usable_cores(),
            # XLA:CPU sizes its intra-op thread pool to the usable cores.
            "threads": usable_cores() if jax.default_backend() == "cpu" else None,
            "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": ver("jaxlib"), "flax": ver("flax"), "optax": ver("optax"),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            # Whether freed host memory is kept (host_memory.py): worth 10-20% on XLA:CPU.
            "host_memory": host_memory.status(),
            # Whether attention_impl="auto" can take the native kernel for float32 (gptjax.cpu.native).
            "native_kernels": native_kernels(),
            # Other work on a shared host skews absolute numbers (ratios suffer less).
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "jax_env": {k: v for k, v in os.environ.items() if k.startswith("JAX_")}}
