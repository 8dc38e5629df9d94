"""System-level numbers: mean ± population std, failure ratio, response time, bootstrap 95%
intervals, and a paired test between two systems answering the same dialogues."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from persona_align.metrics.lexical import corpus_distinct
from persona_align.records import ScoredCandidate


def bootstrap_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% interval of the mean, resampling responses with replacement."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_boot, data.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarize(
    scored: Iterable[ScoredCandidate], metrics: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Per responder: counts, failure ratio, mean latency and each metric's mean ± std and CI.

    Failures carry their metric's worst value (PersoBench), so they are part of the means;
    ``valid_mean`` is the mean over valid replies alone. Candidates with a call error (a server
    down: no reply came back) are not the model's failures: they are left out of every number
    and counted in ``errors``. When ``dist-1``/``dist-2`` are among the metrics, ``corpus`` adds
    the system-level Dist-n over all valid replies.
    """
    corpus_n = [n for n in (1, 2) if f"dist-{n}" in metrics]
    groups: dict[str, dict[str, Any]] = {}
    for c in scored:
        g = groups.setdefault(
            c.responder,
            {"n": 0, "valid": 0, "errors": 0, "latency": [], "values": {}, "valid_values": {},
             "replies": []},
        )  # fmt: skip
        if c.error is not None:
            g["errors"] += 1
            continue
        if corpus_n and c.response is not None:
            g["replies"].append(c.response)
        g["n"] += 1
        g["valid"] += c.valid
        if c.latency_s is not None:
            g["latency"].append(c.latency_s)
        for name in metrics:
            value = c.scores.get(name)
            if value is not None:
                g["values"].setdefault(name, []).append(value)
                if c.valid:
                    g["valid_values"].setdefault(name, []).append(value)
    out: dict[str, dict[str, Any]] = {}
    for responder, g in groups.items():
        entry: dict[str, Any] = {
            "responses": g["n"],
            "errors": g["errors"],
            "failure_ratio": 1 - g["valid"] / g["n"] if g["n"] else None,
            "mean_latency_s": float(np.mean(g["latency"])) if g["latency"] else None,
            "metrics": {},
        }
        if corpus_n:  # Dist-n over all of a system's valid replies, as PersoBench reports it
            entry["corpus"] = {f"dist-{n}": corpus_distinct(g["replies"], n) for n in corpus_n}
        for name in metrics:
            values = g["values"].get(name, [])
            valid = g["valid_values"].get(name, [])
            if not values:
                entry["metrics"][name] = None
                continue
            entry["metrics"][name] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values)),  # population std, as PersoBench reports
                "ci95": bootstrap_ci(values, n_boot, seed),
                "n": len(values),
                "valid_mean": float(np.mean(valid)) if valid else None,
            }
        out[responder] = entry
    return out


def paired_test(
    a: dict[str, float], b: dict[str, float], n_resamples: int = 10000, seed: int = 0
) -> dict[str, float]:
    """Two-sided paired randomization test (sign flips) on the dialogues both systems answered.

    Returns the mean difference a - b, its bootstrap 95% interval and the p-value.
    """
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two systems share no dialogue")
    diff = np.array([a[k] - b[k] for k in shared], dtype=float)
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, diff.size))
    null = np.abs((signs * diff).mean(axis=1))
    p_value = (1 + int((null >= observed - 1e-12).sum())) / (n_resamples + 1)
    low, high = bootstrap_ci(diff.tolist(), n_boot=2000, seed=seed)
    return {
        "n": int(diff.size),
        "mean_diff": float(diff.mean()),
        "ci95_low": low,
        "ci95_high": high,
        "p_value": p_value,
    }
