import typer


def train() -> None:
    typer.echo("mochi train: not implemented yet", err=True)
    raise typer.Exit(2)
