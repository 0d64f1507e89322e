"""Serve the status page with uvicorn: in a background thread beside a run, or in the
foreground for ``fedscan dashboard``.

Bound to 127.0.0.1 unless told otherwise. Bound to any other address the page requires a
token: ``FEDSCAN_STATUS_TOKEN`` from the environment, else a random one, printed once in the
URL to open. With a certificate and key the page is served over HTTPS (the token and the
cookie then never cross the network in clear).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fedscan.shared.errors import FedscanError
from fedscan.shared.status.app import create_app

#: Default port of the status page.
DEFAULT_PORT = 8050
#: Environment variable that gives the token (instead of a random one).
TOKEN_ENV = "FEDSCAN_STATUS_TOKEN"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class StatusOptions:
    """Where and how to serve the page.

    Attributes:
        host: address to bind (default loopback).
        port: port to bind; 0 picks a free one.
        token: required on every request; None: none on loopback, a random one elsewhere
            (or ``FEDSCAN_STATUS_TOKEN``).
        certfile, keyfile: serve HTTPS with this certificate and key.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    def resolved_token(self) -> str | None:
        """The token the page requires (generated once when bound off loopback)."""
        if self.token is None:
            self.token = os.environ.get(TOKEN_ENV) or None
        if self.token is None and not is_loopback(self.host):
            self.token = secrets.token_urlsafe(32)
        return self.token


class StatusServer:
    """A running status page; :meth:`stop` ends it.

    Attributes:
        url: the address to open (with ``?token=`` when a token is required).
    """

    def __init__(self, run_dir: Path | Callable[[], Path], options: StatusOptions,
                 bind: str | None = None) -> None:
        """Args:
            run_dir: the run folder, or a callable returning the current one.
            options: address, port, token and TLS files.
            bind: listen here instead of ``options.host`` while applying ``options.host``'s
                policy (tests attack an off-loopback page's policy on loopback).
        """
        token = options.resolved_token()
        self._sock = _bind(bind or options.host, options.port)
        port = self._sock.getsockname()[1]
        tls = bool(options.certfile and options.keyfile)
        app = create_app(run_dir, token=token, loopback_only_hosts=is_loopback(options.host),
                         secure_cookie=tls)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                ssl_certfile=options.certfile if tls else None,
                                ssl_keyfile=options.keyfile if tls else None)
        self._server = uvicorn.Server(config)
        shown = options.host
        if shown in ("0.0.0.0", "::", ""):
            shown = socket.getfqdn()
        elif ":" in shown:
            shown = f"[{shown}]"
        self.url = f"{'https' if tls else 'http'}://{shown}:{port}/"
        if token:
            self.url += f"?token={token}"
        self.port = port
        self._thread: threading.Thread | None = None

    def start(self) -> StatusServer:
        """Serve in a daemon thread; returns once the socket accepts requests."""
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]},
                                        name="fedscan-status", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise FedscanError(f"status page did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until Ctrl-C (``fedscan dashboard``)."""
        self._server.run(sockets=[self._sock])

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._sock.close()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (a clear error when the port is taken)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise FedscanError(f"status page: cannot listen on {host}:{port} ({exc.strerror}); "
                           "choose another port (0 picks a free one)") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def start_status(run_dir: Path | Callable[[], Path], options: StatusOptions) -> StatusServer:
    """Start the page beside a run and print where to open it.

    Args:
        run_dir: the run folder, or a callable returning the current one.
        options: bind address, port, token, TLS files.

    Returns:
        The running server (call ``stop()`` when the run ends).
    """
    server = StatusServer(run_dir, options).start()
    print(f"fedscan: status page {server.url}", flush=True)
    warn_plain_http(options)
    return server


def warn_plain_http(options: StatusOptions) -> None:
    """Say so when the token would cross a network in clear."""
    if not is_loopback(options.host) and not (options.certfile and options.keyfile):
        print("fedscan: WARNING: the status page is served over plain HTTP on a non-loopback "
              "address: its token crosses the network in clear (use TLS files or an SSH "
              "tunnel)", flush=True)
