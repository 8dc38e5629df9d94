"""Calls that keep failing (a server down) are the server's failures, not the model's.

``generate`` writes what came back, exits 3 and a rerun makes only the failed calls again;
``score``, ``bench`` and ``pairs`` leave candidates with an ``error`` out of every number and
count them apart; ``run`` stops at the stage whose calls failed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from persona_align.cli.run_config import sample_path
from persona_align.data import read_dialogues
from persona_align.preference import PairingConfig, build_pairs
from persona_align.prompting import persobench_messages
from persona_align.records import Candidate, Dialogue, ScoredCandidate, read_records, write_records
from persona_align.testing.fake_server import FakeOpenAIServer, content_hash


@pytest.fixture
def dialogues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The 14 sample dialogues; the user cache is the test's own."""
    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(tmp_path / "user-cache"))
    path = tmp_path / "dialogues.jsonl"
    write_records(path, read_dialogues("jsonl", sample_path("valid")), Dialogue)
    return path


def responder(server: FakeOpenAIServer) -> dict:
    """No retries, so that an injected fault is a call that failed after its retries."""
    return {"kind": "openai", "model": "fake-model", "name": "fake",
            "base_url": server.base_url, "max_retries": 0, "timeout": 5.0}  # fmt: skip


def generate_config(folder: Path, dialogues: Path, server: FakeOpenAIServer) -> Path:
    section = {"dialogues": str(dialogues), "output": str(folder / "candidates.jsonl"),
               "cache": str(folder / "gen.sqlite"), "responders": [responder(server)]}  # fmt: skip
    path = folder / "generate.yaml"
    path.write_text(yaml.safe_dump({"generate": section}))
    return path


def last_user(dialogue: Dialogue) -> str:
    return persobench_messages(dialogue)[-1].content


def test_generate_exits_3_and_a_rerun_makes_only_the_failed_calls(
    cli, tmp_path: Path, dialogues: Path
) -> None:
    out = tmp_path / "candidates.jsonl"
    rows = read_dialogues("jsonl", dialogues)
    # half of the first attempts lose their connection, as when a server dies mid-run
    with FakeOpenAIServer(faults={"drop": 0.5}, faulty_attempts=1) as server:
        config = generate_config(tmp_path, dialogues, server)
        first = cli("generate", "--config", config, "--json")
        failed = {c.dialogue_id for c in read_records(out, Candidate) if c.error is not None}
        assert first.code == 3, first.err
        assert 0 < len(failed) < len(rows) and server.calls == len(rows)
        line = first.err.strip().splitlines()[-1]
        assert line.startswith(f"error: {len(failed)} of {len(rows)} model calls still failed")
        assert "fake: APIConnectionError" in line and "Traceback" not in first.err
        assert first.summary["responders"]["fake"]["errors"] == len(failed)

        second = cli("generate", "--config", config)
        assert second.code == 0, second.err
        retried = {d.id for d in rows if server.calls_by_prompt[content_hash(last_user(d))] == 2}
        assert server.calls == len(rows) + len(failed) and retried == failed
    assert all(c.error is None and c.valid for c in read_records(out, Candidate))


@pytest.fixture
def with_errors(cli, tmp_path: Path, dialogues: Path) -> tuple[Path, int]:
    """Candidates of one responder, some of which hold a call error; and how many."""
    with FakeOpenAIServer(faults={"drop": 0.5}, faulty_attempts=1) as server:
        assert cli("generate", "--config", generate_config(tmp_path, dialogues, server)).code == 3
    out = tmp_path / "candidates.jsonl"
    errors = sum(c.error is not None for c in read_records(out, Candidate))
    assert 0 < errors < 14
    return out, errors


def test_score_leaves_call_errors_out_and_counts_them(
    cli, tmp_path: Path, dialogues: Path, with_errors: tuple[Path, int]
) -> None:
    candidates, errors = with_errors
    scored = tmp_path / "scored.jsonl"
    result = cli("score", "-d", dialogues, "-c", candidates, "-o", scored, "--metrics", "lfc",
                 "--no-cache", "--json")  # fmt: skip
    assert result.code == 0, result.err
    entry = result.summary["systems"]["fake"]
    # every reply that came back is valid JSON: the model failed nothing
    assert (entry["errors"], entry["responses"], entry["failure_ratio"]) == (errors, 14 - errors, 0)
    assert entry["metrics"]["lfc"]["n"] == 14 - errors
    rows = read_records(scored, ScoredCandidate)
    assert [r.scores["lfc"] is None for r in rows] == [r.error is not None for r in rows]
    human = cli("score", "-d", dialogues, "-c", candidates, "-o", scored, "--metrics", "lfc",
                "--no-cache")  # fmt: skip
    assert f"{errors} candidates hold a call error" in human.out


def test_bench_report_counts_call_errors_apart(
    cli, tmp_path: Path, dialogues: Path, with_errors: tuple[Path, int]
) -> None:
    candidates, errors = with_errors
    report = tmp_path / "report"
    result = cli("bench", "-d", dialogues, "-s", candidates, "-o", report, "--metrics", "lfc",
                 "--no-cache", "--json")  # fmt: skip
    assert result.code == 0, result.err
    entry = result.summary["systems"]["fake"]
    assert (entry["errors"], entry["failure_ratio"]) == (errors, 0)
    markdown = (report / "report.md").read_text()
    header, _, row = [line for line in markdown.splitlines() if line.startswith("|")][:3]
    cells = dict(zip(header.split("|"), row.split("|"), strict=True))
    assert cells[" call errors "].strip() == str(errors)
    assert cells[" failure ratio "].strip() == "0.000"


def test_pairs_never_reject_a_call_error() -> None:
    dialogue = read_dialogues("jsonl", sample_path("valid"))[0]
    reply = '{"response": "I sing."}'
    valid = ScoredCandidate(dialogue_id=dialogue.id, responder="a", raw=reply, response="I sing.",
                            valid=True)  # fmt: skip
    failed = ScoredCandidate(dialogue_id=dialogue.id, responder="b", raw="", response=None,
                             valid=False, error="APIConnectionError")  # fmt: skip
    pairs = build_pairs({dialogue.id: dialogue}, [valid, failed], PairingConfig(rule="format"))
    assert pairs == []


def test_run_stops_at_the_stage_whose_calls_failed(cli, tmp_path: Path, dialogues: Path) -> None:
    with FakeOpenAIServer(faults={"drop": 1.0}) as server:
        config = {"name": "x", "output_dir": "run", "data": {"train": str(dialogues), "limit": 3},
                  "generate": {"responders": [responder(server)]}}  # fmt: skip
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        result = cli("run", path)
    assert result.code == 3, result.err
    assert result.err.strip().splitlines()[-1].startswith("error: 3 of 3 model calls")
    assert (tmp_path / "run" / "data" / "manifest.json").exists()
    assert not (tmp_path / "run" / "generate").exists()  # a rerun retries the stage


def test_all_calls_failed_is_no_system_to_report(cli, tmp_path: Path, dialogues: Path) -> None:
    rows = read_dialogues("jsonl", dialogues)
    failed = [Candidate(dialogue_id=d.id, responder="down", raw="", response=None, valid=False,
                        error="APIConnectionError") for d in rows]  # fmt: skip
    write_records(tmp_path / "down.jsonl", failed, Candidate)
    result = cli("bench", "-d", dialogues, "-s", tmp_path / "down.jsonl", "-o", tmp_path / "r",
                 "--metrics", "lfc", "--no-cache")  # fmt: skip
    assert result.code == 2
    assert result.err.strip() == (
        "error: system 'down': all 14 of its calls failed (every candidate holds an error); "
        "rerun generate to retry them"
    )
    assert not (tmp_path / "r").exists()
