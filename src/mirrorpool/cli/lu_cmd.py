"""`mirrorpool lu create|list|delete|resize`."""

from __future__ import annotations

import time
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

app = typer.Typer(help="Create, list, grow and delete logical units.", no_args_is_help=True)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        fail(str(exc))


def _table(lus: list[dict]) -> Table:
    table = Table("name", "size", "pool", "connections", "uuid", "created")
    for lu in lus:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lu["created"]))
        table.add_row(lu["name"], format_size(lu["size"]), str(lu["pool"]),
                      str(lu["connections"]), lu["uuid"], created)
    return table


@app.command("create")
def create(
    name: str,
    size: Annotated[str | None, typer.Option("--size", help="e.g. 64M, 10G")] = None,
    pool: Annotated[int, typer.Option("--pool", help="backup pool size (0: none)")] = 3,
    backing: Annotated[str | None, typer.Option("--backing",
                                                help="existing file or block device")] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Create an LU."""
    body = {"name": name, "size": _size(size) if size else None, "pool": pool,
            "backing": backing}
    lu = call(api, "POST", "/v1/lus", json=body)
    if as_json:
        print_json(lu)
    else:
        console.print(f"created LU {lu['name']} ({format_size(lu['size'])}, pool {lu['pool']})",
                      highlight=False)


@app.command("list")
def list_(api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """List LUs."""
    lus = call(api, "GET", "/v1/lus")
    if as_json:
        print_json(lus)
    else:
        console.print(_table(lus))


@app.command("delete")
def delete(
    name: str,
    force: Annotated[bool, typer.Option("--force", help="disconnect clients first")] = False,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Delete an LU (refused while clients are connected, unless --force)."""
    call(api, "DELETE", f"/v1/lus/{name}", params={"force": force})
    if as_json:
        print_json({"deleted": name})
    else:
        console.print(f"deleted LU {name}", highlight=False)


@app.command("resize")
def resize(
    name: str,
    size: Annotated[str, typer.Option("--size", help="new size, larger than now")],
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Grow an LU."""
    lu = call(api, "POST", f"/v1/lus/{name}/resize", json={"size": _size(size)})
    if as_json:
        print_json(lu)
    else:
        console.print(f"LU {name} is now {format_size(lu['size'])}", highlight=False)


@app.command("set")
def set_(
    name: str,
    pool: Annotated[int | None, typer.Option("--pool", help="new backup pool size")] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Change an LU's settings (its backup pool size)."""
    if pool is None:
        fail("nothing to change: give --pool N")
    lu = call(api, "PATCH", f"/v1/lus/{name}", json={"pool": pool})
    if as_json:
        print_json(lu)
    else:
        console.print(f"LU {name}: pool {lu['pool']}", highlight=False)


@app.command("repair")
def repair(name: str, api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """Bring a failed or missing active backup back: a member is resynced from the primary."""
    lu = call(api, "POST", f"/v1/lus/{name}/repair")
    if as_json:
        print_json(lu)
    else:
        mirror = lu.get("mirror") or {}
        console.print(f"LU {name}: active backup {mirror.get('active_member')}"
                      f" {mirror.get('active_state')}", highlight=False)
