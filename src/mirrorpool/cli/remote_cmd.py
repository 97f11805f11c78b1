"""`mirrorpool remote add|status|list|remove`: replication links to remote devices."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mirrorpool.cli.api_client import (
    DEFAULT_API,
    ApiOption,
    JsonOption,
    call,
    console,
    fail,
    print_json,
)
from mirrorpool.sizes import format_size, parse_size

app = typer.Typer(no_args_is_help=True,
                  help="Replicate LUs to remote devices: add, status, list, remove.")


@app.command("add")
def add(
    name: str,
    device: Annotated[str, typer.Option("--device", help="the remote device's control API URL")],
    remote_name: Annotated[str | None, typer.Option(
        "--remote-name", help="LU name on the remote device (default: NAME)")] = None,
    remote_pool: Annotated[int, typer.Option(
        "--remote-pool", help="pool size of the remote LU, if it is created now")] = 3,
    mode: Annotated[str, typer.Option(
        "--mode", help="async: acknowledged once journalled here; sync: once the remote "
                       "device has it")] = "async",
    journal_limit: Annotated[str, typer.Option(
        "--journal-limit", help="replication journal size before falling back to "
                                "changed-block tracking (K/M/G/T)")] = "1G",
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Replicate NAME to an LU of the same size on another device (created if missing)."""
    try:
        limit = parse_size(journal_limit)
    except ValueError as exc:
        fail(str(exc))
    status = call(api, "POST", f"/v1/lus/{name}/remote", json={
        "device": device, "remote_name": remote_name, "remote_pool": remote_pool,
        "mode": mode, "journal_limit": limit})
    if as_json:
        print_json(status)
        return
    console.print(f"{name} replicates to {status['remote']} on {status['device']} "
                  f"({status['mode']}); initial copy {status['state']}", highlight=False)


def _row(s: dict) -> list[str]:
    lag = "-" if s["lag_seq"] is None else f"{s['lag_seq']} seq, {s['lag_seconds']} s"
    last = s.get("last_remote_trigger") or {}
    return [s["lu"], f"{s['remote']} @ {s['device']}", s["mode"], s["state"],
            "yes" if s["connected"] else "no", lag,
            f"{format_size(s['journal_used'])} / {format_size(s['journal_limit'])}",
            format_size(s["dirty_bytes"]),
            f"{last.get('gen')} -> {last.get('remote_gen')}" if last else "-"]


_HEADERS = ("LU", "remote", "mode", "state", "connected", "lag", "journal", "to refresh",
            "last trigger (gen here -> remote)")


@app.command("status")
def status(name: str, api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """Replication state of NAME: connected, lag, journal use, last remote trigger."""
    s = call(api, "GET", f"/v1/lus/{name}/remote")
    if as_json:
        print_json(s)
        return
    table = Table(*_HEADERS)
    table.add_row(*_row(s))
    console.print(table)
    if s.get("last_error"):
        console.print(f"last error: {s['last_error']}", highlight=False)


@app.command("list")
def list_(api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """Every replicated LU of the device."""
    rows = call(api, "GET", "/v1/remotes")
    if as_json:
        print_json(rows)
        return
    table = Table(*_HEADERS)
    for s in rows:
        table.add_row(*_row(s))
    console.print(table)


@app.command("remove")
def remove(name: str, api: ApiOption = DEFAULT_API) -> None:
    """Stop replicating NAME (the remote LU and its generations stay)."""
    call(api, "DELETE", f"/v1/lus/{name}/remote")
    console.print(f"{name} is no longer replicated", highlight=False)
