"""The `tunebook` command. Each subcommand is a thin shell over a library function; user errors are
printed as one clear message (no traceback) and exit with status 2, usage errors (an unknown command or
option) as the CLI library prints them, also with status 2."""
from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..errors import TunebookError, write_failure

try:  # typer carries its own copy of click (typer._click) in recent versions
    from typer._click import exceptions as _click_exceptions
except ImportError:  # older typer uses click itself
    from click import exceptions as _click_exceptions
from .backend import export_config
from .chat import chat
from .data import data
from .eval import eval_
from .export import compare, export
from .garbage import gc
from .options import err
from .recipe import plan, validate
from .share import push, space
from .sweep import sweep
from .serve import serve
from .train import train

app = typer.Typer(
    name="tunebook",
    help="Declarative LoRA/QLoRA fine-tuning recipes: validate, plan, train, evaluate, export, chat, serve, share.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' own log lines "
                                                   "(llama.cpp, transformers, ...) and warnings.")] = False) -> None:
    """Declarative LoRA/QLoRA fine-tuning recipes: validate, plan, train, evaluate, export, chat."""
    from ..console import quiet_libraries

    quiet_libraries(not verbose)


for name, command in (("validate", validate), ("plan", plan), ("data", data), ("train", train), ("sweep", sweep),
                      ("eval", eval_), ("export", export), ("compare", compare), ("gc", gc), ("chat", chat),
                      ("serve", serve), ("export-config", export_config), ("push", push), ("space", space)):
    app.command(name)(command)


def main() -> None:
    """Entry point: run the app, turn user errors into a message and exit status 2."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(is_gradient_checkpointing|gradient_checkpointing. is deprecated).*")
    args = sys.argv[1:]
    if "--verbose" in args[1:]:  # also after the command (`tunebook train R --verbose`): it is the app's option
        args = ["--verbose"] + [a for a in args if a != "--verbose"]
    try:
        code = app(args=args, prog_name="tunebook", standalone_mode=False)
    except TunebookError as exc:
        err.print(str(exc), style="red", highlight=False, markup=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted", style="yellow")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _click_exceptions.ClickException as exc:  # usage errors: shown as typer shows them, exit status 2
        _show_usage_error(exc)
        sys.exit(exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        sys.exit(130)
    except Exception as exc:  # a full disk or a read-only folder, from whichever library was writing
        failure = write_failure(exc)
        if failure is None:
            raise
        err.print(str(failure), style="red", highlight=False, markup=False)
        sys.exit(failure.exit_code)
    if code == 130:  # Ctrl-C outside a training step's own handling: typer makes it Exit(130), silently
        command = next((a for a in args if not a.startswith("-")), "")
        err.print("interrupted" + ("" if command in WATCHERS else
                                   "; what was finished is kept: run the same command again to go on"), style="yellow")
    sys.exit(code if isinstance(code, int) else 0)


WATCHERS = ("chat", "serve", "validate", "plan", "gc")  # commands that make nothing a rerun goes on with


def _show_usage_error(exc) -> None:
    """What `typer` prints for a usage error when it runs standalone (a rich panel, or click's plain text)."""
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(exc)
    except ImportError:
        exc.show()
