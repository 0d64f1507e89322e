"""The status page's web app (FastAPI): one page, its script, plotly.js and one JSON endpoint.

Security, because anything that listens is a door:
- Read-only: GET only (anything else: 405); no route takes a path, so nothing outside the
  run folder can be named, and of the run folder only the computed view is served (not the
  config with its data paths, not checkpoints).
- Token: when one is set (always when bound to a non-loopback address), every request needs
  it: ``Authorization: Bearer <token>`` (scripts), or the cookie set by opening the page once
  as ``/?token=<token>`` (the page then redirects to ``/`` so the token leaves the address
  bar). Compared in constant time. Without it: 401, whatever the path.
- Loopback binds accept only loopback ``Host`` headers, so a web page the operator visits
  cannot reach the status page through DNS rebinding.
- No CORS headers; a Content-Security-Policy allows scripts from the page's own origin only;
  the page sets every text (site names, error reasons) as text, never as HTML.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.responses import Response

from fedscan.shared.status.view import build_view

#: The cookie that carries the token after ``/?token=``.
COOKIE = "fedscan_status"
#: Host names a loopback-bound page answers to.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
_STATIC = files("fedscan.shared.status") / "static"
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def plotly_js() -> Path:
    """plotly.js as the installed ``plotly`` package ships it (served offline, no CDN)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"plotly.min.js not found in the plotly package: {path}")
    return path


def _host_name(host_header: str) -> str:
    """``Host`` without its port (``[::1]:8050`` -> ``[::1]``)."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def create_app(run_dir: Path | Callable[[], Path], token: str | None = None,
               loopback_only_hosts: bool = True, secure_cookie: bool = False) -> FastAPI:
    """The status app over one run folder.

    Args:
        run_dir: the run folder, or a callable returning it (a simulation of several modes
            moves from one folder to the next).
        token: required on every request when set.
        loopback_only_hosts: answer only requests whose ``Host`` is a loopback name (for a
            page bound to loopback).
        secure_cookie: mark the token cookie ``Secure`` (the page is served over HTTPS).

    Returns:
        The FastAPI app (no docs or OpenAPI routes).
    """
    folder = run_dir if callable(run_dir) else (lambda: Path(run_dir))
    page = {name: (_STATIC / name).read_bytes()
            for name in ("index.html", "status.js", "status.css")}
    plotly_path = plotly_js()
    secret = token.encode() if token else None
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def authorised(request: Request) -> bool:
        if secret is None:
            return True
        given = request.cookies.get(COOKIE, "")
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), secret)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if request.method != "GET":
            response: Response = PlainTextResponse("read-only: GET only\n", status_code=405,
                                                   headers={"Allow": "GET"})
        elif (loopback_only_hosts
              and _host_name(request.headers.get("host", "")) not in LOOPBACK_HOSTS):
            response = PlainTextResponse("this page answers on loopback names only\n",
                                         status_code=400)
        elif request.url.path == "/" and "token" in request.query_params and secret:
            response = _token_login(request.query_params["token"])
        elif not authorised(request):
            response = PlainTextResponse(
                "401: a token is required (open the URL with ?token= that fedscan printed, "
                "or send 'Authorization: Bearer <token>')\n", status_code=401,
                headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        for key, value in _HEADERS.items():
            response.headers.setdefault(key, value)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _token_login(given: str) -> Response:
        if not hmac.compare_digest(given.encode(), secret or b""):
            return PlainTextResponse("401: wrong token\n", status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, given, httponly=True, samesite="strict",
                            secure=secure_cookie, path="/")
        return response

    def static(name: str, media_type: str) -> Response:
        return Response(page[name], media_type=media_type)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return static("index.html", "text/html; charset=utf-8")

    @app.get("/static/status.js", include_in_schema=False)
    def script() -> Response:
        return static("status.js", "text/javascript; charset=utf-8")

    @app.get("/static/status.css", include_in_schema=False)
    def style() -> Response:
        return static("status.css", "text/css; charset=utf-8")

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly() -> Response:
        return FileResponse(plotly_path, media_type="text/javascript; charset=utf-8",
                            headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/api/status", include_in_schema=False)
    def status() -> Response:
        return JSONResponse(build_view(folder()))

    return app
