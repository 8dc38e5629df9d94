"""Agreement of our C, UE and P scores with the PersoDPO authors' values on the shared pool.

The authors scored 7 LLMs x 1,500 FoCus training dialogues with their own (unreleased) NLI
models and GoogleNews word2vec; we score the same extracted replies with our metrics. Reported:
Spearman's rho across the 7 systems of per-system means (all replies, failures at the worst
value as both sides do; and valid replies only), Spearman's rho across the valid replies
themselves, and per-reply agreement of the C label (share of equal labels, Cohen's kappa).

    .venv/bin/python benchmarks/agreement.py [--metrics c,ue,p] [--opt c.mode=persobench]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from persona_align.data import read_dialogues
from persona_align.data.responses import import_responses
from persona_align.metrics import make_metric, parse_metric_options
from persona_align.metrics.judges import cohen_kappa
from persona_align.metrics.scorer import ScoreCache, prepare_metrics, score_stream
from persona_align.models import cache_dir

POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "persodpo-focus"
THEIRS = {"c": "C Score", "ue": "UE Score", "p": "Persona Distance"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default="c,ue,p")
    parser.add_argument("--opt", action="append", default=[], help="METRIC.KEY=VALUE")
    args = parser.parse_args()
    if not POOL.exists():
        sys.exit(f"{POOL} is absent")
    names = args.metrics.split(",")
    options = parse_metric_options(args.opt)
    dialogues = read_dialogues("persobench-csv", POOL / "prompts" / "train.csv")
    by_id = {d.id: d for d in dialogues}
    metrics = [make_metric(n, **options.get(n, {})) for n in names]
    statuses = prepare_metrics(metrics, dialogues)
    for status in statuses:
        if not status.available:
            sys.exit(f"{status.name} unavailable: {status.reason}")

    ours: dict[str, dict[str, list[float]]] = {}
    theirs: dict[str, dict[str, list[float]]] = {}
    valid: dict[str, list[bool]] = {}
    began = time.perf_counter()
    for path in sorted((POOL / "responses").glob("*.csv")):
        system = path.stem
        candidates = import_responses(path, dialogues, system, extraction="none")
        with_cache = ScoreCache(cache_dir() / "scores.sqlite")  # shared with `persona-align score`
        scored = list(score_stream(by_id, iter(candidates), metrics, statuses, with_cache))
        with_cache.close()
        valid[system] = [c.valid for c in scored]
        ours[system] = {n: [c.scores[n] for c in scored] for n in names}
        with open(POOL / "scores" / path.name, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        theirs[system] = {n: [float(r[THEIRS[n]]) for r in rows] for n in names if n in THEIRS}
        print(f"scored {system}: {sum(valid[system])}/{len(scored)} valid", flush=True)
    seconds = time.perf_counter() - began

    systems = sorted(ours)
    print(f"\n{len(systems)} systems x {len(dialogues)} dialogues, scored in {seconds:.0f} s")
    print(f"metric options: {options or 'defaults'}")
    print(
        "| metric | rho (all replies) | rho (valid replies only) | per-reply rho (valid) "
        "| ours: mean per system | theirs |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        if name not in THEIRS:
            continue
        rows = []
        for only_valid in (False, True):
            a, b = [], []
            for s in systems:
                keep = [i for i, v in enumerate(valid[s]) if v or not only_valid]
                a.append(np.mean([ours[s][name][i] for i in keep]))
                b.append(np.mean([theirs[s][name][i] for i in keep]))
            rows.append((spearmanr(a, b).statistic, a, b))
        ours_means = ", ".join(
            f"{s[:10]} {m:.2f}" for s, m in zip(systems, rows[0][1], strict=True)
        )
        theirs_means = ", ".join(f"{m:.2f}" for m in rows[0][2])
        pairs = [
            (o, t)
            for s in systems
            for o, t, ok in zip(ours[s][name], theirs[s][name], valid[s], strict=True)
            if ok
        ]
        per_reply = spearmanr(*zip(*pairs, strict=True)).statistic
        print(
            f"| {name} | {rows[0][0]:.3f} | {rows[1][0]:.3f} | {per_reply:.3f} | {ours_means} "
            f"| {theirs_means} |"
        )
    if "c" in names:
        a = [round(v) for s in systems for v, ok in zip(ours[s]["c"], valid[s], strict=True) if ok]
        b = [
            round(v) for s in systems for v, ok in zip(theirs[s]["c"], valid[s], strict=True) if ok
        ]
        equal = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
        kappa = cohen_kappa(a, b)
        print(f"\nC label per valid reply: {len(a)} replies, equal {equal:.1%}, kappa {kappa:.3f}")
        for label in (-1, 0, 1):
            print(f"  ours {label:+d}: {a.count(label)}   theirs {label:+d}: {b.count(label)}")


if __name__ == "__main__":
    main()
