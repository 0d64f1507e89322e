"""The server's network front: nginx terminates TLS and forwards only Flower's Fleet API.

Flower 1.41/1.42 serves the Fleet API (what SuperNodes use, ``/v1/fleet/*``), the Control API
(``flwr run``, ``flwr supernode register``, ``flwr ls/stop/log``: ``/v1/control/*``) and the
runtime API on one port, and the open-source SuperLink has no authentication on the Control
API. So ``fedscan server start`` binds the SuperLink to 127.0.0.1 on an internal port (the
operator's own ``flwr`` CLI talks to it there) and starts nginx, from the Debian package, on
``server.host:server.port`` with the consortium server certificate. nginx forwards a request
only if its normalised path is one Fleet endpoint (``/v1/fleet/<name>``, POST); everything
else gets 403. The upstream path is rebuilt from that match, so no encoding or ``..`` trick
can reach another route. SuperNode authentication needs TLS on the SuperLink itself, so
nginx re-encrypts to the loopback port and verifies it against the consortium CA.

Transport facts behind the settings (Flower 1.42, ``flwr/supercore/protobuf/client.py``):
SuperNodes speak HTTP/1.1 (httpx), one POST per call, a 30 s client timeout (5 s for
heartbeats), no long polls or streams on the Fleet API; arrays travel in chunks of at most
5 MiB (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), one object per ``push-object``/``pull-object``
call. Node authentication signs a timestamp sent in ``flwr-*`` headers, which pass through
unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from fedscan.shared.errors import FedscanError

#: Largest request body forwarded: a 5 MiB array chunk plus protobuf framing, with room.
MAX_BODY = "16m"
#: Seconds nginx waits for the SuperLink's answer (the SuperNode gives up after 30 s).
UPSTREAM_TIMEOUT = 120
#: Where Debian and most distributions put nginx (``/usr/sbin`` is not on users' PATH).
NGINX_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")
MISSING_NGINX = ("nginx not found: the server's TLS front needs it (Debian/Ubuntu: "
                 "apt-get install -y nginx; see docs/deployment.md)")
#: Name the SuperLink's certificate always carries (``fedscan certs server`` adds it); nginx
#: verifies the loopback hop against it.
UPSTREAM_TLS_NAME = "localhost"


def find_nginx() -> str:
    """The nginx binary; a one-line error saying how to install it when there is none."""
    found = shutil.which("nginx") or next(
        (str(Path(d, "nginx")) for d in NGINX_DIRS if os.access(Path(d, "nginx"), os.X_OK)),
        None)
    if not found:
        raise FedscanError(MISSING_NGINX)
    return found


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def nginx_config(front_dir: Path, host: str, port: int, upstream_port: int,
                 tls: tuple[str, str, str] | None) -> str:
    """The front's nginx.conf: everything (pid, logs, temp folders) under ``front_dir``.

    Args:
        front_dir: the front's folder in the run folder.
        host, port: where hospitals connect.
        upstream_port: the SuperLink's loopback port.
        tls: ``(ca_cert, cert, key)``; None serves plain HTTP (``--insecure``).
    """
    tmp = front_dir / "tmp"
    # "::" means every address, IPv4 included (nginx binds IPv6 only unless told).
    dual = " ipv6only=off" if host == "::" else ""
    if tls:
        ca_cert, cert, key = tls
        listen = f"listen {listen_address(host, port)} ssl{dual};"
        server_tls = (f"ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
                      "        ssl_protocols TLSv1.2 TLSv1.3;\n"
                      "        ssl_session_cache shared:fedscan_tls:1m;")
        scheme = "https"
        upstream_tls = (f"proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate "
                        f"{ca_cert};\n            proxy_ssl_name {UPSTREAM_TLS_NAME};\n"
                        "            proxy_ssl_verify_depth 2;\n"
                        "            proxy_ssl_session_reuse on;\n"
                        "            proxy_ssl_protocols TLSv1.2 TLSv1.3;")
    else:
        listen, server_tls, scheme, upstream_tls = (
            f"listen {listen_address(host, port)}{dual};", "", "http", "")
    return f"""# Written by `fedscan server start`: the SuperLink's TLS front (Fleet API only).
daemon off;
worker_processes 1;
pid {front_dir}/nginx.pid;
error_log {front_dir}/error.log warn;

events {{
    worker_connections 512;
}}

http {{
    # Every request, refused ones included: who, what, status, request/answer bytes, seconds.
    log_format fedscan '$remote_addr [$time_local] "$request" $status '
                       'request_bytes=$request_length answer_bytes=$body_bytes_sent '
                       'seconds=$request_time';
    access_log {front_dir}/access.log fedscan;
    server_tokens off;
    # Bodies and answers stay in memory (never temporary files); the folders must exist.
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    upstream superlink {{
        server 127.0.0.1:{upstream_port};
        keepalive 16;
    }}

    server {{
        {listen}
        {server_tls}
        client_max_body_size {MAX_BODY};
        client_body_buffer_size {MAX_BODY};
        client_body_timeout 60s;
        send_timeout 60s;
        keepalive_timeout 75s;

        # Only the Fleet API, matched on the normalised path; the upstream path is rebuilt
        # from the match (no query string, no encoded or dot segments reach the SuperLink).
        location ~ "^/v1/fleet/([a-z][a-z-]{{0,63}})$" {{
            limit_except POST {{ deny all; }}
            proxy_pass {scheme}://superlink/v1/fleet/$1;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_connect_timeout 10s;
            proxy_send_timeout {UPSTREAM_TIMEOUT}s;
            proxy_read_timeout {UPSTREAM_TIMEOUT}s;
            proxy_request_buffering on;
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 32 256k;
            proxy_busy_buffers_size 1m;
            proxy_max_temp_file_size 0;
            {upstream_tls}
        }}

        # Control API, runtime API, health, docs: never from the network.
        location / {{
            return 403;
        }}
    }}
}}
"""


def _die_with_parent() -> None:
    """Child setup: SIGTERM when ``fedscan server start`` dies, however it dies (Linux)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_setup(bound_to_parent: bool):
    """``preexec_fn`` for the SuperLink and nginx: bound to our life unless kept running."""
    return _die_with_parent if bound_to_parent else None


def start_front(front_dir: Path, host: str, port: int, upstream_port: int,
                tls: tuple[str, str, str] | None, bound_to_parent: bool = True,
                timeout: float = 30.0) -> subprocess.Popen:
    """Start nginx in the foreground of its own session; returns once it listens.

    Raises:
        FedscanError: nginx is missing, or exited (its error log's last lines say why).
    """
    nginx = find_nginx()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (front_dir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    conf = front_dir / "nginx.conf"
    conf.write_text(nginx_config(front_dir, host, port, upstream_port, tls))
    error_log = front_dir / "error.log"
    with (front_dir / "nginx.out").open("a") as out:
        proc = subprocess.Popen([nginx, "-p", str(front_dir), "-c", str(conf),
                                 "-e", str(error_log)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                preexec_fn=child_setup(bound_to_parent))
    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = [line for line in (error_log.read_text(errors="replace").splitlines()
                                      if error_log.is_file() else []) if "[emerg]" in line]
            raise FedscanError(f"nginx (the TLS front) exited with code {proc.returncode}: "
                               f"{tail[-1] if tail else 'see ' + str(error_log)}")
        with contextlib.suppress(OSError), socket.create_connection((probe, port), timeout=1):
            return proc
        time.sleep(0.2)
    stop_process(proc)
    raise FedscanError(f"nginx did not listen on {listen_address(host, port)} within "
                       f"{timeout:.0f}s; see {error_log}")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a process and its session (nginx: fast shutdown), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_stale(pid_file: Path, program: str) -> bool:
    """Stop what a crashed ``fedscan server start`` left behind (pid file + program name).

    Returns:
        True when a live process of ``program`` was stopped.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, IndexError):
        return False
    if program not in cmdline:
        return False  # the pid was reused by something else
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            if os.getpgid(pid) == pid:  # a session leader: take what it started along
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return True
            time.sleep(0.1)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
