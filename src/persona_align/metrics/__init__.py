"""Persona metrics behind one registry (``persona-align score --metrics ...``).

Each metric is a module with ``@register_metric`` classes that declare the model they need;
importing the module here registers them.
"""

from persona_align.metrics import (  # noqa: F401
    bertscore,
    coherence,
    consistency,
    lexical,
    lfc,
    persona_distance,
    similarity,
)
from persona_align.metrics.base import (
    METRICS,
    Metric,
    ScoreItem,
    Unavailable,
    make_metric,
    parse_metric_options,
)

__all__ = ["METRICS", "Metric", "ScoreItem", "Unavailable", "make_metric", "parse_metric_options"]
