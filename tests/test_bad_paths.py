"""Bad paths: exit 2 in one line, checked before any work, nothing written."""

from __future__ import annotations

from pathlib import Path

from persona_align.cli import sample_path
from persona_align.generation.fake_server import FakeOpenAIServer


def test_output_is_checked_before_any_call(cli, tmp_path: Path, read_only_dir: Path) -> None:
    """``generate`` finds an output it cannot write before its first model call, not after."""
    with FakeOpenAIServer() as server:
        out = read_only_dir / "candidates.jsonl"
        result = cli("generate", "-r", f"openai:fake-model@{server.base_url}", "-d",
                     sample_path("valid"), "-o", out, "--cache", tmp_path / "g.sqlite")  # fmt: skip
        assert result.code == 2 and server.calls == 0
    assert result.err.startswith(f"error: {out}: cannot be written")
