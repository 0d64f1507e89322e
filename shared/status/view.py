"""What the status page shows, computed from a run folder's summary.json and live.json.

The page renders this dict as it is (it computes nothing), so the browser test can hold every
rendered number against summary.json. Both files are treated as untrusted: any key may be
missing or of the wrong type; site names and error texts are passed on as text, and the page
sets them as text, never as HTML.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedscan.shared.cross_site import cell, row_label
from fedscan.shared.live import HEARTBEAT_SECONDS, HOLD_FILE, read_live

#: A running run whose live.json is older than this is shown as not responding.
STALE_SECONDS = 4 * HEARTBEAT_SECONDS
#: Train fields the page shows per site and round (privacy ledger and loss), when present.
TRAIN_FIELDS = ("loss", "epsilon", "epsilon_budget", "delta", "status", "steps")


def read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json of ``run_dir``, or an empty dict when absent or unreadable."""
    try:
        data = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _num(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _scalar(value: Any) -> float | int | str | None:
    """A number (finite) or a string as it is; anything else None (keeps the JSON valid)."""
    return value if isinstance(value, str) else _num(value)


def _rounds(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    rounds = summary.get("rounds")
    out = [dict(r) for r in rounds if isinstance(r, Mapping)] if isinstance(rounds, list) else []
    out = [r for r in out if isinstance(_num(r.get("round")), int)]
    return sorted(out, key=lambda r: r["round"])


def metric_keys(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The evaluation metrics to show: the task's declared specs (summary ``metrics``), each
    followed by its per-class keys ``name/<class>``; else every key the evaluations hold."""
    found: list[str] = []
    for r in _rounds(summary):
        for metrics in _dict(r.get("evaluate")).values():
            for key, value in _dict(metrics).items():
                if key != "num_examples" and key not in found and _num(value) is not None:
                    found.append(key)
    specs = [s for s in summary.get("metrics") or [] if isinstance(s, Mapping) and "name" in s]
    out: list[dict[str, Any]] = []
    for spec in specs:
        name = str(spec["name"])
        keys = [name] + sorted(k for k in found if k.startswith(name + "/"))
        for key in keys:
            out.append({"key": key, "higher_is_better": bool(spec.get("higher_is_better", True)),
                        "unit": str(spec.get("unit") or ""),
                        "headline": bool(spec.get("headline")) and key == name})
    if not specs:
        ordered = sorted(found, key=lambda k: ("/" in k, found.index(k)))
        out = [{"key": k, "higher_is_better": None, "unit": "", "headline": i == 0}
               for i, k in enumerate(ordered)]
    return out


def _site_names(summary: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    names: list[str] = []

    def add(name: Any) -> None:
        if isinstance(name, str) and name not in names:
            names.append(name)

    for source in (summary.get("sites"), live.get("sites")):
        for name in source if isinstance(source, list) else []:
            add(name)
    for r in _rounds(summary):
        for part in ("train", "evaluate", "bytes"):
            for name in _dict(r.get(part)):
                add(name)
        for fault in [*(r.get("errors") or []), *(r.get("rejected") or [])]:
            add(_dict(fault).get("site"))
    for node in _dict(live.get("nodes")).values():
        add(_dict(node).get("site"))
    return names


def _outcome(entry: Mapping[str, Any], site: str) -> str | None:
    """How a site's training went in a completed round."""
    for fault in entry.get("rejected") or []:
        if _dict(fault).get("site") == site and _dict(fault).get("phase") == "train":
            return "rejected"
    train = _dict(_dict(entry.get("train")).get(site))
    if train:
        return "declined" if train.get("status") == "declined" else "trained"
    for fault in entry.get("errors") or []:
        if _dict(fault).get("site") == site and _dict(fault).get("phase") == "train":
            return "error"
    return None


def _round_rows(summary: Mapping[str, Any], sites: list[str],
                keys: list[str]) -> list[dict[str, Any]]:
    rows = []
    for r in _rounds(summary):
        per_site = {}
        for site in sites:
            evaluate = _dict(_dict(r.get("evaluate")).get(site))
            train = _dict(_dict(r.get("train")).get(site))
            per_site[site] = {
                "outcome": _outcome(r, site),
                "metrics": {k: _num(evaluate.get(k)) for k in keys if k in evaluate},
                **{f: _scalar(train[f]) for f in TRAIN_FIELDS if f in train},
            }
        aggregate = _dict(r.get("aggregate"))
        rows.append({"round": r["round"], "seconds": _num(r.get("seconds")),
                     "complete": _num(r.get("seconds")) is not None,
                     "aggregate": {k: _num(aggregate.get(k)) for k in keys if k in aggregate},
                     "sites": per_site})
    return rows


def _faults(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    # The data check's flags come first: they were raised before round 1.
    out = [{"round": "before 1", "kind": "flagged", "site": str(_dict(f).get("site")),
            "phase": "data check", "reason": str(_dict(f).get("reason"))}
           for f in _dict(summary.get("data_check")).get("flags") or []]
    # Nodes that connected with a key the operator never admitted (deployment): an outsider
    # or a misconfigured hospital; they are never sampled, and what they send is dropped.
    unadmitted = summary.get("unadmitted_nodes")
    out += [{"round": "—", "kind": "refused", "site": f"node {_scalar(node)}",
             "phase": "admission", "reason": "online with a key that was not admitted: "
             "never sampled, its replies dropped"}
            for node in (unadmitted if isinstance(unadmitted, list) else [])]
    for r in _rounds(summary):
        for kind, part in (("error", "errors"), ("rejected", "rejected")):
            for fault in r.get(part) or []:
                fault = _dict(fault)
                out.append({"round": r["round"], "kind": kind, "site": str(fault.get("site")),
                            "phase": str(fault.get("phase")), "reason": str(fault.get("reason"))})
    return out


def _site_rows(summary: Mapping[str, Any], live: Mapping[str, Any], sites: list[str],
               rows: list[dict[str, Any]], live_now: bool,
               in_flight: bool) -> list[dict[str, Any]]:
    nodes = [_dict(n) for n in _dict(live.get("nodes")).values()]
    complete = [r for r in rows if r["complete"]]
    out = []
    for site in sites:
        # The node last sent work (a site that rejoined under a new node id has two).
        node = max((n for n in nodes if n.get("site") == site),
                   key=lambda n: (_num(n.get("sent")) or 0, _num(n.get("last_contact")) or 0),
                   default={})
        down = up = 0
        for r in _rounds(summary):
            for key, value in _dict(_dict(r.get("bytes")).get(site)).items():
                if isinstance(_num(value), (int, float)):
                    if key.endswith("_down"):
                        down += value
                    elif key.endswith("_up"):
                        up += value
        privacy = next((r["sites"][site] for r in reversed(rows)
                        if r["sites"][site].get("epsilon") is not None), {})
        metrics = next((r["sites"][site]["metrics"] for r in reversed(rows)
                        if r["sites"][site]["metrics"]), {})
        out.append({
            "name": site,
            "online": node.get("online") is True if live_now and node else None,
            "last_contact": _num(node.get("last_contact")),
            "in_flight": _scalar(node.get("status")) if in_flight else None,
            "error": (_scalar(node.get("error"))
                      if in_flight and node.get("status") == "error" else None),
            "last_round": complete[-1]["round"] if complete else None,
            "last_outcome": complete[-1]["sites"][site]["outcome"] if complete else None,
            "bytes_down": down, "bytes_up": up,
            "epsilon": _num(privacy.get("epsilon")),
            "epsilon_budget": _num(privacy.get("epsilon_budget")),
            "privacy_status": _scalar(privacy.get("status")),
            "metrics": metrics,
        })
    return out


def _replies(live: Mapping[str, Any]) -> dict[str, int]:
    """How many nodes of the exchange in flight have replied, failed or are still working."""
    counts = {"waiting": 0, "replied": 0, "error": 0}
    for node in _dict(live.get("nodes")).values():
        status = _dict(node).get("status")
        if status in counts:
            counts[status] += 1
    return counts


def _eta(live: Mapping[str, Any], rows: list[dict[str, Any]], total: int, done: int,
         now: float) -> float | None:
    """Seconds left: median round duration (live, else summary) x rounds left, less the time
    the round in flight has already run."""
    durations = [v for v in _dict(live.get("round_durations")).values() if _num(v)]
    durations = durations or [r["seconds"] for r in rows if r["seconds"]]
    if not durations or done >= total or live.get("state") != "running":
        return None
    # The median: a first round that includes the runtime's start-up does not skew it.
    mean = statistics.median(durations)
    started = _num(live.get("round_started"))
    elapsed = now - started if started and live.get("state") == "running" else 0.0
    return max(0.0, mean * (total - done) - elapsed)


def _cross_site(summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The cross-site matrix of the headline metric (rows: models, columns: sites), with the
    global model's comparison per local model; None before the stage has run."""
    cs = _dict(summary.get("cross_site"))
    key = _scalar(cs.get("headline"))
    if not cs or not key:
        return None
    sites = [str(s) for s in cs.get("sites") or []]
    models = [str(m) for m in cs.get("models") or []]
    comparison = _dict(cs.get("comparison"))
    return {
        "metric": key, "sites": sites,
        "rows": [{"model": row_label(m), "values": [cell(cs, m, s, key) for s in sites],
                  "off_diagonal": _num(_dict(comparison.get(m)).get("local_off_diagonal")),
                  "global_there": _num(_dict(comparison.get(m)).get("global_same_sites"))}
                 for m in models],
        "not_shared": {str(k): str(v) for k, v in _dict(cs.get("not_shared")).items()},
    }


def build_view(run_dir: str | Path, now: float | None = None) -> dict[str, Any]:
    """The status page's data for ``run_dir`` (see the module docstring).

    Args:
        run_dir: a run folder (summary.json and/or live.json; either may be missing).
        now: the time to compute ages and the ETA against (default: now).

    Returns:
        ``run`` (state, mode, task, hold), ``rounds`` (total, done, in flight, ETA),
        ``metrics`` (keys shown, in order), ``sites`` (one row per site), ``per_round``
        (every round's per-site values and aggregate), ``faults`` (errors, rejections,
        data-check flags) and ``cross_site`` (the matrix of the headline metric, or None).
    """
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    summary, live = read_summary(run_dir), read_live(run_dir)
    # Without live.json (a baseline run, or a run older than the status page) only the
    # summary tells: a final model means finished.
    state = _scalar(live.get("state")) or ("finished" if summary.get("model") else
                                  "unknown" if not summary else "summary only")
    updated = _num(live.get("updated"))
    stale = state in ("running", "held", "starting") and (updated is None
                                                          or now - updated > STALE_SECONDS)
    live_now = state in ("running", "held", "starting") and not stale
    keys = metric_keys(summary)
    sites = _site_names(summary, live)
    rows = _round_rows(summary, sites, [k["key"] for k in keys])
    done = sum(1 for r in rows if r["complete"])
    config = _dict(summary.get("config"))
    total = _num(live.get("rounds_total")) or _num(config.get("rounds")) or len(rows)
    live_round = live.get("round") if isinstance(_num(live.get("round")), int) else None
    in_flight = live_round if live_now and state == "running" else None
    if live.get("phase") == "train" and any(r["round"] == in_flight and r["complete"]
                                            for r in rows):
        in_flight = None  # between rounds: the round has closed, the next not yet started
    phase = _scalar(live.get("phase")) if in_flight is not None else None
    return {
        "now": now,
        "run": {
            "name": run_dir.name, "state": state, "stale": stale, "updated": updated,
            "reason": _scalar(live.get("reason")) if state == "failed" else None,
            "mode": summary.get("mode"), "task": summary.get("task") or config.get("task"),
            "strategy": summary.get("strategy"),
            "held": (run_dir / HOLD_FILE).exists() and state != "finished",
        },
        "rounds": {
            "total": int(total), "done": done, "in_flight": in_flight, "phase": phase,
            "in_flight_since": _num(live.get("round_started")) if in_flight else None,
            "replies": _replies(live) if in_flight is not None else None,
            "eta_seconds": _eta(live, rows, int(total), done, now) if live_now else None,
        },
        "metrics": keys,
        "sites": _site_rows(summary, live, sites, rows, live_now, in_flight is not None),
        "per_round": rows,
        "faults": _faults(summary),
        "cross_site": _cross_site(summary),
    }
