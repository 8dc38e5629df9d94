"""The ``persona-align`` application: every command group registered in one place.

Exit codes: 0 success, 2 bad input or configuration (one line naming file, place and field),
3 model calls still failing after retries (a server down; a rerun retries only those),
1 anything else. ``--json`` prints a machine-readable summary as the last line of output.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from persona_align.cli import (
    data,
    generate,
    judge,
    methods,
    nli,
    pairs,
    report,
    run_config,
    score,
    serve,
    train,
)
from persona_align.errors import CallsFailed, InputError

app = typer.Typer(
    help="Make dialogue models stay in character: data, candidates, scores, pairs, training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _policy(
    device: Annotated[
        str | None,
        typer.Option(
            help="Where every model loads: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps. "
            "Overrides a config's device:.",
            envvar="PERSONA_ALIGN_DEVICE",
        ),
    ] = None,
    attn_implementation: Annotated[
        str | None,
        typer.Option(help="sdpa (default), eager or flash_attention_2 (needs flash-attn)."),
    ] = None,
) -> None:
    """Make dialogue models stay in character: data, candidates, scores, pairs, training."""
    from persona_align import devices

    devices.reset()  # one policy per invocation (main() may run several in one process)
    devices.configure(device, attn_implementation, explicit=device is not None)


train_app = typer.Typer(
    help="Train models: score-weighted DPO, SFT, PAL, SBS, our judges and the NLI model.",
    no_args_is_help=True,
)
train_app.command("dpo")(train.train_dpo_command)
train_app.command("sft")(train.train_sft_command)
train_app.command("pal")(methods.train_pal_command)
train_app.command("sbs")(methods.train_sbs_command)
train_app.command("judge")(judge.train_judge_command)
train_app.command("nli")(nli.train_nli_command)

app.add_typer(data.data_app, name="data")
app.command("generate")(generate.generate)
app.command("score")(score.score)
app.add_typer(pairs.pairs_app, name="pairs")
app.add_typer(train_app, name="train")
app.command("run")(run_config.run_pipeline)
app.command("bench")(report.bench_command)
app.command("serve")(serve.serve_command)
app.command("chat")(serve.chat_command)
app.add_typer(
    nli.nli_app, name="nli", help="The NLI model behind C and UE: accuracy on labelled pairs."
)
app.add_typer(
    judge.judge_app, name="judge", help="Our judges (C, coherence): agreement with readers' labels."
)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; InputError becomes exit 2 and CallsFailed exit 3,
    each with one line on stderr."""
    # our own rich progress bars report long work; the libraries' tqdm bars would interleave
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF conversion bar
    try:
        app(args=argv, prog_name="persona-align")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CallsFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except SystemExit as exit_:  # click's own handling: usage errors exit 2, --help exits 0
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def run_cli() -> None:
    """Console-script entry point."""
    sys.exit(main())
