"""Integration checks on the real PersoDPO/PersoBench files in ../shared/data (skipped when absent)."""

import csv
from pathlib import Path

import pytest

from persona_align.data import read_dialogues
from persona_align.data.responses import import_responses

pytestmark = pytest.mark.integration
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPTS = SHARED_DATA / "persodpo-focus" / "prompts"


@pytest.mark.parametrize(("split", "count"), [("train", 1500), ("valid", 1000)])
def test_persodpo_prompts(split: str, count: int) -> None:
    dialogues = read_dialogues("persobench-csv", PROMPTS / f"{split}.csv")
    assert len(dialogues) == count
    for dialogue in dialogues:
        assert len(dialogue.persona) >= 2
        assert len(dialogue.context) >= 1
        assert dialogue.reference and not dialogue.reference.startswith("User2:")


def _non_empty_share(path: Path) -> float:
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return sum(1 for row in rows if row["gen_response"].strip()) / len(rows)


@pytest.mark.parametrize(
    "raw",
    sorted((SHARED_DATA / "persodpo-focus" / "responses-raw").glob("*.csv")),
    ids=lambda p: p.stem,
)
def test_extraction_matches_authors_valid_rate(raw: Path) -> None:
    dialogues = read_dialogues("persobench-csv", PROMPTS / "train.csv")
    candidates = import_responses(raw, dialogues)
    ours = sum(c.valid for c in candidates) / len(candidates)
    theirs = _non_empty_share(raw.parent.parent / "responses" / raw.name)
    assert abs(ours - theirs) <= 0.02, (raw.stem, ours, theirs)


def test_seven_models_are_present() -> None:
    assert len(list((SHARED_DATA / "persodpo-focus" / "responses-raw").glob("*.csv"))) == 7
