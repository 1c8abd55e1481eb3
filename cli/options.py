"""Options generated from a config dataclass, so every field is an option of the same name and no
option exists without its field. Every option defaults to None, meaning "not given": the preset,
the --config file or the dataclass default then decides (mochi_hub.config.resolve_config)."""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator

import typer

# Fields whose Python type is not what the command line takes.
AS_TEXT = {tuple: str}


def _option_type(annotation: Any) -> Any:
    """int | None -> int; tuple[int, int, int] -> str ("1024,1024,512"); bool stays a --flag/--no-flag."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"tuple": tuple, "int": int, "float": float, "str": str, "bool": bool})  # noqa: S307
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    return AS_TEXT.get(origin, annotation)


def config_options(cls: type, help_texts: dict[str, str]) -> list[inspect.Parameter]:
    """One keyword parameter per dataclass field, plus --config FILE."""
    params = []
    for f in dataclasses.fields(cls):
        if f.name not in help_texts:
            raise KeyError(f"{cls.__name__}.{f.name} has no help text")
        kind = _option_type(f.type)
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            flag = f"{flag}/--no-{f.name.replace('_', '-')}"
        option = typer.Option(flag, help=help_texts[f.name], show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    params.append(inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=Annotated[Path | None, typer.Option(
                                        "--config", help="YAML or JSON file of option values (under explicit options).",
                                        show_default=False)]))
    return params


def with_signature(run: Callable[..., None], params: list[inspect.Parameter], doc: str) -> Callable[..., None]:
    """A function Typer can read: `run(**options)` behind the generated signature."""

    def command(**options: Any) -> None:
        run(**options)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


@contextmanager
def exit_on(*errors: type[BaseException], code: int) -> Iterator[None]:
    """Errors of the user's making (bad options, bad input): one line on stderr and `code`, no traceback."""
    try:
        yield
    except errors as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(code) from None
