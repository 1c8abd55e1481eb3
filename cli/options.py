"""Options generated from a config dataclass, so every field is an option of the same name and no
option exists without its field. Every option defaults to None, meaning "not given": the preset,
the --config file or the dataclass default then decides (mochi_hub.config.resolve_config)."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from mochi_hub.errors import FAILURE, UserError

# Fields whose Python type is not what the command line takes.
AS_TEXT = {tuple: str}


def _option_type(annotation: Any) -> Any:
    """int | None -> int; tuple[int, int, int] -> str ("1024,1024,512"); bool stays a --flag/--no-flag."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    return AS_TEXT.get(origin, annotation)


def _shown(value: Any) -> str:
    """A value as the command line writes it: 30,40,50; on/off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def help_text(field: dataclasses.Field, presets: dict[str, dict[str, Any]]) -> str:
    """The field's help, then "[default: D; preset V; ...]": its default (or what a None default means) and the
    value of every preset that sets another. A preset named after the value it sets (--dataset imagenet-100)
    says nothing new and is left out; the presets themselves are listed under --preset."""
    if field.name == "preset":
        return f"{field.metadata['help']} [one of: {', '.join(presets)}; `mochi presets` shows their values]"
    said = field.metadata["default_text"]
    parts = [f"default: {said if said is not None else _shown(field.default)}"]
    if field.default is None and said is None:
        parts = []
    for name, values in presets.items():
        if field.name in values and values[field.name] != field.default and values[field.name] != name:
            parts.append(f"{name} {_shown(values[field.name])}")
    return field.metadata["help"] + (f" [{'; '.join(parts)}]" if parts else "")


def _keyword(name: str, default: Any, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def config_options(cls: type, presets: dict[str, dict[str, Any]]) -> list[inspect.Parameter]:
    """One keyword parameter per dataclass field (Literal fields become choices), its help and older names from
    the field's declaration (mochi_hub.config.option), plus --config FILE and --print-config."""
    params = []
    hints = typing.get_type_hints(cls)  # the annotations are strings (from __future__ import annotations)
    for f in dataclasses.fields(cls):
        kind = _option_type(hints[f.name])
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            flag = f"{flag}/--no-{f.name.replace('_', '-')}"
        aliases = [f"--{old.replace('_', '-')}" for old in f.metadata["aliases"]]
        option = typer.Option(flag, *aliases, help=help_text(f, presets), show_default=False)
        params.append(_keyword(f.name, None, Annotated[kind | None, option]))
    config = typer.Option("--config", help="YAML or JSON file of option values (under explicit options).")
    params.append(_keyword("config_file", None, Annotated[Path | None, config]))
    show = typer.Option("--print-config", help="Print the resolved configuration (YAML) and exit.")
    params.append(_keyword("print_config", False, Annotated[bool, show]))
    return params


def print_config(config: Any) -> None:
    """The resolved config as YAML on stdout: what would run, every field."""
    import yaml

    typer.echo(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())


def with_signature(run: Callable[..., None], params: list[inspect.Parameter], doc: str) -> Callable[..., None]:
    """A function Typer can read: `run(**options)` behind the generated signature."""

    def command(**options: Any) -> None:
        run(**options)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


INTERRUPTED = 130  # exit code of Ctrl-C; USAGE (2) and FAILURE (1) come with mochi_hub.errors


def fail(error: BaseException | str, code: int = FAILURE) -> NoReturn:
    """One line on stderr, with the prefix every command uses, and the exit code."""
    typer.echo(f"Error: {' '.join(str(error).split())}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Errors a user can fix (mochi_hub.errors.UserError: a bad option, bad input, a full disk): one line on stderr and
    the error's exit code (2 usage, 1 at run time), no traceback. Ctrl-C: exit 130 (the library has said where the
    newest checkpoint is). Anything else is a bug and keeps its traceback."""
    try:
        yield
    except UserError as error:
        fail(error, error.exit_code)
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED) from None


# The positional SOURCE of `mochi probe` and `mochi detect`: anything mochi_hub.publish.sources.Source parses.
SOURCE = inspect.Parameter(
    "source",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    annotation=Annotated[
        str,
        typer.Argument(
            help="A run directory (its export/, else its newest checkpoint), an exported timm folder "
            "(config.json + model.safetensors), or hf-hub:org/name[@revision].",
            metavar="SOURCE",
            show_default=False,
        ),
    ],
)


def print_table(title: str, row: dict[str, str], *, text_columns: int = 1, note: str = "") -> None:
    """One result as a table on stdout: `row` maps each column's name to its value; the first `text_columns`
    are left-aligned, the numbers after them right-aligned. Where the row does not fit the terminal, one line per
    column instead: a value is never cut in two ("fashion-mnis" / "t")."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title)
    for i, column in enumerate(row):
        table.add_column(column, justify="left" if i < text_columns else "right", no_wrap=True)
    table.add_row(*row.values())
    if console.measure(table, options=console.options.update_width(10**6)).maximum > console.width:
        table = Table(title=title, show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # only a value wider than the terminal itself is folded
        for column, value in row.items():
            table.add_row(column, value)
    console.print(table)
    if note:
        console.print(note, markup=False, soft_wrap=True)
