"""`tunebook export-config`: a recipe's stages as configs for another trainer (axolotl), for people who run
it themselves. `backend: axolotl` in a recipe runs the same translation inside `tunebook train`."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .options import SetOpt, writable


class Target(str, Enum):
    axolotl = "axolotl"


def export_config(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)],
    to: Annotated[Target, typer.Option("--to", help="The trainer to write a config for.")] = Target.axolotl,
    stage: Annotated[str | None, typer.Option(help="Only this stage (default: every stage).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the YAML here (several stages: FILE-<stage>.yaml); "
                                                   "default: print it.")] = None,
    data_dir: Annotated[Path | None, typer.Option(
        help="Write every stage's conversations here as JSON Lines and point the config at them (default: only "
             "for stages axolotl cannot read itself, under the run directory).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Also validate with axolotl's own validate_config "
                                                        "(needs `make env-axolotl`).")] = False,
    set_: SetOpt = None,
) -> None:
    """Translate a recipe's stages into axolotl configs: base model, LoRA/QLoRA, datasets with type
    chat_template and field mappings, the chat template, batch, schedule, evaluation and saving."""
    import tempfile

    from rich.console import Console

    from ..recipe import load_recipe
    from ..train.axolotl import export_configs, validate

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if out is not None:
        writable(out, "--out", folder=False)
    if data_dir is not None:
        writable(data_dir, "--data-dir", folder=True)
    loaded = load_recipe(recipe, set_ or [])
    configs = export_configs(loaded, stage, data_dir, log=lambda m: err.print(m, markup=False))
    written: dict[str, Path] = {}
    if out is not None:
        for name, text in configs.items():
            path = out if len(configs) == 1 else out.with_name(f"{out.stem}-{name}{out.suffix or '.yaml'}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written[name] = path
            err.print(f"wrote {path} (stage {name})", markup=False)
    else:
        print("\n---\n".join(configs.values()), end="")
    if check:
        with tempfile.TemporaryDirectory() as tmp:
            paths = [written.get(name) or Path(tmp) / f"{name}.yaml" for name in configs]
            for path, text in zip(paths, configs.values()):
                if not path.exists():
                    path.write_text(text)
            validate(*paths)
        err.print(f"valid for axolotl (its validate_config): {', '.join(configs)}", markup=False)
