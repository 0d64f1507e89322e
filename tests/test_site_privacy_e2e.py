"""End to end: what a failing hospital reveals. Flower's simulation runtime (Ray), three tiny
phantom sites, the real ServerApp and ClientApp, no up-front data check (the path a deployed
site takes). A recording wrapper around the ServerApp's Grid keeps the serialized bytes of
every reply the server receives.

1. Broken data: site-b has a label value (48271) beyond the server's ``num_classes`` from the
   start; site-c's training image is truncated after round 1 (corrupted mid-run). The run
   completes with site-a (and site-c in round 1).
2. The server sends a task config with the wrong ``in_channels``: every site fails round 1.

In both, the replies and summary.json/report.md hold the error codes but no path, file name,
case id or label value, while each site's own log has the full error.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from flwr.app import Array, MessageType
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from tinysites import TINY_RUN, make_sites

from fedscan.shared.error_codes import SITE_ERRORS

pytestmark = pytest.mark.slow
SITES = ("site-a", "site-b", "site-c")
#: A bad label value (labels are uint8 after preprocessing, so one below 256 survives as is).
SECRET_LABEL = 217


def wire_bytes(msg) -> tuple[bytes, bytes]:
    """A message as it crosses the network (its protobuf and its serialized objects), and the
    part of it that is not weights (a number could occur in weight bytes by chance)."""
    objects = get_all_nested_objects(msg).values()
    records = b"".join(o.deflate() for o in objects if not isinstance(o, (Array, ArrayChunk)))
    arrays = b"".join(o.deflate() for o in objects if isinstance(o, (Array, ArrayChunk)))
    return message_to_proto(msg).SerializeToString() + records + arrays, records


class RecordingGrid:
    """The ServerApp's Grid, keeping every reply's bytes; ``after(n)`` runs after the n-th
    exchange (to break a site's data mid-run)."""

    def __init__(self, after=None) -> None:
        self.inner = None
        self.replies: list[tuple[bool, str | None, tuple[bytes, bytes]]] = []
        self.exchanges = 0
        self.after = after

    def get_node_ids(self):
        return self.inner.get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            reason = reply.error.reason if reply.has_error() else None
            self.replies.append((reply.has_error(), reason, wire_bytes(reply)))
        if messages and messages[0].metadata.message_type == MessageType.QUERY:
            return replies  # the data check before round 1 is no round's exchange
        self.exchanges += 1
        if self.after is not None:
            self.after(self.exchanges)
        return replies


def federate(root: Path, run_yaml: str, after=None) -> tuple[RecordingGrid, dict, Path, str]:
    """Run the federation on Flower's simulation runtime; returns the recording, summary.json,
    the run folder and the outcome ("completed" or the RoundFailed text)."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedscan.client.client_app import make_client_app
    from fedscan.server.rounds import RoundFailed
    from fedscan.server.server_app import run_federation
    from fedscan.shared.config import load_config
    from fedscan.simulations.federated import simulation_backend, site_for_client

    (root / "run.yaml").write_text(run_yaml)
    cfg = load_config(root / "run.yaml")
    out = root / "run"
    sites = [site_for_client(cfg, s, out) for s in cfg.sites]
    grid = RecordingGrid(after)
    outcome = {"result": "did not run"}
    server = ServerApp()

    @server.main()
    def main(real: Grid, context: Context) -> None:
        grid.inner = real
        try:
            run_federation(grid, cfg, out)
            outcome["result"] = "completed"
        except RoundFailed as exc:
            outcome["result"] = str(exc)

    client = make_client_app(lambda ctx: sites[int(ctx.node_config["partition-id"])])
    run_simulation(server_app=server, client_app=client, num_supernodes=len(sites),
                   backend_config=simulation_backend(cfg))
    return grid, json.loads((out / "summary.json").read_text()), out, outcome["result"]


def sites_yaml(extra: str) -> str:
    return ("sites:\n" + "".join(f"  - {{name: {s}, data: data/{s}}}\n" for s in SITES)
            + extra + TINY_RUN)


def secrets_of(root: Path) -> list[str]:
    """What must never reach the server: the site's folders, file and case names, the label
    value, its exception text and traceback frames (the server's own tracebacks may be in its
    logs)."""
    return [str(root / "data"), "site-a_", "site-b_", "site-c_", ".nii", "imagesTr", "labelsTr",
            "label value", "DataError", "<class", "channel(s)", "client_app.py"]


#: The bad label value as a number of its own (not a digit run inside another number).
LABEL_VALUE = re.compile(rf"(?<![0-9.]){SECRET_LABEL}(?![0-9.])")


def assert_nothing_leaked(root: Path, grid: RecordingGrid, summary: dict, out: Path) -> None:
    for is_error, reason, (data, records) in grid.replies:
        assert not is_error or reason in SITE_ERRORS, reason  # a bare code, nothing else
        for secret in secrets_of(root):
            assert secret.encode() not in data, (secret, reason)
        # Array ids in the records are content hashes (hex): a "217" inside one is chance.
        plain = re.sub(rb"[0-9a-f]{32,}", b"", records)
        assert not re.search(LABEL_VALUE.pattern.encode(), plain), reason
    # In simulation the researcher's own config (summary["config"]) lists every site's folder:
    # the researcher owns them. Everything else in summary.json came from the sites.
    for site in summary["config"]["sites"]:
        site["data"] = "(the researcher's folder)"
    report = out / "report.md"  # not written when the run stops at a failed round
    text = json.dumps(summary) + (report.read_text() if report.is_file() else "")
    for secret in secrets_of(root):
        assert secret not in text, secret
    assert not LABEL_VALUE.search(text)


def write_label(path: Path, value: int) -> None:
    """Rewrite a label file with ``value`` wherever it had foreground."""
    img = nib.load(path)
    data = np.asarray(img.dataobj).astype(np.int32)
    data[data > 0] = value
    nib.save(nib.Nifti1Image(data, img.affine), path)


def test_broken_data_reaches_the_server_as_a_code_only(tmp_path):
    folders = make_sites(tmp_path / "data")
    write_label(folders["site-b"] / "labelsTr" / "site-b_000.nii.gz", SECRET_LABEL)
    corrupt = folders["site-c"] / "imagesTr" / "site-c_000.nii.gz"

    def truncate_after_round_1(exchange: int) -> None:
        if exchange == 1:  # round 1's training is done: corrupt a file site-c trains on
            corrupt.write_bytes(gzip.compress(corrupt.read_bytes())[:400])

    grid, summary, out, outcome = federate(
        tmp_path, sites_yaml("rounds: 2\nstrategy: {min_sites: 1}\n"), truncate_after_round_1)
    assert outcome == "completed"
    r1, r2 = summary["rounds"]
    assert set(r1["train"]) == {"site-a", "site-c"} and set(r2["train"]) == {"site-a"}
    # site-b never trained, so the simulation server knows it by node id only.
    errors = {(r["round"], e["site"], e["reason"].split(":")[0])
              for r in summary["rounds"] for e in r.get("errors", [])}
    (site_b,) = {site for _, site, _ in errors if site.startswith("node-")}
    assert errors == {(1, site_b, "data-error"), (2, site_b, "data-error"),
                      (2, "site-c", "data-error")}
    assert sum(is_error for is_error, _, _ in grid.replies) == 3
    # The data check's query (3-case sites keep their statistics: "few-cases"), two train
    # exchanges and the final evaluation.
    assert len(grid.replies) == 3 * 4
    assert "data-error" in (out / "report.md").read_text()
    assert_nothing_leaked(tmp_path, grid, summary, out)
    # The sites kept the full story: file, label value, traceback.
    log_b = (out / "site-state" / "site-b" / "site.log").read_text()
    assert "site-b_000.nii.gz" in log_b and str(SECRET_LABEL) in log_b and "Traceback" in log_b
    assert "site-c_000.nii.gz" in (out / "site-state" / "site-c" / "site.log").read_text()
    log_a = (out / "site-state" / "site-a" / "site.log").read_text()  # progress lines only
    assert "[site-a] round 2 step" in log_a and "failed" not in log_a and "Traceback" not in log_a
    # Every accepted task config is in each site's audit log under its canonical sha256.
    from fedscan.shared.config import load_config
    from fedscan.shared.messages import RoundConfig

    sent = RoundConfig.for_run(load_config(tmp_path / "run.yaml")).task_config
    canonical = json.dumps(json.loads(sent), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    for site in SITES:
        audit = [json.loads(line) for line in
                 (out / "site-state" / site / "audit.log").read_text().splitlines()]
        accepted = [(a["round"], a["phase"]) for a in audit if a["event"] == "task-accepted"]
        # The data check's query before round 1 carries the same task config.
        assert accepted == [(0, "query"), (1, "train"), (2, "train"), (2, "evaluate")], site
        assert {a["sha256"] for a in audit} == {digest}


def test_wrong_in_channels_from_the_server_reaches_it_as_a_code_only(tmp_path):
    make_sites(tmp_path / "data")
    run = sites_yaml("rounds: 1\n").replace("data: {spacing: [8, 8, 8]}",
                                            "data: {spacing: [8, 8, 8], in_channels: 2}")
    assert "in_channels: 2" in run
    grid, summary, out, outcome = federate(tmp_path, run)
    assert outcome.startswith("round 1: no update aggregated")
    (r1,) = summary["rounds"]
    assert [e["reason"].split(":")[0] for e in r1["errors"]] == ["data-error"] * 3
    # The data check's query and round 1's training: dataset.json disagrees with both.
    assert [reason for _, reason, _ in grid.replies] == ["data-error"] * 6
    assert_nothing_leaked(tmp_path, grid, summary, out)
    for site in SITES:
        log = (out / "site-state" / site / "site.log").read_text()
        # The site's own log names the file that disagrees (its dataset.json) and why.
        assert f"data/{site}/dataset.json" in log and "data.in_channels is 2" in log


def test_deployed_site_with_broken_data_reveals_only_a_code(tmp_path):
    """Flower's deployment runtime on loopback (``fedscan server start``, a ``fedscan client
    start`` daemon, guarded ``flwr-clientapp`` processes): the site's bad label reaches the
    server host as ``data-error`` and nothing else, in any file the server wrote, including
    the SuperLink's state database, where the reply was stored."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        runtime = s.getsockname()[1]
    folders = make_sites(tmp_path / "data")
    write_label(folders["site-b"] / "labelsTr" / "site-b_000.nii.gz", SECRET_LABEL)
    (tmp_path / "site-b.yaml").write_text(
        f"name: site-b\ndata: data/site-b\nserver: 127.0.0.1:{port}\nruntime_port: {runtime}\n")
    (tmp_path / "server.yaml").write_text(
        f"server: {{host: 127.0.0.1, port: {port}, run_dir: run, site_grace: 60}}\n"
        "sites: [{name: site-b}]\nrounds: 1\nstrategy: {round_timeout: 300}\n" + TINY_RUN)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
    with (tmp_path / "site-b.log").open("w") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "fedscan", "client", "start", "--config", "site-b.yaml",
             "--insecure"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
    try:
        started = time.monotonic()
        server = subprocess.run(
            [sys.executable, "-m", "fedscan", "server", "start", "--config", "server.yaml",
             "--insecure"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=400)
        print(f"deployment run took {time.monotonic() - started:.0f}s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(daemon.pid, signal.SIGTERM)
        daemon.wait(timeout=30)
    # The only site failed: round 1 aggregated nothing and the run stopped there.
    assert server.returncode != 0 and "ended as finished:failed" in server.stderr, \
        server.stdout[-3000:] + server.stderr[-3000:]
    run = tmp_path / "run"
    (r1,) = json.loads((run / "summary.json").read_text())["rounds"]
    assert [e["reason"].split(":")[0] for e in r1["errors"]] == ["data-error"]
    # Every file on the server host: summary, logs and Flower's state database, which holds
    # the reply as the SuperLink received it.
    stored = b"".join(p.read_bytes() for p in run.glob("state.db*"))
    assert b"data-error" in stored
    site_side = [*secrets_of(tmp_path), str(tmp_path / ".fedscan-site-b"), "site-b.yaml"]
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for secret in site_side:
            assert secret.encode() not in data, (path, secret)
        if path.suffix in (".json", ".md", ".log", ".txt", ".yaml"):
            assert not LABEL_VALUE.search(data.decode(errors="replace")), path
    # The hospital kept the details.
    log_b = (tmp_path / ".fedscan-site-b" / "site.log").read_text()
    assert "site-b_000.nii.gz" in log_b and "label values must be integers" in log_b
    assert LABEL_VALUE.search(log_b)
