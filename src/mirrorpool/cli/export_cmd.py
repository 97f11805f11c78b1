"""`mirrorpool export NAME@GEN FILE`: a generation to a sparse file."""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from mirrorpool.cli.api_client import (
    DEFAULT_API,
    ApiOption,
    JsonOption,
    console,
    fail,
    nbd_uri,
    print_json,
)
from mirrorpool.cli.diff_cmd import split_ref
from mirrorpool.nbd.client import NbdClient, NbdError

STEP = 4 * 1024 * 1024


def export_command(
    ref: str = typer.Argument(help="NAME@GEN"),
    path: str = typer.Argument(help="file to write (sparse)"),
    nbd: Annotated[str | None, typer.Option(
        "--nbd", help="NBD URI of the device (default: from the API)")] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Copy a generation into FILE, skipping holes."""
    name, gen = split_ref(ref, "export")
    if gen is None:
        fail(f"{ref!r}: name a generation as NAME@GEN")
    uri = nbd_uri(api, nbd, f"{name}@{gen}")
    written = 0
    try:
        with NbdClient(uri, contexts=("base:allocation",)) as client, open(path, "wb") as out:
            out.truncate(client.size)
            columns = (*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn(),
                       TransferSpeedColumn())
            with Progress(*columns, console=console, disable=as_json) as progress:
                task = progress.add_task(f"exporting {ref}", total=client.size)
                offset = 0
                while offset < client.size:
                    length = min(STEP, client.size - offset)
                    runs = client.block_status(length, offset).get("base:allocation") or [
                        (length, 0)]
                    pos = offset
                    for run_length, flags in runs:
                        run_length = min(run_length, offset + length - pos)
                        if run_length <= 0:
                            break
                        if not flags & 1:  # not a hole
                            data = client.pread(run_length, pos)
                            out.seek(pos)
                            out.write(data)
                            written += run_length
                        pos += run_length
                    offset = pos
                    progress.update(task, completed=offset)
            out.flush()
            os.fsync(out.fileno())
    except (NbdError, OSError) as exc:
        fail(f"export of {ref} failed: {exc}")
    if as_json:
        print_json({"export": ref, "file": path, "size": client.size, "data_bytes": written})
    else:
        console.print(f"exported {ref} to {path}: {client.size} bytes, {written} bytes of data",
                      highlight=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
