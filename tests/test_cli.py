import json
from pathlib import Path

import pytest

from persona_align.cli.run_config import sample_path
from persona_align.data import read_dialogues


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["data"],
        ["data", "import"],
        ["data", "import-responses"],
        ["data", "stats"],
        ["data", "validate"],
        ["data", "formats"],
        ["run"],
        ["train", "dpo"],
        ["train", "sft"],
        ["bench"],
        ["serve"],
        ["chat"],
    ],
)
def test_every_command_has_help(cli, command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.code == 0
    assert "Usage" in result.out


def test_sample_data_is_ours_and_well_formed() -> None:
    train = read_dialogues("jsonl", sample_path("train"))
    valid = read_dialogues("jsonl", sample_path("valid"))
    assert len(train) + len(valid) >= 60
    assert not {d.id for d in train} & {d.id for d in valid}
    for dialogue in train + valid:
        assert 4 <= len(dialogue.persona) <= 6
        assert len(dialogue.context) >= 3  # multi-turn
        assert dialogue.reference
        assert dialogue.source == "persona-align-sample"


def test_import_stats_validate_json(cli, tmp_path: Path) -> None:
    out = tmp_path / "train.parquet"
    result = cli("data", "import", sample_path("train"), "-f", "jsonl", "-o", out, "--json")
    assert result.code == 0, result.err
    assert result.summary["records"] == 52 and result.summary["output"] == str(out)
    stats = cli("data", "stats", out, "--json")
    assert stats.code == 0
    assert stats.summary["type"] == "dialogue" and stats.summary["records"] == 52
    assert stats.summary["persona_sentences"]["min"] >= 4
    valid = cli("data", "validate", out, "--json")
    assert valid.summary == {
        "command": "data validate",
        "file": str(out),
        "records": 52,
        "type": "dialogue",
        "ok": True,
    }
    human = cli("data", "stats", out)
    assert "persona sentences" in human.out


def test_import_responses_and_candidate_stats(cli, tmp_path: Path) -> None:
    dialogues = tmp_path / "d.jsonl"
    cli("data", "import", sample_path("valid"), "-f", "jsonl", "-o", dialogues)
    ids = [d.id for d in read_dialogues("jsonl", dialogues)]
    responses = tmp_path / "resp.jsonl"
    responses.write_text(
        "\n".join(
            json.dumps({"dialogue_id": i, "raw": '{"response": "ok"}', "latency_s": 1})
            for i in ids[:10]
        ),
        encoding="utf-8",
    )
    out = tmp_path / "cands.jsonl"
    result = cli(
        "data",
        "import-responses",
        responses,
        "-d",
        dialogues,
        "-o",
        out,
        "--responder",
        "bot",
        "--json",
    )
    assert result.code == 0, result.err
    bot = result.summary["responders"]["bot"]
    assert bot["candidates"] == len(ids) and bot["valid"] == 10
    assert cli("data", "stats", out, "--json").summary["type"] == "candidate"
    bad = cli(
        "data", "import-responses", responses, "-d", dialogues, "-o", out, "--extraction", "fuzzy"
    )
    assert bad.code == 2 and "--extraction" in bad.err


def test_validate_reports_first_bad_record(cli, tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        '{"dialogue_id": "a", "responder": "m", "raw": "", "response": null, "valid": true}\n'
    )
    result = cli("data", "validate", path, "--type", "candidate")
    assert result.code == 2
    assert (
        result.err.strip()
        == f"error: {path}:line 1: valid must be true exactly when response is not null"
    )
