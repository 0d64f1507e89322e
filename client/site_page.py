"""``fedscan client status --serve``: the hospital's own view as a small local web page.

The same stack and guard as the consortium's status page (FastAPI + uvicorn, GET only,
127.0.0.1 by default, a token when bound elsewhere, no script, strict headers): ``/`` is the
view rendered on the server as HTML (every value escaped), ``/api/status`` the same as JSON.
It reads the site's state folder on each request, so it follows a running daemon.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.responses import Response

from fedscan.client.site_status import format_size, format_when, site_status
from fedscan.shared.config import SiteConfig
from fedscan.shared.status.app import guarded_app

_STYLE = ("body{font:14px system-ui,sans-serif;margin:2em;max-width:70em;color:#222}"
          "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;"
          "padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}"
          "code{font-size:12px;word-break:break-all}.refused{color:#a00}")


def _e(value: Any) -> str:
    return html.escape(str(value))


def render_page(status: dict[str, Any]) -> str:
    """The site's view as one HTML page (no script, no external resource)."""
    privacy = status["privacy"]
    if privacy is None:
        eps = "no DP ledger (this site has not trained with DP)"
    else:
        budget = privacy["budget"]
        eps = (f"{privacy['epsilon']:.4f} spent"
               + (f" of {budget:g}" if budget is not None else " (no budget now: DP is off)")
               + f" (δ {privacy['delta']:g}, {_e(privacy['accountant'])}, "
               f"{privacy['steps']} DP-SGD steps)")
    rows = []
    for run in status["runs"]:
        verdict = "refused" if run["refused"] and not run["accepted"] else (
            "accepted, then refused" if run["refused"] else "accepted")
        hashes = "<br>".join(f"<code>{_e(h)}</code>" for h in run["sha256"]) or "–"
        eps_run = ("–" if run["epsilon_after"] is None else
                   f"{run['epsilon_before']:.4f} → {run['epsilon_after']:.4f}")
        notes = "<br>".join(_e(r) for r in run["refusals"])
        notes += "<br>".join(f"round {_e(e['round'])} {_e(e['phase'])}: {_e(e['code'])}"
                             for e in run["errors"])
        rows.append(
            f"<tr><td>{_e(run['run_id'])}</td>"
            f"<td class='{'refused' if run['refused'] else ''}'>{verdict}</td>"
            f"<td>{hashes}</td><td>{_e(', '.join(map(str, run['rounds_trained'])) or '–')}</td>"
            f"<td>{_e(', '.join(map(str, run['rounds_declined'])) or '–')}</td>"
            f"<td>{eps_run}</td><td>{run['replies']} / {format_size(run['bytes_sent'])}</td>"
            f"<td>{_e(format_when(run['last']))}</td><td>{notes or '–'}</td></tr>")
    names = "".join(f"<tr><th>{_e(record)}</th><td>{_e(', '.join(keys))}</td></tr>"
                    for record, keys in status["sent_names"].items())
    failures = "".join(f"<tr><td>{_e(f['time'])}</td><td>{_e(f['where'])}</td>"
                       f"<td>{_e(f['code'])}</td></tr>" for f in status["failures"])
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>fedscan site {_e(status['site'])}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Site {_e(status['site'])}</h1>"
        f"<p>State folder <code>{_e(status['state_dir'])}</code>. Last contact with the "
        f"server: {_e(format_when(status['last_contact']))}.</p>"
        f"<p><b>Privacy (ε):</b> {eps}</p>"
        f"<h2>Runs ({len(status['runs'])}; {format_size(status['bytes_sent'])} sent)</h2>"
        "<table><tr><th>run</th><th>decision</th><th>task config sha256</th>"
        "<th>rounds trained</th><th>declined</th><th>ε before → after</th>"
        "<th>replies / bytes sent</th><th>last seen</th><th>refusals, errors sent</th></tr>"
        + "".join(rows) + "</table>"
        "<h2>What was sent</h2><p>Weights (tensors) and these records, nothing per case:</p>"
        f"<table>{names}</table>"
        f"<h2>Failures in site.log ({len(status['failures'])})</h2>"
        f"<table><tr><th>time</th><th>where</th><th>code sent</th></tr>{failures}</table>"
        "<p>Reload the page for the latest state.</p></body></html>")


def site_page_factory(site: SiteConfig) -> Callable[[str | None, bool, bool], FastAPI]:
    """Builds the site's guarded app (for :class:`~fedscan.shared.status.serve.StatusServer`)."""

    def make(token: str | None, loopback_only_hosts: bool, secure_cookie: bool) -> FastAPI:
        app = guarded_app(token, loopback_only_hosts, secure_cookie)

        @app.get("/", include_in_schema=False)
        def index() -> Response:
            return Response(render_page(site_status(site)),
                            media_type="text/html; charset=utf-8")

        @app.get("/api/status", include_in_schema=False)
        def status() -> Response:
            return JSONResponse(site_status(site))

        return app

    return make
