"""`mirrorpool serve`: one device process wiring the NBD server and the control API."""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from dataclasses import dataclass

import uvicorn

from mirrorpool.api.app import create_app
from mirrorpool.device.device import Device
from mirrorpool.errors import DeviceBusy
from mirrorpool.metrics import IoStats
from mirrorpool.mirror.volume import RESYNC_SHARE
from mirrorpool.nbd.codec import TlsMode
from mirrorpool.nbd.polling import DEFAULT_POLL_US, PollBudget
from mirrorpool.nbd.server import NbdServer
from mirrorpool.nbd.tls import TlsSetupError, server_tls_context
from mirrorpool.net import ListenError, listen_tcp

log = logging.getLogger("mirrorpool.serve")


class StartError(Exception):
    """The device cannot start; the message says why in plain words."""


@dataclass
class ServeConfig:
    data_dir: str = "./mirrorpool-data"
    nbd_host: str = "127.0.0.1"
    nbd_port: int = 10809
    unix_socket: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 10880
    workers_per_connection: int = 4
    # How long a connection's thread polls its socket before sleeping (0: never).
    poll_us: int = DEFAULT_POLL_US
    journal_sync: bool = False
    fault_injection: bool = False
    resync_share: float = RESYNC_SHARE
    # None: REQUIRE when a certificate is given, else OFF.
    tls: TlsMode | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Clients must show a certificate signed by this CA (device-to-device links).
    tls_ca: str | None = None


def tls_setup(config: ServeConfig) -> tuple[TlsMode, ssl.SSLContext | None]:
    """The TLS mode and server context the configuration asks for, or a StartError."""
    mode = config.tls
    if mode is None:
        mode = TlsMode.OFF if config.tls_cert is None else TlsMode.REQUIRE
    if mode is TlsMode.OFF:
        if config.tls is None and (config.tls_key or config.tls_ca):
            raise StartError("--tls-key and --tls-ca need --tls-cert")
        return mode, None
    if config.tls_cert is None or config.tls_key is None:
        raise StartError(f"--tls {mode.value} needs both --tls-cert and --tls-key")
    try:
        return mode, server_tls_context(config.tls_cert, config.tls_key, config.tls_ca)
    except TlsSetupError as exc:
        raise StartError(str(exc)) from None


class RunningDevice:
    """A started device: call stop() to shut it down cleanly."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.io_stats = IoStats()
        # Before the device is opened: a bad certificate leaves nothing to undo.
        self.tls_mode, tls = tls_setup(config)
        try:
            self.device = Device(config.data_dir, journal_sync=config.journal_sync,
                                 fault_injection=config.fault_injection,
                                 resync_share=config.resync_share)
        except DeviceBusy as exc:
            raise StartError(str(exc)) from None
        try:
            self.nbd = NbdServer(
                self.device,
                tcp=(config.nbd_host, config.nbd_port),
                unix_path=config.unix_socket,
                workers_per_connection=config.workers_per_connection,
                io_stats=self.io_stats,
                tls=tls,
                tls_mode=self.tls_mode,
                poll=PollBudget(config.poll_us),
            )
            api_sock = listen_tcp(config.api_host, config.api_port, "the control API")
        except (ListenError, StartError) as exc:
            if hasattr(self, "nbd"):
                self.nbd.stop()
            self.device.close()
            raise StartError(str(exc)) from None
        api_port = api_sock.getsockname()[1]
        self.api_url = f"http://{config.api_host}:{api_port}"
        app = create_app(self.device, self.nbd.addresses, self.api_url, self.nbd.connection_count,
                         self.io_stats)
        self._uvicorn = uvicorn.Server(
            # The C parser and loop: an API request then takes a quarter to a half of
            # the CPU, time the NBD threads would wait for (BENCHMARKS.md, "Triggers").
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                           http="httptools", loop="uvloop",
                           timeout_graceful_shutdown=2, timeout_keep_alive=5)
        )
        self._api_sock = api_sock
        self._api_thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [api_sock]}, name="api", daemon=True
        )

    def start(self) -> None:
        self.nbd.start()
        self._api_thread.start()
        for address in self.nbd.addresses:
            log.info("serving NBD", extra={"address": address})
        if self.tls_mode is TlsMode.OFF:
            log.info("NBD TLS off: clients connect in plain text")
        else:
            log.info(f"NBD TLS {'required' if self.tls_mode is TlsMode.REQUIRE else 'offered'}",
                     extra={"tls": self.tls_mode.value,
                            "client_certificates": "required" if self.config.tls_ca
                            else "not required"})
        log.info("serving control API", extra={"address": self.api_url,
                                                "openapi": self.api_url + "/openapi.json"})

    def stop(self) -> None:
        log.info("stopping: finishing requests in flight and closing connections")
        self.nbd.stop()
        self._uvicorn.should_exit = True
        self._api_thread.join(5)
        self.device.close()
        log.info("stopped")


def serve(config: ServeConfig) -> None:
    stop = threading.Event()
    received: list[int] = []

    def _on_signal(signum: int, _frame: object) -> None:
        # Only note it: the handler may interrupt the main thread inside a write to
        # the log stream, where logging again would raise or deadlock.
        received.append(signum)
        stop.set()

    # Installed first: a stop asked for during start-up is honoured once started.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    running = RunningDevice(config)
    try:
        running.start()
        # Short waits: a signal delivered to another thread only sets a flag, and
        # the main thread runs the handler once it next runs Python code; a long
        # wait on a lock would put that off until it timed out.
        while not stop.wait(0.2):
            pass
        log.info("signal received", extra={"signal": signal.Signals(received[0]).name})
    finally:
        running.stop()
