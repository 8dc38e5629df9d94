"""A generation run killed with SIGKILL midway resumes: only the missing calls are made again."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from persona_align.prompting import persobench_prompt
from persona_align.records import Candidate, Dialogue, read_records
from persona_align.testing.fake_server import FakeOpenAIServer, expected_content

N = 60


def test_sigkill_then_rerun_makes_exactly_the_missing_calls(tmp_path: Path) -> None:
    dialogues = [
        Dialogue(
            id=f"d{i:02d}",
            persona=["I keep bees."],
            context=[{"speaker": "User1", "text": f"Question {i}?"}],
        )
        for i in range(N)
    ]
    source = tmp_path / "d.jsonl"
    source.write_text("".join(d.model_dump_json() + "\n" for d in dialogues), encoding="utf-8")
    out, cache = tmp_path / "c.jsonl", tmp_path / "cache.sqlite"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    with FakeOpenAIServer(latency_s=0.05) as server:
        cmd = [
            sys.executable, "-m", "persona_align.cli", "generate",
            "-r", f"openai:fake-model@{server.base_url}", "--concurrency", "2",
            "-d", str(source), "-o", str(out), "--cache", str(cache), "--json",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while server.calls < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not out.exists()  # no half-written output
        with sqlite3.connect(cache) as db:
            cached = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        assert 0 < cached < N
        before = server.calls

        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        assert server.calls - before == N - cached  # exactly the missing ones
        summary = json.loads(rerun.stdout.strip().splitlines()[-1])
        assert summary["responders"]["fake-model"]["valid"] == N

    candidates = read_records(out, Candidate)
    assert sorted(c.dialogue_id for c in candidates) == [d.id for d in dialogues]  # once each
    for dialogue, candidate in zip(
        dialogues, sorted(candidates, key=lambda c: c.dialogue_id), strict=True
    ):
        assert candidate.raw == expected_content(persobench_prompt(dialogue))
