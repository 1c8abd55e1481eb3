"""The root of the `mochi` command: it only wires the commands."""

from typing import Annotated

import typer

from .detect import detect
from .presets import presets
from .probe import probe
from .publish import export, import_, push
from .train import train


def _version(value: bool) -> None:
    if value:
        from mochi_hub import __version__

        typer.echo(f"mochi-hub {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="mochi",
    help="MoCHi (hard negative mixing) pretraining, evaluation and Hub publishing for timm backbones.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_show_locals=False,  # locals could hold a token
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" and "train/ [val/]" are literal
)


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Messages of long work go to stderr as plain lines; results go to stdout."""
    from mochi_hub.core.console import setup_logging

    setup_logging()


# Each command's one line in `mochi --help` (short enough for 80 columns: click would cut a longer one with "...");
# `mochi COMMAND --help` gives the whole text.
app.command("train", short_help="Pretrain a timm backbone with MoCo-v2 + MoCHi.")(train)
app.command("probe", short_help="Evaluate a frozen backbone: linear probe, kNN or fast.")(probe)
app.command("detect", short_help="Fine-tune Faster R-CNN + FPN on a backbone; report box AP.")(detect)
app.command("export", short_help="Export a run's backbone: timm, detectron2 or torchvision.")(export)
app.command("push", short_help="Upload an export and its model card to the Hugging Face Hub.")(push)
app.command("import", short_help="Bring another project's checkpoint in as a timm folder.")(import_)
app.command("presets", short_help="List the presets of train, probe and detect, resolved.")(presets)


def main() -> None:
    app()
