import json
from pathlib import Path

import pytest

from persona_align.errors import InputError
from persona_align.records import (
    Candidate,
    Dialogue,
    PreferencePair,
    ScoredCandidate,
    atomic_open,
    read_jsonl,
    read_records,
    write_records,
)

DIALOGUE = {
    "id": "d1",
    "persona": ["我喜欢做饭。", "I keep bees."],
    "context": [{"speaker": "User1", "text": "Hi!\nHow are you?"}],
    "reference": "Busy with my hives.",
    "knowledge": None,
    "source": "test",
    "persona_grounding": [False, True],
    "meta": {"turn": 3, "nested": {"a": [1, 2]}},
}
CANDIDATE = {
    "dialogue_id": "d1",
    "responder": "m",
    "raw": '{"response": "ok"}',
    "response": "ok",
    "valid": True,
    "latency_s": 0.5,
    "prompt_hash": "abc",
    "error": None,
}
SCORED = CANDIDATE | {"scores": {"c": 1.0, "coh": None}, "total": 0.25}
PAIR = {
    "dialogue_id": "d1",
    "prompt": [{"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "good"}],
    "rejected": [{"role": "assistant", "content": "bad"}],
    "score_chosen": 0.9,
    "score_rejected": 0.1,
    "weight": 0.69,
    "rule": "quantile",
}
CASES = [
    (Dialogue, DIALOGUE),
    (Candidate, CANDIDATE),
    (ScoredCandidate, SCORED),
    (PreferencePair, PAIR),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize(("model", "data"), CASES)
def test_round_trip(tmp_path: Path, model, data, suffix: str) -> None:
    records = [
        model.model_validate(data),
        model.model_validate(
            data | {"dialogue_id": "d2"}
            if "dialogue_id" in data
            else data | {"id": "d2", "meta": {}}
        ),
    ]
    path = tmp_path / f"records{suffix}"
    assert write_records(path, records, model) == 2
    assert read_records(path, model) == records
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


def test_jsonl_keeps_chinese_text_verbatim(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_records(path, [Dialogue.model_validate(DIALOGUE)], Dialogue)
    assert "我喜欢做饭。" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (Dialogue, DIALOGUE | {"persona": []}, "persona"),
        (Dialogue, DIALOGUE | {"persona": ["  "]}, "persona.0"),
        (Dialogue, DIALOGUE | {"context": []}, "context"),
        (Dialogue, DIALOGUE | {"context": [{"speaker": "User1", "text": " "}]}, "context.0.text"),
        (Dialogue, DIALOGUE | {"persona_grounding": [True]}, "(record)"),
        (Dialogue, DIALOGUE | {"personas": ["typo"]}, "personas"),
        (Candidate, CANDIDATE | {"valid": False}, "(record)"),
        (Candidate, CANDIDATE | {"latency_s": -1}, "latency_s"),
        (PreferencePair, PAIR | {"prompt": [{"role": "robot", "content": "x"}]}, "prompt.0.role"),
        (PreferencePair, PAIR | {"weight": -0.1}, "weight"),
    ],
)
def test_invalid_records_name_line_and_field(tmp_path: Path, model, data, field: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(
        DIALOGUE if model is Dialogue else (PAIR if model is PreferencePair else CANDIDATE)
    )
    path.write_text(good + "\n\n" + json.dumps(data) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_jsonl(path, model)
    message = str(info.value)
    assert message.startswith(
        f"{path}:line 3: field '{field}'" if field != "(record)" else f"{path}:line 3:"
    )
    assert "\n" not in message


def test_malformed_json_and_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(CANDIDATE) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:line 2: malformed JSON"):
        read_jsonl(path, Candidate)
    path.write_bytes(json.dumps(CANDIDATE).encode() + b"\n" + b'{"raw": "\xff"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:line 2: not valid UTF-8"):
        read_jsonl(path, Candidate)
    with pytest.raises(InputError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl", Candidate)


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text("old\n", encoding="utf-8")

    def records():
        yield Candidate.model_validate(CANDIDATE)
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_records(path, records(), Candidate)
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "new.jsonl") as handle:
        handle.write("partial")
        raise RuntimeError
    assert not (tmp_path / "new.jsonl").exists()


def test_parquet_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("not parquet", encoding="utf-8")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_records(path, Dialogue)


KILLED_WRITER = """
import os, signal, sys
from persona_align.records import atomic_open
with atomic_open(sys.argv[1]) as handle:
    handle.write("half a file")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_no_temp_file_after_the_rerun(cli, tmp_path: Path) -> None:
    """What ``score`` killed mid-write left behind goes with the next write of that output."""
    import subprocess
    import sys

    dialogues, candidates = tmp_path / "d.jsonl", tmp_path / "c.jsonl"
    write_records(dialogues, [Dialogue.model_validate(DIALOGUE)], Dialogue)
    write_records(candidates, [Candidate.model_validate(CANDIDATE)], Candidate)
    out = tmp_path / "scored.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], check=False)
    assert killed.returncode == -9
    assert [p.name for p in tmp_path.glob(".scored.jsonl.*.tmp")]  # the leftover
    result = cli("score", "-d", dialogues, "-c", candidates, "-o", out, "--no-cache")
    assert result.code == 0, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "d.jsonl", "scored.jsonl"]
    assert read_records(out, ScoredCandidate)[0].scores["lfc"] is not None


def test_a_live_writers_temp_file_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with atomic_open(out) as handle:  # another writer of the same output, still at work
        handle.write("the other writer's\n")
        (theirs,) = tmp_path.glob(".out.jsonl.*.tmp")
        write_records(out, [Candidate.model_validate(CANDIDATE)], Candidate)
        assert theirs.exists()
    assert out.read_text() == "the other writer's\n"  # the last rename wins, as before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
