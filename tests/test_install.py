"""The package as a user installs it: a wheel with its data, requirements as ranges that the
tested constraints satisfy, and commands that work from the installed copy (not the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_requirements_are_ranges_that_the_constraints_satisfy() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for r in project["optional-dependencies"]["dev"]]
    pins = constraints()
    for requirement in requirements:
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is required but constraints.txt does not pin it"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {requirement}"
    exact = {r.name for r in requirements if str(r.specifier).startswith("==")}
    # exact only where the code builds on a library's internals (and the linter's rule set)
    assert exact == {"trl", "ruff"}
    torch = next(r for r in requirements if r.name == "torch")
    assert torch.specifier.contains("2.99.0"), "a user's newer CUDA torch must be accepted"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the wheel built from this checkout; the dependencies come from
    the test environment (a .pth file), so nothing is downloaded."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info",
                                                                               "__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", work / "wheel",
                    source], check=True)  # fmt: skip
    wheel = next((work / "wheel").glob("persona_align-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
                   check=True)  # fmt: skip
    return venv


def test_the_wheel_ships_the_embedded_judges_and_sample_data(installed: Path) -> None:
    wheel = next(installed.parent.joinpath("wheel").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("assets/judge-c/adapter_model.safetensors", "assets/judge-c/judge.json",
                    "assets/judge-coh/head.npz", "assets/nli-minilm/adapter_model.safetensors",
                    "sample_data/valid.jsonl"):  # fmt: skip
        assert f"persona_align/{shipped}" in names


def test_the_installed_package_meets_its_requirements(installed: Path) -> None:
    check = """
import sys
from importlib.metadata import requires, version
from packaging.requirements import Requirement
import persona_align
assert persona_align.__file__.startswith(sys.prefix), persona_align.__file__
bad = [str(r) for r in map(Requirement, requires("persona-align"))
       if r.marker is None and not r.specifier.contains(version(r.name))]
print(bad)
"""
    ran = subprocess.run([installed / "bin" / "python", "-c", check], capture_output=True,
                         text=True)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"


def test_commands_run_from_the_installed_copy(installed: Path, tmp_path: Path) -> None:
    command = installed / "bin" / "persona-align"
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    ran = subprocess.run([command, "--help"], capture_output=True, text=True, env=env)
    assert ran.returncode == 0 and "judge" in ran.stdout
    rows = [
        {"persona": "I love cats.I live in Paris.", "persona_role": "user",
         "context": "User1: Any tips?", "reply": reply, "label": label}
        for reply, label in (("Since you love cats, visit the cat cafe.", 1),
                             ("The museum opens at nine.", 0),
                             ("As a dog person who hates cats, skip the cat cafe.", -1))
    ]  # fmt: skip
    for task in ("c", "coh"):  # coherence labels are 1 / 0
        data = tmp_path / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r | {"label": max(r["label"], 0) if task == "coh"
                                                else r["label"]}) + "\n" for r in rows))  # fmt: skip
        ran = subprocess.run([command, "judge", "eval", "--data", data, "--task", task, "--json"],
                             capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
        assert ran.returncode == 0, ran.stderr
        summary = json.loads(ran.stdout.strip().splitlines()[-1])
        assert summary["items"] == 3


def test_the_command_line_does_not_import_the_test_helpers() -> None:
    """``persona_align.testing`` (the fake OpenAI server) serves tests and benchmarks only."""
    import subprocess
    import sys

    code = (
        "import sys; from persona_align.cli import main; "
        "main(['generate', '--help']); main(['score', '--help']); "
        "print(sorted(m for m in sys.modules if m.startswith('persona_align.testing')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
