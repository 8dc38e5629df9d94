"""Run responders over dialogues: cached, resumable, with a progress bar, one Candidate each."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from persona_align.errors import CallsFailed
from persona_align.generation.base import GenerationParams, Request, Responder, Result
from persona_align.generation.cache import GenerationCache, cache_key
from persona_align.prompting import extract_response, messages_hash, persobench_messages
from persona_align.records import Candidate, Dialogue, Message

PromptBuilder = Callable[[Dialogue], list[Message]]
Reader = Callable[[str], str | None]  # raw output -> extracted reply, None when invalid


def build_requests(
    dialogues: Sequence[Dialogue],
    responder: Responder,
    params: GenerationParams,
    prompt: PromptBuilder | None = None,
) -> list[Request]:
    """The messages of every dialogue (PersoBench's prompt unless ``prompt`` builds others),
    with the cache key of this responder + params + prompt."""
    settings = responder.settings()
    # extraction changes what we read from the output, not the output: not part of the key
    key_params = {k: v for k, v in params.as_dict().items() if k != "extraction"}
    requests = []
    for dialogue in dialogues:
        messages = (
            prompt(dialogue)
            if prompt is not None
            else persobench_messages(dialogue, params.variant, params.word_limit, params.system)
        )
        phash = messages_hash(messages)
        requests.append(Request(dialogue, messages, phash, cache_key(settings, key_params, phash)))
    return requests


def _to_candidate(
    request: Request,
    result: Result,
    responder: Responder,
    params: GenerationParams,
    read: Reader | None,
) -> Candidate:
    mode = getattr(responder, "extraction", None) or params.extraction
    if result.error is not None:
        response = None
    elif read is not None:
        response = read(result.raw)
    elif mode == "none":  # imported files that already hold extracted replies
        response = result.raw.strip() or None
    else:
        response = extract_response(result.raw, mode)
    return Candidate(
        dialogue_id=request.dialogue.id,
        responder=responder.name,
        raw=result.raw,
        response=response,
        valid=response is not None,
        latency_s=result.latency_s,
        prompt_hash=request.prompt_hash,
        error=result.error,
    )


def run_responder(
    dialogues: Sequence[Dialogue],
    responder: Responder,
    params: GenerationParams,
    cache: GenerationCache | None = None,
    refresh: bool = False,
    console: Console | None = None,
    *,
    prompt: PromptBuilder | None = None,
    read: Reader | None = None,
    label: str | None = None,
) -> list[Candidate]:
    """One Candidate per dialogue, in dialogue order; only what the cache lacks is generated.

    ``prompt`` and ``read`` replace the PersoBench prompt and reply extraction for methods
    that ask their own questions (PAL's no-persona replies); ``label`` names the progress bar.
    """
    requests = build_requests(dialogues, responder, params, prompt)
    cacheable = cache is not None and responder.cacheable
    results: dict[str, Result] = {}
    if cacheable and not refresh:
        results = cache.get_many(r.key for r in requests)  # type: ignore[union-attr]
    if cacheable:
        todo = list({r.key: r for r in requests if r.key not in results}.values())
    else:
        todo = requests  # e.g. imports, which are row-aligned with the whole list
    if todo:
        responder.prepare()
        failures = 0
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("failures: {task.fields[failures]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=console is None,
        ) as progress:
            task = progress.add_task(label or responder.name, total=len(todo), rate="", failures=0)

            def on_result(request: Request, result: Result) -> None:
                nonlocal failures
                results[request.key] = result
                if cacheable:
                    cache.put(request.key, responder.name, request.dialogue.id, result)  # type: ignore[union-attr]
                failures += result.error is not None
                progress.advance(task)
                elapsed = progress.tasks[task].elapsed or 0.0
                done = progress.tasks[task].completed
                rate = f"{done / elapsed:.1f}/s" if elapsed > 0 else ""
                progress.update(task, rate=rate, failures=failures)

            responder.generate(todo, params, on_result)
    missing = [r.dialogue.id for r in requests if r.key not in results]
    if missing:
        raise RuntimeError(f"responder {responder.name!r} returned no result for {missing[:3]}")
    return [_to_candidate(r, results[r.key], responder, params, read) for r in requests]


def run_responders(
    dialogues: Sequence[Dialogue],
    responders: Sequence[Responder],
    params: GenerationParams,
    cache_path: Path | None = None,
    use_cache: bool = True,
    refresh: bool = False,
    console: Console | None = None,
) -> list[Candidate]:
    """Every responder over every dialogue, through one cache (default: the user cache's
    ``generations.sqlite``). The cache opens and all responders start first, so a cache that
    cannot be written or a responder that cannot start (unknown model, missing key) fails
    before any work is done."""
    from persona_align.models import cache_dir

    store = GenerationCache(cache_path or cache_dir() / "generations.sqlite") if use_cache else None
    candidates: list[Candidate] = []
    try:
        for responder in responders:
            responder.prepare()
        for responder in responders:
            candidates += run_responder(dialogues, responder, params, store, refresh, console)
    finally:
        if store is not None:
            store.close()
    return candidates


def check_calls(candidates: Sequence[Candidate], responders: Sequence[Responder]) -> None:
    """Raise CallsFailed when calls a rerun would retry (a server's, a model's) still failed
    after their retries; their candidates carry the error and are never scored."""
    retried = {r.name for r in responders if r.cacheable}
    failed = Counter(
        (c.responder, c.error) for c in candidates if c.error is not None and c.responder in retried
    )
    if failed:
        calls = sum(1 for c in candidates if c.responder in retried)
        what = ", ".join(f"{name}: {error} x{n}" for (name, error), n in failed.most_common())
        raise CallsFailed(
            f"{failed.total()} of {calls} model calls still failed after retries ({what}); "
            "rerun to retry them"
        )
