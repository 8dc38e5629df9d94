"""Every command x every kind of bad path or config: exit 2, one line, nothing written anywhere.

The kinds: an output that is a folder (or, for folder outputs, a file), an output below a
regular file, an output in a folder no one may write in (root included), an input that is a
folder, missing or empty, a cache that is a folder, and a wrong-typed config value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from persona_align.cli.run_config import sample_path
from persona_align.data import read_dialogues
from persona_align.records import (
    Candidate,
    Dialogue,
    Message,
    PreferencePair,
    ScoredCandidate,
    SFTExample,
    write_records,
)
from persona_align.testing.fake_server import FakeOpenAIServer


@dataclass
class Paths:
    """Good inputs in ``root``; a case replaces one of them, or the output, with a bad path."""

    root: Path
    dialogues: Path
    responses: Path
    candidates: Path
    scored: Path
    pairs: Path
    sft: Path


def good_inputs(root: Path) -> Paths:
    dialogues = read_dialogues("jsonl", sample_path("valid"))[:3]
    reply = '{"response": "I sing in a choir."}'
    candidates = [
        Candidate(dialogue_id=d.id, responder="bot", raw=reply, response="I sing in a choir.",
                  valid=True, latency_s=0.1)
        for d in dialogues
    ]  # fmt: skip
    prompt = [Message(role="user", content="Hi")]
    paths = Paths(
        root, *(root / f"{n}.jsonl" for n in ("dialogues", "responses", "candidates", "scored",
                                              "pairs", "sft"))
    )  # fmt: skip
    write_records(paths.dialogues, dialogues, Dialogue)
    paths.responses.write_text(
        "".join(json.dumps({"dialogue_id": d.id, "raw": reply}) + "\n" for d in dialogues)
    )
    write_records(paths.candidates, candidates, Candidate)
    write_records(
        paths.scored,
        [ScoredCandidate(**c.model_dump(), scores={"lfc": 1.0}) for c in candidates],
        ScoredCandidate,
    )
    write_records(
        paths.pairs,
        [PreferencePair(dialogue_id=d.id, prompt=prompt, chosen=[Message(role="assistant",
         content="a")], rejected=[Message(role="assistant", content="b")], score_chosen=1.0,
         score_rejected=0.0, rule="quantile") for d in dialogues],
        PreferencePair,
    )  # fmt: skip
    write_records(
        paths.sft,
        [SFTExample(dialogue_id=d.id, prompt=prompt,
                    completion=[Message(role="assistant", content="a")], task="sft")
         for d in dialogues],
        SFTExample,
    )  # fmt: skip
    return paths


def config(p: Paths, data: dict) -> str:
    path = p.root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# A command's arguments: a template over the good inputs' names, ``{input}`` (the good input
# unless the case replaces it) and ``{output}``, or a function of (paths, output, input,
# bad_type) that writes a config first (with a wrong-typed value when ``bad_type``).
Build = Callable[[Paths, Path, Path, bool], list[str]]


@dataclass
class Command:
    build: str | Build
    output: str | None  # "file", "folder" or None (the command writes nothing)
    default_output: str = "out.jsonl"
    input: str = "dialogues"  # which good input the input kinds replace
    cache: bool = False
    config: bool = False

    def args(self, p: Paths, out: Path, inp: Path, bad_type: bool) -> list[str]:
        if callable(self.build):
            return self.build(p, out, inp, bad_type)
        names = {f: getattr(p, f) for f in ("root", "dialogues", "responses")}
        return self.build.format(input=inp, output=out, **names).split()


def _generate_config(p: Paths, out: Path, inp: Path, bad: bool) -> list[str]:
    responder = {"kind": "openai", "model": "m", "timeout": "soon"} if bad else {
        "kind": "import", "path": str(p.responses)}  # fmt: skip
    section = {"dialogues": str(inp), "output": str(out), "responders": [responder]}
    return ["generate", "--config", config(p, {"generate": section})]


def _run(p: Paths, out: Path, inp: Path, bad: bool) -> list[str]:
    data = {"train": str(inp), "limit": "many" if bad else 2}
    return ["run", config(p, {"name": "x", "output_dir": str(out), "data": data})]


def _method(name: str) -> Build:
    def build(p: Paths, out: Path, inp: Path, bad: bool) -> list[str]:
        section = {"dialogues": str(inp), "output_dir": str(out),
                   "max_dialogues": "some" if bad else 2}  # fmt: skip
        return ["train", name, "--config", config(p, {name: section})]

    return build


COMMANDS: dict[str, Command] = {
    "data import": Command("data import {input} -f jsonl -o {output}", "file"),
    "data import-responses": Command(
        "data import-responses {input} -d {dialogues} -o {output}", "file", input="responses"
    ),
    "data stats": Command("data stats {input}", None),
    "data validate": Command("data validate {input}", None),
    "generate": Command(
        "generate -r import:{responses} -d {input} -o {output} --cache {root}/gen.sqlite",
        "file",
        cache=True,
    ),
    "generate --config": Command(_generate_config, "file", config=True),
    "score": Command(
        "score -d {dialogues} -c {input} -o {output} --cache {root}/scores.sqlite",
        "file",
        input="candidates",
        cache=True,
    ),
    "pairs": Command(
        "pairs -s {input} -d {dialogues} -o {output} --weights lfc=1", "file", input="scored"
    ),
    "pairs stats": Command("pairs stats {input}", None, input="pairs"),
    "bench": Command(
        "bench -d {dialogues} -s {input} -o {output} --metrics lfc --cache {root}/scores.sqlite",
        "folder",
        "report",
        input="candidates",
        cache=True,
    ),
    "run": Command(_run, "folder", "run", config=True),
    "train dpo": Command("train dpo --data {input} -o {output}", "folder", "trained", "pairs"),
    "train sft": Command("train sft --data {input} -o {output}", "folder", "trained", "sft"),
    "train pal": Command(_method("pal"), "folder", "pal-run", config=True),
    "train sbs": Command(_method("sbs"), "folder", "sbs-run", config=True),
    "nli eval": Command("nli eval --data {input}", None),
}


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name, command in COMMANDS.items():
        kinds = ["input-is-dir", "input-missing", "input-empty"]
        if command.output is not None:
            kinds += ["output-is-dir" if command.output == "file" else "output-is-file",
                      "output-under-file", "output-read-only"]  # fmt: skip
        if command.cache:
            kinds.append("cache-is-dir")
        if command.config:
            kinds += ["config-bad-type", "config-is-dir"]
        cases += [(name, kind) for kind in kinds]
    return cases


def _snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path below ``root``: (size, mtime) of files, None for folders."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        if path.is_file() else None
        for path in root.rglob("*")
    }  # fmt: skip


@pytest.mark.parametrize(("name", "kind"), _cases(), ids=[f"{n}:{k}" for n, k in _cases()])
def test_bad_path_exits_2_in_one_line_and_writes_nothing(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
    name: str, kind: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("PERSONA_ALIGN_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.chdir(tmp_path)
    command = COMMANDS[name]
    p = good_inputs(tmp_path)
    out = tmp_path / command.default_output
    inp = getattr(p, command.input)
    if kind == "input-is-dir":
        inp = tmp_path / "a-folder"
        inp.mkdir()
    elif kind == "input-missing":
        inp = tmp_path / "missing.jsonl"
    elif kind == "input-empty":
        inp = tmp_path / "empty.jsonl"
        inp.write_text("")
    elif kind == "output-is-dir":
        out.mkdir()
    elif kind == "output-is-file":
        out.write_text("a file where a folder should go\n")
    elif kind == "output-under-file":
        out = p.dialogues / "out"
    elif kind == "output-read-only":
        out = request.getfixturevalue("read_only_dir") / "sub" / "out"
    args = command.args(p, out, inp, kind == "config-bad-type")
    if kind == "cache-is-dir":
        Path(args[args.index("--cache") + 1]).mkdir()
    if kind == "config-is-dir":
        config_file = Path(next(a for a in args if a.endswith("config.yaml")))
        config_file.unlink()
        config_file.mkdir()
    before = _snapshot(tmp_path)
    result = cli(*args)
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err
    assert _snapshot(tmp_path) == before  # no output, no temporary file, no cache, no folder


def test_output_is_checked_before_any_call(cli, tmp_path: Path, read_only_dir: Path) -> None:
    """``generate`` finds an output it cannot write before its first model call, not after."""
    with FakeOpenAIServer() as server:
        out = read_only_dir / "candidates.jsonl"
        result = cli("generate", "-r", f"openai:fake-model@{server.base_url}", "-d",
                     sample_path("valid"), "-o", out, "--cache", tmp_path / "g.sqlite")  # fmt: skip
        assert result.code == 2 and server.calls == 0
    assert result.err.startswith(f"error: {out}: cannot be written")
