"""`mirrorpool diff NAME@G1 NAME@G2`: what changed between two generations."""

from __future__ import annotations

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
from mirrorpool.sizes import format_size


def split_ref(ref: str, what: str) -> tuple[str, int | None]:
    """NAME@GEN -> (NAME, GEN); bare NAME -> (NAME, None)."""
    name, at, gen = ref.partition("@")
    if not at:
        return name, None
    if not gen.isdigit():
        fail(f"{what} {ref!r}: write NAME@GEN with a generation number")
    return name, int(gen)


def diff_command(
    first: str = typer.Argument(help="NAME@G1"),
    second: str = typer.Argument(help="NAME@G2, or NAME for the primary now"),
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """List the extents that differ, from tracked changes (no data is read)."""
    name1, g1 = split_ref(first, "first")
    name2, g2 = split_ref(second, "second")
    if name1 != name2:
        fail(f"both sides must be generations of one LU, not {name1!r} and {name2!r}")
    if g1 is None:
        fail(f"{first!r}: the first side must be a generation (NAME@GEN)")
    params = {"from": g1} if g2 is None else {"from": g1, "to": g2}
    answer = call(api, "GET", f"/v1/lus/{name1}/diff", params=params)
    if as_json:
        print_json(answer)
        return
    table = Table("offset", "length")
    for e in answer["extents"]:
        table.add_row(str(e["offset"]), str(e["length"]))
    console.print(table)
    console.print(f"{len(answer['extents'])} extent(s), {format_size(answer['changed_bytes'])}"
                  f" changed between {answer['from']} and {answer['to']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("diff")(diff_command)
