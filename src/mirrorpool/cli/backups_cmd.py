"""`mirrorpool backups NAME`, `backups pin NAME GEN`, `backups unpin NAME GEN`."""

from __future__ import annotations

import time
from typing import Annotated

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from mirrorpool.cli.api_client import DEFAULT_API, ApiOption, JsonOption, call, console, print_json


class _ListByDefault(TyperGroup):
    """`backups NAME` means `backups list NAME`."""

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[no-untyped-def]
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args.insert(0, "list")
        return super().resolve_command(ctx, args)


app = typer.Typer(cls=_ListByDefault, no_args_is_help=True,
                  help="Generations of an LU: list, pin, unpin.")


@app.command("list")
def list_(
    name: str,
    remote: Annotated[bool, typer.Option(
        "--remote", help="show each trigger's generation here and on the remote device")] = False,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """List the generations of NAME (oldest first)."""
    if remote:
        rows = call(api, "GET", f"/v1/lus/{name}/remote/backups")
        if as_json:
            print_json(rows)
            return
        table = Table("trigger", "label", "seq", "gen here", "state", "gen remote", "state")
        for r in rows:
            table.add_row(str(r.get("trigger_id") or ""), r.get("label") or "",
                          str(r.get("seq") or ""), str(r.get("gen") or "-"),
                          r.get("state") or "", str(r.get("remote_gen") or "-"),
                          r.get("remote_state") or "")
        console.print(table)
        return
    gens = call(api, "GET", f"/v1/lus/{name}/backups")
    if as_json:
        print_json(gens)
        return
    origin = any("origin_seq" in g for g in gens)  # a remote copy: the source's seq too
    columns = ["gen", "seq", "label", "source", "created", "state", "pinned", "trigger"]
    table = Table(*columns, *(["origin seq"] if origin else []))
    for g in gens:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.get("created", 0)))
        table.add_row(str(g["gen"]), str(g.get("seq", "")), g.get("label", ""),
                      g.get("source", ""), created, g["state"], "yes" if g["pinned"] else "",
                      g.get("trigger_id", ""),
                      *([str(g.get("origin_seq", ""))] if origin else []))
    console.print(table)


@app.command("pin")
def pin(name: str, gen: int, api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """Keep generation GEN of NAME from being recycled."""
    answer = call(api, "POST", f"/v1/lus/{name}/backups/{gen}/pin")
    if as_json:
        print_json(answer)
    else:
        console.print(f"pinned {name}@{gen}", highlight=False)


@app.command("unpin")
def unpin(name: str, gen: int, api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """Let generation GEN of NAME be recycled again."""
    answer = call(api, "DELETE", f"/v1/lus/{name}/backups/{gen}/pin")
    if as_json:
        print_json(answer)
    else:
        console.print(f"unpinned {name}@{gen}", highlight=False)
