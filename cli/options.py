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

# Fields whose Python type is not what the command line takes.
AS_TEXT = {tuple: str}


def _option_type(annotation: Any) -> Any:
    """int | None -> int; tuple[int, int, int] -> str ("1024,1024,512"); bool stays a --flag/--no-flag."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    return AS_TEXT.get(origin, annotation)


def config_options(
    cls: type, help_texts: dict[str, str], aliases: dict[str, tuple[str, ...]] | None = None
) -> list[inspect.Parameter]:
    """One keyword parameter per dataclass field (Literal fields become choices), plus --config FILE and
    --print-config. `aliases`: older option names a field still answers to."""
    params = []
    hints = typing.get_type_hints(cls)  # the annotations are strings (from __future__ import annotations)
    for f in dataclasses.fields(cls):
        if f.name not in help_texts:
            raise KeyError(f"{cls.__name__}.{f.name} has no help text")
        kind = _option_type(hints[f.name])
        flag = f"--{f.name.replace('_', '-')}"
        if kind is bool:
            flag = f"{flag}/--no-{f.name.replace('_', '-')}"
        option = typer.Option(flag, *(aliases or {}).get(f.name, ()), help=help_texts[f.name], show_default=False)
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
            )
        )
    params.append(
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                Path | None,
                typer.Option(
                    "--config", help="YAML or JSON file of option values (under explicit options).", show_default=False
                ),
            ],
        )
    )
    params.append(
        inspect.Parameter(
            "print_config",
            inspect.Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool, typer.Option("--print-config", help="Print the resolved configuration (YAML) and exit.")
            ],
        )
    )
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


USAGE, FAILURE, INTERRUPTED = 2, 1, 130  # exit codes, the same for every command


def fail(error: BaseException | str, code: int = FAILURE) -> NoReturn:
    """One line on stderr, with the prefix every command uses, and the exit code."""
    typer.echo(f"Error: {str(error).strip()}", err=True)
    raise typer.Exit(code)


@contextmanager
def exit_on(*errors: type[BaseException], code: int) -> Iterator[None]:
    """Errors of the user's making (bad options, bad input): one line on stderr and `code`, no traceback.
    Ctrl-C: exit 130 (the library has said where the newest checkpoint is)."""
    try:
        yield
    except errors as error:
        fail(error, code)
    except KeyboardInterrupt:
        raise typer.Exit(INTERRUPTED) from None


# The positional SOURCE of `mochi probe` and `mochi detect`: anything sources.load_backbone reads.
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
