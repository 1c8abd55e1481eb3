"""`mochi export` and `mochi push`: options mapped onto mochi_hub.publish.export.export_run and mochi_hub.publish.hub.push.

User errors (a run without weights, a token that may not write, a lost connection) print one clear line on
stderr and exit 1; the token is never echoed.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from .options import fail


class ExportFormat(StrEnum):
    timm = "timm"
    detectron2 = "detectron2"
    torchvision = "torchvision"


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def export(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run directory written by `mochi train` (run.json, checkpoints/).", show_default=False),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output folder. Default: RUN_DIR/export (timm), RUN_DIR/export-detectron2, "
            "RUN_DIR/export-torchvision.",
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
) -> None:
    """Export the newest checkpoint's query backbone."""
    from mochi_hub.publish.export import ExportError, export_run

    try:
        written = export_run(run_dir, output, format.value)
    except (ExportError, FileNotFoundError) as error:
        fail(error)
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
) -> None:
    """Upload an export, with its model card, in one commit; then verify the remote files."""
    from mochi_hub.publish.export import ExportError
    from mochi_hub.publish.hub import PushError
    from mochi_hub.publish.hub import push as push_export

    try:
        result = push_export(
            source,
            repo_id,
            private=private,
            create_pr=create_pr,
            revision=revision,
            tag=tag,
            commit_message=commit_message,
            dry_run=dry_run,
            allow_extra=allow_extra,
            log=lambda message: typer.echo(message, err=True),
        )
    except (PushError, ExportError) as error:
        fail(error)
    total = sum(f.size for f in result.files)
    verb = "would upload" if result.dry_run else "uploaded"
    typer.echo(
        f"{verb} {len(result.files)} files ({_size(total)}) from {result.folder} to {repo_id}"
        + (f" @ {revision}" if revision else "")
        + (" as a pull request" if create_pr else "")
    )
    for f in result.files:
        typer.echo(f"  {f.path_in_repo:<28} {_size(f.size):>10}")
    if result.dry_run:
        typer.echo("dry run: nothing was sent")
        return
    typer.echo(f"verified: the remote files and sizes match (commit {result.commit_oid[:12]})")
    if result.tag:
        typer.echo(f"tagged {result.tag}")
    if result.remote_extra:
        typer.echo(f"note: the repository also holds files from earlier pushes: {', '.join(result.remote_extra)}")
    typer.echo(f"url: {result.url}")
    typer.echo(f"load it with: {result.timm_line}")
