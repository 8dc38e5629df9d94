import csv
import json
from pathlib import Path
from typing import Any

import pytest

from persona_align.errors import InputError
from persona_align.generation import (
    GenerationCache,
    GenerationParams,
    make_responder,
    run_responder,
)
from persona_align.generation.base import OnResult, Request, Responder, Result
from persona_align.records import Candidate, Dialogue, read_records

DIALOGUES = [
    Dialogue(
        id=f"d{i}",
        persona=["I keep bees.", "I live by the sea."],
        context=[{"speaker": "User1", "text": "Tell me about yourself" + " please" * i}],
    )
    for i in range(7)
]


class Scripted(Responder):
    """Answers from a script and counts the calls it receives."""

    kind = "scripted"

    def __init__(self, fail: set[str] = frozenset(), tag: str = "v1") -> None:
        super().__init__("scripted")
        self.fail, self.tag, self.calls = fail, tag, []

    def settings(self) -> dict[str, Any]:
        return {"kind": self.kind, "tag": self.tag}

    def generate(
        self, requests: list[Request], params: GenerationParams, on_result: OnResult
    ) -> None:
        for request in requests:
            self.calls.append(request.dialogue.id)
            if request.dialogue.id in self.fail:
                on_result(request, Result(error="APIConnectionError"))
            elif request.dialogue.id == "d1":
                on_result(request, Result(raw="not json at all", latency_s=0.1))
            else:
                on_result(
                    request,
                    Result(
                        raw=json.dumps({"response": f"hi {request.dialogue.id}"}), latency_s=0.1
                    ),
                )


def test_runner_resumes_from_cache(tmp_path: Path) -> None:
    params = GenerationParams()
    with GenerationCache(tmp_path / "cache.sqlite") as cache:
        first = Scripted(fail={"d3"})
        out = run_responder(DIALOGUES, first, params, cache)
        assert [c.dialogue_id for c in out] == [d.id for d in DIALOGUES]
        assert first.calls == [d.id for d in DIALOGUES]
        assert out[1].valid is False and out[1].raw == "not json at all" and out[1].error is None
        assert out[3].valid is False and out[3].error == "APIConnectionError"
        assert out[0].response == "hi d0" and out[0].latency_s == 0.1
        assert len(cache) == 6  # the failed call is not cached

        second = Scripted()
        again = run_responder(DIALOGUES, second, params, cache)
        assert second.calls == ["d3"]  # only what was missing
        assert again[3].response == "hi d3"
        assert [c.model_dump() for c in again if c.dialogue_id != "d3"] == [
            c.model_dump() for c in out if c.dialogue_id != "d3"
        ]

        third = Scripted()
        run_responder(DIALOGUES, third, params, cache, refresh=True)
        assert len(third.calls) == 7
        changed = Scripted(tag="v2")  # other settings, other keys
        run_responder(DIALOGUES, changed, params, cache)
        assert len(changed.calls) == 7
        other_params = Scripted()
        run_responder(DIALOGUES, other_params, GenerationParams(max_new_tokens=50), cache)
        assert len(other_params.calls) == 7
        strict = Scripted()
        run_responder(DIALOGUES, strict, GenerationParams(extraction="strict"), cache)
        assert strict.calls == []  # extraction reads the output differently, it does not change it


def test_duplicate_prompts_are_generated_once(tmp_path: Path) -> None:
    twins = [DIALOGUES[0], DIALOGUES[0].model_copy(update={"id": "twin"})]
    responder = Scripted()
    with GenerationCache(tmp_path / "c.sqlite") as cache:
        out = run_responder(twins, responder, GenerationParams(), cache)
    assert len(responder.calls) == 1
    assert [c.dialogue_id for c in out] == ["d0", "twin"] and out[0].raw == out[1].raw


def test_hf_batched_equals_one_by_one(tiny_llama_dir: Path) -> None:
    params = GenerationParams(max_new_tokens=12)
    single = run_responder(
        DIALOGUES, make_responder("hf", model=str(tiny_llama_dir), batch_size=1), params
    )
    batched = run_responder(
        DIALOGUES, make_responder("hf", model=str(tiny_llama_dir), batch_size=4), params
    )
    unguessed = make_responder("hf", model=str(tiny_llama_dir), batch_size=4, guesses=0)
    assert unguessed.settings() == make_responder("hf", model=str(tiny_llama_dir)).settings()
    plain = run_responder(DIALOGUES, unguessed, params)
    assert [c.raw for c in single] == [c.raw for c in batched] == [c.raw for c in plain]
    assert all(c.raw for c in single)
    assert all(c.latency_s is not None and c.latency_s > 0 for c in batched)
    assert {c.responder for c in batched} == {tiny_llama_dir.name}


def test_hf_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dtype"):
        make_responder("hf", model="embedded", dtype="int3")
    with pytest.raises(InputError, match="guesses"):
        make_responder("hf", model="embedded", guesses=-1)
    with pytest.raises(InputError, match="neither a directory nor a hub id"):
        make_responder("hf", model=str(tmp_path / "missing" / "model"))
    with pytest.raises(InputError, match="unknown responder 'nope'"):
        make_responder("nope")
    with pytest.raises(InputError, match="unexpected keyword"):
        make_responder("hf", modle="embedded")


def test_import_responder(tmp_path: Path) -> None:
    path = tmp_path / "Extracted.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["gen_response", "response_time"])
        writer.writerows([[f"reply {i}" if i % 2 else "", str(i)] for i in range(len(DIALOGUES))])
    responder = make_responder("import", path=str(path), extraction="none")
    out = run_responder(DIALOGUES, responder, GenerationParams(), None)
    assert [c.valid for c in out] == [i % 2 == 1 for i in range(7)]
    assert (
        out[1].response == "reply 1" and out[1].latency_s == 1.0 and out[1].responder == "Extracted"
    )
    short = tmp_path / "short.csv"
    short.write_text("gen_response\nx\n", encoding="utf-8")
    with pytest.raises(InputError, match="1 response rows for 7 dialogues"):
        run_responder(
            DIALOGUES, make_responder("import", path=str(short)), GenerationParams(), None
        )


def write_dialogues(path: Path) -> Path:
    path.write_text("".join(d.model_dump_json() + "\n" for d in DIALOGUES), encoding="utf-8")
    return path


def test_cli_generate_hf_and_resume(cli, tmp_path: Path, tiny_llama_dir: Path) -> None:
    dialogues = write_dialogues(tmp_path / "d.jsonl")
    out = tmp_path / "cands.jsonl"
    args = [
        "generate",
        "-r",
        f"hf:{tiny_llama_dir}",
        "-d",
        dialogues,
        "-o",
        out,
        "--cache",
        tmp_path / "c.sqlite",
    ]
    first = cli(*args, "--max-new-tokens", "8", "--json")
    assert first.code == 0, first.err
    assert first.summary["responders"][tiny_llama_dir.name]["candidates"] == 7
    records = read_records(out, Candidate)
    assert sorted(c.dialogue_id for c in records) == sorted(d.id for d in DIALOGUES)
    mtime = (tmp_path / "c.sqlite").stat().st_mtime_ns
    again = cli(*args, "--max-new-tokens", "8", "--json")
    assert again.code == 0
    assert read_records(out, Candidate) == records
    assert (tmp_path / "c.sqlite").stat().st_mtime_ns == mtime  # nothing new was generated


def test_cli_generate_warns_when_imported_replies_all_fail_extraction(cli, tmp_path: Path) -> None:
    dialogues = write_dialogues(tmp_path / "d.jsonl")
    extracted = tmp_path / "extracted.csv"
    extracted.write_text("gen_response\n" + "".join(f"reply {i}\n" for i in range(7)))
    args = ["generate", "-r", f"import:{extracted}", "-d", dialogues, "-o", tmp_path / "c.jsonl",
            "--no-cache", "--json"]  # fmt: skip
    lenient = cli(*args)
    assert lenient.code == 0, lenient.err
    (warning,) = [line for line in lenient.err.splitlines() if line.startswith("warning:")]
    assert "extracted: 7 of 7 replies (100%)" in warning and "--import-extraction none" in warning
    as_extracted = cli(*args, "--import-extraction", "none")
    assert as_extracted.summary["responders"]["extracted"]["valid"] == 7
    assert "warning:" not in as_extracted.err


def test_cli_generate_config_and_errors(cli, tmp_path: Path, tiny_llama_dir: Path) -> None:
    write_dialogues(tmp_path / "d.jsonl")
    config = tmp_path / "pipeline.yaml"
    config.write_text(
        "generate:\n  dialogues: d.jsonl\n  output: out/c.jsonl\n  use_cache: false\n"
        f"  params: {{max_new_tokens: 4}}\n  responders:\n    - kind: hf\n      model: {tiny_llama_dir}\n"
        "      batch_size: 3\n",
        encoding="utf-8",
    )
    result = cli("generate", "--config", config, "--json")
    assert result.code == 0, result.err
    assert len(read_records(tmp_path / "out" / "c.jsonl", Candidate)) == 7

    config.write_text(
        "generate:\n  dialogues: d.jsonl\n  output: o.jsonl\n  responder: []\n", encoding="utf-8"
    )
    bad = cli("generate", "--config", config)
    assert bad.code == 2 and "responder" in bad.err
    assert (
        cli("generate", "-r", "gpt4", "-d", tmp_path / "d.jsonl", "-o", tmp_path / "x.jsonl").code
        == 2
    )
    assert (
        cli(
            "generate",
            "-r",
            "hf:/no/such/dir/x",
            "-d",
            tmp_path / "d.jsonl",
            "-o",
            tmp_path / "x.jsonl",
        ).code
        == 2
    )
    missing_key = cli(
        "generate",
        "-r",
        "openai:gpt-4o-mini",
        "--api-key-env",
        "PA_TEST_NO_SUCH_KEY",
        "-d",
        tmp_path / "d.jsonl",
        "-o",
        tmp_path / "x.jsonl",
    )
    assert missing_key.code == 2 and "PA_TEST_NO_SUCH_KEY" in missing_key.err
    assert not (tmp_path / "x.jsonl").exists()
