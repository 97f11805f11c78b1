"""TLS for NBD (NBD_OPT_STARTTLS): contexts from PEM files, with plain-worded errors,
and a TLS stream that one reading thread and several writing threads may share."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview


class TlsSetupError(Exception):
    """A certificate, key or CA file cannot be used; the message names it."""


def _readable(path: str, what: str) -> None:
    # Checked up front: ssl's own errors for a missing file do not say which file.
    if not os.path.isfile(path):
        raise TlsSetupError(f"{what} {path} does not exist or is not a file")
    if not os.access(path, os.R_OK):
        raise TlsSetupError(f"{what} {path} is not readable")


def _load_identity(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    _readable(cert, "TLS certificate")
    _readable(key, "TLS key")
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsSetupError(
            f"cannot use TLS certificate {cert} with key {key}: {exc.reason or exc}"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    _readable(ca, "TLS CA certificate")
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise TlsSetupError(f"cannot use TLS CA certificate {ca}: {exc.reason or exc}") from None


def server_tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """The server's context; with ``ca``, clients must show a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the NBD spec's floor
    # A TLS 1.2 renegotiation would make TlsStream's writers wait for bytes only
    # its reader receives; OpenSSL 3 refuses it by default, older ones not.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    _load_identity(ctx, cert, key)
    if ca is not None:
        _load_ca(ctx, ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client context: the server is checked against ``ca`` (the system's CAs if None),
    host name included; ``cert`` and ``key`` are the client's own certificate, if any."""
    if (cert is None) != (key is None):
        raise TlsSetupError("a client certificate needs its key, and a key its certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca(ctx, ca)  # only this CA: a certificate from any public CA will not do
    if cert is not None and key is not None:
        _load_identity(ctx, cert, key)
    return ctx


def client_tls_context_from_dir(directory: str) -> ssl.SSLContext:
    """A client context from a directory laid out as libnbd and qemu expect it:
    ca-cert.pem, and client-cert.pem with client-key.pem when the client has one."""
    if not os.path.isdir(directory):
        raise TlsSetupError(f"TLS certificates directory {directory} does not exist")
    ca = os.path.join(directory, "ca-cert.pem")
    cert = os.path.join(directory, "client-cert.pem")
    key = os.path.join(directory, "client-key.pem")
    has_cert = os.path.exists(cert)
    return client_tls_context(ca if os.path.exists(ca) else None,
                              cert if has_cert else None, key if has_cert else None)


# Plain bytes taken from the socket at once (the reader's, outside the TLS lock).
_RECV_SIZE = 256 * 1024
# Plain text encrypted per turn of the TLS lock: bounds the outgoing BIO's size
# and lets the reader decrypt between the pieces of a large reply.
_WRITE_CHUNK = 128 * 1024
# Parts shorter than a TLS record are joined first, so that many small replies
# (and a header with its data) share records rather than each making its own.
_COALESCE = 16 * 1024


class TlsStream:
    """TLS over a plain socket for one reading thread and any number of writers at once.

    OpenSSL does not allow one SSL object to be used by two threads at the same
    time, yet an ``ssl.SSLSocket`` read on one thread and write on another do
    just that (TLS 1.3 post-handshake messages, key updates and alerts make it
    more than a theory).  Here the TLS object works on memory BIOs: every call
    into it is made under ``_tls_lock``, and the socket's own recv and send run
    outside that lock, so a reader waiting for bytes never holds writers up.

    Ordering: records must reach the socket in the order the TLS object made
    them (each is numbered implicitly).  The outgoing BIO is drained only with
    ``_send_lock`` held, and what was drained is sent before it is released, so
    bytes leave in BIO order whichever thread made them: a writer, or the reader
    answering a post-handshake message.  ``_send_lock`` is always taken before
    ``_tls_lock``.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._raw = memoryview(bytearray(_RECV_SIZE))  # the reader's only

    # ------------------------------------------------------------ handshake

    def do_handshake(self) -> None:
        """Complete the handshake; the socket's timeout bounds each wait for the peer."""
        while True:
            try:
                with self._tls_lock:
                    self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._receive():
                    raise ConnectionResetError("the peer closed the connection") from None
            except ssl.SSLError:
                self._flush(wait=False)  # the alert, so that the peer learns why
                raise
        self._flush()  # the last flight, and TLS 1.3 session tickets

    # ------------------------------------------------------------ reading (one thread)

    def recv_into(self, buffer: Buffer, nbytes: int = 0) -> int:
        """Like ``socket.recv_into``; 0 at close_notify or at the end of the stream."""
        view = memoryview(buffer)
        want = nbytes or len(view)
        while True:
            got, ended, error = 0, False, None
            with self._tls_lock:
                try:
                    # Decrypt all that is already here: one call gives one record at most.
                    while got < want:
                        n = self._tls.read(want - got, view[got:want])
                        if not n:
                            ended = True  # close_notify
                            break
                        got += n
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    ended = True
                except ssl.SSLError as exc:
                    error = exc
                answered = self._outgoing.pending
            if error is not None:
                self._flush(wait=False)  # the alert
                raise error
            if answered:
                self._flush()  # e.g. our own KeyUpdate, made by reading the peer's
            if got or ended:
                return got
            if not self._receive():
                return 0  # an end without close_notify, as SSLSocket reports it too

    def recv(self, bufsize: int) -> bytes:
        buf = bytearray(bufsize)
        return bytes(buf[: self.recv_into(buf)])

    def _receive(self) -> bool:
        """Feed what the socket has to the TLS object; False at the end of the stream."""
        n = self.sock.recv_into(self._raw)  # blocks, without the TLS lock
        if not n:
            return False
        with self._tls_lock:
            self._incoming.write(self._raw[:n])
        return True

    # ------------------------------------------------------------ writing (any thread)

    def sendmsg(self, parts: Sequence[Buffer]) -> int:
        """Send every part, in order and unbroken by other threads' sends; unlike
        ``socket.sendmsg`` never partly.  Returns the number of bytes sent."""
        total = 0
        with self._send_lock:
            small = bytearray()
            for part in parts:
                size = len(part)
                total += size
                if size < _COALESCE:
                    small += part
                    if len(small) < _COALESCE:
                        continue
                    part = small
                elif small:
                    self._write(small)
                self._write(part)
                small = bytearray()
            if small:
                self._write(small)
        return total

    def sendall(self, data: Buffer) -> None:
        self.sendmsg((data,))

    def _write(self, data: Buffer) -> None:
        """Encrypt and send (``_send_lock`` held); writes never wait for the peer,
        as renegotiation is off, so SSLWantReadError here would be a failure."""
        view = memoryview(data)
        for start in range(0, len(view), _WRITE_CHUNK):
            with self._tls_lock:
                self._tls.write(view[start : start + _WRITE_CHUNK])
                records = self._outgoing.read()
            self.sock.sendall(records)

    def _flush(self, wait: bool = True) -> None:
        """Send what the TLS object made of its own accord (handshake, alerts, key updates).

        Without ``wait``, only what fits in the socket's buffer now, and only if no
        writer is sending: an alert or a close_notify before closing must not hang
        on a peer that stopped reading."""
        if not self._send_lock.acquire(blocking=wait):
            return
        try:
            with self._tls_lock:
                records = self._outgoing.read()
            if not records:
                return
            if wait:
                self.sock.sendall(records)
            else:
                with contextlib.suppress(OSError):
                    self.sock.send(records, socket.MSG_DONTWAIT)
        finally:
            self._send_lock.release()

    # ------------------------------------------------------------ the socket underneath

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        """Shut the TCP socket down, from any thread: a reader blocked in recv and
        writers blocked in send return; the TLS object itself is left alone."""
        self.sock.shutdown(how)

    def close(self) -> None:
        """Close, with a close_notify first if it can go at once."""
        with contextlib.suppress(ssl.SSLError), self._tls_lock:
            self._tls.unwrap()  # SSLWantReadError: the peer's close_notify is not awaited
        self._flush(wait=False)
        self.sock.close()


__all__ = ["TlsSetupError", "TlsStream", "client_tls_context", "client_tls_context_from_dir",
           "server_tls_context"]
