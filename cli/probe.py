import typer


def probe() -> None:
    typer.echo("mochi probe: not implemented yet", err=True)
    raise typer.Exit(2)
