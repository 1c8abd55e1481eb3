"""The root of the `mochi` command: it only wires the commands."""

import typer

from .probe import probe
from .publish import export, push
from .train import train

app = typer.Typer(
    name="mochi",
    help="MoCHi (hard negative mixing) pretraining, evaluation and Hub publishing for timm backbones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals could hold a token
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" and "train/ [val/]" are literal
)
app.command("train", help="Pretrain a timm backbone with MoCo-v2 + MoCHi (Accelerate: CPU, GPUs, nodes).")(train)
app.command("probe", help="Evaluate a frozen backbone: the paper's linear protocol, kNN, or cached-feature linear.")(probe)
app.command("export", help="Export a run's backbone as a timm folder (or detectron2 / torchvision weights).")(export)
app.command("push", help="Upload an export, with its model card, to the Hugging Face Hub.")(push)


def main() -> None:
    app()
