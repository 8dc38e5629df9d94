"""Per-step training logs kept in the run folder, and the curves of PersoDPO's Fig. 2.

Every log the Trainer emits becomes one JSON line in ``log.jsonl`` (``training.common``'s
callbacks write it); on ``--resume`` the lines after the checkpoint's step are dropped first,
so the file never holds a step twice. Reading and plotting need no transformers import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

from persona_align.records import atomic_open

CURVE_KEYS = (
    "loss",
    "grad_norm",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
_TITLES = {
    "loss": "training loss",
    "grad_norm": "gradient norm",
    "rewards/margins": "reward margin",
    "rewards/accuracies": "reward accuracy",
    "logps/chosen": "log-prob of chosen",
    "logps/rejected": "log-prob of rejected",
}


def read_training_log(path: str | Path) -> list[dict[str, Any]]:
    """The logged steps, oldest first; a torn last line (killed mid-write) is ignored."""
    entries = []
    path = Path(path)
    if not path.exists():
        return entries
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def truncate_log(path: Path, step: int) -> None:
    """Keep only the entries logged at or before ``step`` (the checkpoint a run resumes from)."""
    if not path.exists():
        return
    kept = [e for e in read_training_log(path) if int(e.get("step", 0)) <= step]
    with atomic_open(path) as handle:
        for entry in kept:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")


def plot_training_curves(log: list[dict[str, Any]], target: str | Path | IO[bytes]) -> list[str]:
    """One panel per curve present in ``log`` (training steps only); returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = [e for e in log if "train_runtime" not in e]
    keys = [k for k in CURVE_KEYS if any(finite(e.get(k)) for e in steps)]
    if not keys:
        return []
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        points = [(e["step"], e[key]) for e in steps if finite(e.get(key))]
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 40 else None
        )
        ax.set_title(_TITLES[key])
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    if isinstance(target, str | Path):
        with atomic_open(target, "wb") as handle:
            fig.savefig(handle, format="png", dpi=110)
    else:
        fig.savefig(target, format="png", dpi=110)
    plt.close(fig)
    return keys


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
