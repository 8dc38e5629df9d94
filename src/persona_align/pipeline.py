"""``persona-align run CONFIG``: every stage of one YAML config, in order, into one run folder.

Each stage writes ``<run>/<stage>/`` and, last, its ``manifest.json`` (config section, input
hashes, library versions, seed, timings, git revision). The manifest's ``key`` hashes the
stage's settings and its inputs' keys, so a stage whose inputs and settings are unchanged is
skipped on rerun, and a change reruns that stage and everything after it. ``--from STAGE``
forces a rerun from there on. A crash leaves the completed stages (and their manifests)
intact, and training resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, get_args

from rich.console import Console

from persona_align.config import STAGES, PairsSection, PipelineConfig, TrainConfig
from persona_align.data import read_dialogues
from persona_align.errors import CallsFailed, InputError, redact_urls
from persona_align.files import check_output_folder, require_file
from persona_align.preference.pairs import PairWeight
from persona_align.records import (
    Candidate,
    Dialogue,
    PreferencePair,
    ScoredCandidate,
    atomic_open,
    read_records,
    write_records,
)

LIBRARIES = ("persona-align", "torch", "transformers", "trl", "peft", "datasets", "accelerate")


def check_config(config: PipelineConfig, where: Path) -> None:
    """Refuse, before any work, a config whose stages cannot feed each other."""

    def need(stage: str, missing: str, why: str) -> None:
        raise InputError(where, f"{why}: add a `{missing}:` section", field=stage)

    present = [s for s in STAGES if getattr(config, s) is not None]
    if not present:
        raise InputError(where, f"no stage section; known stages: {', '.join(STAGES)}")
    if config.name is None and config.output_dir is None:
        raise InputError(where, "a run needs a `name` (or an `output_dir`)", field="name")
    if config.generate is not None and config.data is None:
        need("generate", "data", "generate answers the data stage's dialogues")
    if config.score is not None and config.generate is None:
        need("score", "generate", "score needs candidates")
    if config.pairs is not None:
        if config.score is None:
            need("pairs", "score", "pairs need scored candidates")
        if config.pairs.rule != "format":
            weights = config.pairs.weights or _default_weights()
            unscored = sorted(set(weights) - set(config.score.metrics))  # type: ignore[union-attr]
            if unscored:
                raise InputError(
                    where,
                    f"weights name {unscored[0]!r}, which score.metrics does not compute",
                    field="pairs.weights",
                )
    if config.train is not None:
        if config.train.method != "dpo":
            raise InputError(
                where, "a run trains with dpo (use `train sft|pal|sbs` for the others)",
                field="train.method",
            )  # fmt: skip
        if config.pairs is None and config.train.data is None:
            need("train", "pairs", "a DPO stage needs preference pairs (or train.data)")
        if config.pairs is not None:
            check_pair_weights(config.pairs, config.train, where)
    if config.evaluate is not None:
        if config.data is None or config.data.eval is None:
            raise InputError(where, "evaluate needs held-out dialogues", field="data.eval")
        if config.evaluate.trained and config.train is None:
            raise InputError(
                where, "evaluate.trained needs a train: section (or set it to false)",
                field="evaluate.trained",
            )  # fmt: skip
        if not (config.evaluate.base or config.evaluate.trained or config.evaluate.responders):
            raise InputError(where, "evaluate has no system to run", field="evaluate")
        if config.score is None and config.evaluate.metrics is None:
            raise InputError(where, "evaluate needs metrics (or a score: section)",
                             field="evaluate.metrics")  # fmt: skip
    if config.report is not None and config.evaluate is None and config.score is None:
        need("report", "evaluate", "a report needs scored systems")


def check_pair_weights(pairs: PairsSection, train: TrainConfig, where: Path) -> None:
    """One source of pair weights: the pairs file's weight column. Refuse a train.weighting that
    recomputes weights other than those the pairs stage writes, and a pairs.weight the rule
    ignores (``format`` pairs are vanilla DPO: weight 1)."""
    if pairs.rule == "format" and "weight" in pairs.model_fields_set and pairs.weight != "one":
        raise InputError(
            where, f"the format rule writes weight 1 (vanilla DPO); pairs.weight: {pairs.weight} "
            "would have no effect: drop it", field="pairs.weight",
        )  # fmt: skip
    written = "one" if pairs.rule == "format" else pairs.weight
    if train.weighting in get_args(PairWeight) and train.weighting != written:
        source = f"pairs.weight: {written}"
        if pairs.rule == "format":
            source = "the format rule's weight 1"
        raise InputError(
            where, f"train.weighting: {train.weighting} contradicts {source}; the trainer uses the "
            "pairs file's weight column by default: drop train.weighting, or set pairs.weight",
            field="train.weighting",
        )  # fmt: skip


def preflight(config: PipelineConfig, where: Path) -> None:
    """Build every responder and metric the run names (cheap: nothing loads), so an unknown
    name or a bad option fails now, naming its key, instead of after hours of earlier stages."""
    from persona_align.generation import make_responders
    from persona_align.metrics import make_metric

    for stage, section in (("generate", config.generate), ("evaluate", config.evaluate)):
        responders = getattr(section, "responders", None) or []
        make_responders([(r.kind, responder_options(r)) for r in responders], where,
                        f"{stage}.responders")  # fmt: skip
    metrics: dict[str, list[str]] = {}
    if config.score is not None:
        metrics["score.metrics"] = config.score.metrics
    if config.evaluate is not None and config.evaluate.metrics is not None:
        metrics["evaluate.metrics"] = config.evaluate.metrics
    options = config.score.options if config.score is not None else {}
    for key, names in metrics.items():
        for name in names:
            try:
                make_metric(name, **options.get(name, {}))
            except InputError as err:
                raise InputError(where, err.message, field=key) from None


def _default_weights() -> dict[str, float]:
    from persona_align.preference.total import DEFAULT_WEIGHTS

    return dict(DEFAULT_WEIGHTS)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    """The revision of the persona-align checkout, when it runs from one."""
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def data_location(location: str) -> Path:
    """A path, or ``sample:NAME`` for a bundled sample file: ``sample:train`` and
    ``sample:valid`` (dialogues), ``sample:responses-small-talk`` (replies to import)."""
    if location.startswith("sample:"):
        name = location.removeprefix("sample:")
        folder = resources.files("persona_align") / "sample_data"
        path = Path(str(folder / f"{name}.jsonl"))
        if not path.exists():
            known = sorted(p.name.removesuffix(".jsonl") for p in Path(str(folder)).glob("*.jsonl"))
            raise InputError(None, f"no bundled sample {name!r}; known: {', '.join(known)}",
                             field="data")  # fmt: skip
        return path
    return Path(location)


def responder_options(responder: Any) -> dict[str, Any]:
    """A responder's options with ``sample:`` file names made paths."""
    options = responder.options()
    if isinstance(options.get("path"), str):
        options["path"] = str(data_location(options["path"]))
    return options


@dataclass
class Stage:
    """One stage's run: its folder, what it depends on, and what it hands on."""

    name: str
    folder: Path
    key: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False


class Pipeline:
    """Runs the stages of one config in order; see the module docstring."""

    def __init__(
        self, config: PipelineConfig, config_path: Path, console: Console | None = None
    ) -> None:
        check_config(config, config_path)
        preflight(config, config_path)
        self.config = config
        self.config_path = config_path
        self.root = check_output_folder(
            (config.output_dir or Path("runs") / str(config.name)).resolve()
        )
        self.console = console or Console(stderr=True)
        self.done: dict[str, Stage] = {}

    def run(self, start: str | None = None) -> dict[str, Any]:
        if start is not None and start not in STAGES:
            raise InputError(None, f"--from {start!r} is not a stage; stages: {', '.join(STAGES)}")
        forced = False
        began = time.perf_counter()
        for name in STAGES:
            section = getattr(self.config, name)
            if section is None:
                continue
            forced = forced or name == start
            stage = Stage(name, self.root / name)
            stage.key = self._key(name, section)
            manifest = _read_manifest(stage.folder)
            if not forced and manifest is not None and manifest.get("key") == stage.key:
                stage.outputs, stage.summary = manifest["outputs"], manifest["summary"]
                stage.skipped = True
                self.console.print(f"[dim]{name}: unchanged, skipped ({stage.folder})[/dim]")
            else:
                forced = True  # everything after a rerun stage reruns as well
                self.console.rule(f"[bold]{name}")
                started = time.perf_counter()
                _enter(stage, resume=manifest is None)
                try:
                    RUNNERS[name](self, stage)
                except (InputError, CallsFailed):
                    _discard_if_empty(stage.folder)
                    raise
                self._write_manifest(stage, section, time.perf_counter() - started)
            self.done[name] = stage
        summary = {
            "command": "run",
            "run_dir": str(self.root),
            "seconds": round(time.perf_counter() - began, 1),
            "stages": {
                n: {"skipped": s.skipped, "outputs": s.outputs, **s.summary}
                for n, s in self.done.items()
            },
        }
        with atomic_open(self.root / "summary.json") as handle:
            json.dump(summary, handle, indent=2, sort_keys=True, default=str)
        return summary

    # -- bookkeeping -------------------------------------------------------------------------

    def _inputs(self, name: str) -> dict[str, str]:
        """Hashes of the files a stage reads that no earlier stage made."""
        files: dict[str, Path] = {}
        data = self.config.data
        if name == "data" and data is not None:
            files["train"] = data_location(data.train)
            if data.eval is not None:
                files["eval"] = data_location(data.eval)
        if name == "train" and self.config.pairs is None and self.config.train is not None:
            files["data"] = Path(str(self.config.train.data))
        for responder in self._responders(name):
            for key in ("path", "model"):
                value = responder_options(responder).get(key)
                if isinstance(value, str) and Path(value).is_file():
                    files[f"{responder.kind}.{key}"] = Path(value)
        for label, path in files.items():  # refused here, before the stage starts
            try:
                require_file(path)
            except InputError as err:
                raise InputError(path, err.message, field=f"{name}.{label}") from None
            if path.stat().st_size == 0:
                raise InputError(path, "empty file", field=f"{name}.{label}")
        return {label: file_hash(path) for label, path in files.items()}

    def _responders(self, name: str) -> list[Any]:
        if name == "generate" and self.config.generate is not None:
            return list(self.config.generate.responders)
        if name == "evaluate" and self.config.evaluate is not None:
            return list(self.config.evaluate.responders)
        return []

    def _key(self, name: str, section: Any) -> str:
        upstream = {n: s.key for n, s in self.done.items()}
        payload = {
            "stage": name,
            "section": _jsonable(section.model_dump(mode="json")),
            "seed": self.config.seed,
            "inputs": self._inputs(name),
            "upstream": upstream,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _write_manifest(self, stage: Stage, section: Any, seconds: float) -> None:
        manifest = {
            "stage": stage.name,
            "key": stage.key,
            "config": redact_urls(_jsonable(section.model_dump(mode="json"))),  # no credentials
            "config_file": str(self.config_path),
            "inputs": self._inputs(stage.name),
            "upstream": {n: s.key for n, s in self.done.items()},
            "seed": self.config.seed,
            "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
            "git_revision": git_revision(),
            "outputs": stage.outputs,
            "summary": _jsonable(stage.summary),
        }
        with atomic_open(stage.folder / "manifest.json") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)

    def output(self, stage: str, name: str) -> Path:
        return Path(self.done[stage].outputs[name])

    # -- stages ------------------------------------------------------------------------------

    def stage_data(self, stage: Stage) -> None:
        data = self.config.data
        assert data is not None
        from persona_align.data.stats import describe

        splits = {}  # every split is read before any is written
        for split, location, limit in (("train", data.train, data.limit),
                                       ("eval", data.eval, data.eval_limit)):  # fmt: skip
            if location is None:
                continue
            path = data_location(location)
            splits[split] = read_dialogues(data.format, path, **data.options)[:limit]
            if not splits[split]:
                raise InputError(path, "no dialogues", field=f"data.{split}")
        for split, dialogues in splits.items():
            target = stage.folder / f"{split}.jsonl"
            write_records(target, dialogues, Dialogue)
            stage.outputs[split] = str(target)
            stage.summary[split] = {"dialogues": describe(dialogues)["records"]}
            self.console.print(f"{split}: {len(dialogues)} dialogues → {target}")

    def stage_generate(self, stage: Stage) -> None:
        section = self.config.generate
        assert section is not None
        dialogues = read_dialogues("jsonl", self.output("data", "train"))
        candidates = self._generate(dialogues, section.responders, section.params,
                                    section.cache, section.use_cache)  # fmt: skip
        target = stage.folder / "candidates.jsonl"
        write_records(target, candidates, Candidate)
        stage.outputs["candidates"] = str(target)
        stage.summary.update(_per_responder(candidates))

    def stage_score(self, stage: Stage) -> None:
        section = self.config.score
        assert section is not None
        dialogues = read_dialogues("jsonl", self.output("data", "train"))
        candidates = read_records(self.output("generate", "candidates"), Candidate)
        scored, statuses = self._score(dialogues, candidates, section.metrics, section.options,
                                       section.use_cache)  # fmt: skip
        target = stage.folder / "scored.jsonl"
        write_records(target, scored, ScoredCandidate)
        stage.outputs["scored"] = str(target)
        stage.summary["metrics"] = {s.name: s.available for s in statuses}
        stage.summary["statuses"] = [asdict(s) for s in statuses]

    def stage_pairs(self, stage: Stage) -> None:
        from persona_align.data.stats import describe
        from persona_align.preference import PairingConfig, build_pairs, fit_minmax, total_score

        section = self.config.pairs
        assert section is not None
        dialogues = {d.id: d for d in read_dialogues("jsonl", self.output("data", "train"))}
        scored = read_records(self.output("score", "scored"), ScoredCandidate)
        settings = section.model_dump(exclude={"weights"})
        config = PairingConfig(**settings)
        if section.rule != "format":
            weights = section.weights or _default_weights()
            ranges = fit_minmax(scored, weights)
            scored = [c.model_copy(update={"total": total_score(c.scores, weights, ranges)})
                      for c in scored]  # fmt: skip
        pairs = build_pairs(dialogues, scored, config)
        if not pairs:
            raise InputError(
                self.output("score", "scored"),
                f"the {section.rule!r} rule made no pair: the candidates of each dialogue score "
                "alike (add responders, or use another rule)",
                field="pairs.rule",
            )
        target = stage.folder / "pairs.jsonl"
        write_records(target, pairs, PreferencePair)
        stage.outputs["pairs"] = str(target)
        stage.summary.update({k: v for k, v in describe(pairs).items() if k != "type"})
        self.console.print(f"{len(pairs)} {section.rule} pairs → {target}")

    def stage_train(self, stage: Stage) -> None:
        from persona_align.training.dpo import train_dpo

        section = self.config.train
        assert section is not None
        data = self.output("pairs", "pairs") if "pairs" in self.done else section.data
        config = TrainConfig.model_validate(
            {**section.model_dump(), "data": data, "output_dir": stage.folder}
        )
        summary = train_dpo(config, resume=_has_checkpoint(stage.folder))
        stage.outputs.update(
            {"model": summary["model_dir"], "log": str(stage.folder / "log.jsonl")}
        )
        stage.summary.update({k: summary[k] for k in ("steps", "pairs", "first_loss",
                                                       "last_loss", "seconds")})  # fmt: skip

    def stage_evaluate(self, stage: Stage) -> None:
        from persona_align.config import ResponderConfig

        section = self.config.evaluate
        assert section is not None
        dialogues = read_dialogues("jsonl", self.output("data", "eval"))
        responders = list(section.responders)
        model = self.config.train.model if self.config.train is not None else "embedded"
        if section.base:
            responders.insert(0, ResponderConfig(kind="hf", model=model, name="base",
                                                 batch_size=section.batch_size))  # fmt: skip
        if section.trained:
            responders.insert(int(section.base), ResponderConfig(
                kind="hf", model=self.output("train", "model").as_posix(), name="trained",
                batch_size=section.batch_size))  # fmt: skip
        candidates = self._generate(dialogues, responders, section.params, None, True)
        metrics = section.metrics or self.config.score.metrics  # type: ignore[union-attr]
        options = self.config.score.options if self.config.score is not None else {}
        scored, statuses = self._score(dialogues, candidates, metrics, options, True)
        target = stage.folder / "scored.jsonl"
        write_records(target, scored, ScoredCandidate)
        stage.outputs["scored"] = str(target)
        stage.summary.update(_per_responder(candidates))
        stage.summary["metrics"] = {s.name: s.available for s in statuses}
        stage.summary["statuses"] = [asdict(s) for s in statuses]

    def stage_report(self, stage: Stage) -> None:
        from persona_align.report import metric_info, write_report
        from persona_align.training.curves import read_training_log

        section = self.config.report
        assert section is not None
        source = "evaluate" if "evaluate" in self.done else "score"
        scored = read_records(self.output(source, "scored"), ScoredCandidate)
        systems: dict[str, list[ScoredCandidate]] = {}
        for record in scored:
            systems.setdefault(record.responder, []).append(record)
        statuses = self.done[source].summary.get("statuses")
        names = (
            [metric_info(s["name"], _Status(**s)) for s in statuses]
            if statuses
            else sorted({k for r in scored for k in r.scores})
        )
        log = read_training_log(self.output("train", "log")) if "train" in self.done else None
        baseline = section.baseline if section.baseline in systems else None
        summary = write_report(
            stage.folder, systems, names, training_log=log, baseline=baseline,
            title=section.title or f"persona-align run {self.root.name}", n_boot=section.n_boot,
            seed=self.config.seed,
        )  # fmt: skip
        for name in ("report.md", "report.html", "summary.json"):
            stage.outputs[name] = str(stage.folder / name)
        stage.summary["systems"] = sorted(systems)
        stage.summary["ranking"] = [r["system"] for r in summary["ranking"]["order"]]
        self.console.print(f"report → {stage.folder / 'report.html'}")

    # -- shared helpers ----------------------------------------------------------------------

    def _generate(
        self,
        dialogues: list[Dialogue],
        responders: list[Any],
        params_config: Any,
        cache_path: Path | None,
        use_cache: bool,
    ) -> list[Candidate]:
        from persona_align.generation import (
            GenerationParams,
            check_calls,
            make_responder,
            run_responders,
        )

        params = GenerationParams(**params_config.model_dump())
        made = [make_responder(r.kind, **responder_options(r)) for r in responders]
        candidates = run_responders(dialogues, made, params, cache_path, use_cache, False,
                                    self.console)  # fmt: skip
        check_calls(candidates, made)  # later stages would take a server's errors for the model's
        return candidates

    def _score(
        self,
        dialogues: list[Dialogue],
        candidates: list[Candidate],
        metrics: list[str],
        options: dict[str, dict[str, Any]],
        use_cache: bool,
    ) -> tuple[list[ScoredCandidate], list[Any]]:
        from persona_align.metrics import make_metric
        from persona_align.metrics.scorer import ScoreCache, prepare_metrics, score_stream
        from persona_align.models import cache_dir

        unknown = sorted(set(options) - set(metrics))
        if unknown:
            raise InputError(self.config_path, f"options for {unknown[0]!r}, which is not scored",
                             field="score.options")  # fmt: skip
        instances = [make_metric(name, **options.get(name, {})) for name in metrics]
        statuses = prepare_metrics(instances, dialogues)
        for status in statuses:
            if not status.available:
                self.console.print(f"[yellow]{status.name}: unavailable: {status.reason}")
        by_id = {d.id: d for d in dialogues}
        order = {d.id: k for k, d in enumerate(dialogues)}
        # replies to one dialogue side by side: judges that share the history run it once
        ranked = sorted(
            range(len(candidates)), key=lambda i: order.get(candidates[i].dialogue_id, -1)
        )
        store = ScoreCache(cache_dir() / "scores.sqlite") if use_cache else None
        try:
            results = list(score_stream(by_id, (candidates[i] for i in ranked), instances,
                                        statuses, store))  # fmt: skip
        finally:
            if store is not None:
                store.close()
        scored: list[ScoredCandidate | None] = [None] * len(candidates)
        for index, result in zip(ranked, results, strict=True):
            scored[index] = result
        return [s for s in scored if s is not None], statuses


@dataclass
class _Status:
    """A MetricStatus read back from a manifest."""

    name: str
    model: str | None
    available: bool
    reason: str | None
    settings: dict[str, Any] | None = None  # absent from manifests written before it existed


def _per_responder(candidates: list[Candidate]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in candidates:
        entry = out.setdefault(c.responder, {"candidates": 0, "valid": 0})
        entry["candidates"] += 1
        entry["valid"] += int(c.valid)
    return {"responders": out}


def _enter(stage: Stage, resume: bool) -> None:
    """Start a stage's folder afresh, unless it holds a crashed attempt at the same key
    (then training resumes from its checkpoints instead of starting over)."""
    attempt = stage.folder / ".attempt"
    crashed = resume and attempt.exists() and attempt.read_text() == stage.key
    if stage.folder.exists() and not crashed:
        shutil.rmtree(stage.folder)
    stage.folder.mkdir(parents=True, exist_ok=True)
    (stage.folder / "manifest.json").unlink(missing_ok=True)
    attempt.write_text(stage.key)


def _discard_if_empty(folder: Path) -> None:
    """A stage that refused its input before writing anything leaves no folder behind (a
    training stage that got as far as a checkpoint keeps it, to resume from)."""
    if {p.name for p in folder.iterdir()} == {".attempt"}:
        shutil.rmtree(folder)
        with contextlib.suppress(OSError):  # and the run folder, when that leaves it empty
            folder.parent.rmdir()


def _has_checkpoint(folder: Path) -> bool:
    return any(folder.glob("checkpoint-*"))


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    outputs = manifest.get("outputs", {})
    if not all(Path(p).exists() for p in outputs.values()):
        return None  # an output was deleted: the stage runs again
    return manifest


RUNNERS: dict[str, Callable[[Pipeline, Stage], None]] = {
    name: getattr(Pipeline, f"stage_{name}") for name in STAGES
}
