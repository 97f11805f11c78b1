"""Entry point: builds the `mirrorpool` command from the per-group modules."""

from __future__ import annotations

import typer

from mirrorpool import __version__
from mirrorpool.cli import (
    backups_cmd,
    check_cmd,
    diff_cmd,
    export_cmd,
    lu_cmd,
    remote_cmd,
    restore_cmd,
    serve_cmd,
    status_cmd,
    trigger_cmd,
)

app = typer.Typer(
    name="mirrorpool",
    help="A storage array serving mirrored logical units over NBD.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
serve_cmd.register(app)
status_cmd.register(app)
app.add_typer(lu_cmd.app, name="lu")
trigger_cmd.register(app)
app.add_typer(backups_cmd.app, name="backups")
app.add_typer(remote_cmd.app, name="remote")
export_cmd.register(app)
diff_cmd.register(app)
restore_cmd.register(app)
check_cmd.register(app)


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="print the version and exit"),
) -> None:
    if version:
        typer.echo(f"mirrorpool {__version__}")
        raise typer.Exit()


def main() -> None:
    app()
