import typer


def export() -> None:
    typer.echo("mochi export: not implemented yet", err=True)
    raise typer.Exit(2)


def push() -> None:
    typer.echo("mochi push: not implemented yet", err=True)
    raise typer.Exit(2)
