"""The listening socket, shared by `gpt2lab serve` and `serve_in_thread`."""

from __future__ import annotations

import socket

from ..errors import UserError


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, so that a taken port or unknown host is a clear error before loading anything."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a port number; give 0 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise UserError(f"cannot listen on host {host!r} ({error.strerror}); give an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port") from None
    return sock
