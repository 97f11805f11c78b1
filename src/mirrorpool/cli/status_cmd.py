"""`mirrorpool status`."""

from __future__ import annotations

import typer
from rich.table import Table

from mirrorpool.cli.api_client import DEFAULT_API, ApiOption, JsonOption, call, console, print_json
from mirrorpool.sizes import format_size


def status_command(api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """Show the device and every LU."""
    status = call(api, "GET", "/v1/status")
    if as_json:
        print_json(status)
        return
    console.print(
        f"mirrorpool {status['version']} pid {status['pid']}  data {status['data_dir']}\n"
        f"NBD {', '.join(status['nbd'])}  API {status['api']}  "
        f"connections {status['connections']}",
        highlight=False,
    )
    table = Table("LU", "size", "pool", "connections", "backing")
    for lu in status["lus"]:
        table.add_row(lu["name"], format_size(lu["size"]), str(lu["pool"]),
                      str(lu["connections"]), lu["backing"] or "internal")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("status")(status_command)
