"""report.html: one self-contained file beside report.md (plots embedded, nothing fetched,
text from the summary escaped)."""

import re

from fedscan.shared.report import write_report

HOSTILE = '<script>alert(1)</script><img src="http://evil.example/x.png">'


def summary():
    return {
        "mode": "federated", "task": "segmentation", "strategy": "fedavg",
        "sites": ["site-a", HOSTILE],
        "rounds": [{"round": r, "seconds": 2.0,
                    "train": {"site-a": {"loss": 1.0 / r, "num_examples": 2},
                              HOSTILE: {"loss": 0.5, "num_examples": 1}},
                    "evaluate": {"site-a": {"dice": 0.5 + r / 10, "num_examples": 1}},
                    "aggregate": {"dice": 0.5 + r / 10}} for r in (1, 2)],
        "final": {"dice": 0.7, "hd95": None, "per_site": {}, "test_sets": {}},
        "model": "final_model.pt", "config": {"rounds": 2},
    }


def test_report_html_embeds_every_plot_and_fetches_nothing(tmp_path):
    write_report(tmp_path, summary())
    page = (tmp_path / "report.html").read_text()
    plots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert plots, "the report has plots"
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(plots)
    assert not re.search(r'(src|href)="(?!data:)', page), "nothing refers outside the file"
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # The site name is text: escaped, never markup.
    assert "<script>" not in page and "evil.example/x.png\"" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Dice per round" in page or "dice" in page.lower()


def test_an_image_outside_the_folder_is_not_embedded(tmp_path):
    from fedscan.shared.report_html import write_html_report

    (tmp_path / "secret.png").write_bytes(b"\x89PNG secret")
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# r\n\n![a](../secret.png)\n\n![b](/etc/passwd.png)\n")
    page = write_html_report(run).read_text()
    assert "base64" not in page and "[a]" in page and "[b]" in page
