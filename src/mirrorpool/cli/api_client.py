"""What every CLI command that talks to a running device shares."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.progress import Progress

DEFAULT_API = "http://127.0.0.1:10880"

ApiOption = Annotated[
    str,
    typer.Option("--api", envvar="MIRRORPOOL_API", help="control API of the device",
                 show_default=True),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def call(api: str, method: str, path: str, **kwargs: Any) -> Any:
    """One request to the control API; refusals become a plain error and exit 1."""
    try:
        response = httpx.request(method, api.rstrip("/") + path, timeout=60, **kwargs)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the device at {api} ({exc}); is `mirrorpool serve` running?")
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        fail(str(detail))
    if response.status_code == 204 or not response.content:
        return None
    return response.json()


def wait_job(api: str, job: dict, title: str, quiet: bool) -> dict:
    """Poll a job the device started (restore, reverse resync) with a progress bar."""
    with Progress(console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task(title, total=None)
        while job["state"] == "running":
            time.sleep(0.2)
            job = call(api, "GET", f"/v1/jobs/{job['id']}")
            progress.update(task, completed=job["done"], total=job["total"] or None)
    return job


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def nbd_uri(api: str, given: str | None, export: str) -> str:
    """NBD URI of ``export``: from --nbd (a base URI) or from the device's status."""
    base = given
    if base is None:
        addresses = call(api, "GET", "/v1/status")["nbd"]
        tcp = [a for a in addresses if a.startswith("nbd://")]
        if not tcp and not addresses:
            fail("the device reports no NBD address; give --nbd")
        base = (tcp or addresses)[0]
    if base.startswith("nbd+unix"):
        path, _, query = base.partition("?")
        return f"nbd+unix:///{export}?{query}"
    return base.rstrip("/").rsplit("/", 1)[0] + "/" + export if base.count("/") > 2 else (
        base.rstrip("/") + "/" + export)
