import json
import math
from pathlib import Path

import pytest

from persona_align.errors import InputError
from persona_align.preference import PairingConfig, build_pairs, fit_minmax, total_score
from persona_align.records import Dialogue, PreferencePair, ScoredCandidate, read_records

DIALOGUES = {
    d: Dialogue(id=d, persona=["I keep bees."], context=[{"speaker": "User1", "text": "Hi"}])
    for d in ("a", "b")
}


def sc(dialogue: str, text: str | None, total: float | None, **scores: float) -> ScoredCandidate:
    raw = json.dumps({"response": text}) if text is not None else "garbage"
    return ScoredCandidate(
        dialogue_id=dialogue, responder=f"m-{text}", raw=raw, response=text, valid=text is not None,
        scores=scores, total=total,
    )  # fmt: skip


POOL = [sc("a", f"r{i}", float(i)) for i in range(5)] + [sc("a", None, -1.0), sc("b", "only", 1.0)]


def texts(pairs: list[PreferencePair]) -> list[tuple[str, str]]:
    return [(p.chosen[0].content, p.rejected[0].content) for p in pairs]


def test_minmax_total() -> None:
    rows = [
        sc("a", "x", None, c=-1.0, p=0.5),
        sc("a", "y", None, c=1.0, p=1.0),
        sc("a", None, None, c=-1.0),
    ]
    ranges = fit_minmax(rows, ["c", "p"])
    assert (ranges["c"].low, ranges["c"].high, ranges["p"].low, ranges["p"].high) == (
        -1.0,
        1.0,
        0.5,
        1.0,
    )
    assert total_score(rows[1].scores, {"c": 0.2, "p": 0.8}, ranges) == pytest.approx(1.0)
    assert total_score(rows[0].scores, {"c": 0.2, "p": 0.8}, ranges) == pytest.approx(0.0)
    assert total_score(rows[2].scores, {"c": 0.2, "p": 0.8}, ranges) == pytest.approx(
        0.0
    )  # p missing: pool min
    with pytest.raises(InputError, match="metric 'ue' has a weight but no value"):
        fit_minmax(rows, ["ue"])


def test_quantile_rule_pairs_top_with_bottom() -> None:
    pairs = build_pairs(DIALOGUES, POOL, PairingConfig())
    # dialogue a totals: -1, 0, 1, 2, 3, 4 -> 0.6 quantile 2.0, 0.4 quantile 1.0
    assert sorted(texts(pairs)) == sorted(
        (json.dumps({"response": f"r{c}"}), rejected)
        for c in (2, 3, 4)
        for rejected in ["garbage", *(json.dumps({"response": f"r{r}"}) for r in (0, 1))]
    )
    assert {p.dialogue_id for p in pairs} == {"a"}  # b has one reply: nothing to pair
    top = next(p for p in pairs if p.score_chosen == 4.0 and p.score_rejected == -1.0)
    assert top.weight == pytest.approx(1 / (1 + math.exp(-5.0)))
    assert top.rejected[0].content == "garbage"  # an invalid reply as the model wrote it
    assert top.prompt[0].role == "user" and "I keep bees." in top.prompt[0].content


def test_other_rules_and_options() -> None:
    margin = build_pairs(DIALOGUES, POOL, PairingConfig(rule="margin", margin=3.0))
    assert sorted((p.score_chosen, p.score_rejected) for p in margin) == [
        (2.0, -1.0),
        (3.0, -1.0),
        (3.0, 0.0),
        (4.0, -1.0),
        (4.0, 0.0),
        (4.0, 1.0),
    ]
    best = build_pairs(DIALOGUES, POOL, PairingConfig(rule="best-worst", response_format="text"))
    assert texts(best) == [("r4", "garbage")]
    fmt = build_pairs(DIALOGUES, POOL, PairingConfig(rule="format"))
    assert len(fmt) == 5 and {(p.score_chosen, p.score_rejected, p.weight) for p in fmt} == {
        (1.0, 0.0, 1.0)
    }
    # the format rule keeps both sides as written (auto = raw); json re-writes the valid side
    pretty = [c.model_copy(update={"raw": json.dumps({"response": c.response}, indent=2)})
              if c.valid else c for c in POOL]  # fmt: skip
    assert {p.chosen[0].content for p in build_pairs(DIALOGUES, pretty, PairingConfig(
        rule="format"))} == {c.raw for c in pretty[:5]}  # fmt: skip
    as_json = build_pairs(DIALOGUES, pretty, PairingConfig(rule="format", response_format="json"))
    assert {p.chosen[0].content for p in as_json} == {json.dumps({"response": f"r{i}"})
                                                      for i in range(5)}  # fmt: skip
    assert texts(build_pairs(DIALOGUES, pretty, PairingConfig(rule="best-worst"))) == [
        (json.dumps({"response": "r4"}), "garbage")
    ]  # other rules: json by default
    one = build_pairs(DIALOGUES, POOL, PairingConfig(weight="one"))
    assert {p.weight for p in one} == {1.0}
    capped = build_pairs(DIALOGUES, POOL, PairingConfig(max_pairs_per_dialogue=2, seed=3))
    assert len(capped) == 2 and texts(capped) == texts(
        build_pairs(DIALOGUES, POOL, PairingConfig(max_pairs_per_dialogue=2, seed=3))
    )
    twins = [sc("a", "same", 2.0), sc("a", "same", 1.0)]
    assert (
        build_pairs(DIALOGUES, twins, PairingConfig(rule="best-worst")) == []
    )  # identical texts dropped
    with pytest.raises(InputError, match="no total score"):
        build_pairs(DIALOGUES, [sc("a", "x", None)], PairingConfig())
    with pytest.raises(InputError, match="unknown pairing rule"):
        build_pairs(DIALOGUES, POOL, PairingConfig(rule="best"))
    with pytest.raises(InputError, match="lower"):
        build_pairs(DIALOGUES, POOL, PairingConfig(upper=0.3, lower=0.5))


def test_cli_pairs(cli, tmp_path: Path) -> None:
    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text(
        "".join(d.model_dump_json() + "\n" for d in DIALOGUES.values()), encoding="utf-8"
    )
    scored = tmp_path / "s.jsonl"
    rows = [sc("a", f"r{i}", None, c=float(i % 3 - 1), lfc=i / 4) for i in range(5)]
    scored.write_text("".join(r.model_dump_json() + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "p.jsonl"
    result = cli(
        "pairs", "-s", scored, "-d", dialogues, "-o", out, "--weights", "c=0.5,lfc=0.5", "--json"
    )
    assert result.code == 0, result.err
    pairs = read_records(out, PreferencePair)
    assert result.summary["records"] == len(pairs) > 0
    assert all(p.score_chosen > p.score_rejected and 0.5 < p.weight < 1 for p in pairs)
    stats = cli("pairs", "stats", out, "--json")
    assert stats.code == 0 and stats.summary["rules"] == {"quantile": len(pairs)}
    missing = cli(
        "pairs", "-s", scored, "-d", dialogues, "-o", tmp_path / "x.jsonl"
    )  # default weights need c, ue, p...
    assert (
        missing.code == 2
        and "has a weight but no value" in missing.err
        and not (tmp_path / "x.jsonl").exists()
    )
