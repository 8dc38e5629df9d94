"""PersoDPO's preference pairs from the shared training pool, scored by our own metrics.

The 7 LLMs' raw outputs on the 1,500 FoCus training prompts are extracted (lenient), scored
with the PersoDPO metric set (coherence judge, C, UE, P, LFC), combined into the total score
(min-max scaled on the pool, PersoDPO weights) and paired with the quantile rule (0.6/0.4).
Prints the pair count next to the paper's ~9,000 and writes the scored pool and the pairs
(outside the repository) for `benchmarks/persodpo_outcome.py`. Scores go through the shared
score cache, so an interrupted run resumes.

``--earlier-judges N`` also scores the first N dialogues with the judges the defaults replaced
(C and UE's gate from `embedded-nli` in PersoBench's mode, coherence from `coh-smollm2`) and
prints how the quantile pairs of those dialogues change: what the new judges do to the pairs.

    .venv/bin/python benchmarks/persodpo_pool.py [--out DIR] [--limit N] [--earlier-judges N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from scipy.stats import spearmanr

from persona_align.data import read_dialogues
from persona_align.data.responses import import_responses
from persona_align.metrics import make_metric
from persona_align.metrics.scorer import ScoreCache, prepare_metrics, score_stream
from persona_align.models import cache_dir
from persona_align.preference.pairs import PairingConfig, build_pairs
from persona_align.preference.total import DEFAULT_WEIGHTS, fit_minmax, total_score
from persona_align.records import PreferencePair, ScoredCandidate, write_records

POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "persodpo-focus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=cache_dir() / "persodpo-pool")
    parser.add_argument("--limit", type=int, default=None, help="first N dialogues only")
    parser.add_argument("--earlier-judges", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if not POOL.exists():
        sys.exit(f"{POOL} is absent")
    dialogues = read_dialogues("persobench-csv", POOL / "prompts" / "train.csv")
    by_id = {d.id: d for d in dialogues[: args.limit]}
    metrics = [make_metric(name) for name in DEFAULT_WEIGHTS]
    statuses = prepare_metrics(metrics, dialogues)
    for status in statuses:
        if not status.available:
            sys.exit(f"{status.name} unavailable: {status.reason}")
    began = time.perf_counter()
    order = {d.id: k for k, d in enumerate(dialogues)}
    candidates = []
    for path in sorted((POOL / "responses-raw").glob("*.csv")):
        replies = import_responses(path, dialogues, path.stem, extraction="lenient")
        candidates += [c for c in replies if c.dialogue_id in by_id]
        print(f"{path.stem}: {sum(c.valid for c in replies)}/{len(replies)} valid", flush=True)
    # all replies to one dialogue side by side: the coherence judge runs their history once
    candidates.sort(key=lambda c: order[c.dialogue_id])
    cache = ScoreCache(cache_dir() / "scores.sqlite")  # shared with `persona-align score`
    scored = list(score_stream(by_id, iter(candidates), metrics, statuses, cache))
    cache.close()
    seconds = time.perf_counter() - began
    systems = len({c.responder for c in candidates})
    ranges = fit_minmax(scored, DEFAULT_WEIGHTS)
    scored = [c.model_copy(update={"total": total_score(c.scores, DEFAULT_WEIGHTS, ranges)})
              for c in scored]  # fmt: skip
    config = PairingConfig(rule="quantile", upper=0.6, lower=0.4)
    pairs = build_pairs(by_id, scored, config)
    args.out.mkdir(parents=True, exist_ok=True)
    write_records(args.out / "scored.jsonl", scored, ScoredCandidate)
    write_records(args.out / "pairs-quantile.jsonl", pairs, PreferencePair)
    formats = build_pairs(by_id, scored, PairingConfig(rule="format"))
    write_records(args.out / "pairs-format.jsonl", formats, PreferencePair)
    per_dialogue = Counter(p.dialogue_id for p in pairs)
    names = ", ".join(DEFAULT_WEIGHTS)
    print(f"\n{len(by_id)} dialogues x {systems} systems = {len(scored)} replies, "
          f"scored in {seconds:.0f} s (metrics: {names})")  # fmt: skip
    print("| rule | pairs | dialogues with a pair | mean pairs per dialogue | paper |")
    print("|---|---:|---:|---:|---|")
    print(f"| quantile 0.6/0.4 | {len(pairs)} | {len(per_dialogue)} | "
          f"{len(pairs) / max(1, len(per_dialogue)):.2f} | ~9,000 |")  # fmt: skip
    print(f"| format (valid vs invalid) | {len(formats)} | "
          f"{len({p.dialogue_id for p in formats})} | - | - |")  # fmt: skip
    print(f"written to {args.out}")
    if args.earlier_judges:
        compare_earlier(dialogues, args.earlier_judges, candidates, scored)


EARLIER = {"coh": ("coh-smollm2", {}), "c": ("c", {"model": "embedded-nli", "mode": "persobench"}),
           "ue": ("ue", {"persona_model": "embedded-nli"})}  # fmt: skip


def quantile_pairs(by_id: dict, scored: list, weights: dict[str, float]) -> list[PreferencePair]:
    """Pairs of these dialogues alone, totals min-max scaled on them."""
    ranges = fit_minmax(scored, weights)
    scored = [c.model_copy(update={"total": total_score(c.scores, weights, ranges)})
              for c in scored]  # fmt: skip
    return build_pairs(by_id, scored, PairingConfig(rule="quantile", upper=0.6, lower=0.4))


def compare_earlier(dialogues: list, count: int, candidates: list, scored: list) -> None:
    """The quantile pairs of the first ``count`` dialogues under the earlier judges and under
    today's (metrics prepared on all dialogues, as the pool's were: LFC's target length)."""
    by_id = {d.id: d for d in dialogues[:count]}
    weights = {EARLIER.get(name, (name, {}))[0]: w for name, w in DEFAULT_WEIGHTS.items()}
    metrics = [make_metric(EARLIER[n][0], **EARLIER[n][1]) if n in EARLIER else make_metric(n)
               for n in DEFAULT_WEIGHTS]  # fmt: skip
    statuses = prepare_metrics(metrics, dialogues)
    began = time.perf_counter()
    cache = ScoreCache(cache_dir() / "scores.sqlite")
    earlier = list(score_stream(by_id, iter([c for c in candidates if c.dialogue_id in by_id]),
                                metrics, statuses, cache))  # fmt: skip
    cache.close()
    seconds = time.perf_counter() - began
    today = [c for c in scored if c.dialogue_id in by_id]
    sets = {"earlier": quantile_pairs(by_id, earlier, weights),
            "today": quantile_pairs(by_id, today, DEFAULT_WEIGHTS)}  # fmt: skip
    keys = {name: {(p.dialogue_id, p.chosen[-1].content, p.rejected[-1].content) for p in pairs}
            for name, pairs in sets.items()}  # fmt: skip
    # a valid reply enters a score-rule pair as {"response": ...}, an invalid one as written
    valid = {(c.dialogue_id, json.dumps({"response": c.response}, ensure_ascii=False))
             for c in today if c.valid}  # fmt: skip
    both_valid = {name: {k for k in found if (k[0], k[1]) in valid and (k[0], k[2]) in valid}
                  for name, found in keys.items()}  # fmt: skip
    same = keys["earlier"] & keys["today"]
    reversed_ = {(d, r, c) for d, c, r in keys["earlier"]} & keys["today"]
    print(f"\nfirst {len(by_id)} dialogues, {len(today)} replies; earlier judges scored in "
          f"{seconds:.0f} s")  # fmt: skip
    print("| pairs | earlier judges | today's | in both | reversed (chosen and rejected swapped) |")
    print("|---|---:|---:|---:|---:|")
    print(f"| all | {len(keys['earlier'])} | {len(keys['today'])} | {len(same)} | "
          f"{len(reversed_)} |")  # fmt: skip
    old, new = both_valid["earlier"], both_valid["today"]
    flipped = {(d, r, c) for d, c, r in old} & new
    print(f"| both replies valid | {len(old)} | {len(new)} | {len(old & new)} | {len(flipped)} |")
    scored_valid = [(a, b) for a, b in zip(earlier, today, strict=True) if b.valid]
    for name in DEFAULT_WEIGHTS:
        metric = EARLIER.get(name, (name, {}))[0]
        pairs = [(a.scores.get(metric), b.scores.get(name)) for a, b in scored_valid]
        pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
        rho = spearmanr(*zip(*pairs, strict=True)).statistic if len(pairs) > 2 else float("nan")
        print(f"{name}: Spearman rho earlier vs today on {len(pairs)} valid replies = {rho:.3f}")


if __name__ == "__main__":
    main()
