"""Every kind of bad input: exit code 2, one line naming file, place and field, no output file."""

import json
from pathlib import Path

import pytest

GOOD_ROW = '"I sing.I dance.","User1: Hi\nUser2: Hello\nUser1: Sing?","User2: Yes."\n'
HEADER = "personas,context,act_response\n"
DIALOGUE = {"id": "a", "persona": ["I sing."], "context": [{"speaker": "User1", "text": "Hi"}]}

CASES = {
    "csv-malformed": (
        "persobench-csv",
        "p.csv",
        (HEADER + GOOD_ROW + '"I sing.,"User1: unterminated\n').encode(),
        ["p.csv:row 2", "malformed CSV"],
    ),
    "csv-missing-column": (
        "persobench-csv",
        "p.csv",
        b'personas,act_response\n"I sing.","User2: Yes."\n',
        ["p.csv:header", "field 'context'", "missing column"],
    ),
    "csv-empty-persona": (
        "persobench-csv",
        "p.csv",
        (HEADER + GOOD_ROW + '"  ","User1: Hi","User2: Yes."\n').encode(),
        ["p.csv:row 2", "field 'personas'", "empty persona"],
    ),
    "csv-empty-context": (
        "persobench-csv",
        "p.csv",
        (HEADER + GOOD_ROW + GOOD_ROW + '"I sing.","","User2: Yes."\n').encode(),
        ["p.csv:row 3", "field 'context'", "empty context"],
    ),
    "csv-extra-field": (
        "persobench-csv",
        "p.csv",
        (HEADER + '"I sing.","User1: Hi","User2: Yes.","extra"\n').encode(),
        ["p.csv:row 1", "4 fields, header has 3"],
    ),
    "csv-not-utf8": (
        "persobench-csv",
        "p.csv",
        (HEADER + GOOD_ROW).encode() + b'"I caf\xe9.","User1: Hi","User2: Yes."\n',
        ["p.csv:line 5", "not valid UTF-8"],
    ),
    "focus-malformed": (
        "focus-json",
        "f.json",
        b'{"data": [\n {"dialogID": }\n]}',
        ["f.json:line 2", "malformed JSON"],
    ),
    "focus-missing-persona": (
        "focus-json",
        "f.json",
        json.dumps({"data": [{"dialogID": "x", "utterance": []}]}).encode(),
        ["f.json:data[0]", "field 'persona'", "missing"],
    ),
    "focus-missing-dialogue": (
        "focus-json",
        "f.json",
        json.dumps(
            {"data": [{"persona": ["I sing."], "utterance": [{"dialogue2": ["a", "b"]}]}]}
        ).encode(),
        ["f.json:data[0].utterance[0]", "field 'dialogue1'"],
    ),
    "personachat-bad-line": (
        "personachat",
        "pc.txt",
        b"1 your persona: i sing.\nhello there\n",
        ["pc.txt:line 2", "expected '<number> <text>'"],
    ),
    "personachat-no-reply": (
        "personachat",
        "pc.txt",
        b"1 your persona: i sing.\n2 hi there\n",
        ["pc.txt:line 2", "field 'reply'"],
    ),
    "personachat-no-persona": (
        "personachat",
        "pc.txt",
        b"1 hi\thello\t\ta|b\n",
        ["pc.txt:line 1", "field 'persona'"],
    ),
    "baidu-malformed": (
        "baidu-personachat",
        "b.json",
        b'{"conversation": [\n',
        ["b.json:line 1", "malformed JSON"],
    ),
    "baidu-no-persona": (
        "baidu-personachat",
        "b.json",
        json.dumps({"conversation": ["Usr: hi", "Bot: yo"]}).encode(),
        ["b.json:line 1", "field 'bot_persona'"],
    ),
    "jsonl-malformed": (
        "jsonl",
        "d.jsonl",
        (json.dumps(DIALOGUE) + "\n{not json}\n").encode(),
        ["d.jsonl:line 2", "malformed JSON"],
    ),
    "jsonl-empty-persona": (
        "jsonl",
        "d.jsonl",
        (
            json.dumps(DIALOGUE) + "\n" + json.dumps(DIALOGUE | {"id": "b", "persona": []}) + "\n"
        ).encode(),
        ["d.jsonl:line 2", "field 'persona'"],
    ),
    "jsonl-empty-context": (
        "jsonl",
        "d.jsonl",
        json.dumps(DIALOGUE | {"context": []}).encode(),
        ["d.jsonl:line 1", "field 'context'"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_no_output(cli, tmp_path: Path, case: str) -> None:
    fmt, name, content, expected = CASES[case]
    source = tmp_path / name
    source.write_bytes(content)
    out = tmp_path / "out" / "dialogues.jsonl"
    result = cli("data", "import", source, "--format", fmt, "-o", out)
    assert result.code == 2, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    for fragment in expected:
        assert fragment in lines[0]
    assert not out.exists()
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize(
    "fmt", ["persobench-csv", "focus-json", "personachat", "baidu-personachat", "jsonl"]
)
def test_missing_file(cli, tmp_path: Path, fmt: str) -> None:
    result = cli("data", "import", tmp_path / "nope.txt", "-f", fmt, "-o", tmp_path / "o.jsonl")
    assert result.code == 2
    assert result.err.strip() == f"error: {tmp_path / 'nope.txt'}: file does not exist"
    assert not (tmp_path / "o.jsonl").exists()


def test_usage_errors_exit_2(cli, tmp_path: Path) -> None:
    assert cli("data", "import", "--bogus").code == 2
    assert cli("data", "import", tmp_path, "-f", "nope", "-o", tmp_path / "o.jsonl").code == 2
    assert (
        cli("data", "import", tmp_path, "-f", "jsonl", "-o", "o.jsonl", "--opt", "novalue").code
        == 2
    )
