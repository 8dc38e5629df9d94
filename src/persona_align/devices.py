"""One device policy for every model the toolkit loads: where it runs, in what dtype, with
which attention kernel.

``auto`` picks cuda > mps > cpu. The dtype ``auto`` follows the device: bf16 on a GPU that has
it, fp32 elsewhere (a CPU with bf16 units runs bf16 faster, but then scores would depend on the
CPU; choose it explicitly). Every loader goes through :func:`place` (or hands
:func:`current` to a library that places its own model), and results come back with ``.cpu()``
before numpy. Set once per process: ``persona-align --device cuda:1 ...``, a config's
``device:``, or :func:`configure`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from persona_align.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")  # cuda may carry an index: cuda:1
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass
class Policy:
    device: str = "auto"
    attn_implementation: str = "sdpa"
    explicit: bool = False  # chosen on the command line: a config's device does not override it


_policy = Policy()
placed: list[tuple[str, str]] = []  # (what, device) of every placement, newest last


def check_device(name: str) -> str:
    """``name`` resolved to a concrete device; exit 2 (InputError) when this machine lacks it."""
    import torch

    kind, _, index = name.partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        allowed = ", ".join(DEVICES)
        raise InputError(None, f"device must be one of {allowed} or cuda:N, got {name!r}")
    if kind == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"device {name}: CUDA is not available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise InputError(None, f"device {name}: this machine has {count} CUDA device(s)")
    if kind == "mps" and not _mps_available():
        raise InputError(None, f"device {name}: MPS is not available on this machine")
    return name


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def check_attention(name: str) -> str:
    if name not in ATTENTION:
        raise InputError(
            None, f"attn_implementation must be one of {', '.join(ATTENTION)}, got {name!r}"
        )
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise InputError(None, "attn_implementation flash_attention_2: flash-attn is not installed")
    return name


def configure(
    device: str | None = None, attn_implementation: str | None = None, *, explicit: bool = False
) -> None:
    """Set the process's policy (checked now: a missing device is an error before any work).

    A command-line choice (``explicit``) wins over a config's, which is applied afterwards.
    """
    if device is not None and (explicit or not _policy.explicit):
        check_device(device)
        _policy.device = device
        _policy.explicit = _policy.explicit or explicit
    if attn_implementation is not None:
        _policy.attn_implementation = check_attention(attn_implementation)


def reset() -> None:
    """Back to ``auto`` (tests)."""
    global _policy
    _policy = Policy()


def current() -> str:
    """The device models load onto now."""
    return check_device(_policy.device)


def attention() -> str:
    return _policy.attn_implementation


def default_dtype(device: str | None = None) -> str:
    """bf16 on a GPU with bf16 units, fp32 on CPUs and MPS."""
    import torch

    where = device or current()
    if where.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def dtype_for(requested: str) -> str:
    """``auto`` resolved for the current device; anything else as given."""
    return default_dtype() if requested == "auto" else requested


def target(what: str) -> str:
    """The device for a library that places its own model (sentence-transformers, BERTScore);
    recorded like :func:`place`."""
    where = current()
    placed.append((what, where))
    return where


def place(model: Any, what: str) -> Any:
    """``model`` moved to the policy's device (and recorded: a test checks every load)."""
    return model.to(target(what))


def load_kwargs() -> dict[str, Any]:
    """Keyword arguments of a transformers ``from_pretrained`` under the policy. ``sdpa`` is
    transformers' own default where a model supports it (eager where it does not), so only
    another choice is passed."""
    chosen = attention()
    return {} if chosen == "sdpa" else {"attn_implementation": chosen}
