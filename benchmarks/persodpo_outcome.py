"""Does score-weighted DPO help? PersoDPO's claim, measured on the embedded SmolLM2.

Pairs come from `benchmarks/persodpo_pool.py` (the shared training pool scored by our own
metrics; run it first). Three LoRA runs on the same pair budget — score-weighted DPO on the
quantile pairs (PersoDPO), unweighted DPO on the same pairs, vanilla DPO on format pairs —
then base and trained models answer held-out dialogues of `prompts/valid.csv`, are scored
with the PersoDPO metrics, and are compared with the base model (paired bootstrap 95%
intervals of the differences; the total score uses the pool's min-max ranges).

    .venv/bin/python benchmarks/persodpo_outcome.py [--pairs 96] [--steps 48] [--eval 200]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from persona_align.config import TrainConfig
from persona_align.data import read_dialogues
from persona_align.generation import GenerationCache, GenerationParams, make_responder
from persona_align.generation.runner import run_responder
from persona_align.metrics import make_metric
from persona_align.metrics.scorer import ScoreCache, prepare_metrics, score_stream
from persona_align.models import cache_dir
from persona_align.preference.total import DEFAULT_WEIGHTS, fit_minmax, total_score
from persona_align.records import PreferencePair, ScoredCandidate, read_records, write_records
from persona_align.report.summary import FAILURE, compare_to_baseline
from persona_align.training.dpo import train_dpo

POOL = Path(__file__).resolve().parents[2] / "shared" / "data" / "persodpo-focus"
RUNS = {  # name: (pairs file, weighting)
    "persodpo": ("pairs-quantile.jsonl", "sigmoid"),
    "dpo-unweighted": ("pairs-quantile.jsonl", "one"),
    "dpo-format": ("pairs-format.jsonl", "one"),
}
COLUMNS = [FAILURE, *DEFAULT_WEIGHTS, "total"]  # the metrics of the total, as the pool used


def subset(source: Path, target: Path, count: int, seed: int) -> int:
    pairs = read_records(source, PreferencePair)
    random.Random(seed).shuffle(pairs)
    write_records(target, pairs[:count], PreferencePair)
    return min(count, len(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=Path, default=cache_dir() / "persodpo-pool")
    parser.add_argument("--out", type=Path, default=cache_dir() / "persodpo-outcome")
    parser.add_argument("--pairs", type=int, default=96, help="pairs per run (seeded subset)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1, help="batches per optimiser step")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval", type=int, default=200, help="held-out valid dialogues")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cache",
        type=Path,
        default=cache_dir(),
        help="folder of the generation and score caches (empty = time it all)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    if not (args.pool / "scored.jsonl").exists():
        sys.exit(f"{args.pool} has no scored pool: run benchmarks/persodpo_pool.py first")
    timings: dict[str, float] = {}
    models = {"base": "embedded"}
    for name, (source, weighting) in RUNS.items():
        began = time.perf_counter()
        data = args.out / f"{name}-pairs.jsonl"
        used = subset(args.pool / source, data, args.pairs, args.seed)
        run = args.out / name
        config = TrainConfig(
            data=data, output_dir=run, weighting=weighting, max_steps=args.steps,
            batch_size=args.batch, grad_accum=args.grad_accum, learning_rate=args.lr,
            max_length=1280, save_steps=16, seed=args.seed,
        )  # fmt: skip
        if not (run / "summary.json").exists():
            summary = train_dpo(config, resume=any(run.glob("checkpoint-*")))
            losses = f"{summary['first_loss']:.4f} → {summary['last_loss']:.4f}"
            print(f"{name}: {used} pairs, {summary['steps']} steps, loss {losses}", flush=True)
        models[name] = str(run / "model")
        timings[f"train {name}"] = time.perf_counter() - began

    dialogues = read_dialogues("persobench-csv", POOL / "prompts" / "valid.csv")[: args.eval]
    by_id = {d.id: d for d in dialogues}
    metrics = [make_metric(name) for name in DEFAULT_WEIGHTS]
    statuses = prepare_metrics(metrics, dialogues)
    ranges = fit_minmax(read_records(args.pool / "scored.jsonl", ScoredCandidate), DEFAULT_WEIGHTS)
    systems: dict[str, list[ScoredCandidate]] = {}
    with GenerationCache(args.cache / "generations.sqlite") as generations:
        for name, model in models.items():
            began = time.perf_counter()
            responder = make_responder("hf", model=model, name=name)
            candidates = run_responder(dialogues, responder, GenerationParams(), generations)
            timings[f"generate {name}"] = time.perf_counter() - began
            began = time.perf_counter()
            scores = ScoreCache(args.cache / "scores.sqlite")
            scored = list(score_stream(by_id, iter(candidates), metrics, statuses, scores))
            scores.close()
            systems[name] = [c.model_copy(update={"total": total_score(c.scores, DEFAULT_WEIGHTS,
                             ranges)}) for c in scored]  # fmt: skip
            timings[f"score {name}"] = time.perf_counter() - began
    for records in systems.values():
        for record in records:
            record.scores["total"] = record.total
    diffs = compare_to_baseline(systems, [c for c in COLUMNS if c != FAILURE], "base",
                                seed=args.seed)  # fmt: skip

    print(f"\n{args.pairs} pairs, {args.steps} steps x batch {args.batch}, lr {args.lr}, "
          f"LoRA r16; {len(dialogues)} held-out FoCus valid dialogues")  # fmt: skip
    print("| system | " + " | ".join(COLUMNS) + " | s/response |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for name, records in systems.items():
        cells = []
        for column in COLUMNS:
            if column == FAILURE:
                value = sum(not r.valid for r in records) / len(records)
            else:
                values = [r.scores[column] for r in records if r.scores.get(column) is not None]
                value = sum(values) / len(values)
            cell = f"{value:.3f}"
            if name != "base" and diffs[name].get(column):
                d = diffs[name][column]
                mark = "*" if d["ci95_low"] > 0 or d["ci95_high"] < 0 else ""
                cell += (
                    f" ({d['mean_diff']:+.3f} [{d['ci95_low']:+.3f}, {d['ci95_high']:+.3f}]{mark})"
                )
            cells.append(cell)
        latency = [r.latency_s for r in records if r.latency_s is not None]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(latency) / len(latency):.2f} |")
    print("\n(differences to base with paired bootstrap 95% intervals; * = interval excludes 0)")
    print("| step | seconds |\n|---|---:|")
    for step, seconds in timings.items():
        print(f"| {step} | {seconds:.0f} |")
    print(f"| total wall | {time.perf_counter() - started:.0f} |")


if __name__ == "__main__":
    main()
