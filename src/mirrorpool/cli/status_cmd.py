"""`mirrorpool status`."""

from __future__ import annotations

import time

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
    table = Table("LU", "size", "pool", "active", "state", "generations", "last trigger",
                  "connections")
    for lu in status["lus"]:
        mirror = lu.get("mirror") or {}
        state = mirror.get("active_state", "")
        sync = mirror.get("sync") or {}
        if state == "syncing" and sync:
            state += f" {sync['percent']}% eta {sync['eta_seconds']}s"
        last = mirror.get("last_trigger") or {}
        last_text = (
            f"gen {last['gen']} {time.strftime('%H:%M:%S', time.localtime(last['created']))}"
            if last else ""
        )
        failed = [m for m in mirror.get("members", []) if m["state"] == "failed"]
        if failed:
            state = f"[bold red]{state}, {len(failed)} member(s) FAILED[/]"
        active = mirror.get("active_member")
        table.add_row(lu["name"], format_size(lu["size"]), str(lu["pool"]),
                      "" if active is None else f"member {active}", state,
                      str(mirror.get("generations", 0)), last_text, str(lu["connections"]))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("status")(status_command)
