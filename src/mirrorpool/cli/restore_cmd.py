"""`mirrorpool restore NAME --from GEN`."""

from __future__ import annotations

from typing import Annotated

import typer

from mirrorpool.cli.api_client import (
    DEFAULT_API,
    ApiOption,
    JsonOption,
    call,
    console,
    fail,
    print_json,
    wait_job,
)


def restore_command(
    name: str,
    gen: Annotated[int, typer.Option("--from", help="generation to bring the LU back to")],
    force: Annotated[bool, typer.Option("--force", help="even with hosts connected")] = False,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Bring NAME back to generation GEN, copying only the chunks that differ."""
    job = call(api, "POST", f"/v1/lus/{name}/restore", json={"gen": gen, "force": force})
    job = wait_job(api, job, f"restoring {name} from {gen}", as_json)
    if job["state"] != "done":
        fail(f"restore failed: {job['error']}")
    if as_json:
        print_json(job["result"])
    else:
        r = job["result"]
        console.print(f"restored {name} from generation {gen}: {r['chunks_copied']} chunk(s),"
                      f" {r['bytes_copied']} bytes copied", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("restore")(restore_command)
