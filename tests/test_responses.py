import csv
import json
from pathlib import Path

import pytest

from persona_align.data.responses import import_responses
from persona_align.errors import InputError
from persona_align.prompting import messages_hash, persobench_messages
from persona_align.records import Dialogue

DIALOGUES = [
    Dialogue(id=f"d{i}", persona=["I sing."], context=[{"speaker": "User1", "text": f"Hi {i}"}])
    for i in range(3)
]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_row_aligned_csv(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "Model-X.csv",
        [
            {"gen_response": '{"response": "La la."}', "response_time": "1.5"},
            {"gen_response": 'Response:\n{"response": "Do re mi."}', "response_time": ""},
            {"gen_response": '{"response": "cut', "response_time": "2"},
        ],
    )
    candidates = import_responses(path, DIALOGUES)
    assert [c.dialogue_id for c in candidates] == ["d0", "d1", "d2"]
    assert {c.responder for c in candidates} == {"Model-X"}
    assert [c.response for c in candidates] == ["La la.", "Do re mi.", None]
    assert [c.valid for c in candidates] == [True, True, False]
    assert [c.latency_s for c in candidates] == [1.5, None, 2.0]
    assert candidates[0].prompt_hash == messages_hash(persobench_messages(DIALOGUES[0]))
    strict = import_responses(path, DIALOGUES, responder="m", extraction="strict")
    assert [c.valid for c in strict] == [True, False, False]


def test_already_extracted_csv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", [{"gen_response": t} for t in ["La la.", "", "  "]])
    candidates = import_responses(path, DIALOGUES, extraction="none")
    assert [c.response for c in candidates] == ["La la.", None, None]


def test_csv_must_be_row_aligned(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "r.csv", [{"gen_response": "x"}])
    with pytest.raises(InputError, match="1 response rows for 3 dialogues"):
        import_responses(path, DIALOGUES)
    bad = write_csv(tmp_path / "b.csv", [{"gen_response": "x", "response_time": "soon"}] * 3)
    with pytest.raises(InputError, match=r"b.csv:row 1: field 'response_time': not a number"):
        import_responses(bad, DIALOGUES)


def test_jsonl_keyed_by_dialogue_id(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    lines = [
        {"dialogue_id": "d2", "raw": '{"response": "Two."}', "latency_s": 0.25},
        {"dialogue_id": "d0", "gen_response": '{"response": "Zero."}'},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    candidates = import_responses(path, DIALOGUES, responder="bot")
    assert [(c.dialogue_id, c.response) for c in candidates] == [
        ("d0", "Zero."),
        ("d1", None),
        ("d2", "Two."),
    ]
    assert candidates[1].error == "no output in out.jsonl" and not candidates[1].valid
    assert candidates[2].latency_s == 0.25
    path.write_text(json.dumps({"dialogue_id": "zz", "raw": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(
        InputError, match=r"out.jsonl:line 1: field 'dialogue_id': no dialogue with id 'zz'"
    ):
        import_responses(path, DIALOGUES)
    # a run over part of the dialogues the file answers
    assert [c.valid for c in import_responses(path, DIALOGUES, subset=True)] == [False] * 3
