"""`mirrorpool backups NAME`, `backups pin NAME GEN`, `backups unpin NAME GEN`."""

from __future__ import annotations

import time

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
def list_(name: str, api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """List the generations of NAME (oldest first)."""
    gens = call(api, "GET", f"/v1/lus/{name}/backups")
    if as_json:
        print_json(gens)
        return
    table = Table("gen", "seq", "label", "source", "created", "state", "pinned", "trigger")
    for g in gens:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.get("created", 0)))
        table.add_row(str(g["gen"]), str(g.get("seq", "")), g.get("label", ""),
                      g.get("source", ""), created, g["state"], "yes" if g["pinned"] else "",
                      g.get("trigger_id", ""))
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
