"""Listening sockets, with a plain sentence when the address cannot be had."""

from __future__ import annotations

import socket


class ListenError(Exception):
    pass


def listen_tcp(host: str, port: int, what: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    return sock
