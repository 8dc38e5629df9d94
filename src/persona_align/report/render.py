"""The report as Markdown and as one self-contained HTML page, built from the same sections.

Both renderings come from one list of :class:`Section`, so the Markdown and the HTML can never
disagree. The HTML embeds its figures as base64 PNG data URIs and its style inline: it opens
offline, from a mail attachment, or in a CI artifact viewer, with nothing fetched.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from persona_align.report.summary import FAILURE

PLOTS: dict[str, str] = {
    "bars": "Per-metric means with bootstrap 95% intervals",
    "radar": "Metric means, min-max normalised across systems",
    "distributions": "Score distributions over valid replies",
    "failure_latency": "Failure ratio vs mean response time (PersoDPO Fig. 2c)",
    "baseline": "Paired differences to the baseline",
    "training": "Training curves",
}


@dataclass
class Section:
    """A heading, an optional paragraph, an optional table and an optional figure."""

    title: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    right: set[int] = field(default_factory=set)
    image: str | None = None


def _num(value: float | None, digits: int = 3, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _interval(low: float | None, high: float | None, sign: bool = False) -> str:
    return f"[{_num(low, sign=sign)}, {_num(high, sign=sign)}]"


def _rank(value: float) -> str:
    return f"{value:g}"


def _settings(settings: Mapping[str, Any] | None) -> str:
    """A metric's settings as ``key=value`` (name and model have their own columns); long texts
    such as a judge's prompt are cut here, summary.json holds them whole."""
    parts = []
    for key, value in (settings or {}).items():
        if key in ("name", "model") or value is None:
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key}={text if len(text) <= 24 else text[:20] + '…'}")
    return ", ".join(parts) or "-"


def _metric_cell(summary: Mapping[str, Any], system: str, metric: str, what: str) -> str:
    cell = summary["systems"][system]["metrics"].get(metric)
    if cell is None:
        return "-" if summary["metrics"][metric]["available"] else "unavailable"
    if what == "ci":
        return _interval(*cell["ci95"])
    return f"{_num(cell['mean'])} ± {_num(cell['std'])}"


ROLE_WORDS = {"user": "the listener's", "self": "the responder's own"}


def _roles(summary: Mapping[str, Any]) -> str:
    """Whose persona the replies are judged against: C means something else for each."""
    roles = summary.get("persona_roles") or {}
    if not roles:
        return ""
    parts = [f"{ROLE_WORDS.get(role, role)} in {n}" for role, n in roles.items()]
    return f" (persona: {', '.join(parts)})"


def sections(
    summary: Mapping[str, Any], images: Mapping[str, bytes], missing: Mapping[str, str]
) -> list[Section]:
    """The report's content, in reading order."""
    out = [_introduction(summary), *_results(summary)]
    for optional in (_corpus_diversity(summary), _ranking(summary), _baseline(summary)):
        if optional is not None:
            out.append(optional)
    out.append(_metric_settings(summary))
    return out + _plots(summary, images, missing)


def _introduction(summary: Mapping[str, Any]) -> Section:
    systems, metrics = list(summary["systems"]), list(summary["metrics"])
    return Section(
        summary.get("title", "Benchmark report"),
        f"{summary.get('dialogues', '?')} dialogues{_roles(summary)}, {len(systems)} systems, "
        f"metrics: {', '.join(metrics) or 'none'}. Means ± population standard deviation "
        "over all replies; a failed reply (no extractable response) carries each metric's "
        "worst value (PersoBench's convention), so the failure ratio is part of every mean. "
        "A call that failed (a server down: no reply came back) is not the model's failure: "
        "it is left out of every number and counted under call errors. "
        f"Time: mean response time. Intervals: percentile bootstrap over replies, "
        f"{summary.get('n_boot', 1000)} resamples.",
    )


def _results(summary: Mapping[str, Any]) -> list[Section]:
    """The means per system, and their bootstrap intervals."""
    metrics = list(summary["metrics"])
    results = Section(
        "Results",
        header=["system", "replies", "call errors", "failure ratio", "time (s)", *metrics],
        right=set(range(1, 5 + len(metrics))),
    )
    intervals = Section(
        "Bootstrap 95% intervals of the means",
        header=["system", "failure ratio", *metrics],
        right=set(range(1, 2 + len(metrics))),
    )
    for system, entry in summary["systems"].items():
        results.rows.append(
            [
                system,
                str(entry["responses"]),
                str(entry["errors"]),
                _num(entry[FAILURE]),
                _num(entry["mean_latency_s"], 2),
                *(_metric_cell(summary, system, m, "mean") for m in metrics),
            ]
        )
        intervals.rows.append(
            [
                system,
                _interval(*entry["failure_ci95"]),
                *(_metric_cell(summary, system, m, "ci") for m in metrics),
            ]
        )
    return [results, intervals]


def _corpus_diversity(summary: Mapping[str, Any]) -> Section | None:
    keys = [k for k in ("dist-1", "dist-2") if k in summary["metrics"]]
    if not keys:
        return None
    return Section(
        "Corpus-level diversity",
        "Distinct n-grams over all of a system's valid replies / all their n-grams "
        "(PersoBench's Dist-n); the table above holds the per-reply mean.",
        header=["system", *keys],
        rows=[
            [s, *(_num(entry.get("corpus", {}).get(k)) for k in keys)]
            for s, entry in summary["systems"].items()
        ],
        right=set(range(1, 1 + len(keys))),
    )


def _ranking(summary: Mapping[str, Any]) -> Section:
    rank = summary["ranking"]
    criteria = rank["criteria"]
    text = (
        "Each system is ranked on every criterion (1 = best; tied systems share the mean of "
        "their ranks) and ordered by its mean rank, as PersoBench compares models across "
        "metrics. Criteria: the metrics with a value for every system, and the failure ratio "
        "(lower is better); response time is left out, as it depends on the hardware."
    )
    if rank["skipped"]:
        text += f" Not ranked (no value for every system): {', '.join(rank['skipped'])}."
    return Section(
        "Ranking",
        text,
        header=["#", "system", "mean rank", *(c.replace("_", " ") for c in criteria)],
        rows=[
            [
                str(row["position"]),
                row["system"],
                f"{row['mean_rank']:.2f}",
                *(_rank(row["ranks"][c]) for c in criteria),
            ]
            for row in rank["order"]
        ],
        right={0, *range(2, 3 + len(criteria))},
    )


def _baseline(summary: Mapping[str, Any]) -> Section | None:
    """Each system minus the baseline, paired, when the report has a baseline."""
    block = summary.get("baseline")
    if not block:
        return None
    keys = [*summary["metrics"], FAILURE]
    rows = []
    for system, cells in block["comparisons"].items():
        row = [system]
        for key in keys:
            cell = cells.get(key)
            if cell is None:
                row.append("-")
                continue
            significant = cell["ci95_low"] > 0 or cell["ci95_high"] < 0
            row.append(
                f"{_num(cell['mean_diff'], sign=True)} "
                f"{_interval(cell['ci95_low'], cell['ci95_high'], sign=True)}"
                f"{'*' if significant else ''} p={cell['p_value']:.3g}"
            )
        rows.append(row)
    return Section(
        f"Paired comparison against {block['name']}",
        f"System minus {block['name']} on the dialogues both answered: mean difference, "
        "paired bootstrap 95% interval over dialogues (* = the interval excludes 0) and "
        "the two-sided p-value of a sign-flip randomization test. For the failure ratio, "
        "lower is better.",
        header=["system", *(k.replace("_", " ") for k in keys)],
        rows=rows,
        right=set(range(1, 1 + len(keys))),
    )


def _metric_settings(summary: Mapping[str, Any]) -> Section:
    return Section(
        "Metrics",
        "Settings: what the values were computed with (the score cache keys on them); "
        "version = a hash of the model's weights.",
        header=["metric", "model", "settings", "status", "description"],
        rows=[
            [
                name,
                info["model"] or "-",
                _settings(info.get("settings")),
                "available" if info["available"] else f"unavailable: {info['reason']}",
                info["description"],
            ]
            for name, info in summary["metrics"].items()
        ],
    )


def _plots(
    summary: Mapping[str, Any], images: Mapping[str, bytes], missing: Mapping[str, str]
) -> list[Section]:
    training = summary.get("training")
    out = []
    for key, caption in PLOTS.items():
        if key in images:
            text = ""
            if key == "training" and training:
                text = f"{training['steps']} logged steps; curves: {', '.join(training['curves'])}."
            out.append(Section(caption, text, image=key))
        elif key in missing:
            out.append(Section(caption, f"Not drawn: {missing[key]}."))
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(parts: list[Section], image_paths: Mapping[str, str]) -> str:
    lines: list[str] = []
    for index, part in enumerate(parts):
        lines += [f"{'#' if index == 0 else '##'} {part.title}", ""]
        if part.text:
            lines += [part.text, ""]
        if part.header:
            lines.append("| " + " | ".join(_md_cell(h) for h in part.header) + " |")
            lines.append(
                "|"
                + "|".join("---:" if i in part.right else "---" for i in range(len(part.header)))
                + "|"
            )
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in part.rows]
            lines.append("")
        if part.image:
            lines += [f"![{part.title}]({image_paths[part.image]})", ""]
    return "\n".join(lines)


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem auto;
max-width:1600px;padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.8rem}
th,td{border:1px solid #d0d0d0;padding:.2rem .35rem;vertical-align:top}
th{background:#f3f3f3;white-space:nowrap}td:nth-child(-n+2){white-space:nowrap}td.r{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#fafafa}img{max-width:100%;height:auto}
figure{margin:.5rem 0 1.5rem}.note{color:#555}.scroll{overflow-x:auto}
"""


def to_html(parts: list[Section], images: Mapping[str, bytes]) -> str:
    esc = html.escape
    body: list[str] = []
    for index, part in enumerate(parts):
        tag = "h1" if index == 0 else "h2"
        body.append(f"<{tag}>{esc(part.title)}</{tag}>")
        if part.text:
            body.append(f'<p class="note">{esc(part.text)}</p>')
        if part.header:
            head = "".join(f"<th>{esc(h)}</th>" for h in part.header)
            rows = "".join(
                "<tr>"
                + "".join(
                    f'<td class="r">{esc(c)}</td>' if i in part.right else f"<td>{esc(c)}</td>"
                    for i, c in enumerate(row)
                )
                + "</tr>"
                for row in part.rows
            )
            body.append(
                f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
                f"<tbody>{rows}</tbody></table></div>"
            )
        if part.image:
            data = base64.b64encode(images[part.image]).decode("ascii")
            body.append(
                f'<figure><img alt="{esc(part.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(part.title)}</figcaption></figure>"
            )
    title = esc(parts[0].title if parts else "report")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
