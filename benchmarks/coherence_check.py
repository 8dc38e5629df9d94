"""Can the coherence judge tell a real next turn from a wrong one? And does it agree with readers?

On FoCus valid dialogues (rows < 800, never trained on: the judge's reader-labelled training
replies answer rows >= 800, see judge_data/build.py), each dialogue's gold next turn is scored
against
(a) the gold turn of another dialogue, (b) an earlier turn of the same speaker in the same
dialogue (an answer to another question about the same place), (c) a degenerate repetition
of the gold turn. Reported per judge: AUC (gold vs negatives) and the paired win rate (gold
scores higher than its own negative). The same on held-out Synthetic-PersonaChat dialogues
(rows >= 800, chit-chat, not FoCus). Then agreement with readers' coherent/not labels on 220
real LLM replies to FoCus valid prompts (judge_data/labels/coh-00.a.jsonl; 100 of them double-
labelled, reader-reader kappa printed), at the 0.5 threshold, and replies/s on this machine.

    .venv/bin/python benchmarks/coherence_check.py [--judges coh,coh-smollm2] [--limit 800]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import mannwhitneyu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "judge_data"))

import build  # noqa: E402
from machine import describe  # noqa: E402

from persona_align.data import read_dialogues  # noqa: E402
from persona_align.metrics import make_metric  # noqa: E402
from persona_align.metrics.base import ScoreItem  # noqa: E402
from persona_align.metrics.judges import (  # noqa: E402
    agreement,
    cohen_kappa,
    parse_context,
    persona_sentences,
)
from persona_align.records import Candidate, Dialogue  # noqa: E402

KINDS = ("a: other dialogue", "b: same dialogue, other position", "c: repetition")


def repetition(text: str) -> str:
    """The gold turn followed by its first clause looping, as small models degenerate."""
    words = text.split()
    loop = " ".join(words[: max(3, min(8, len(words) // 2))])
    return f"{text} " + " ".join([loop] * 4)


def negatives(dialogues: list[Dialogue], seed: int = 0) -> list[tuple[Dialogue, str, dict]]:
    """(dialogue, gold, {kind: negative}) for dialogues with a gold turn and an earlier turn
    of the same speaker."""
    rng = random.Random(seed)
    found = []
    for index, dialogue in enumerate(dialogues):
        gold = dialogue.reference
        responder = next((t.speaker for t in reversed(dialogue.context)
                          if t.speaker != dialogue.context[-1].speaker), None)  # fmt: skip
        own = [t.text for t in dialogue.context if t.speaker == responder and t.text != gold]
        if not gold or not own:
            continue
        other = dialogues[rng.choice([j for j in range(len(dialogues)) if j != index])]
        found.append((dialogue, gold, {
            KINDS[0]: other.reference or other.context[-1].text,
            KINDS[1]: rng.choice(own),
            KINDS[2]: repetition(gold),
        }))  # fmt: skip
    return found


def item(dialogue: Dialogue, reply: str) -> ScoreItem:
    candidate = Candidate(dialogue_id=dialogue.id, responder="check", raw=reply, response=reply,
                          valid=True)  # fmt: skip
    return ScoreItem(dialogue, candidate)


def separation(metric, cases) -> tuple[dict[str, tuple[float, float]], int, float]:
    """{kind: (AUC, paired win rate)}, items scored, seconds."""
    items = [item(d, gold) for d, gold, _ in cases]
    for kind in KINDS:
        items += [item(d, neg[kind]) for d, _, neg in cases]
    began = time.perf_counter()
    values = np.array(metric.score(items), dtype=float)
    seconds = time.perf_counter() - began
    n = len(cases)
    gold = values[:n]
    found = {}
    for k, kind in enumerate(KINDS):
        neg = values[n * (k + 1) : n * (k + 2)]
        auc = mannwhitneyu(gold, neg).statistic / (n * n)
        found[kind] = (float(auc), float(np.mean(gold > neg) + 0.5 * np.mean(gold == neg)))
    return found, len(items), seconds


def reader_agreement(metric) -> dict:
    """The judge at 0.5 against reader labels on real LLM replies."""
    items = {f"coh-{i['id']}": i for i in build.focus_items()}
    first = build.read_labels("coh-00.a.jsonl")
    second = {r["item"]: r["label"] for r in build.read_labels("coh-00.b.jsonl")}
    readers = [(r["label"], second[r["item"]]) for r in first if r["item"] in second]
    scored = []
    for label in first:
        found = items[label["item"]]
        dialogue = Dialogue(id=found["id"], persona=persona_sentences(found["persona"]),
                            context=parse_context(found["context"]))  # fmt: skip
        scored.append(item(dialogue, found["reply"]))
    values = metric.score(scored)
    gold = [r["label"] for r in first]
    predicted = [int(v >= 0.5) for v in values]
    found = agreement(gold, predicted, [1, 0])
    positives = [v for v, g in zip(values, gold, strict=True) if g == 1]
    negatives_ = [v for v, g in zip(values, gold, strict=True) if g == 0]
    auc = mannwhitneyu(positives, negatives_).statistic / (len(positives) * len(negatives_))
    return {"items": len(gold), "coherent": sum(gold), "accuracy": found.accuracy,
            "kappa": found.kappa, "auc": float(auc), "judge_coherent": sum(predicted),
            "reader_pairs": len(readers),
            "reader_accuracy": float(np.mean([a == b for a, b in readers])),
            "reader_kappa": cohen_kappa(*zip(*readers, strict=True))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judges", default="coh,coh-smollm2")
    parser.add_argument(
        "--limit",
        type=int,
        default=build.FOCUS_COH_TRAIN_FROM,
        help="FoCus valid dialogues (the rows from FOCUS_COH_TRAIN_FROM on have trained replies)",
    )
    parser.add_argument(
        "--baseline-limit",
        type=int,
        default=200,
        help="dialogues for judges other than coh (the LLM judge is slow)",
    )
    parser.add_argument("--opt", action="append", default=[], help="coh.model=DIR")
    args = parser.parse_args()
    if not build.DATA.is_dir():
        sys.exit(f"{build.DATA} is absent")
    torch.set_num_threads(2)
    options: dict = {}
    for pair in args.opt:
        key, _, value = pair.partition("=")
        metric, _, option = key.partition(".")
        options.setdefault(metric, {})[option] = value
    focus = read_dialogues("persobench-csv", build.FOCUS_PROMPTS)[
        : min(args.limit, build.FOCUS_COH_TRAIN_FROM)
    ]
    chat = build.chitchat_dialogues(range(build.CHITCHAT_DEV_FROM, 966))
    sets = {"FoCus valid": negatives(focus), "Synthetic-PersonaChat held-out": negatives(chat)}
    print(describe())
    for name in args.judges.split(","):
        metric = make_metric(name, **options.get(name, {}))
        metric.load()
        limit = None if name == "coh" else args.baseline_limit
        print(f"\n## {name} ({metric.model})")
        print("| data | cases | kind | AUC | paired win rate |\n|---|---|---|---|---|")
        for data, cases in sets.items():
            cases = cases[:limit]
            found, count, seconds = separation(metric, cases)
            for kind, (auc, win) in found.items():
                print(f"| {data} | {len(cases)} | {kind} | {auc:.3f} | {win:.3f} |")
            print(f"| {data} | {count} replies | speed | {count / seconds:.1f} replies/s | |")
        readers = reader_agreement(metric)
        print(f"\nreader labels: {json.dumps(readers)}")


if __name__ == "__main__":
    main()
