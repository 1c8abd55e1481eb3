"""`mochi export`, `mochi push` and `mochi import`: options mapped onto mochi_hub.publish.export.export_run,
mochi_hub.publish.hub.push and mochi_hub.publish.importer.import_checkpoint.

User errors (a bad option, a run without weights, a token that may not write, a lost connection) print one clear
line on stderr and exit 2 (usage) or 1 (run time); the token is never echoed.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from .options import user_errors


class ExportFormat(StrEnum):
    timm = "timm"
    detectron2 = "detectron2"
    torchvision = "torchvision"


LICENSE_HELP = (
    "License of the weights, a Hub license id (e.g. apache-2.0, cc-by-nc-4.0: MoCo's released weights); "
    "it goes into config.json's pretrained_cfg and the card."
)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def export(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A run directory written by `mochi train` (run.json, checkpoints/), or a timm folder (`mochi import`) "
            "for --format detectron2 / torchvision.",
            metavar="RUN_DIR",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output folder. Default: RUN_DIR/export (timm), RUN_DIR/export-detectron2, "
            "RUN_DIR/export-torchvision (a timm folder: FOLDER-detectron2, FOLDER-torchvision beside it).",
            show_default=False,
        ),
    ] = None,
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="timm: model.safetensors + config.json + model card (what `mochi push` uploads). "
            "detectron2: a .pkl for detectron2's R50-C4/FPN configs. torchvision: a safetensors "
            "state dict for torchvision.models.resnet*().",
        ),
    ] = ExportFormat.timm,
    license: Annotated[
        str | None, typer.Option("--license", help=LICENSE_HELP + " [default: apache-2.0; a timm folder's own]")
    ] = None,
) -> None:
    """Export the newest checkpoint's query backbone (or an imported timm folder's, to detectron2 / torchvision)."""
    from mochi_hub.publish.export import export_run

    with user_errors():
        written = export_run(run_dir, output, format.value, license=license)
    files = sorted(p for p in written.iterdir() if p.is_file()) if written.is_dir() else [written]
    typer.echo(f"exported {run_dir} ({format.value}) to {written}")
    for path in files:
        typer.echo(f"  {path.name:<28} {_size(path.stat().st_size):>10}")
    if format is ExportFormat.timm:
        typer.echo(f'load it with: timm.create_model("local-dir:{written}", pretrained=True)')


def push(
    source: Annotated[
        Path,
        typer.Argument(
            help="A run directory (its export is pushed, exported first if missing or stale) or an export folder.",
            metavar="SOURCE",
            show_default=False,
        ),
    ],
    repo_id: Annotated[
        str, typer.Option("--repo-id", help="Target model repository, namespace/name.", show_default=False)
    ],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")
    ] = False,
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision",
            help="Branch to commit to (created if missing); with --create-pr, the branch the PR targets.",
            show_default=False,
        ),
    ] = None,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Tag the new commit (e.g. v1.0).", show_default=False)
    ] = None,
    commit_message: Annotated[
        str | None, typer.Option("--commit-message", help="Commit title.", show_default=False)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the files and sizes; send nothing.")] = False,
    allow_extra: Annotated[
        bool,
        typer.Option(
            "--allow-extra",
            help="Also upload files that are not part of an export (refused by default: optimizer state, checkpoints).",
        ),
    ] = False,
    license: Annotated[
        str | None,
        typer.Option("--license", help=LICENSE_HELP + " Overrides the export's for this upload.", show_default=False),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="A Hugging Face token that may write to the repository. [default: HF_TOKEN, else the login saved by "
            "`hf auth login`] Prefer those: a token on the command line shows in the process list and shell history.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Upload an export, with its model card, in one commit; then verify the remote files."""
    from mochi_hub.publish.hub import push as push_export

    with user_errors():
        result = push_export(
            source,
            repo_id,
            private=private,
            create_pr=create_pr,
            revision=revision,
            tag=tag,
            commit_message=commit_message,
            dry_run=dry_run,
            token=token,
            allow_extra=allow_extra,
            license=license,
            log=lambda message: typer.echo(message, err=True),
        )
    total = sum(f.size for f in result.files)
    where = f"{repo_id}" + (f" @ {revision}" if revision else "")
    if not result.changed:
        typer.echo(
            f"nothing to upload: {where} already holds these {len(result.files)} files from {result.folder}; no commit"
            + (" and no pull request" if create_pr else "")
            + " was made"
        )
    else:
        verb = "would upload" if result.dry_run else "uploaded"
        typer.echo(
            f"{verb} {len(result.files)} files ({_size(total)}) from {result.folder} to {where}"
            + (" as a pull request" if create_pr else "")
        )
    for f in result.files:
        typer.echo(f"  {f.path_in_repo:<28} {_size(f.size):>10}")
    if result.dry_run:
        typer.echo("dry run: nothing was sent")
        return
    typer.echo(f"verified: the remote files and sizes match (commit {result.commit_oid[:12]})")
    if result.pr_url:
        typer.echo(f"pull request: {result.pr_url}")
    if result.tag:
        typer.echo(f"tagged {result.tag}")
    if result.remote_extra:
        typer.echo(f"note: the repository also holds files from earlier pushes: {', '.join(result.remote_extra)}")
    typer.echo(f"url: {result.url}")
    typer.echo(f"load it with: {result.timm_line}")


def import_(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A MoCo / MoCHi .pth.tar (main_moco.py), a Lightning .ckpt (lightly, solo-learn: backbone.*), or a "
            "torchvision / timm state dict (.pth, .safetensors).",
            metavar="CHECKPOINT",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The timm folder to write (new, empty, or an earlier import).", show_default=False
        ),
    ],
    arch: Annotated[
        str | None,
        typer.Option(
            "--arch",
            help="timm architecture of the backbone. [default: the file's 'arch', else the torchvision ResNet "
            "whose every weight the file fills]",
            show_default=False,
        ),
    ] = None,
    image_size: Annotated[
        int, typer.Option("--image-size", min=1, help="Input size the weights were trained at, in pixels.")
    ] = 224,
    keep_head: Annotated[
        bool,
        typer.Option(
            "--keep-head", help="Keep the projection head, as projection_head.safetensors beside the backbone."
        ),
    ] = False,
    allow_unsafe_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-unsafe-pickle",
            help="Read a file that holds Python objects beyond tensors by full unpickling, which runs any code in "
            "it. Only for files you trust; off by default.",
        ),
    ] = False,
    method: Annotated[
        str | None,
        typer.Option(
            "--method", help="How it was pretrained: mochi | moco-v2 | moco | another name.", show_default=False
        ),
    ] = None,
    mochi: Annotated[
        str | None,
        typer.Option("--mochi", help="MoCHi (N, s, s') it was trained with, e.g. 512,1024,512.", show_default=False),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs", min=1, help="Pretraining epochs. [default: a MoCo file's 'epoch']", show_default=False
        ),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Pretraining data, e.g. imagenet-1k.", show_default=False)
    ] = None,
    source_url: Annotated[
        str | None, typer.Option("--source-url", help="Where the file was published.", show_default=False)
    ] = None,
    license: Annotated[str, typer.Option("--license", help=LICENSE_HELP)] = "unknown",
    quote: Annotated[
        list[str] | None,
        typer.Option(
            "--quote",
            help="A published figure for this checkpoint, METRIC=VALUE (e.g. 'ImageNet-1K linear top-1 (%)=68.0'); "
            "repeatable; shown as quoted, with --quote-source.",
            metavar="METRIC=VALUE",
            show_default=False,
        ),
    ] = None,
    quote_source: Annotated[
        str | None, typer.Option("--quote-source", help="Where the --quote figures were published.", show_default=False)
    ] = None,
    results: Annotated[
        list[Path] | None,
        typer.Option(
            "--results",
            help="A result JSON of `mochi probe --output` or `mochi detect` measured on these weights; repeatable.",
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Bring another project's checkpoint in as a timm folder: weights, config.json and an honest card."""
    from mochi_hub.config import parse_mochi
    from mochi_hub.publish.importer import Declared, Quote, import_checkpoint

    with user_errors():
        quoted = tuple(Quote.parse(text, quote_source) for text in quote or ())
        declared = Declared(
            method=method,
            mochi=parse_mochi(mochi) if mochi else None,
            epochs=epochs,
            dataset=dataset,
            source_url=source_url,
            license=license,
            quoted=quoted,
        )
        declared.method_label()
        report = import_checkpoint(
            checkpoint,
            output,
            arch=arch,
            image_size=image_size,
            keep_head=keep_head,
            allow_unsafe_pickle=allow_unsafe_pickle,
            declared=declared,
            results=results or (),
        )
    read = ", ".join(f"{k} {v}" for k, v in report.from_file.items() if not isinstance(v, dict))
    typer.echo(f"read {checkpoint.name}: {report.layout}" + (f"; {read}" if read else ""))
    for part in report.parts:
        typer.echo(f"  {part.line()}")
    for note in report.notes:
        typer.echo(f"  note: {note}")
    typer.echo(f"imported as timm's {report.architecture} to {report.output}")
    for path in sorted(p for p in report.output.iterdir() if p.is_file()):
        typer.echo(f"  {path.name:<28} {_size(path.stat().st_size):>10}")
    typer.echo(f'load it with: timm.create_model("local-dir:{report.output}", pretrained=True)')
