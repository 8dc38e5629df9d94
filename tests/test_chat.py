"""`persona-align chat`: persona files, the session's context, and piped stdin through the CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from persona_align.errors import InputError
from persona_align.generation import GenerationParams, make_responder, run_responder
from persona_align.inference.chat import ChatSession, load_persona
from persona_align.inference.engine import (
    Conversation,
    Engine,
    ReplyError,
    ReplyParams,
    load_engine,
    make_policy,
    split_persona,
)
from persona_align.prompting import extract_response
from persona_align.records import Dialogue, Message, Turn, write_records

PERSONA = ["I keep bees.", "I am afraid of the sea.", "I live in Lyon."]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Engine:
    return load_engine(str(tiny_llama_dir))


@pytest.fixture
def persona_file(tmp_path: Path) -> Path:
    path = tmp_path / "persona.txt"
    path.write_text("\n".join(PERSONA) + "\n\n", encoding="utf-8")
    return path


def hf_reply(model_dir: Path, context: list[Turn]) -> str:
    """The ``hf`` responder's greedy raw output for the PersoBench prompt of this dialogue."""
    dialogue = Dialogue(id="d", persona=PERSONA, context=context)
    responder = make_responder("hf", model=str(model_dir))
    return run_responder([dialogue], responder, GenerationParams(max_new_tokens=MAX_TOKENS))[0].raw


def test_persona_files(tmp_path: Path, persona_file: Path) -> None:
    assert load_persona(persona_file) == PERSONA
    one_line = tmp_path / "one-line.txt"
    one_line.write_text(" ".join(PERSONA), encoding="utf-8")
    assert load_persona(one_line) == PERSONA  # a single line is split into sentences
    dialogues = [
        Dialogue(
            id=f"d{i}", persona=[f"I am number {i}."], context=[Turn(speaker="User1", text="Hi")]
        )
        for i in range(3)
    ]
    records = tmp_path / "dialogues.jsonl"
    write_records(records, dialogues, Dialogue)
    assert load_persona(records) == ["I am number 0."]
    assert load_persona(records, "d2") == ["I am number 2."]
    single = tmp_path / "one.json"
    single.write_text(dialogues[1].model_dump_json(), encoding="utf-8")
    assert load_persona(single) == ["I am number 1."]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([d.model_dump() for d in dialogues]), encoding="utf-8")
    assert load_persona(listed, "d2") == ["I am number 2."]

    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    broken = tmp_path / "broken.json"
    broken.write_text('{"id": "x",\n "persona": [', encoding="utf-8")
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps([dialogues[0].model_dump(), {"id": "y", "persona": []}]))
    for path, dialogue_id, words in [
        (tmp_path / "missing.txt", None, "does not exist"),
        (tmp_path, None, "directory"),
        (empty, None, "no persona"),
        (broken, None, "malformed JSON"),
        (invalid, None, "item 2"),
        (records, "d9", "no dialogue with id 'd9'"),
        (persona_file, "d1", "needs a Dialogue file"),
    ]:
        with pytest.raises(InputError, match=words) as err:
            load_persona(path, dialogue_id)
        assert str(path) in str(err.value)


def test_system_messages_become_persona_and_turns_keep_their_roles() -> None:
    assert split_persona("I keep bees.\n\n  I live in Lyon. I sing.  \n") == [
        "I keep bees.",
        "I live in Lyon. I sing.",
    ]
    assert split_persona("I keep bees. I live in Lyon.") == ["I keep bees.", "I live in Lyon."]
    conversation = Conversation.from_messages(
        _messages(
            ("system", "I keep bees."),
            ("system", "I live in Lyon."),
            ("user", "Hi"),
            ("assistant", "Hello"),
        )
    )
    assert conversation.persona == ["I keep bees.", "I live in Lyon."]
    assert [(t.speaker, t.text) for t in conversation.context] == [
        ("User1", "Hi"),
        ("User2", "Hello"),
    ]
    assert [(m.role, m.content) for m in conversation.messages()] == [
        ("system", "I keep bees.\nI live in Lyon."),
        ("user", "Hi"),
        ("assistant", "Hello"),
    ]
    with pytest.raises(ReplyError, match="before the dialogue"):
        Conversation.from_messages(_messages(("user", "Hi"), ("system", "Be nice.")))


def _messages(*pairs: tuple[str, str]) -> list[Message]:
    return [Message(role=role, content=content) for role, content in pairs]  # type: ignore[arg-type]


def test_session_keeps_context_and_matches_the_hf_responder(
    engine: Engine, tiny_llama_dir: Path
) -> None:
    session = ChatSession(
        make_policy("persobench", engine), PERSONA, ReplyParams(max_tokens=MAX_TOKENS)
    )
    first = session.say("Hello, who are you?")
    assert first.raw == hf_reply(
        tiny_llama_dir, [Turn(speaker="User1", text="Hello, who are you?")]
    )
    second = session.say("Do you like boats?")
    expected_context = [Turn(speaker="User1", text="Hello, who are you?")]
    if first.content.strip():
        expected_context.append(Turn(speaker="User2", text=first.content))
    expected_context.append(Turn(speaker="User1", text="Do you like boats?"))
    assert second.raw == hf_reply(tiny_llama_dir, expected_context)
    assert second.prompt_tokens > first.prompt_tokens  # the first exchange is in the prompt
    assert session.context[: len(expected_context)] == expected_context
    session.reset()
    assert session.context == [] and session.persona == PERSONA
    assert session.say("Hello, who are you?").raw == first.raw


def test_session_drops_the_oldest_turns_when_the_context_overflows(engine: Engine) -> None:
    session = ChatSession(make_policy("raw", engine), PERSONA, ReplyParams(max_tokens=MAX_TOKENS))
    first = session.say("Tell me about your bees.")
    before = len(session.context)  # the message, and the reply unless it was blank
    saved = engine.max_context
    try:
        # room for one message and a few tokens more, not for an exchange and a message
        engine.max_context = first.prompt_tokens + MAX_TOKENS + 3
        reply = session.say("Tell me about your bees.")
        assert session.dropped_turns == before
        assert reply.prompt_tokens == first.prompt_tokens  # only the new turn is left
        engine.max_context = 10
        with pytest.raises(ReplyError, match="context"):
            session.say("This alone does not fit.")
    finally:
        engine.max_context = saved


def test_chat_cli_with_piped_stdin(
    cli, persona_file: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = persona_file.parent / "other.txt"
    other.write_text("I am a pirate.\n", encoding="utf-8")
    script = [
        "Hello, who are you?",
        "",
        "/persona",
        "/reset",
        "Do you like boats?",
        "/frobnicate",
        f"/persona {other}",
        "/help",
        "/quit",
        "never read",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(script) + "\n"))
    result = cli(
        "chat", tiny_llama_dir, "--persona", persona_file, "--max-tokens", MAX_TOKENS, "--json"
    )
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in result.out.strip().splitlines()]
    replies = [line for line in lines if "reply" in line]
    assert [r["user"] for r in replies] == ["Hello, who are you?", "Do you like boats?"]
    # after /reset the second message is answered without the first exchange
    assert replies[0]["raw"] == hf_reply(
        tiny_llama_dir, [Turn(speaker="User1", text="Hello, who are you?")]
    )
    assert replies[1]["raw"] == hf_reply(
        tiny_llama_dir, [Turn(speaker="User1", text="Do you like boats?")]
    )
    for reply in replies:
        extracted = extract_response(reply["raw"])
        assert reply["extracted"] is (extracted is not None)
        assert reply["reply"] == (reply["raw"] if extracted is None else extracted)
        assert 0 < reply["completion_tokens"] <= MAX_TOKENS
    personas = [line["persona"] for line in lines if "persona" in line and "event" not in line]
    assert personas == [PERSONA, ["I am a pirate."]]
    events = [line["event"] for line in lines if "event" in line]
    assert events.count("reset") == 1 and events.count("error") == 1 and events.count("help") == 4
    summary = lines[-1]
    assert summary["command"] == "chat" and summary["turns"] == 2
    assert summary["persona_sentences"] == 1 and summary["extracted"] == sum(
        bool(r["extracted"]) for r in replies
    )


def test_chat_cli_rejects_bad_input(cli, tmp_path: Path, persona_file: Path) -> None:
    result = cli("chat", tmp_path, "--persona", tmp_path / "nope.txt")
    assert result.code == 2 and "nope.txt" in result.err
    result = cli("chat", tmp_path, "--persona", persona_file, "--temperature", "3")
    assert result.code == 2 and "--temperature" in result.err
    result = cli("chat", tmp_path, "--persona", persona_file, "--prompt", "fancy")
    assert result.code == 2 and "--prompt" in result.err


def test_chat_through_a_real_pipe(persona_file: Path, tiny_llama_dir: Path, engine: Engine) -> None:
    """The installed entry point, stdin a pipe: plain replies on stdout, errors on stderr."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "persona_align.cli", "chat", str(tiny_llama_dir)]
    command += ["--persona", str(persona_file), "--max-tokens", str(MAX_TOKENS), "--prompt", "raw"]
    done = subprocess.run(
        command,
        input="Hi there!\n/nonsense\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    session = ChatSession(make_policy("raw", engine), PERSONA, ReplyParams(max_tokens=MAX_TOKENS))
    assert done.stdout == session.say("Hi there!").content + "\n"
    assert "unknown command /nonsense" in done.stderr
    assert "Traceback" not in done.stderr
