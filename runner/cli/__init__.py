"""The `tunebook` command. Each subcommand is a thin shell over a library function; user errors are
printed as one clear message (no traceback) and exit with status 2."""
from __future__ import annotations

import sys

import typer

from ..errors import TunebookError
from .backend import export_config
from .chat import chat
from .data import data
from .eval import eval_
from .export import compare, export
from .options import err
from .recipe import plan, validate
from .serve import serve
from .train import train

app = typer.Typer(
    name="tunebook",
    help="Declarative LoRA/QLoRA fine-tuning recipes: validate, plan, train, evaluate, export, chat, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
for name, command in (("validate", validate), ("plan", plan), ("data", data), ("train", train), ("eval", eval_),
                      ("export", export), ("compare", compare), ("chat", chat), ("serve", serve),
                      ("export-config", export_config)):
    app.command(name)(command)


def main() -> None:
    """Entry point: run the app, turn user errors into a message and exit status 2."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|gradient_checkpointing. is deprecated).*")
    try:
        code = app(standalone_mode=False)
    except TunebookError as exc:
        err.print(str(exc), style="red", highlight=False, markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and aborts
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        raise
    sys.exit(code if isinstance(code, int) else 0)
