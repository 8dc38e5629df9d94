"""Loading helpers shared by model-based metrics: fail fast and say why."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from persona_align.errors import InputError
from persona_align.metrics.base import Unavailable
from persona_align.models import resolve


def pretrained_source(name: str) -> tuple[str, bool]:
    """(what ``from_pretrained`` should load, local_files_only) for a model name.

    A hub id is checked up front: offline, transformers retries the hub for about a minute
    before failing, so an uncached id on a machine without hub access is Unavailable at once,
    and a cached one is loaded from the cache without touching the network.
    """
    try:
        resolved = resolve(name)
    except InputError as err:
        raise Unavailable(err.message) from None
    if resolved.kind != "hub":
        return resolved.location, False
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(resolved.location, "config.json"), str)
    host = urlparse(constants.ENDPOINT).hostname or ""
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    if offline is None:
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            offline = f"{host} cannot be reached"
    if offline is not None and not cached:
        raise Unavailable(f"{name!r} is not in the local hub cache and {offline}")
    return resolved.location, offline is not None


def first_line(err: Exception) -> str:
    """The first line of an error message: transformers' run on for a paragraph."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
