"""`mirrorpool trigger NAME [NAME...]`: make consistent backups now."""

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
    nbd_uri,
    print_json,
)
from mirrorpool.nbd.client import NbdClient, NbdError


def generations_table(answers: list[dict]) -> Table:
    table = Table("LU", "gen", "seq", "label", "source", "created", "split ms")
    for g in answers:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g["created"]))
        table.add_row(g["lu"], str(g["gen"]), str(g["seq"]), g["label"], g["source"], created,
                      str(g.get("split_ms", "")))
    return table


def trigger_command(
    names: Annotated[list[str], typer.Argument(help="LU(s); several split at one cut")],
    label: Annotated[str, typer.Option("--label", help="a note kept with the backup")] = "",
    in_band: Annotated[bool, typer.Option(
        "--in-band", help="send the NBD TRIGGER command on a connection to the LU")] = False,
    nbd: Annotated[str | None, typer.Option(
        "--nbd", help="NBD URI of the device for --in-band (default: from the API)")] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Split the mirror of NAME: its active backup becomes a generation."""
    if in_band:
        if len(names) != 1:
            fail("--in-band triggers one LU (its own NBD connection); name exactly one")
        uri = nbd_uri(api, nbd, names[0])
        try:
            with NbdClient(uri, contexts=("mirrorpool:trigger",)) as client:
                answer = client.trigger(label)
        except (NbdError, OSError) as exc:
            fail(f"in-band trigger on {uri} failed: {exc}")
    elif len(names) == 1:
        answer = call(api, "POST", f"/v1/lus/{names[0]}/trigger",
                      json={"label": label, "source": "cli"})
    else:
        answer = call(api, "POST", "/v1/trigger",
                      json={"lus": names, "label": label, "source": "cli"})
    if as_json:
        print_json(answer)
    else:
        console.print(f"trigger {answer['trigger_id']}", highlight=False)
        console.print(generations_table(answer["generations"]))


def register(app: typer.Typer) -> None:
    app.command("trigger")(trigger_command)
