"""TLS contexts for NBD (NBD_OPT_STARTTLS) from PEM files, with plain-worded errors."""

from __future__ import annotations

import os
import ssl


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


__all__ = ["TlsSetupError", "client_tls_context", "client_tls_context_from_dir",
           "server_tls_context"]
