"""Time `persona-align bench` on the PersoBench FoCus-valid systems, from an empty score cache.

Stages: read the 1,000 FoCus validation prompts with the persobench-csv reader (`data import`),
then `persona-align bench` on the 8 systems of ../shared/data/persobench-focus/responses/
(extracted replies: `--extraction none`) with a fresh score cache, then a headless-Chromium
screenshot of report.html. Prints the seconds of every stage, and of every metric's model
load and scoring inside `bench`.

    .venv/bin/python benchmarks/bench_report.py [--limit N] [--metrics c,ue,...] [--out DIR]
        [--cache FILE]  # a warm cache measures a rerun: every score is a cache hit
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from persona_align.report import DEFAULT_METRICS

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
PROMPTS = DATA / "persodpo-focus" / "prompts" / "valid.csv"
RESPONSES = DATA / "persobench-focus" / "responses"
TARGET_S = 600.0


def cli(*args: str | Path) -> tuple[dict, float]:
    """Run the real command line in its own process; its --json summary and wall seconds."""
    command = [sys.executable, "-m", "persona_align.cli", *map(str, args), "--json"]
    began = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1]), seconds


def head_csv(source: Path, target: Path, rows: int) -> Path:
    """The first ``rows`` rows of a CSV (a quick, still row-aligned run)."""
    with source.open(encoding="utf-8", newline="") as src, target.open("w", newline="") as dst:
        reader = csv.reader(src)
        writer = csv.writer(dst)
        writer.writerow(next(reader))
        for index, row in enumerate(reader):
            if index >= rows:
                break
            writer.writerow(row)
    return target


def screenshot(page: Path, target: Path, profile: Path) -> float | None:
    names = ("chromium", "chromium-browser", "google-chrome")
    chromium = next(filter(None, map(shutil.which, names)), None)
    if chromium is None:
        print("chromium not found: no screenshot")
        return None
    began = time.perf_counter()
    subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
            "--window-size=1280,4000", f"--screenshot={target}", page.as_uri(),
        ],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics", default=None, help="default: bench's default metric set")
    parser.add_argument("--limit", type=int, default=None, help="only the first N dialogues")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: temp)")
    parser.add_argument(
        "--cache", type=Path, default=None, help="score cache (default: a new, empty one)"
    )
    parser.add_argument("--screenshot", type=Path, default=HERE / "report_screenshot.png")
    args = parser.parse_args()
    if not PROMPTS.exists() or not RESPONSES.is_dir():
        sys.exit(f"{DATA} is absent")

    work = Path(tempfile.mkdtemp(prefix="bench-report-"))
    out = args.out or work / "report"
    prompts, systems = PROMPTS, sorted(RESPONSES.glob("*.csv"))
    if args.limit:
        prompts = head_csv(PROMPTS, work / "valid.csv", args.limit)
        systems = [head_csv(p, work / p.name, args.limit) for p in systems]
    stages: dict[str, float] = {}
    began = time.perf_counter()

    dialogues = work / "dialogues.jsonl"
    _, stages["data import (persobench-csv)"] = cli(
        "data", "import", "--format", "persobench-csv", prompts, "-o", dialogues
    )
    metric_names = args.metrics.split(",") if args.metrics else list(DEFAULT_METRICS)
    metrics = ["--metrics", ",".join(metric_names)]
    summary, stages["bench (whole command)"] = cli(
        "bench", "-d", dialogues, "--systems", *systems, "-o", out, "--extraction", "none",
        "--cache", args.cache or work / "scores.sqlite", "--baseline", "Qwen2-7B-Instruct",
        *metrics,
    )  # fmt: skip
    shot = screenshot(out / "report.html", args.screenshot, work / "chromium-profile")
    if shot is not None:
        stages["screenshot (chromium)"] = shot
    total = time.perf_counter() - began

    print(f"\n{summary['dialogues']} dialogues x {len(systems)} systems, report in {out}")
    print(f"ranking: {', '.join(summary['ranking'])}")
    for name, info in summary["metrics"].items():
        if not info["available"]:
            print(f"  {name}: unavailable: {info['reason']}")
    print("\nstage                                    seconds")
    for name, seconds in stages.items():
        print(f"{name:<40} {seconds:8.1f}")
        if name.startswith("bench"):
            inner = summary["timings_s"]
            order = ["read inputs"]
            order += [f"{step} {m}" for m in metric_names for step in ("load", "score")]
            order += ["write scored", "statistics", "plots", "report"]
            for key in sorted(inner, key=lambda k: order.index(k) if k in order else len(order)):
                print(f"  {key:<38} {inner[key]:8.1f}")
    verdict = "met" if total <= TARGET_S else "MISSED"
    print(f"{'total':<40} {total:8.1f}  (target {TARGET_S:.0f} s: {verdict})")
    if shot is not None:
        print(f"screenshot: {args.screenshot}")
    # keep the temp folder only when the report lives in it
    shutil.rmtree(work / "chromium-profile" if args.out is None else work, ignore_errors=True)


if __name__ == "__main__":
    main()
