"""C and UE speed: the batched metrics vs one ``pipeline`` call per (premise, hypothesis) pair.

The baseline is how the PersoBench notebooks score: a text-classification pipeline called once
per NLI pair, no batching, no de-duplication, and for UE both pairs of every reply. Both sides
use the same model (``embedded-nli`` by default, merged, fp32) and the same metric code, except
that our UE skips the (gold, reply) pair when the persona does not entail the reply; the values
must be identical. Responses: the 7 systems x 1,500 PersoDPO FoCus train prompts
(``--quick``: the first 100 prompts). A bf16 run of the batched side is reported separately
with its deviation in the C/UE means and its label agreement with fp32.

    .venv/bin/python benchmarks/bench_metrics_nli.py [--quick] [--metrics C,UE] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import fmean

from rich.console import Console
from rich.table import Table

from persona_align.data import read_dialogues
from persona_align.data.nli import normalise_label
from persona_align.data.responses import import_responses
from persona_align.metrics import consistency  # registers c and ue
from persona_align.metrics.base import ScoreItem, make_metric
from persona_align.metrics.nli import NLIModel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "persodpo-focus"
METRICS = {"C": ("c", {}), "C max": ("c", {"mode": "max"}), "UE": ("ue", {})}


def load_items(limit: int | None) -> list[ScoreItem]:
    """Valid responses of every system to the first ``limit`` prompts (all when None)."""
    dialogues = read_dialogues("persobench-csv", DATA / "prompts" / "train.csv")
    items = []
    for path in sorted((DATA / "responses").glob("*.csv")):
        candidates = import_responses(path, dialogues, extraction="none")  # row-aligned: all rows
        pairs = list(zip(dialogues, candidates, strict=True))[:limit]
        items += [ScoreItem(d, c) for d, c in pairs if c.valid]
    return items


class Recorder:
    """Wraps a predict function: counts the pairs asked and keeps the label of each pair."""

    def __init__(self, predict) -> None:
        self.predict, self.pairs, self.labels = predict, 0, {}

    def __call__(self, pairs, on_batch=None):
        labels = self.predict(pairs)
        self.pairs += len(pairs)
        self.labels.update(zip(pairs, labels, strict=True))
        return labels


def persobench_ue(items: list[ScoreItem], predict) -> list[float]:
    """UE the PersoBench way: both NLI pairs of every reply are judged."""
    persona = predict([(consistency.persona_text(i.dialogue), i.response) for i in items])
    gold = predict([(i.dialogue.reference, i.response) for i in items])
    return [consistency.ue_value(p, g) for p, g in zip(persona, gold, strict=True)]


def per_pair_predict(nli: NLIModel):
    """The baseline: one pipeline call per pair, as the PersoBench notebooks do."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=nli.model, tokenizer=nli.tokenizer)

    def predict(pairs):
        out = []
        for premise, hypothesis in pairs:
            result = classify({"text": premise, "text_pair": hypothesis}, truncation=True)
            result = result[0] if isinstance(result, list) else result
            out.append(normalise_label(result["label"]))
        return out

    return predict


def run(items, name: str, options: dict, model: str, dtype: str, baseline: bool, batch: int):
    """(values, labels, pairs asked, seconds) for one metric on one side."""
    if name == "ue":  # PersoBench's UE: NLI for the persona gate too
        options = options | {"persona_model": model}
    metric = make_metric(name, model=model, dtype=dtype, batch_size=batch, **options)
    # a model of its own: the process-wide shared one would carry results (its memo) and the
    # recorder of the previous run into this one
    nli = NLIModel(model, dtype=dtype, batch_size=batch)
    metric.gate.model = nli
    if name == "ue":
        metric.nli = nli
    metric.load()
    predict = per_pair_predict(nli) if baseline else nli.predict
    recorder = Recorder(predict)
    nli.predict = recorder
    began = time.perf_counter()
    values = persobench_ue(items, recorder) if baseline and name == "ue" else metric.score(items)
    return values, recorder.labels, recorder.pairs, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first 100 prompts only")
    parser.add_argument("--model", default="embedded-nli")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--metrics", default="C,C max,UE", help="subset of: C, C max, UE")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"{DATA} is absent", file=sys.stderr)
        return 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    items = load_items(100 if args.quick else None)
    console = Console()
    console.print(
        f"{len(items)} valid responses, model {args.model}, torch threads "
        f"{torch.get_num_threads()}, batch size {args.batch_size}"
    )
    columns = (
        "metric", "pairs", "baseline pairs/s", "batched pairs/s", "ratio", "identical (fp32)",
        "bf16 pairs/s", "bf16 |Δ mean|", "bf16 label agreement",
    )  # fmt: skip
    table = Table(*columns, title="NLI metrics: batched vs per-pair pipeline", title_justify="left")
    for label in [m.strip() for m in args.metrics.split(",")]:
        name, options = METRICS[label]
        common = (items, name, options, args.model)
        base_v, base_l, pairs, base_s = run(*common, "float32", True, args.batch_size)
        fast_v, fast_l, _, fast_s = run(*common, "float32", False, args.batch_size)
        differ = sum(a != b for a, b in zip(base_v, fast_v, strict=True))
        flipped = sum(base_l[pair] != label for pair, label in fast_l.items())
        same = "yes" if not (differ or flipped) else f"no ({differ} values, {flipped} labels)"
        row = [label, str(pairs), f"{pairs / base_s:.1f}", f"{pairs / fast_s:.1f}",
               f"{base_s / fast_s:.1f}x", same]  # fmt: skip
        console.print(
            f"{label}: mean fp32 {fmean(fast_v):.4f} (baseline {fmean(base_v):.4f}); "
            f"baseline {base_s:.1f} s, batched {fast_s:.1f} s"
        )
        if args.no_bf16:
            row += ["-", "-", "-"]
        else:
            bf_v, bf_l, _, bf_s = run(*common, "bfloat16", False, args.batch_size)
            agree = fmean(fast_l[pair] == label for pair, label in bf_l.items())
            row += [f"{pairs / bf_s:.1f}", f"{abs(fmean(bf_v) - fmean(fast_v)):.4f}",
                    f"{agree:.4f}"]  # fmt: skip
            console.print(f"{label}: mean bf16 {fmean(bf_v):.4f}, bf16 {bf_s:.1f} s")
        table.add_row(*row)
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
