"""What every benchmark prints first: the CPU it ran on and torch's thread count."""

from __future__ import annotations

from pathlib import Path


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def describe() -> str:
    import torch

    flags = Path("/proc/cpuinfo").read_text()
    extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    units = ", ".join(extras) or "no bf16 units"
    return f"CPU: {cpu_name()} ({units}); torch threads {torch.get_num_threads()}"
