"""Errors that reach the user as one line: bad input (which file, where in it, which field, what
is wrong) and calls that kept failing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit


class InputError(Exception):
    """Bad input or configuration. The CLI prints ``str(err)`` and exits with code 2."""

    def __init__(
        self,
        path: str | Path | None,
        message: str,
        *,
        where: str | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.where = where
        self.field = field
        self.message = message
        super().__init__(self.format())

    def format(self) -> str:
        head = ":".join(p for p in (self.path, self.where) if p)
        body = f"field '{self.field}': {self.message}" if self.field else self.message
        text = f"{head}: {body}" if head else body
        return " ".join(text.split())  # always one line, whatever the message held


class CallsFailed(Exception):
    """Model calls still failing after their retries (a server down): neither bad input nor the
    model's failure. The CLI prints ``str(err)`` in one line and exits with code 3; the answers
    that did come back are cached, so a rerun makes only the failed calls again."""


URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s\"',]+", re.IGNORECASE)


def redact_urls(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings) with every URL in it passed through
    ``redact_url``: configs written to disk (run manifests) keep no credentials."""
    if isinstance(value, str):
        return URL.sub(lambda match: redact_url(match.group(0)), value)
    if isinstance(value, dict):
        return {key: redact_urls(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_urls(item) for item in value]
    return value


def redact_url(url: str) -> str:
    """``url`` fit to print: its user part (``key@`` or ``user:password@``), query and fragment,
    where servers take keys, become ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not even splittable: show none of it
        return "<malformed URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query, fragment = ("***" if text else "" for text in (parts.query, parts.fragment))
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))
