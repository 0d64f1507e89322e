"""The status page in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright) over a real run: ``fedscan simulate --status-port 0`` with three tiny sites (two
with DP budgets) on Flower's simulation runtime. The run folder's ``hold`` file holds the
federation between rounds, so the page is read at known points: before round 1 completes
(in flight), after round 1 (round 2 held) and after round 2 (round 3 held). Each time the
RENDERED page's rounds, per-site values, aggregate, ε and chart data must equal summary.json.

With FEDSCAN_SCREENSHOTS=docs the screenshot is also written to docs/status-page.png.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from tinysites import make_sites

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DELTA = "delta: 1.0e-3"
DOCS = Path(__file__).resolve().parent.parent / "docs"

#: Everything the checks read from the rendered page, in one call.
READ_PAGE = """() => {
  const cells = [...document.querySelectorAll('#per-round td[data-key]')].map((td) => ({
    round: td.dataset.round, site: td.dataset.site, key: td.dataset.key,
    value: td.dataset.value === undefined ? null : td.dataset.value, text: td.textContent}));
  const sites = [...document.querySelectorAll('#sites tbody tr')].map((tr) => {
    const eps = tr.querySelector('td[data-key=epsilon] [data-value]');
    const budget = tr.querySelector('td[data-key=epsilon] [data-budget]');
    return {name: tr.dataset.site,
            epsilon: eps ? eps.dataset.value : null, epsilon_text: eps ? eps.textContent : null,
            budget: budget ? budget.dataset.budget : null,
            eps_cell: tr.querySelector('td[data-key=epsilon]').textContent,
            last: tr.querySelector('td[data-key=last_outcome]').textContent};
  });
  const charts = {};
  for (const div of document.querySelectorAll('[data-chart]')) {
    charts[div.dataset.chart] = (div.data || []).map((t) => ({name: t.name, x: t.x, y: t.y}));
  }
  const done = document.getElementById('rounds-done');
  return {done: done.dataset.done, total: done.dataset.total,
          in_flight: document.getElementById('in-flight').dataset.round,
          notice: document.getElementById('notice').hidden ? '' :
                  document.getElementById('notice').textContent,
          cells, sites, charts};
}"""


def wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"run ended (code {proc.returncode}) while waiting: {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} missing: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900})
        yield context
        context.close()


def open_page(browser, url: str):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    return page, errors


def check_page_equals_summary(page, summary: dict) -> dict:
    """Every per-round value, the sites' ε and the chart data equal summary.json."""
    complete = [r for r in summary["rounds"] if r.get("seconds") is not None]
    page.wait_for_function(f"() => document.getElementById('rounds-done').dataset.done "
                           f"=== '{len(complete)}'", timeout=20_000)
    page.wait_for_timeout(300)  # let the refresh that showed it finish drawing the charts
    shown = page.evaluate(READ_PAGE)
    assert shown["done"] == str(len(complete))
    assert shown["total"] == str(summary["config"]["rounds"])
    cells = {(c["round"], c["site"], c["key"]): c for c in shown["cells"]}
    rows = {(c["round"], c["site"]) for c in shown["cells"]}
    expected_rows = {(str(r["round"]), s) for r in summary["rounds"] for s in summary["sites"]}
    evaluated = [r for r in summary["rounds"] if r["evaluate"]]
    # The task's declared metrics are columns from the start ("—" until evaluated).
    columns = bool(summary.get("metrics")) or bool(evaluated)
    if columns:  # the aggregate row holds metrics only
        expected_rows |= {(str(r["round"]), "aggregate") for r in summary["rounds"]}
    assert rows == expected_rows
    checked = 0

    def same(cell: dict, value, digits: int) -> None:
        nonlocal checked
        if value is None:
            assert cell["value"] is None and cell["text"] == "—", cell
        else:
            assert float(cell["value"]) == value, (cell, value)
            assert abs(float(cell["text"]) - value) <= 0.5 * 10 ** -digits + 1e-12, cell
        checked += 1

    if not columns:  # no metric declared or reported: no metric column either
        assert not any(key[2] == "dice" for key in cells)
    for r in summary["rounds"]:
        rnd = str(r["round"])
        for site in summary["sites"]:
            train = r["train"].get(site, {})
            evaluate = r["evaluate"].get(site, {})
            if columns:
                same(cells[(rnd, site, "dice")], evaluate.get("dice"), 4)
            same(cells[(rnd, site, "epsilon")], train.get("epsilon"), 3)
            same(cells[(rnd, site, "loss")], train.get("loss"), 4)
            assert cells[(rnd, site, "outcome")]["text"] == ("trained" if train else "—")
        if columns:
            same(cells[(rnd, "aggregate", "dice")], r["aggregate"].get("dice"), 4)
    # Sites table: the latest ε of each site against its budget.
    by_name = {s["name"]: s for s in shown["sites"]}
    assert list(by_name) == summary["sites"]
    for site in summary["sites"]:
        spent = [r["train"][site] for r in complete if "epsilon" in r["train"].get(site, {})]
        if spent:
            assert float(by_name[site]["epsilon"]) == spent[-1]["epsilon"]
            assert float(by_name[site]["budget"]) == spent[-1]["epsilon_budget"]
            assert by_name[site]["epsilon_text"] == f"{spent[-1]['epsilon']:.3f}"
        else:
            assert by_name[site]["epsilon"] is None
        if complete:
            assert by_name[site]["last"] == f"trained (round {complete[-1]['round']})"
    # Charts: each site's curve (and the aggregate) is exactly the summary's series.
    if evaluated:
        traces = {t["name"]: t for t in shown["charts"]["dice"]}
        for site in summary["sites"]:
            assert traces[site]["x"] == [r["round"] for r in evaluated]
            assert traces[site]["y"] == [r["evaluate"][site]["dice"] for r in evaluated]
        assert traces["aggregate"]["y"] == [r["aggregate"]["dice"] for r in evaluated]
    eps_traces = {t["name"]: t for t in shown["charts"].get("epsilon", [])}
    for site in ("site-a", "site-b"):
        if complete:
            assert eps_traces[site]["y"] == [r["train"][site]["epsilon"] for r in complete]
    assert checked > 0
    return shown


@pytest.mark.slow
def test_page_shows_what_summary_json_holds_before_and_after_rounds(tmp_path, browser):
    sites = make_sites(tmp_path / "data")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "sites:\n"
        f"  - {{name: site-a, data: {sites['site-a']}, privacy: {{epsilon: 8.0, {DELTA}}}}}\n"
        f"  - {{name: site-b, data: {sites['site-b']}, privacy: {{epsilon: 20.0, {DELTA}}}}}\n"
        f"  - {{name: site-c, data: {sites['site-c']}}}\n"
        "rounds: 3\n"
        "data: {spacing: [8, 8, 8]}\n"
        "model: {channels: [4, 8, 16], strides: [2, 2], num_res_units: 0}\n"
        # 20 steps: a round lasts longer than the page's 2 s refresh even with the ClientApp
        # actor already warm (the data check's query starts it before round 1).
        "train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 20}\n"
        "evaluate: {hd95: false}\n")
    run = tmp_path / "run"
    run.mkdir()
    hold = run / "hold"
    hold.touch()  # nothing starts until the test lets it
    proc = subprocess.Popen([sys.executable, "-m", "fedscan", "simulate", "--config", str(config),
                             "--out", str(run), "--status-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        while "status page http" not in line:
            assert line, "simulate ended without printing the status page URL"
            line = proc.stdout.readline()
        url = line.split("status page ", 1)[1].strip()
        # Drain the console so the run never blocks on a full pipe.
        drained: list[str] = []
        threading.Thread(target=lambda: drained.extend(proc.stdout), daemon=True).start()
        live = run / "live.json"
        wait_for(lambda: read_json(live).get("state") == "held", 120, "the hold", proc)
        page, errors = open_page(browser, url)
        page.wait_for_function("() => document.body.dataset.updated", timeout=20_000)
        shown = page.evaluate(READ_PAGE)
        assert shown["done"] == "0" and shown["total"] == "3" and "Held" in shown["notice"]

        # Round 1 in flight: release it, hold round 2.
        hold.unlink()
        wait_for(lambda: read_json(live).get("state") == "running", 30, "round 1 to start", proc)
        hold.touch()
        page.wait_for_function("() => document.getElementById('in-flight').dataset.round === '1'",
                               timeout=20_000)
        assert page.evaluate(READ_PAGE)["done"] == "0"

        # After round 1: held before round 2.
        wait_for(lambda: read_json(live).get("state") == "held"
                 and read_json(live).get("round") == 1, 400, "round 1 to complete", proc)
        first = check_page_equals_summary(page, read_json(run / "summary.json"))
        assert first["in_flight"] == ""

        # After round 2 (its train replies carry round 1's evaluation): held before round 3.
        hold.unlink()
        wait_for(lambda: read_json(live).get("round") == 2, 30, "round 2 to start", proc)
        hold.touch()
        wait_for(lambda: read_json(live).get("state") == "held"
                 and read_json(live).get("round") == 2, 300, "round 2 to complete", proc)
        second = check_page_equals_summary(page, read_json(run / "summary.json"))
        assert second["charts"]["dice"], "the Dice chart is drawn"
        shot = tmp_path / "status-page.png"
        page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("FEDSCAN_SCREENSHOTS") == "docs":
            (DOCS / "status-page.png").write_bytes(shot.read_bytes())
        assert not errors, errors

        hold.unlink()
        assert proc.wait(timeout=300) == 0, "".join(drained)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The finished run folder, as `fedscan dashboard RUN_DIR` serves it.
    from fedscan.shared.status.serve import StatusOptions, StatusServer

    server = StatusServer(run, StatusOptions(port=0)).start()
    try:
        page, errors = open_page(browser, server.url)
        final = check_page_equals_summary(page, read_json(run / "summary.json"))
        assert final["done"] == "3" and not errors
    finally:
        server.stop()


def test_hostile_names_and_reasons_render_as_text(tmp_path, browser):
    """A dishonest member names itself with markup and sends markup as its error reason:
    the page shows the text and runs nothing."""
    from fedscan.shared.status.serve import StatusOptions, StatusServer

    evil = '<img src=x onerror="window.pwned=1">'
    (tmp_path / "summary.json").write_text(json.dumps({
        "sites": [evil], "config": {"rounds": 2},
        "rounds": [{"round": 1, "seconds": 1.0, "train": {}, "evaluate": {}, "aggregate": {},
                    "errors": [{"site": evil, "phase": "train",
                                "reason": '<script>window.pwned=2</script>'}]}]}))
    server = StatusServer(tmp_path, StatusOptions(port=0)).start()
    try:
        page, _ = open_page(browser, server.url)
        page.wait_for_function("() => document.body.dataset.updated", timeout=20_000)
        assert page.evaluate("() => window.pwned") is None
        assert page.inner_text("#sites tbody th") == evil
        assert '<script>window.pwned=2</script>' in page.inner_text("#faults")
        assert page.evaluate("() => document.querySelectorAll('main img, table img').length") == 0
    finally:
        server.stop()


def test_report_html_opens_from_a_file_with_every_plot(tmp_path, browser):
    from fedscan.shared.report import write_report

    write_report(tmp_path, {
        "mode": "federated", "task": "segmentation", "strategy": "fedavg", "sites": ["a"],
        "rounds": [{"round": r, "seconds": 1.0, "train": {"a": {"loss": 1.0 / r}},
                    "evaluate": {"a": {"dice": 0.5 + r / 10, "num_examples": 1}},
                    "aggregate": {"dice": 0.5 + r / 10}} for r in (1, 2, 3)],
        "final": {"dice": 0.8, "per_site": {}, "test_sets": {}}, "config": {"rounds": 3}})
    page, errors = open_page(browser, (tmp_path / "report.html").as_uri())
    widths = page.evaluate("() => [...document.images].map((i) => i.naturalWidth)")
    assert len(widths) == len(list(tmp_path.glob("*.png"))) and all(w > 100 for w in widths)
    assert not errors, errors


def test_cross_site_matrix_renders_what_summary_json_holds(tmp_path, browser):
    """The cross-site matrix on the page: each cell is summary.json's headline value for that
    model and site; a dropped cell shows as missing; a site's refusal is named."""
    from fedscan.shared.status.serve import StatusOptions, StatusServer

    evil = '<img src=x onerror="window.pwned=1">'
    sites = ["site-a", "site-b", evil]
    matrix = {"global": {s: {"dice": 0.9 - 0.01 * i} for i, s in enumerate(sites)},
              "site-a": {"site-a": {"dice": 0.95}, "site-b": {"dice": 0.7},
                         evil: {"dice": 0.8}}}
    matrix["site-a"]["site-b"] = {}  # dropped by the server's checks
    (tmp_path / "summary.json").write_text(json.dumps({
        "sites": sites, "config": {"rounds": 1}, "rounds": [],
        "cross_site": {"models": ["global", "site-a"], "sites": sites, "metrics": ["dice"],
                       "headline": "dice", "matrix": matrix,
                       "not_shared": {"site-b": "policy-refused"},
                       "comparison": {"site-a": {"local_off_diagonal": 0.8,
                                                 "global_same_sites": 0.885}}}}))
    server = StatusServer(tmp_path, StatusOptions(port=0)).start()
    try:
        page, errors = open_page(browser, server.url)
        page.wait_for_function("() => document.body.dataset.updated", timeout=20_000)
        assert page.is_visible("#cross-site")
        shown = page.evaluate("""() => [...document.querySelectorAll('#cross-site tbody tr')]
            .map((tr) => ({model: tr.dataset.model, cells: [...tr.querySelectorAll(
              'td[data-site]')].map((td) => [td.dataset.site, td.dataset.value ?? null]),
              off: tr.querySelector('td[data-key=off_diagonal]').dataset.value ?? null}))""")
        assert [r["model"] for r in shown] == ["global", "site-a (local)"]
        for row, model in zip(shown, ["global", "site-a"], strict=True):
            for site, value in row["cells"]:
                expected = matrix[model][site].get("dice")
                assert (value is None) == (expected is None), (model, site)
                if expected is not None:
                    assert float(value) == pytest.approx(expected)
        assert shown[1]["off"] is not None and float(shown[1]["off"]) == pytest.approx(0.8)
        assert "site-b: policy-refused" in page.inner_text("#cross-site-not-shared")
        assert evil in page.inner_text("#cross-site thead")
        assert page.evaluate("() => window.pwned") is None
        assert not errors, errors
    finally:
        server.stop()
