"""The benchmark report and ``persona-align bench``: numbers, ranking, HTML, errors."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from persona_align.records import (
    Candidate,
    Dialogue,
    ScoredCandidate,
    Turn,
    read_records,
    write_records,
)
from persona_align.report import DEFAULT_METRICS, MetricInfo, write_report
from persona_align.report.summary import ranking

SAMPLE_VALID = Path(__file__).resolve().parents[1] / "src/persona_align/sample_data/valid.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dialogues(n: int) -> list[Dialogue]:
    return [
        Dialogue(
            id=f"d{i}",
            persona=["I like tea.", "I live in Oslo."],
            context=[Turn(speaker="User1", text="How are you?")],
            reference="I am fine and drinking tea in Oslo.",
        )
        for i in range(n)
    ]


def _candidate(dialogue_id: str, responder: str, reply: str | None, latency: float) -> Candidate:
    return Candidate(
        dialogue_id=dialogue_id,
        responder=responder,
        raw=json.dumps({"response": reply}) if reply is not None else "no json here",
        response=reply,
        valid=reply is not None,
        latency_s=latency,
    )


@pytest.fixture
def two_systems(tmp_path: Path) -> dict[str, Path]:
    """Three dialogues; replies chosen so Dist-1/Dist-2 are easy to compute by hand."""
    dialogues = _dialogues(3)
    write_records(tmp_path / "dialogues.jsonl", dialogues, Dialogue)
    alpha = ["yes yes yes yes", "one two three", None]  # dist-1: 1/4, 1, fail 0
    beta = ["hello there friend", "go go", "a b a b"]  # dist-1: 1, 1/2, 2/4
    write_records(
        tmp_path / "alpha.jsonl",
        [
            _candidate(d.id, "alpha", r, t)
            for d, r, t in zip(dialogues, alpha, [1, 2, 3], strict=True)
        ],
        Candidate,
    )
    write_records(
        tmp_path / "beta.jsonl",
        [_candidate(d.id, "beta", r, 0.5) for d, r in zip(dialogues, beta, strict=True)],
        Candidate,
    )
    return {"dir": tmp_path, "dialogues": tmp_path / "dialogues.jsonl"}


def _bench(cli, paths: dict[str, Path], *extra: str, out: str = "report"):
    return cli(
        "bench", "-d", paths["dialogues"], "-s", paths["dir"] / "alpha.jsonl",
        paths["dir"] / "beta.jsonl", "-o", paths["dir"] / out,
        "--cache", paths["dir"] / "scores.sqlite", "--metrics", "dist-1,dist-2", "--json", *extra,
    )  # fmt: skip


def _md_rows(markdown: str, section: str) -> dict[str, list[str]]:
    """Rows of the first table under ``## section``, keyed by their system cell."""
    block = markdown.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[header.index("system")]] = cells
    return rows


def test_markdown_table_matches_hand_computed_means(cli, two_systems) -> None:
    result = _bench(cli, two_systems, "--baseline", "alpha")
    assert result.code == 0, result.err
    markdown = (two_systems["dir"] / "report" / "report.md").read_text()
    rows = _md_rows(markdown, "Results")
    # alpha dist-1 [0.25, 1, 0]: mean 0.4167, population std sqrt(0.5417/3) = 0.4249
    # alpha dist-2 [1/3, 1, 0]: mean 0.4444, std sqrt(0.5185/3) = 0.4157
    assert rows["alpha"][1:] == ["3", "0", "0.333", "2.00", "0.417 ± 0.425", "0.444 ± 0.416"]
    # beta dist-1 [1, 0.5, 0.5]: mean 0.6667, std 0.2357; dist-2 [1, 1, 2/3]: 0.8889, 0.1571
    assert rows["beta"][1:] == ["3", "0", "0.000", "0.50", "0.667 ± 0.236", "0.889 ± 0.157"]
    ranks = _md_rows(markdown, "Ranking")
    assert ranks["beta"][0] == "1" and ranks["alpha"][0] == "2"
    # paired differences beta - alpha on dist-1: 0.75, -0.5, 0.5 -> mean +0.25
    paired = _md_rows(markdown, "Paired comparison against alpha")
    assert paired["beta"][1].startswith("+0.250 [")
    summary = json.loads((two_systems["dir"] / "report" / "summary.json").read_text())
    assert summary["baseline"]["comparisons"]["beta"]["dist-1"]["mean_diff"] == pytest.approx(0.25)
    assert summary["systems"]["alpha"]["metrics"]["dist-1"]["std"] == pytest.approx(
        0.42492, abs=1e-5
    )
    # two metrics cannot make a radar; the report says so instead of drawing an empty one
    assert "radar" in summary["plots_missing"] and "Not drawn:" in markdown
    low, high = summary["systems"]["alpha"]["metrics"]["dist-1"]["ci95"]
    assert 0 <= low <= 0.4167 <= high <= 1


def test_ranking_shares_tied_ranks_and_respects_direction() -> None:
    def entry(value: float, cost: float, failure: float) -> dict:
        return {"metrics": {"m": {"mean": value}, "cost": {"mean": cost}}, "failure_ratio": failure}

    systems = {"x": entry(0.5, 0.3, 0.1), "y": entry(0.5, 0.1, 0.2), "z": entry(0.1, 0.2, 0.0)}
    infos = [MetricInfo("m"), MetricInfo("cost", higher_is_better=False)]
    result = ranking(systems, infos)
    by_name = {row["system"]: row for row in result["order"]}
    assert by_name["x"]["ranks"] == {"m": 1.5, "cost": 3.0, "failure_ratio": 2.0}
    assert by_name["y"]["ranks"] == {"m": 1.5, "cost": 1.0, "failure_ratio": 3.0}
    assert by_name["z"]["ranks"] == {"m": 3.0, "cost": 2.0, "failure_ratio": 1.0}
    # mean ranks: y 5.5/3, z 6/3, x 6.5/3
    assert [row["system"] for row in result["order"]] == ["y", "z", "x"]
    assert [row["position"] for row in result["order"]] == [1, 2, 3]


def _scored(dialogue_id: str, responder: str, value: float | None, valid: bool = True):
    return ScoredCandidate(
        dialogue_id=dialogue_id, responder=responder, raw="x", response="x" if valid else None,
        valid=valid, latency_s=1.0, scores={"a": value, "b": value, "c": value},
    )  # fmt: skip


def _scored_systems() -> dict[str, list[ScoredCandidate]]:
    return {
        name: [_scored(f"d{i}", name, (i + offset) / 10) for i in range(6)]
        for name, offset in (("one", 0), ("two", 2), ("three", 4))
    }


def test_html_is_self_contained_with_one_image_per_plot(tmp_path: Path) -> None:
    summary = write_report(tmp_path / "r", _scored_systems(), ["a", "b", "c"], baseline="one")
    page = (tmp_path / "r" / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert set(summary["plots"]) == {
        "bars",
        "radar",
        "distributions",
        "failure_latency",
        "baseline",
    }
    assert len(sources) == len(summary["plots"])
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    for name in ("one", "two", "three"):
        assert f"<td>{name}</td>" in page
    assert (tmp_path / "r" / "plots" / "radar.png").read_bytes().startswith(PNG_MAGIC)


def test_training_curves_only_when_a_log_is_given(tmp_path: Path) -> None:
    systems = _scored_systems()
    without = write_report(tmp_path / "r", systems, ["a"])
    assert "training" not in without["plots"] and without["training"] is None
    assert "Training curves" not in (tmp_path / "r" / "report.html").read_text()

    dpo_log = [
        {"step": s, "epoch": s / 10, "loss": 0.7 - s / 100, "grad_norm": 1.0 + s,
         "learning_rate": 1e-6, "rewards/margins": s / 50, "rewards/accuracies": 0.5 + s / 40}
        for s in range(1, 9)
    ]  # fmt: skip
    with_log = write_report(tmp_path / "r", systems, ["a"], training_log=dpo_log)
    page = (tmp_path / "r" / "report.html").read_text()
    assert with_log["training"]["curves"] == [
        "loss",
        "grad_norm",
        "rewards/margins",
        "rewards/accuracies",
    ]
    assert "Training curves" in page
    assert page.count("<img ") == len(without["plots"]) + 1
    assert (tmp_path / "r" / "plots" / "training.png").exists()

    write_report(tmp_path / "r", systems, ["a"])  # a later report without a log drops the plot
    assert not (tmp_path / "r" / "plots" / "training.png").exists()


def test_a_failure_while_computing_leaves_no_file(tmp_path: Path, monkeypatch) -> None:
    from persona_align.report import plots

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "radar", broken)
    with pytest.raises(RuntimeError):
        write_report(tmp_path / "r", _scored_systems(), ["a", "b", "c"])
    assert not (tmp_path / "r").exists()


def _write_csv(path: Path, replies: list[str], times: list[float]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["gen_response", "response_time"])
        writer.writerows(zip(replies, times, strict=True))


@pytest.fixture
def sample_systems(tmp_path: Path) -> dict[str, Path]:
    """The bundled sample dialogues answered by a responses CSV and a Candidate file."""
    dialogues = read_records(SAMPLE_VALID, Dialogue)
    replies = [json.dumps({"response": f"I think {d.persona[0].lower()}"}) for d in dialogues]
    replies[0] = "sorry, no JSON"  # one failure
    _write_csv(tmp_path / "csv-system.csv", replies, [2.0] * len(dialogues))
    write_records(
        tmp_path / "cands.jsonl",
        [_candidate(d.id, "hf:gold", d.reference, 0.25) for d in dialogues],
        Candidate,
    )
    return {"dir": tmp_path, "dialogues": SAMPLE_VALID}


def test_cli_bench_end_to_end_on_sample_data(cli, sample_systems) -> None:
    folder = sample_systems["dir"]
    sft_log = [
        {"step": s, "loss": 2.0 / s, "grad_norm": 1.0, "learning_rate": 1e-5} for s in (1, 2)
    ]
    log = folder / "log.jsonl"
    log.write_text("".join(json.dumps(entry) + "\n" for entry in sft_log))
    args = [
        "bench", "-d", sample_systems["dialogues"], "--systems", folder / "csv-system.csv",
        folder / "cands.jsonl", "-o", folder / "out", "--metrics", "lfc,dist-1,bleu-1,rouge-l",
        "--cache", folder / "scores.sqlite", "--baseline", "csv-system", "--json",
        "--training-log", log,
    ]  # fmt: skip
    first = cli(*args)
    assert first.code == 0, first.err
    summary = first.summary
    assert summary["ranking"] == ["hf:gold", "csv-system"]
    gold = summary["systems"]["hf:gold"]["means"]
    assert gold["bleu-1"] == pytest.approx(1.0) and gold["rouge-l"] == pytest.approx(1.0)
    assert summary["systems"]["csv-system"]["failure_ratio"] == pytest.approx(1 / 14)
    assert summary["systems"]["csv-system"]["mean_latency_s"] == pytest.approx(2.0)
    assert "training" in summary["plots"] and "baseline" in summary["plots"]
    report = json.loads((folder / "out" / "summary.json").read_text())
    assert report["training"] == {"steps": 2, "curves": ["loss", "grad_norm"]}
    for name in ("report.md", "report.html", "summary.json"):
        assert (folder / "out" / name).stat().st_size > 0
    scored = read_records(folder / "out" / "scored" / "hf_gold.jsonl", ScoredCandidate)
    assert len(scored) == 14 and set(scored[0].scores) == {"lfc", "dist-1", "bleu-1", "rouge-l"}

    # a ScoredCandidate file keeps its values: edit one metric and the report shows the edit
    edited = [s.model_copy(update={"scores": s.scores | {"dist-1": 0.123}}) for s in scored]
    write_records(folder / "edited.jsonl", edited, ScoredCandidate)
    again = cli(
        "bench", "-d", sample_systems["dialogues"], "-s", f"mine={folder / 'edited.jsonl'}",
        "-s", folder / "cands.jsonl", "-o", folder / "out2", "--metrics", "dist-1,bleu-1",
        "--cache", folder / "scores.sqlite", "--json",
    )  # fmt: skip
    assert again.code == 0, again.err
    assert again.summary["systems"]["mine"]["means"]["dist-1"] == pytest.approx(0.123)
    assert again.summary["systems"]["hf:gold"]["means"]["dist-1"] != pytest.approx(0.123)
    sources = json.loads((folder / "out2" / "summary.json").read_text())["sources"]
    assert sources["mine"]["metrics_from_file"] == ["dist-1", "bleu-1"]


def test_unavailable_metric_is_reported_not_scored(cli, two_systems) -> None:
    result = _bench(cli, two_systems, "--metrics", "dist-1,p", "--opt", "p.backend=word2vec")
    assert result.code == 0, result.err
    assert result.summary["metrics"]["p"]["available"] is False
    assert "vectors" in result.summary["metrics"]["p"]["reason"]
    assert result.summary["systems"]["alpha"]["means"]["p"] is None
    rows = _md_rows((two_systems["dir"] / "report" / "report.md").read_text(), "Results")
    assert rows["alpha"][-1] == "unavailable" and rows["beta"][-1] == "unavailable"


def test_metric_table_shows_the_settings_the_values_were_computed_with(cli, two_systems) -> None:
    result = _bench(cli, two_systems, "--metrics", "lfc,dist-1", "--opt", "lfc.target=4")
    assert result.code == 0, result.err
    markdown = (two_systems["dir"] / "report" / "report.md").read_text()
    block = markdown.split("## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in block.splitlines() if line.startswith("|")}
    assert "| target=4, format_bonus=0.3 |" in rows["lfc"]
    assert "| - | - | available |" in rows["dist-1"]  # no model, nothing to set
    summary = json.loads((two_systems["dir"] / "report" / "summary.json").read_text())
    settings = summary["metrics"]["lfc"]["settings"]
    assert settings == {"name": "lfc", "target": 4, "format_bonus": 0.3}


def test_already_extracted_replies_read_as_json_get_a_one_line_warning(cli, two_systems) -> None:
    folder = two_systems["dir"]
    _write_csv(folder / "extracted.csv", ["I am fine.", "Tea, always.", "Oslo."], [1.0] * 3)
    args = ["bench", "-d", two_systems["dialogues"], "-s", folder / "extracted.csv",
            folder / "alpha.jsonl", "-o", folder / "r", "--metrics", "dist-1", "--no-cache",
            "--json"]  # fmt: skip
    lenient = cli(*args)
    assert lenient.code == 0, lenient.err
    warnings = [line for line in lenient.err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        'warning: extracted: 3 of 3 replies (100%) have no extractable {"response": ...}; '
        "if they were extracted already, use --extraction none"
    ]  # alpha fails 1 of 3: no warning
    as_extracted = cli(*args, "--extraction", "none")
    assert as_extracted.summary["systems"]["extracted"]["failure_ratio"] == 0
    assert "warning:" not in as_extracted.err


def test_default_metric_list_matches_the_cli() -> None:
    from persona_align.cli.report import DEFAULT_METRICS as CLI_DEFAULT

    assert CLI_DEFAULT.split(",") == list(DEFAULT_METRICS)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-file", "file does not exist"),
        ("short-csv", "2 response rows for 3 dialogues"),
        ("missing-dialogue", "answers 2 of 3 dialogues"),
        ("unknown-dialogue", "field 'dialogue_id': no dialogue with id 'zz'"),
        ("duplicate-name", "a second system named 'alpha'"),
        ("dialogue-file", "holds dialogue records"),
        ("bad-baseline", "--baseline 'nobody' is not a system"),
        ("unknown-metric", "unknown metric 'nope'"),
        ("multi-named", "NAME=FILE can only name a file with one responder"),
        ("missing-log", "log.jsonl: file does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, two_systems, case: str, expected: str) -> None:
    folder = two_systems["dir"]
    alpha = folder / "alpha.jsonl"
    systems: list[str | Path] = [alpha]
    extra: list[str] = []
    if case == "missing-file":
        systems = [folder / "nope.jsonl"]
    elif case == "short-csv":
        _write_csv(folder / "short.csv", ["a", "b"], [1, 1])
        systems = [folder / "short.csv"]
    elif case == "missing-dialogue":
        lines = alpha.read_text().splitlines()
        (folder / "partial.jsonl").write_text("\n".join(lines[:2]) + "\n")
        systems = [folder / "partial.jsonl"]
    elif case == "unknown-dialogue":
        record = json.loads(alpha.read_text().splitlines()[0]) | {"dialogue_id": "zz"}
        (folder / "odd.jsonl").write_text(alpha.read_text() + json.dumps(record) + "\n")
        systems = [folder / "odd.jsonl"]
    elif case == "duplicate-name":
        systems = [alpha, alpha]
    elif case == "dialogue-file":
        systems = [two_systems["dialogues"]]
    elif case == "bad-baseline":
        extra = ["--baseline", "nobody"]
    elif case == "unknown-metric":
        extra = ["--metrics", "nope"]
    elif case == "multi-named":
        both = alpha.read_text() + (folder / "beta.jsonl").read_text()
        (folder / "both.jsonl").write_text(both)
        systems = [f"x={folder / 'both.jsonl'}"]
    elif case == "missing-log":
        extra = ["--training-log", str(folder / "log.jsonl")]
    args = ["bench", "-d", two_systems["dialogues"], "-o", folder / "out", "--no-cache"]
    result = cli(*args, *extra, "--systems", *systems)
    assert result.code == 2, result.out
    message = result.err.strip()
    assert len(message.splitlines()) == 1 and expected in message, message
    assert not (folder / "out").exists()


CHROMIUM = next(
    filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))),
    None,
)
_CHECK = (
    "<script>window.addEventListener('load',()=>{const i=[...document.images];"
    "document.body.setAttribute('data-images',"
    "i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)})</script></body>"
)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium or chrome on PATH")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    summary = write_report(tmp_path / "r", _scored_systems(), ["a", "b", "c"], baseline="one")
    page = (tmp_path / "r" / "report.html").read_text()
    probe = tmp_path / "probe.html"  # the report plus a script that counts decoded images
    probe.write_text(page.replace("</body>", _CHECK))
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000", "--dump-dom", probe.as_uri(),
    ]  # fmt: skip
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    count = len(summary["plots"])
    assert f'data-images="{count}/{count}"' in dom
    for name in ("one", "two", "three"):
        assert f"<td>{name}</td>" in dom
