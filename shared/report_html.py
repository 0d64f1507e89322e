"""``report.html``: the run report as one self-contained file.

A hospital's file share has no web server and a report is often read as an e-mail
attachment: the HTML holds the text of report.md (rendered by markdown-it, raw HTML in it
escaped) and every plot it shows, embedded as a base64 PNG. It loads nothing from anywhere;
its Content-Security-Policy forbids scripts and any fetch.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from markdown_it import MarkdownIt

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1100px;
       margin: 1.5rem auto; padding: 0 1.5rem; color: #1d2733; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; } h3 { font-size: 1.05rem; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.6rem 0; }
th, td { border: 1px solid #d5dce4; padding: 0.25rem 0.55rem; }
th { background: #eef2f6; }
img { max-width: 100%; border: 1px solid #e3e8ee; border-radius: 6px; }
code { background: #f0f3f6; padding: 0 0.2rem; border-radius: 3px; }
"""


def _embed_images(md: MarkdownIt, text: str, folder: Path) -> str:
    """Render ``text`` with each image that names a PNG in ``folder`` embedded; any other
    image reference (a path with a folder, a URL, a missing file) shows only its alt text."""
    tokens = md.parse(text)
    for token in tokens:
        for child in token.children or []:
            if child.type != "image":
                continue
            src = str(child.attrGet("src") or "")
            path = folder / src
            if "/" in src or "\\" in src or not src.endswith(".png") or not path.is_file():
                child.type, child.tag = "text", ""
                child.content = f"[{child.content or src}]"
                continue
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            child.attrSet("src", f"data:image/png;base64,{data}")
    return md.renderer.render(tokens, md.options, {})


def write_html_report(out_dir: str | Path) -> Path:
    """Write ``report.html`` beside ``report.md`` in ``out_dir``.

    Args:
        out_dir: a run folder that holds report.md and its plots.

    Returns:
        The path of report.html.
    """
    out_dir = Path(out_dir)
    text = (out_dir / "report.md").read_text(encoding="utf-8")
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = _embed_images(md, text, out_dir)
    title = next((line.lstrip("# ").strip() for line in text.splitlines()
                  if line.startswith("# ")), "fedscan run report")
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style></head>\n"
            f"<body>\n{body}</body></html>\n")
    path = out_dir / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
