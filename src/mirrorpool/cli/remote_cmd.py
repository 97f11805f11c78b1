"""`mirrorpool remote add|status|list|remove`: replication links to remote devices."""

from __future__ import annotations

import os
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
    wait_job,
)
from mirrorpool.sizes import format_size, parse_size

app = typer.Typer(no_args_is_help=True,
                  help="Replicate LUs to remote devices: add, status, list, remove, "
                       "promote, resync.")


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
    sync_timeout: Annotated[float, typer.Option(
        "--sync-timeout", help="sync mode: seconds to wait for the remote device before "
                               "acknowledging without it (0: no limit, until "
                               "--give-up-after)")] = 5.0,
    link_timeout: Annotated[float, typer.Option(
        "--link-timeout", help="seconds without an answer before the link is taken as "
                               "down")] = 30.0,
    give_up_after: Annotated[float, typer.Option(
        "--give-up-after", help="seconds the remote device may be gone before the journal "
                                "is dropped for changed-block tracking")] = 600.0,
    nbd_address: Annotated[str | None, typer.Option(
        "--nbd-address", help="HOST:PORT of the remote NBD server, if not the address "
                              "the remote device reports")] = None,
    tls_ca: Annotated[str | None, typer.Option(
        "--tls-ca", help="TLS link: CA certificate to verify the remote device")] = None,
    tls_cert: Annotated[str | None, typer.Option(
        "--tls-cert", help="TLS link: this device's client certificate")] = None,
    tls_key: Annotated[str | None, typer.Option(
        "--tls-key", help="TLS link: this device's client key")] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Replicate NAME to an LU of the same size on another device (created if missing)."""
    try:
        limit = parse_size(journal_limit)
    except ValueError as exc:
        fail(str(exc))
    files = {k: os.path.abspath(v) if v else None
             for k, v in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key))}
    status = call(api, "POST", f"/v1/lus/{name}/remote", json={
        "device": device, "remote_name": remote_name, "remote_pool": remote_pool,
        "mode": mode, "journal_limit": limit, "sync_timeout": sync_timeout,
        "link_timeout": link_timeout, "give_up_after": give_up_after,
        "nbd_address": nbd_address, **files})
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
    """Replication state of NAME: connected, lag, journal use, last remote trigger.

    On the remote device, the copy's side: its source, link, what it applied."""
    s = call(api, "GET", f"/v1/lus/{name}/remote")
    if as_json:
        print_json(s)
        return
    if s.get("role") == "copy":
        last = s.get("last_remote_trigger") or {}
        table = Table("LU", "copy of", "link connected", "applied (this run)",
                      "last trigger (origin seq -> gen here)")
        table.add_row(s["lu"], f"{s['source_lu']} on device {s['source_device']}",
                      "yes" if s["connected"] else "no",
                      f"{s['applied_requests']} requests, {format_size(s['applied_bytes'])}",
                      f"{last.get('origin_seq')} -> {last.get('gen')}" if last else "-")
        console.print(table)
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
    """Stop replicating NAME (the remote LU stays a read-only copy, with its generations)."""
    call(api, "DELETE", f"/v1/lus/{name}/remote")
    console.print(f"{name} is no longer replicated", highlight=False)


@app.command("promote")
def promote(
    name: str,
    gen: Annotated[int | None, typer.Option(
        "--gen", help="make this generation of the copy the primary's data")] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """On the remote device: make the copy NAME a primary that hosts can write."""
    answer = call(api, "POST", f"/v1/lus/{name}/promote", json={"gen": gen})
    if as_json:
        print_json(answer)
        return
    restored = answer.get("restored")
    extra = f", from generation {gen} ({restored['bytes_copied']} bytes copied)" \
        if restored else ""
    console.print(f"{name} is a primary now{extra}; it was the copy of "
                  f"{answer['source_lu']} on device {answer['source_device']}", highlight=False)


@app.command("resync")
def resync(
    name: str,
    reverse: Annotated[bool, typer.Option(
        "--reverse", help="bring NAME here in line with its promoted remote copy, then "
                          "replicate from here again")] = False,
    force: Annotated[bool, typer.Option("--force", help="even with hosts connected")] = False,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Compare NAME with its remote copy chunk by chunk and copy only what differs."""
    job = call(api, "POST", f"/v1/lus/{name}/remote/resync",
               json={"reverse": reverse, "force": force})
    if not reverse:
        if as_json:
            print_json(job["result"])
        else:
            console.print(f"{name}: comparing with the remote copy; `mirrorpool remote status "
                          f"{name}` shows progress", highlight=False)
        return
    job = wait_job(api, job, f"bringing {name} in line with its remote copy", as_json)
    if job["state"] != "done":
        fail(f"reverse resync failed: {job['error']}")
    r = job["result"]
    if as_json:
        print_json(r)
    else:
        console.print(f"{name} is in line with its remote copy: {format_size(r['bytes_copied'])}"
                      f" copied of {format_size(r['bytes_compared'])} compared; replicating "
                      "from here again", highlight=False)
