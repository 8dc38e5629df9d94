import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from persona_align.errors import InputError
from persona_align.metrics import make_metric
from persona_align.metrics.aggregate import bootstrap_ci, paired_test, summarize
from persona_align.metrics.base import Metric, ScoreItem, Unavailable
from persona_align.metrics.lfc import length_score
from persona_align.metrics.scorer import ScoreCache, prepare_metrics, score_stream
from persona_align.records import Candidate, Dialogue, ScoredCandidate, read_records

DIALOGUES = {
    f"d{i}": Dialogue(
        id=f"d{i}",
        persona=["I keep bees."],
        context=[{"speaker": "User1", "text": "Hi"}],
        reference=" ".join(["word"] * 10) if i < 3 else None,
    )
    for i in range(4)
}


def candidate(
    dialogue_id: str, raw: str, responder: str = "m", latency: float | None = 1.0
) -> Candidate:
    from persona_align.prompting import extract_response

    response = extract_response(raw)
    return Candidate(
        dialogue_id=dialogue_id,
        responder=responder,
        raw=raw,
        response=response,
        valid=response is not None,
        latency_s=latency,
    )


class Counting(Metric):
    name = "count"
    failure_value = -1.0
    needs_reference = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        self.seen += [i.response for i in items]
        return [float(len(i.response.split())) for i in items]


class Broken(Metric):
    name = "broken"

    def load(self) -> None:
        raise Unavailable("model 'x/y' needs the hub, which is unreachable here")

    def score(self, items: Sequence[ScoreItem]) -> list[float | None]:
        raise AssertionError("never called")


def test_lfc_values() -> None:
    assert length_score(10, 10) == 1.0
    assert length_score(15, 10) == pytest.approx(0.75)
    assert length_score(30, 10) == 0.0
    lfc = make_metric("lfc")
    lfc.fit(list(DIALOGUES.values()))  # mean reference length: 10 words
    strict = candidate("d0", json.dumps({"response": " ".join(["a"] * 15)}))
    wrapped = candidate("d0", "Sure!\n" + json.dumps({"response": " ".join(["a"] * 10)}))
    assert lfc.score([ScoreItem(DIALOGUES["d0"], strict), ScoreItem(DIALOGUES["d0"], wrapped)]) == [
        pytest.approx(0.75 + 0.3),  # the format bonus fires on the raw output
        pytest.approx(1.0),  # valid after lenient extraction, but not strict JSON: no bonus
    ]
    # PersoDPO: w1 > w2, length weighs more than format (the authors' code: 1 and 0.3)
    assert lfc.settings() == {"name": "lfc", "target": 10.0, "format_bonus": 0.3}
    with pytest.raises(InputError, match="target must be positive"):
        make_metric("lfc", target=0)
    with pytest.raises(InputError, match="unexpected keyword"):
        make_metric("lfc", targt=3)
    with pytest.raises(Unavailable, match="no target length"):
        make_metric("lfc").fit([DIALOGUES["d3"]])


def test_scorer_failures_references_unavailable_and_cache(tmp_path: Path) -> None:
    cands = [
        candidate("d0", json.dumps({"response": "one two"})),
        candidate("d1", "not json"),  # a failure: worst value, no call
        candidate("d3", json.dumps({"response": "no gold here"})),  # no reference: null
        candidate("d2", json.dumps({"response": "three words here"})),
    ]
    metrics = [Counting(), Broken()]
    statuses = prepare_metrics(metrics, list(DIALOGUES.values()))
    assert [s.available for s in statuses] == [True, False]
    assert "unreachable" in statuses[1].reason
    cache = ScoreCache(tmp_path / "s.sqlite")
    out = list(score_stream(DIALOGUES, iter(cands), metrics, statuses, cache, chunk_size=3))
    assert [c.dialogue_id for c in out] == ["d0", "d1", "d3", "d2"]
    assert [c.scores["count"] for c in out] == [2.0, -1.0, None, 3.0]
    assert all(c.scores["broken"] is None for c in out)  # unavailable: null, never 0
    assert metrics[0].seen == ["one two", "three words here"]
    again = Counting()
    out2 = list(score_stream(DIALOGUES, iter(cands), [again, metrics[1]], statuses, cache))
    assert again.seen == [] and [c.scores for c in out2] == [c.scores for c in out]  # all cached
    cache.close()
    with pytest.raises(
        InputError, match=r"record 2: field 'dialogue_id': no dialogue with id 'zz'"
    ):
        list(
            score_stream(
                DIALOGUES,
                iter([cands[0], candidate("zz", "x")]),
                metrics,
                statuses,
                None,
                source="c.jsonl",
            )
        )


def test_summarize_and_bootstrap() -> None:
    rows = [
        ScoredCandidate(
            **candidate(f"d{i}", json.dumps({"response": "x"}), latency=i).model_dump(),
            scores={"m": v},
        )
        for i, v in enumerate([1.0, 2.0, 3.0])
    ] + [
        ScoredCandidate(**candidate("d3", "broken", latency=None).model_dump(), scores={"m": -1.0})
    ]
    entry = summarize(rows, ["m"], n_boot=500)["m"]
    assert entry["responses"] == 4 and entry["failure_ratio"] == 0.25
    assert entry["mean_latency_s"] == 1.0
    stats = entry["metrics"]["m"]
    assert stats["mean"] == pytest.approx(1.25)
    assert stats["std"] == pytest.approx(float(np.std([1, 2, 3, -1])))  # population std
    assert stats["valid_mean"] == pytest.approx(2.0)
    low, high = stats["ci95"]
    assert -1.0 <= low < 1.25 < high <= 3.0
    assert bootstrap_ci([1, 2, 3], seed=1) == bootstrap_ci([1, 2, 3], seed=1)


def test_paired_test() -> None:
    rng = np.random.default_rng(0)
    base = {f"d{i}": float(v) for i, v in enumerate(rng.normal(size=200))}
    better = {k: v + 0.5 for k, v in base.items()}
    same = {k: v + float(rng.normal(scale=0.01)) for k, v in base.items()}
    result = paired_test(better, base)
    assert result["n"] == 200 and result["mean_diff"] == pytest.approx(0.5)
    assert result["p_value"] < 0.001 and result["ci95_low"] == pytest.approx(0.5)
    assert paired_test(same, base)["p_value"] > 0.05
    with pytest.raises(ValueError, match="share no dialogue"):
        paired_test({"a": 1.0}, {"b": 1.0})


def test_cli_score(cli, tmp_path: Path) -> None:
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text(
        "".join(d.model_dump_json() + "\n" for d in DIALOGUES.values()), encoding="utf-8"
    )
    cands = tmp_path / "c.jsonl"
    rows = [
        candidate("d0", json.dumps({"response": "a b c d e f g h i j"})),
        candidate("d1", "oops", "other"),
    ]
    cands.write_text("".join(c.model_dump_json() + "\n" for c in rows), encoding="utf-8")
    out = tmp_path / "s.jsonl"
    result = cli("score", "-d", dialogues, "-c", cands, "-o", out, "--metrics", "lfc", "--opt", "lfc.target=10",
                 "--cache", tmp_path / "cache.sqlite", "--json")  # fmt: skip
    assert result.code == 0, result.err
    scored = read_records(out, ScoredCandidate)
    assert [s.scores["lfc"] for s in scored] == [pytest.approx(1.3), 0.0]
    assert result.summary["systems"]["other"]["failure_ratio"] == 1.0
    warnings = [line for line in result.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: other: 1 of 1 replies (100%)")
    assert "--extraction none" in warnings[0]
    assert result.summary["metrics"]["lfc"]["available"] is True
    assert result.summary["metrics"]["lfc"]["settings"]["format_bonus"] == 0.3
    bad = cli("score", "-d", dialogues, "-c", cands, "-o", out, "--metrics", "nope")
    assert bad.code == 2 and "unknown metric 'nope'" in bad.err
    bad_opt = cli(
        "score", "-d", dialogues, "-c", cands, "-o", out, "--metrics", "lfc", "--opt", "c.mode=max"
    )
    assert bad_opt.code == 2


def test_corpus_distinct_in_summary() -> None:
    rows = [
        ScoredCandidate(
            **candidate(f"d{i}", json.dumps({"response": text})).model_dump(),
            scores={"dist-1": 1.0},
        )
        for i, text in enumerate(["a b", "a c"])
    ]
    entry = summarize(rows, ["dist-1"], n_boot=10)["m"]
    assert entry["corpus"]["dist-1"] == pytest.approx(3 / 4)  # {a, b, c} over 4 unigrams
