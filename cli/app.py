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


app.command("train", help="Pretrain a timm backbone with MoCo-v2 + MoCHi (Accelerate: CPU, GPUs, nodes).")(train)
app.command("probe", help="Evaluate a frozen backbone: the paper's linear protocol, kNN, or cached-feature linear.")(
    probe
)
app.command("detect", help="Fine-tune Faster R-CNN + FPN on a backbone (COCO layout data) and report box AP.")(detect)
app.command("export", help="Export a run's backbone as a timm folder (or detectron2 / torchvision weights).")(export)
app.command("push", help="Upload an export, with its model card, to the Hugging Face Hub.")(push)
app.command("import", help="Bring a MoCo / MoCHi, Lightning, torchvision or timm checkpoint in as a timm folder.")(
    import_
)
app.command("presets", help="List the presets of train, probe and detect with their resolved values.")(presets)


def main() -> None:
    app()
