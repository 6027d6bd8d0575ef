"""What this machine's CPU is: its name and the cores this process may use."""

from __future__ import annotations

import os


def cpu_model() -> str:
    """The CPU's name, with its x86 family and model numbers where /proc/cpuinfo has them:
    virtual machines often report only "AMD EPYC", and results differ by generation
    (benchmarks/NOTES.md, XLA:CPU entry 15)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" in fields:
        numbers = (f", family {fields['cpu family']} model {fields['model']}"
                   if "cpu family" in fields and "model" in fields else "")
        return fields["model name"] + numbers
    import platform
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
