"""``persona-align``: one module per command group; commands parse, check and call the stages.

``app`` registers every group (``cli/app.py``); ``output`` holds what the commands share.
"""

from persona_align.cli.app import app, main, run_cli

run = run_cli  # the console script's entry point: persona_align.cli:run

__all__ = ["app", "main", "run"]
