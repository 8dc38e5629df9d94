"""``python -m persona_align.cli ...`` (multi-process launches, tests)."""

from persona_align.cli.app import run_cli

run_cli()
