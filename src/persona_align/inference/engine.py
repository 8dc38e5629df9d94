"""The generation policy shared by ``serve`` and ``chat``: one model, pluggable reply policies.

A conversation (persona + turns) goes to a ``ReplyPolicy``, which decides what prompt the model
sees and what text comes back. ``persobench`` asks for PersoBench's ``{"response": ...}`` JSON
and returns the extracted reply; ``raw`` passes the chat straight through the chat template.
Another policy (PAL's Select-then-Generate) is one more ``@register_policy`` class; the server
and the chat loop only ever call ``policy.validate`` and ``policy.reply``.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from persona_align.data.text import split_sentences
from persona_align.errors import InputError
from persona_align.models import DTYPES, load_causal_lm
from persona_align.prompting import (
    DEFAULT_WORD_LIMIT,
    ExtractionMode,
    Variant,
    extract_response,
    persobench_messages,
    render_chat,
)
from persona_align.records import Dialogue, Message, Turn

# The speaker labels of the dataset readers: User1 talks to the model, User2 is the model.
USER_SPEAKER = "User1"
BOT_SPEAKER = "User2"
_ROLE_OF_SPEAKER = {USER_SPEAKER: "user", BOT_SPEAKER: "assistant"}

FinishReason = Literal["stop", "length"]
DEFAULT_MAX_TOKENS = 110  # PersoBench's generation budget


class ReplyError(Exception):
    """A conversation this policy cannot answer; the client's fault (HTTP 400), not the model's."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class Cancelled(Exception):
    """The reply was called off by its caller (``Watch.cancel``) before it was finished."""


@dataclass(frozen=True)
class ReplyParams:
    """Decoding settings of one reply; temperature 0 is greedy, as PersoBench decodes.
    ``max_prompt_tokens`` bounds the prompt a policy builds (None: the model's context)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    max_prompt_tokens: int | None = None


@dataclass(frozen=True)
class Watch:
    """A reply's caller as the engine sees it: told of the text as it is generated
    (``on_text``, called with each new piece on the thread that asked for the reply), and able
    to call the reply off (``cancel``: its client hung up), which frees its decoding slot at
    the next step."""

    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()

    def quiet(self) -> Watch:
        """The same cancellation without the text (for a pass whose text is not the reply)."""
        return Watch(None, self.cancelled)


@dataclass(frozen=True)
class Generation:
    """One model call: the decoded new text and what it cost."""

    raw: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class Reply:
    """What a policy answers. ``content`` is what the user sees; ``raw`` what the model wrote.

    ``extracted`` is None for policies that do not extract, else whether the model's output held
    a reply (when it did not, ``content`` is the raw output). Token counts add up every model
    call the policy made.
    """

    content: str
    raw: str
    extracted: bool | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    policy: str
    latency_s: float = 0.0


def split_persona(text: str) -> list[str]:
    """Persona sentences of a system message or file: one per line, or split if on one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return split_sentences(lines[0])
    return lines


@dataclass(frozen=True)
class Conversation:
    """A persona and the turns so far; ``system`` keeps the system message exactly as sent.

    Turns use the readers' speakers: ``User1`` is the user, ``User2`` the model.
    """

    persona: list[str]
    context: list[Turn]
    system: str | None = None

    @classmethod
    def from_messages(cls, messages: Sequence[Message]) -> Conversation:
        """System messages (at the start only) give the persona; the rest become turns."""
        systems: list[str] = []
        context: list[Turn] = []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if message.role == "system":
                if context:
                    raise ReplyError(
                        f"{where}: system messages must come before the dialogue",
                        param=f"{where}.role",
                    )
                systems.append(message.content)
                continue
            if not message.content.strip():
                raise ReplyError(f"{where}: content is empty", param=f"{where}.content")
            speaker = USER_SPEAKER if message.role == "user" else BOT_SPEAKER
            context.append(Turn(speaker=speaker, text=message.content))
        system = "\n".join(systems) if systems else None
        return cls(persona=split_persona(system or ""), context=context, system=system)

    def messages(self) -> list[Message]:
        """The chat as messages: the system message as sent (else the persona, one per line)."""
        system = self.system if self.system is not None else "\n".join(self.persona)
        head = [Message(role="system", content=system)] if system else []
        return head + [
            Message(role=_ROLE_OF_SPEAKER[t.speaker], content=t.text)  # type: ignore[arg-type]
            for t in self.context
        ]


class Engine:
    """A causal LM and its tokenizer; every reply is generated on one model thread
    (``inference.scheduler``), where up to ``batch_size`` greedy replies decode together.

    The decoding matches ``HFResponder`` for a single prompt (same chat template, no special
    tokens added, cut after the first end-of-sequence token), so a served model answers a
    PersoBench prompt exactly as ``generate`` would, however many requests share its steps.
    Greedy requests go through decoding slots that check looked-up guesses
    (``generation.slots``); sampled ones through ``model.generate``.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = 8) -> None:
        from persona_align.inference.scheduler import Scheduler  # torch: not at CLI start-up

        if not getattr(tokenizer, "chat_template", None):
            raise InputError(None, f"model {name!r} has no chat template; it needs a chat model")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.max_context: int | None = getattr(model.config, "max_position_embeddings", None)
        self.scheduler = Scheduler(model, self._eos_ids, tokenizer.pad_token_id, batch_size)

    def stats(self) -> dict[str, int]:
        """Replies decoding now, and the model thread's counts (``Scheduler.stats``)."""
        return {"rows": self.scheduler.rows, **self.scheduler.stats}

    def close(self) -> None:
        """Let the replies asked for finish, then end the model thread."""
        self.scheduler.close()

    def generate(
        self, messages: Sequence[Message], params: ReplyParams, watch: Watch | None = None
    ) -> Generation:
        """Answer one chat. ReplyError when the prompt cannot fit (code
        context_length_exceeded) or is over ``params.max_prompt_tokens`` (prompt_too_long);
        Cancelled when ``watch`` calls the reply off."""
        from persona_align.generation import slots
        from persona_align.inference.scheduler import Job

        text = render_chat(self.tokenizer, messages)
        prompt = self.tokenizer(text, add_special_tokens=False).input_ids
        prompt_tokens = len(prompt)
        if self.max_context is not None and prompt_tokens + params.max_tokens > self.max_context:
            raise ReplyError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {params.max_tokens}; "
                f"the model's context holds {self.max_context}",
                param="messages",
                code="context_length_exceeded",
            )
        if params.max_prompt_tokens is not None and prompt_tokens > params.max_prompt_tokens:
            raise ReplyError(
                f"the prompt has {prompt_tokens} tokens; this server takes prompts of at most "
                f"{params.max_prompt_tokens}",
                param="messages",
                code="prompt_too_long",
            )
        watch = watch or Watch()
        sampling: dict[str, Any] | None = None  # greedy, in a decoding slot
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        elif not slots.supported(self.model, prompt_tokens + params.max_tokens):
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        job = Job(prompt, params.max_tokens, watch.cancelled, sampling, params.seed)
        self.scheduler.submit(job)
        tokens: list[int] = []
        shown = ""  # the text passed to watch.on_text so far
        try:
            for new in job.tokens():
                tokens += new
                if watch.on_text is not None:
                    shown = self._show(tokens, shown, watch.on_text)
        except BaseException:
            watch.cancel()  # the caller is gone (Cancelled) or failing: free the slot
            raise
        stop = next((k + 1 for k, t in enumerate(tokens) if t in self._eos_ids), None)
        completion = stop if stop is not None else len(tokens)
        finish: FinishReason = (
            "length" if stop is None and completion >= params.max_tokens else "stop"
        )
        raw = self.tokenizer.decode(tokens[:completion], skip_special_tokens=True)
        if watch.on_text is not None and raw.startswith(shown) and raw != shown:
            watch.on_text(raw[len(shown) :])
        return Generation(
            raw=raw,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            finish_reason=finish,
        )

    def _show(self, tokens: list[int], shown: str, on_text: Callable[[str], None]) -> str:
        """Pass on the text ``tokens`` add to ``shown``; a piece that may still change (a
        character whose bytes are not all there yet) waits for the next tokens."""
        stop = next((k + 1 for k, t in enumerate(tokens) if t in self._eos_ids), len(tokens))
        text = self.tokenizer.decode(tokens[:stop], skip_special_tokens=True)
        if len(text) > len(shown) and text.startswith(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown) :])
            return text
        return shown


def load_engine(name: str, dtype: str = "auto", batch_size: int = 8) -> Engine:
    """``embedded``, a checkpoint folder, a hub id, or a PEFT adapter folder (merged into its
    base by ``models.load_causal_lm``; its own tokenizer when one is saved beside it);
    ``batch_size`` greedy replies decode together."""
    if dtype not in DTYPES:
        raise InputError(None, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = Path(name).expanduser()
    if path.is_dir() and not any(
        (path / f).is_file() for f in ("config.json", "adapter_config.json")
    ):
        raise InputError(path, "not a model folder: no config.json or adapter_config.json")
    model, tokenizer = load_causal_lm(name, dtype)
    return Engine(model, tokenizer, name, batch_size)


def served_name(name: str) -> str:
    """The model id clients ask for: the folder's name, or the name as given."""
    path = Path(name).expanduser()
    return path.resolve().name if path.is_dir() else name


# --- policies ------------------------------------------------------------------------------


class ReplyPolicy(ABC):
    """Turns a conversation into a reply with one engine; must not keep per-request state."""

    name: ClassVar[str]

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def validate(self, conversation: Conversation) -> None:  # noqa: B027 - optional check
        """Refuse (ReplyError) a conversation this policy cannot answer, before it is queued."""

    @abstractmethod
    def reply(
        self, conversation: Conversation, params: ReplyParams, watch: Watch | None = None
    ) -> Reply:
        """The reply; the text passed to ``watch.on_text`` (if any) is a prefix of its
        ``content``, so a streaming caller sends the rest once it has the reply."""


PolicyFactory = Callable[..., ReplyPolicy]
POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def wrap(factory: PolicyFactory) -> PolicyFactory:
        if name in POLICIES:
            raise ValueError(f"reply policy {name!r} registered twice")
        POLICIES[name] = factory
        return factory

    return wrap


def make_policy(name: str, engine: Engine, **options: Any) -> ReplyPolicy:
    factory = POLICIES.get(name)
    if factory is None:
        raise InputError(None, f"unknown prompt policy {name!r}; known: {', '.join(POLICIES)}")
    return factory(engine, **options)


@register_policy("persobench")
class PersoBenchPolicy(ReplyPolicy):
    """The PersoBench prompt over a Dialogue built from the conversation; returns its "response".

    When no reply can be extracted the raw output is returned, with ``extracted`` False.
    """

    name = "persobench"

    def __init__(
        self,
        engine: Engine,
        variant: Variant = "vanilla",
        word_limit: int = DEFAULT_WORD_LIMIT,
        extraction: ExtractionMode = "lenient",
    ) -> None:
        super().__init__(engine)
        self.variant: Variant = variant
        self.word_limit = word_limit
        self.extraction: ExtractionMode = extraction

    def validate(self, conversation: Conversation) -> None:
        if not conversation.persona:
            raise ReplyError(
                "the persobench prompt needs a persona: send it as the system message, "
                "one sentence per line (or use a server started with --prompt raw)",
                param="messages",
            )
        if not conversation.context or conversation.context[-1].speaker != USER_SPEAKER:
            raise ReplyError(
                "the persobench prompt answers the user: the last message must be the user's",
                param="messages",
            )

    def dialogue(self, conversation: Conversation) -> Dialogue:
        self.validate(conversation)
        return Dialogue(id="chat", persona=conversation.persona, context=conversation.context)

    def reply(
        self, conversation: Conversation, params: ReplyParams, watch: Watch | None = None
    ) -> Reply:
        messages = persobench_messages(self.dialogue(conversation), self.variant, self.word_limit)
        began = time.perf_counter()
        # the content is extracted from the whole output: no text to pass on before it
        out = self.engine.generate(messages, params, watch.quiet() if watch else None)
        response = extract_response(out.raw, self.extraction)
        return Reply(
            content=out.raw if response is None else response,
            raw=out.raw,
            extracted=response is not None,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            finish_reason=out.finish_reason,
            policy=self.name,
            latency_s=time.perf_counter() - began,
        )


@register_policy("raw")
class RawPolicy(ReplyPolicy):
    """The messages as they are, through the model's chat template; the output as it is."""

    name = "raw"

    def reply(
        self, conversation: Conversation, params: ReplyParams, watch: Watch | None = None
    ) -> Reply:
        began = time.perf_counter()
        out = self.engine.generate(conversation.messages(), params, watch)
        return Reply(
            content=out.raw,
            raw=out.raw,
            extracted=None,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            finish_reason=out.finish_reason,
            policy=self.name,
            latency_s=time.perf_counter() - began,
        )
