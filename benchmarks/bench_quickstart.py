"""Wall time of `make demo` (`persona-align run configs/quickstart.yaml`) with a stage breakdown.

Runs in a fresh temporary folder with an empty model/score/generation cache, as on a fresh
clone whose Python packages are already installed: the GGUF conversion of the embedded model
is part of the time. Target: at most 15 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/bench_quickstart.py [--config configs/quickstart.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from persona_align.config import STAGES

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 15 * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        env = {**os.environ, "PERSONA_ALIGN_CACHE": str(Path(tmp) / "cache"),
               "HF_HUB_OFFLINE": "1"}  # fmt: skip
        cli = Path(sys.executable).with_name("persona-align")
        began = time.perf_counter()
        done = subprocess.run([str(cli), "run", str(args.config.resolve()), "--json"], cwd=tmp,
                              env=env, capture_output=True, text=True, check=False)  # fmt: skip
        wall = time.perf_counter() - began
        if done.returncode != 0:
            sys.exit(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        run_dir = Path(summary["run_dir"])
        print(f"`persona-align run {args.config.name}` from an empty cache, 2 CPU cores")
        print("| stage | seconds | what |")
        print("|---|---:|---|")
        stages = [s for s in STAGES if s in summary["stages"]]
        for stage in stages:
            entry = summary["stages"][stage]
            manifest = json.loads((run_dir / stage / "manifest.json").read_text())
            what = {k: v for k, v in entry.items() if k not in ("skipped", "outputs", "statuses")}
            print(f"| {stage} | {manifest['seconds']:.1f} | {json.dumps(what)[:120]} |")
        print(f"| **total (wall, incl. start-up)** | **{wall:.1f}** | target <= {TARGET_S} s |")
        print(f"\nratio to the 15-minute target: {wall / TARGET_S:.2f}x")
        report = run_dir / "report" / "report.md"
        if report.exists():
            print("\n" + report.read_text(encoding="utf-8")[:3000])


if __name__ == "__main__":
    main()
