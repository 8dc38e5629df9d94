"""A terminal chat with a model in character: the persona from a file, replies from a policy.

Reads lines from a terminal (a rich prompt) or from piped stdin (one message per line, replies
printed one per message), so a conversation can be scripted. ``/reset`` clears the dialogue,
``/persona`` shows the persona (``/persona FILE`` loads another), ``/quit`` ends.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from persona_align.data.text import read_text
from persona_align.errors import InputError
from persona_align.inference.engine import (
    BOT_SPEAKER,
    USER_SPEAKER,
    Conversation,
    Reply,
    ReplyError,
    ReplyParams,
    ReplyPolicy,
    split_persona,
)
from persona_align.records import Dialogue, Turn, read_records, validate_record

COMMANDS = {
    "/reset": "forget the dialogue so far (the persona stays)",
    "/persona": "show the persona; /persona FILE loads another and resets",
    "/help": "list the commands",
    "/quit": "end the chat (also /exit, Ctrl-D)",
}


def _pick(dialogues: list[Dialogue], path: Path, dialogue_id: str | None) -> list[str]:
    if not dialogues:
        raise InputError(path, "no dialogues")
    if dialogue_id is None:
        return list(dialogues[0].persona)
    for dialogue in dialogues:
        if dialogue.id == dialogue_id:
            return list(dialogue.persona)
    raise InputError(path, f"no dialogue with id {dialogue_id!r}", field="id")


def load_persona(path: str | Path, dialogue_id: str | None = None) -> list[str]:
    """Persona sentences from a text file (one per line), or from Dialogue JSONL/Parquet/JSON.

    A record file gives the persona of dialogue ``dialogue_id`` (default: the first one); a
    ``.json`` file holds one Dialogue object or a list of them.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            path, "is a directory, expected a file" if path.is_dir() else "file does not exist"
        )
    suffix = path.suffix.lower()
    if suffix in {".jsonl", ".parquet", ".pq"}:
        return _pick(read_records(path, Dialogue), path, dialogue_id)
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise InputError(
                path, f"malformed JSON: {err.msg}", where=f"line {err.lineno}"
            ) from None
        items = data if isinstance(data, list) else [data]
        dialogues = [
            validate_record(Dialogue, item, path, f"item {index}")
            for index, item in enumerate(items, start=1)
        ]
        return _pick(dialogues, path, dialogue_id)
    if dialogue_id is not None:
        raise InputError(path, "a dialogue id needs a Dialogue file (.jsonl, .json, .parquet)")
    persona = split_persona(read_text(path))
    if not persona:
        raise InputError(path, "no persona sentences (the file is empty)")
    return persona


class ChatSession:
    """The persona and the turns so far; when the context overflows, the oldest turns go."""

    def __init__(self, policy: ReplyPolicy, persona: list[str], params: ReplyParams) -> None:
        self.policy = policy
        self.persona = persona
        self.params = params
        self.context: list[Turn] = []
        self.dropped_turns = 0

    def reset(self, persona: list[str] | None = None) -> None:
        if persona is not None:
            self.persona = persona
        self.context = []

    def say(self, text: str) -> Reply:
        """The model's reply to ``text``; both join the context (an empty reply does not)."""
        turn = Turn(speaker=USER_SPEAKER, text=text)
        while True:
            conversation = Conversation(persona=self.persona, context=[*self.context, turn])
            try:
                reply = self.policy.reply(conversation, self.params)
                break
            except ReplyError as err:
                if err.code != "context_length_exceeded" or not self.context:
                    raise
                drop = min(2, len(self.context))  # one exchange, oldest first
                self.context = self.context[drop:]
                self.dropped_turns += drop
        self.context.append(turn)
        if reply.content.strip():
            self.context.append(Turn(speaker=BOT_SPEAKER, text=reply.content))
        return reply


ReadLine = Callable[[], str | None]


class ChatLoop:
    """Reads messages and commands, prints replies; ``as_json`` prints one JSON object each."""

    def __init__(
        self,
        session: ChatSession,
        console: Console,
        *,
        interactive: bool,
        as_json: bool = False,
    ) -> None:
        self.session = session
        self.console = console
        self.interactive = interactive
        self.as_json = as_json
        self.turns = 0
        self.extracted = 0

    def run(self, read_line: ReadLine) -> dict[str, Any]:
        """Chat until /quit or end of input; returns the summary."""
        if self.interactive:
            self._show_persona()
            self.console.print("[dim]Type a message; /help lists the commands.[/]")
        while True:
            line = read_line()
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self._command(line):
                    break
                continue
            self._answer(line)
        return {
            "turns": self.turns,
            "extracted": self.extracted if self.session.policy.name == "persobench" else None,
            "dropped_turns": self.session.dropped_turns,
            "persona_sentences": len(self.session.persona),
        }

    def _answer(self, text: str) -> None:
        try:
            if self.interactive:
                with self.console.status("thinking..."):
                    reply = self.session.say(text)
            else:
                reply = self.session.say(text)
        except ReplyError as err:
            self._notice("error", err.message)
            return
        self.turns += 1
        self.extracted += bool(reply.extracted)
        if self.as_json:
            self._json(
                {
                    "user": text,
                    "reply": reply.content,
                    "extracted": reply.extracted,
                    "raw": reply.raw,
                    "finish_reason": reply.finish_reason,
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                }
            )
        elif self.interactive:
            self.console.print(Text.assemble(("bot ", "bold green"), reply.content))
            if reply.extracted is False:
                self.console.print("[dim](no JSON reply could be extracted: raw model output)[/]")
        else:
            print(reply.content, flush=True)

    def _command(self, line: str) -> bool:
        """Run one /command; False ends the chat."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in {"/quit", "/exit"}:
            return False
        if name == "/reset":
            self.session.reset()
            self._notice("reset", "(the dialogue is cleared; the persona stays)")
        elif name == "/persona" and argument:
            try:
                persona = load_persona(Path(argument).expanduser())
            except InputError as err:
                self._notice("error", str(err))
                return True
            self.session.reset(persona)
            self._notice("persona", f"(persona loaded from {argument}; the dialogue is cleared)")
            self._show_persona()
        elif name == "/persona":
            self._show_persona()
        elif name == "/help":
            for command, help_text in COMMANDS.items():
                self._notice("help", f"{command:10} {help_text}")
        else:
            self._notice("error", f"unknown command {name}; try {', '.join(COMMANDS)}")
        return True

    def _show_persona(self) -> None:
        if self.as_json:
            self._json({"persona": self.session.persona})
            return
        self._notice("persona", "persona:")
        for sentence in self.session.persona:
            self._notice("persona", f"  - {sentence}")

    def _notice(self, event: str, message: str) -> None:
        if self.as_json:
            self._json({"event": event, "message": message})
        elif self.interactive:
            self.console.print(message, style="dim", markup=False, highlight=False)
        else:  # piped: stdout carries replies and what was asked for, errors go to stderr
            print(message, file=sys.stderr if event == "error" else sys.stdout, flush=True)

    @staticmethod
    def _json(obj: dict[str, Any]) -> None:
        print(json.dumps(obj, ensure_ascii=False), flush=True)
