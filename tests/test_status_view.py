"""The live state and the status page's view, without a runtime: the LiveGrid reports each
reply as it arrives and honours the hold file; build_view turns summary.json + live.json into
what the page shows (rounds in flight, outcomes, metrics from the task's specs, ETA, staleness)."""

import json
import threading
import time

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedscan.server.live_grid import LiveGrid
from fedscan.shared.live import HOLD_FILE, LiveStatus, read_live
from fedscan.shared.messages import site_record
from fedscan.shared.status.view import build_view, metric_keys


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Messages built outside a runtime need a run id, as inside one.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def train_messages(rnd: int, nodes: list[int]) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"server-round": rnd})}),
                    dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(rnd))
            for n in nodes]


class OneReplyPerPull:
    """A grid whose nodes answer one per pull (node 2 with an error); records live.json as it
    stood at each pull."""

    pull_interval = 0.01

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.pushed: list[Message] = []
        self.seen: list[dict] = []

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.pushed.append(msg)
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids):
        self.seen.append(read_live(self.run_dir))
        pending = [m for m in self.pushed if m.metadata.message_id in set(ids)]
        if not pending:
            return []
        msg = pending[0]
        node = msg.metadata.dst_node_id
        if node == 2:
            reply = Message(Error(code=1, reason="data-error"), reply_to=msg)
        else:
            reply = Message(RecordDict({"site": site_record(f"site-{node}"),
                                        "metrics": MetricRecord({"num-examples": 1})}),
                            reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = node
        return [reply]


def test_live_grid_reports_each_reply_as_it_arrives(tmp_path):
    live = LiveStatus(tmp_path, rounds_total=3, sites=["site-1", "site-2"], min_interval=0)
    grid = OneReplyPerPull(tmp_path)
    replies = LiveGrid(grid, live).send_and_receive(train_messages(1, [1, 2]), timeout=10)
    assert len(replies) == 2
    first, second = grid.seen[0], grid.seen[1]
    assert {n["status"] for n in first["nodes"].values()} == {"waiting"}
    assert first["round"] == 1 and first["phase"] == "train" and first["state"] == "running"
    # At the second pull node 1 had replied (and is named by its reply), node 2 not yet.
    assert second["nodes"]["1"]["status"] == "replied"
    assert second["nodes"]["1"]["site"] == "site-1"
    assert second["nodes"]["2"]["status"] == "waiting"
    final = read_live(tmp_path)
    assert final["nodes"]["2"]["status"] == "error"
    assert final["nodes"]["2"]["error"] == "data-error"
    assert final["nodes"]["1"]["online"] is True


def test_hold_file_holds_the_next_round_until_deleted(tmp_path):
    live = LiveStatus(tmp_path, rounds_total=3, sites=["site-1", "site-2"], min_interval=0)
    grid = OneReplyPerPull(tmp_path)
    (tmp_path / HOLD_FILE).touch()
    worker = threading.Thread(target=lambda: LiveGrid(grid, live).send_and_receive(
        train_messages(1, [1, 2]), timeout=10))
    worker.start()
    deadline = time.monotonic() + 10
    while read_live(tmp_path).get("state") != "held" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert read_live(tmp_path)["state"] == "held"
    time.sleep(0.6)
    assert grid.pushed == [], "nothing is sent while held"
    (tmp_path / HOLD_FILE).unlink()
    worker.join(timeout=10)
    assert len(grid.pushed) == 2 and read_live(tmp_path)["state"] == "running"


def write_run(tmp_path, summary: dict, live: dict | None = None):
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    if live is not None:
        (tmp_path / "live.json").write_text(json.dumps(live))
    return tmp_path


SUMMARY = {
    "mode": "federated", "task": "segmentation", "sites": ["a", "b", "c"],
    "config": {"rounds": 5},
    "rounds": [
        {"round": 1, "seconds": 100.0,
         "train": {"a": {"epsilon": 1.5, "epsilon_budget": 8.0, "status": "trained"},
                   "b": {"loss": 0.9, "status": "off"}},
         "evaluate": {"a": {"dice": 0.5, "dice/tumour": 0.4, "hd95": 3.0, "num_examples": 2},
                      "b": {"dice": 0.7, "hd95": 2.0, "num_examples": 1}},
         "aggregate": {"dice": 0.5667},
         "rejected": [{"site": "c", "phase": "train", "reason": "update norm 40x the median"}],
         "bytes": {"a": {"train_down": 100, "train_up": 90}, "b": {"train_down": 100}}},
        {"round": 2, "seconds": 10.0,
         "train": {"a": {"epsilon": 8.0, "epsilon_budget": 8.0, "status": "declined"}},
         "evaluate": {}, "aggregate": {},
         "errors": [{"site": "b", "phase": "train", "reason": "data-error"}],
         "bytes": {"a": {"train_down": 100, "train_up": 90}}},
    ],
}


def test_view_outcomes_privacy_bytes_and_faults(tmp_path):
    view = build_view(write_run(tmp_path, SUMMARY))
    assert view["rounds"]["done"] == 2 and view["rounds"]["total"] == 5
    assert view["run"]["state"] == "summary only"  # no live.json, no final model
    r1, r2 = view["per_round"]
    assert [r1["sites"][s]["outcome"] for s in "abc"] == ["trained", "trained", "rejected"]
    assert [r2["sites"][s]["outcome"] for s in "abc"] == ["declined", "error", None]
    assert r1["sites"]["a"]["metrics"] == {"dice": 0.5, "dice/tumour": 0.4, "hd95": 3.0}
    sites = {s["name"]: s for s in view["sites"]}
    assert sites["a"]["epsilon"] == 8.0 and sites["a"]["privacy_status"] == "declined"
    assert sites["b"]["epsilon"] is None
    assert (sites["a"]["bytes_down"], sites["a"]["bytes_up"]) == (200, 180)
    assert sites["a"]["metrics"]["dice"] == 0.5  # the latest round that has metrics
    assert sites["b"]["last_outcome"] == "error" and sites["b"]["last_round"] == 2
    assert [(f["round"], f["kind"], f["site"]) for f in view["faults"]] == [
        (1, "rejected", "c"), (2, "error", "b")]


def test_unadmitted_nodes_are_listed_as_refused_not_as_sites(tmp_path):
    view = build_view(write_run(tmp_path, {**SUMMARY, "unadmitted_nodes": [77, "<b>x</b>"]}))
    refused = [f for f in view["faults"] if f["kind"] == "refused"]
    assert [(f["site"], f["phase"]) for f in refused] == [("node 77", "admission"),
                                                          ("node <b>x</b>", "admission")]
    assert all("node" not in s["name"] for s in view["sites"])


def test_metric_keys_follow_the_task_specs_else_the_data():
    fallback = [m["key"] for m in metric_keys(SUMMARY)]
    assert fallback == ["dice", "hd95", "dice/tumour"]
    specs = {**SUMMARY, "metrics": [
        {"name": "dice", "higher_is_better": True, "per_class": True, "headline": True},
        {"name": "hd95", "higher_is_better": False, "unit": "mm"}]}
    keys = metric_keys(specs)
    assert [m["key"] for m in keys] == ["dice", "dice/tumour", "hd95"]
    assert keys[0]["headline"] and not keys[1]["headline"] and keys[2]["unit"] == "mm"


def test_round_in_flight_eta_and_a_silent_server(tmp_path):
    now = time.time()
    live = {"state": "running", "updated": now - 1, "rounds_total": 5, "round": 3,
            "phase": "train", "round_started": now - 4,
            "round_durations": {"1": 100.0, "2": 10.0},
            "nodes": {"7": {"site": "a", "online": True, "status": "replied",
                            "last_contact": now - 2},
                      "8": {"site": "b", "online": False, "status": "waiting"}}}
    view = build_view(write_run(tmp_path, SUMMARY, live), now=now)
    assert view["rounds"]["in_flight"] == 3
    assert view["rounds"]["replies"] == {"waiting": 1, "replied": 1, "error": 0}
    # Median of 100 s and 10 s (55 s) x 3 rounds left, less the 4 s round 3 has run.
    assert abs(view["rounds"]["eta_seconds"] - (55.0 * 3 - 4)) < 1e-6
    sites = {s["name"]: s for s in view["sites"]}
    assert sites["a"]["online"] is True and sites["a"]["in_flight"] == "replied"
    assert sites["b"]["online"] is False and sites["b"]["in_flight"] == "waiting"
    # Between rounds: round 2 closed in summary.json, round 3 not yet sent.
    between = build_view(write_run(tmp_path, SUMMARY, {**live, "round": 2}), now=now)
    assert between["rounds"]["in_flight"] is None
    assert all(s["in_flight"] is None for s in between["sites"])
    # A server that stopped writing: not shown as running, no ETA.
    silent = build_view(write_run(tmp_path, SUMMARY, {**live, "updated": now - 600}), now=now)
    assert silent["run"]["stale"] and silent["rounds"]["in_flight"] is None
    assert silent["rounds"]["eta_seconds"] is None and silent["sites"][0]["online"] is None


def test_unreadable_files_show_an_empty_run(tmp_path):
    (tmp_path / "summary.json").write_text("{not json")
    (tmp_path / "live.json").write_text("[1, 2]")
    view = build_view(tmp_path)
    assert view["run"]["state"] == "unknown" and view["per_round"] == [] and view["sites"] == []


def test_non_finite_and_odd_values_keep_the_answer_valid_json(tmp_path):
    (tmp_path / "summary.json").write_text(
        '{"sites": ["a"], "rounds": [{"round": 1, "seconds": NaN, "train": {"a": '
        '{"loss": Infinity, "epsilon": NaN, "status": ["x"]}}, "evaluate": {"a": '
        '{"dice": NaN}}, "aggregate": {"dice": -Infinity}}]}')
    (tmp_path / "live.json").write_text(
        json.dumps({"state": "running", "updated": time.time(), "round": 1.5,
                    "nodes": {"1": {"site": "a", "status": {"x": 1}, "online": "yes"}}}))
    view = build_view(tmp_path)
    json.dumps(view, allow_nan=False)  # what the app sends; raises on NaN
    row = view["per_round"][0]["sites"]["a"]
    assert row["loss"] is None and row["epsilon"] is None and row["status"] is None
    assert view["rounds"]["in_flight"] is None and view["sites"][0]["online"] is False


def test_cross_site_matrix_in_the_view(tmp_path):
    """The view carries the headline metric's matrix, the comparison and refusals; a run
    without the stage has none."""
    assert build_view(write_run(tmp_path, SUMMARY))["cross_site"] is None
    cs = {"models": ["global", "a"], "sites": ["a", "b"], "metrics": ["dice", "hd95"],
          "headline": "dice",
          "matrix": {"global": {"a": {"dice": 0.9, "hd95": 2.0}, "b": {"dice": float("nan")}},
                     "a": {"a": {"dice": 0.95}, "b": {"dice": 0.6}}},
          "comparison": {"a": {"local_off_diagonal": 0.6, "global_same_sites": None}},
          "not_shared": {"b": "policy-refused"}}
    view = build_view(write_run(tmp_path, {**SUMMARY, "cross_site": cs}))["cross_site"]
    assert view["metric"] == "dice" and view["sites"] == ["a", "b"]
    assert [r["model"] for r in view["rows"]] == ["global", "a (local)"]
    assert view["rows"][0]["values"] == [0.9, None]  # NaN: missing, not NaN in the JSON
    assert view["rows"][1]["values"] == [0.95, 0.6] and view["rows"][1]["off_diagonal"] == 0.6
    assert view["not_shared"] == {"b": "policy-refused"}
    json.dumps(view, allow_nan=False)
