"""`mirrorpool serve`."""

from __future__ import annotations

from typing import Annotated

import typer

from mirrorpool.cli.api_client import fail
from mirrorpool.daemon import ServeConfig, StartError, serve
from mirrorpool.logs import setup_logging
from mirrorpool.mirror.volume import MIN_SHARE, RESYNC_SHARE
from mirrorpool.nbd.codec import TlsMode
from mirrorpool.nbd.polling import DEFAULT_POLL_US


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"{what} must look like HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve_command(
    data: Annotated[str, typer.Option("--data", envvar="MIRRORPOOL_DATA",
                                      help="data directory")] = "./mirrorpool-data",
    listen: Annotated[str, typer.Option("--listen", envvar="MIRRORPOOL_LISTEN",
                                        help="NBD address HOST:PORT")] = "127.0.0.1:10809",
    unix: Annotated[str | None, typer.Option("--unix", envvar="MIRRORPOOL_UNIX",
                                             help="also serve NBD on this Unix socket")] = None,
    api: Annotated[str, typer.Option("--api", envvar="MIRRORPOOL_API_LISTEN",
                                     help="control API address HOST:PORT")] = "127.0.0.1:10880",
    workers: Annotated[int, typer.Option("--workers", min=1, max=64,
                                         help="request threads per NBD connection")] = 4,
    poll_us: Annotated[int, typer.Option(
        "--poll-us", envvar="MIRRORPOOL_POLL_US", min=0, max=100_000,
        help="microseconds an NBD connection polls for its next request before sleeping "
             "(0: never poll)")] = DEFAULT_POLL_US,
    journal_sync: Annotated[bool, typer.Option(
        "--journal-sync", help="flush each new write-intent entry (survives power loss)")] = False,
    fault_injection: Annotated[bool, typer.Option(
        "--fault-injection", help="allow /v1/lus/NAME/faults (for testing)")] = False,
    resync_share: Annotated[float, typer.Option(
        "--resync-share", envvar="MIRRORPOOL_RESYNC_SHARE", min=MIN_SHARE, max=1.0,
        help="while hosts write, the share of time resyncs may copy (1: no limit); "
             "idle, they copy at full speed")] = RESYNC_SHARE,
    tls: Annotated[TlsMode | None, typer.Option(
        "--tls", envvar="MIRRORPOOL_TLS", case_sensitive=False,
        help="NBD over TLS: off, on (offered) or require (the default with --tls-cert; "
             "else off)")] = None,
    tls_cert: Annotated[str | None, typer.Option(
        "--tls-cert", envvar="MIRRORPOOL_TLS_CERT", help="server certificate (PEM)")] = None,
    tls_key: Annotated[str | None, typer.Option(
        "--tls-key", envvar="MIRRORPOOL_TLS_KEY", help="key of --tls-cert (PEM)")] = None,
    tls_ca: Annotated[str | None, typer.Option(
        "--tls-ca", envvar="MIRRORPOOL_TLS_CA",
        help="require client certificates signed by this CA (PEM)")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning")] = "info",
    log_format: Annotated[str, typer.Option("--log-format", help="text or json")] = "text",
) -> None:
    """Start a device: NBD on --listen, the control API on --api."""
    setup_logging(log_level, log_format)
    nbd_host, nbd_port = _host_port(listen, "--listen")
    api_host, api_port = _host_port(api, "--api")
    config = ServeConfig(
        data_dir=data, nbd_host=nbd_host, nbd_port=nbd_port, unix_socket=unix,
        api_host=api_host, api_port=api_port, workers_per_connection=workers,
        poll_us=poll_us, journal_sync=journal_sync, fault_injection=fault_injection,
        resync_share=resync_share,
        tls=tls, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
    )
    try:
        serve(config)
    except StartError as exc:
        fail(str(exc))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
