"""``persona-align serve`` and ``persona-align chat``: a trained (or base) model in character.

Both load the model once (a checkpoint folder, a PEFT adapter folder merged into its base,
``embedded`` or a hub id) and answer through a reply policy of ``inference.engine``: the
PersoBench prompt with the extracted reply (default), or the raw chat. Registered by ``cli/app.py``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from persona_align.cli.output import JsonFlag, console, emit, err_console
from persona_align.errors import InputError

if TYPE_CHECKING:
    from persona_align.inference.engine import ReplyPolicy

ModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL_DIR",
        help="A checkpoint folder, a PEFT adapter folder (merged into its base), "
        "`embedded` or a hub id.",
    ),
]
PromptOpt = Annotated[
    str,
    typer.Option(
        "--prompt",
        help="persobench: the PersoBench prompt, reply extracted from its JSON; "
        "raw: the messages straight through the chat template; select-then-generate: PAL's "
        "two passes (for models from `train pal`).",
    ),
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="auto (bf16 on GPUs that have it, else float32) | float32 | bfloat16 | float16."
    ),
]
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def load_policy(model_dir: str, prompt: str, dtype: str, batch_size: int = 1) -> ReplyPolicy:
    """The engine and the reply policy named by ``--prompt``, loaded with a spinner on stderr."""
    from persona_align.inference import select_generate  # noqa: F401 - registers its policy
    from persona_align.inference.engine import POLICIES, load_engine, make_policy

    if prompt not in POLICIES:
        raise InputError(None, f"--prompt must be one of {', '.join(POLICIES)}, got {prompt!r}")
    with err_console.status(f"loading {model_dir}..."):
        engine = load_engine(model_dir, dtype, batch_size)
    return make_policy(prompt, engine)


def serve_command(
    model_dir: ModelArg,
    host: Annotated[
        str, typer.Option(help="Address to listen on; only this machine by default.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on; 0 picks a free one.")] = 8000,
    prompt: PromptOpt = "persobench",
    model_name: Annotated[
        str | None, typer.Option(help="Model id clients ask for (default: the folder's name).")
    ] = None,
    dtype: DtypeOpt = "auto",
    max_tokens: Annotated[
        int, typer.Option(help="Tokens generated when a request does not say (PersoBench: 110).")
    ] = 110,
    max_tokens_cap: Annotated[
        int, typer.Option(help="Most tokens a request may ask for (more: HTTP 400).")
    ] = 512,
    max_prompt_tokens: Annotated[
        int,
        typer.Option(help="Most tokens of a request's rendered prompt (more: HTTP 400)."),
    ] = 2048,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body (larger: HTTP 413).")
    ] = 1 << 20,
    batch_size: Annotated[
        int, typer.Option(help="Requests answered at once; their greedy replies decode together.")
    ] = 8,
    queue_size: Annotated[
        int, typer.Option(help="Requests that may wait behind those being answered (more: 503).")
    ] = 8,
    as_json: JsonFlag = False,
) -> None:
    """An OpenAI-compatible /v1/chat/completions server; the persona is the system message."""
    from persona_align.inference.engine import served_name
    from persona_align.inference.server import ChatServer, ServerLimits

    if not 0 <= port <= 65535:
        raise InputError(None, f"--port must be in 0..65535, got {port}")
    try:
        limits = ServerLimits(
            max_body_bytes=max_body_bytes,
            max_tokens_cap=max_tokens_cap,
            default_max_tokens=max_tokens,
            max_prompt_tokens=max_prompt_tokens,
            batch_size=batch_size,
            queue_size=queue_size,
        )
    except ValueError as err:
        raise InputError(None, str(err)) from None
    policy = load_policy(model_dir, prompt, dtype, batch_size)
    model_id = model_name or served_name(model_dir)
    server = ChatServer(policy, model_id, host, port, limits)
    try:
        server.start()
    except OSError as err:
        raise InputError(None, f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    access_log = logging.getLogger("persona_align.inference.server")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    stop = threading.Event()
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if on_main else None
    summary = {"command": "serve", "url": server.base_url, "model": model_id, "policy": prompt}
    try:
        if host not in LOOPBACK:
            err_console.print(
                f"[yellow]warning:[/] listening on {host}: anyone who can reach it can use "
                "the model (there is no authentication)"
            )
        if as_json:
            emit(summary | {"event": "listening"}, as_json)
        else:
            console.print(
                f"Serving [bold]{model_id}[/] ({prompt} prompt) at {server.base_url}; Ctrl-C stops"
            )
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        server.close()
        policy.engine.close()
        access_log.removeHandler(handler)
    stats = server.stats()
    if not as_json:
        console.print(f"Stopped after {stats['requests']} requests")
    emit(summary | stats, as_json)


def _read_line(interactive: bool) -> Callable[[], str | None]:
    from rich.prompt import Prompt

    def read() -> str | None:
        if not interactive:
            line = sys.stdin.readline()
            return line if line else None
        try:
            return Prompt.ask("[bold cyan]you[/]", console=console)
        except (EOFError, KeyboardInterrupt):
            console.print()
            return None

    return read


def chat_command(
    model_dir: ModelArg,
    persona: Annotated[
        Path,
        typer.Option(
            "--persona",
            help="Persona: a text file (one sentence per line) or Dialogue JSONL/JSON/Parquet.",
        ),
    ],
    dialogue: Annotated[
        str | None,
        typer.Option("--dialogue", help="Which dialogue's persona (default: the first)."),
    ] = None,
    prompt: PromptOpt = "persobench",
    dtype: DtypeOpt = "auto",
    max_tokens: Annotated[int, typer.Option(help="Tokens per reply (PersoBench: 110).")] = 110,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    as_json: JsonFlag = False,
) -> None:
    """Chat with a model in character; reads piped stdin too (one message per line)."""
    from persona_align.inference.chat import ChatLoop, ChatSession, load_persona
    from persona_align.inference.engine import ReplyParams

    if max_tokens < 1 or not 0 <= temperature <= 2 or not 0 < top_p <= 1:
        raise InputError(None, "need --max-tokens >= 1, 0 <= --temperature <= 2, 0 < --top-p <= 1")
    sentences = load_persona(persona, dialogue)
    policy = load_policy(model_dir, prompt, dtype)
    params = ReplyParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    interactive = sys.stdin.isatty()
    loop = ChatLoop(
        ChatSession(policy, sentences, params), console, interactive=interactive, as_json=as_json
    )
    try:
        summary = loop.run(_read_line(interactive))
    finally:
        policy.engine.close()
    emit({"command": "chat", "model": model_dir, "policy": prompt} | summary, as_json)
