"""The hospital's own view of what ran on its data: ``fedscan client status``.

Everything comes from the site's state folder, which never leaves the site:

- ``audit.log`` (:mod:`fedscan.client.audit`): every run and task config the site accepted or
  refused, with the task config's sha256;
- ``sent.log`` (:mod:`fedscan.client.sent_log`): every reply the site sent: bytes, weight
  tensors, the names and values of its metrics, its ε after each round;
- ``privacy_ledger.json`` (:mod:`fedscan.client.privacy`): ε spent in total, replayed here
  with Opacus' accountant, exactly as the ClientApp computes it before each round;
- ``site.log`` (:mod:`fedscan.client.site_log`): failures in full.

ε is not additive over runs: a run's line shows the site's (cumulative) ε before and after
it, as the ledger stood; the total is the ledger's ε over every step the site ever took.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedscan.client.privacy import LEDGER_FILE, PrivacyLedger
from fedscan.client.sent_log import SENT_LOG
from fedscan.client.site_log import SITE_LOG
from fedscan.shared.config import PrivacyConfig, SiteConfig, effective_privacy
from fedscan.shared.errors import FedscanError
from fedscan.shared.messages import PRIVACY

AUDIT_LOG = "audit.log"
#: A failure entry's first line in site.log (``client/error_replies.py``).
_FAILURE = re.compile(r"^(\S+) site (.+?): (.+) failed, sent (\S+)$")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """A JSON-lines file's records (a torn last line, from a crash mid-write, is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _unix(stamp: str | None) -> float | None:
    """Seconds since the epoch of an audit-style time (``%Y-%m-%dT%H:%M:%S%z``)."""
    if not stamp:
        return None
    try:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z"))
    except ValueError:
        return None


def _ledger(state_dir: Path, privacy: PrivacyConfig | None) -> dict[str, Any] | None:
    """The ledger's ε replayed with the site's accountant, or None when there is none
    (``budget`` None when the site trains without DP now)."""
    path = state_dir / LEDGER_FILE
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        stored = json.loads(text)
        if privacy is None:  # DP is off now: replay with what the ledger was kept under
            privacy = PrivacyConfig(epsilon=math.inf, delta=float(stored["delta"]),
                                    accountant=str(stored["accountant"]))
        ledger = PrivacyLedger.from_json(text, privacy)
    except (ValueError, KeyError, TypeError) as exc:
        raise FedscanError(f"{path}: privacy ledger is corrupt ({exc})") from None
    budget = privacy.epsilon if math.isfinite(privacy.epsilon) else None
    return {"epsilon": ledger.epsilon(), "budget": budget, "delta": privacy.delta,
            "accountant": privacy.accountant, "steps": ledger.steps,
            "noise_multiplier": ledger.noise_multiplier, "sample_rate": ledger.sample_rate}


def _failures(state_dir: Path) -> list[dict[str, str]]:
    path = state_dir / SITE_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _FAILURE.match(line)
        if match:
            out.append({"time": match[1], "where": match[3], "code": match[4]})
    return out


def _runs(audit: Iterable[dict[str, Any]], sent: Iterable[dict[str, Any]]
          ) -> list[dict[str, Any]]:
    """One entry per run id, in the order the site first heard of them."""
    runs: dict[Any, dict[str, Any]] = {}

    def run(run_id: Any) -> dict[str, Any]:
        return runs.setdefault(run_id, {
            "run_id": run_id, "first": None, "last": None, "accepted": 0, "refused": 0,
            "sha256": [], "fab_hash": None, "refusals": [], "rounds_trained": [],
            "rounds_declined": [], "rounds_evaluated": [], "errors": [], "replies": 0,
            "bytes_sent": 0, "epsilon_before": None, "epsilon_after": None,
            "dp_steps": None, "metric_names": {}})

    def seen(entry: dict[str, Any], when: float | None) -> None:
        if when is not None:
            entry["first"] = when if entry["first"] is None else min(entry["first"], when)
            entry["last"] = when if entry["last"] is None else max(entry["last"], when)

    for record in audit:
        event, entry = record.get("event"), run(record.get("run_id"))
        seen(entry, _unix(record.get("time")))
        digest = record.get("sha256")
        if digest and digest not in entry["sha256"]:
            entry["sha256"].append(digest)
        if record.get("fab_hash"):
            entry["fab_hash"] = record["fab_hash"]
        if event in ("task-accepted", "run-accepted"):
            entry["accepted"] += 1
        elif event in ("task-refused", "run-refused"):
            entry["refused"] += 1
            entry["refusals"].append(str(record.get("reason", ""))[:300])
    last_epsilon = 0.0
    for record in sent:
        entry = run(record.get("run_id"))
        seen(entry, record.get("unix"))
        entry["replies"] += 1
        entry["bytes_sent"] += int(record.get("bytes", 0))
        rnd, phase = record.get("round"), record.get("phase")
        if "error" in record:
            entry["errors"].append({"round": rnd, "phase": phase, "code": record["error"]})
            continue
        records = record.get("records", {})
        for name, values in records.items():
            names = entry["metric_names"].setdefault(name, [])
            names.extend(k for k in values if k not in names)
        if phase == "train":
            privacy = records.get(PRIVACY, {})
            status = privacy.get("status", "trained")
            steps = records.get("metrics", {}).get("steps", 0)
            if status == "declined" or not steps:
                entry["rounds_declined"].append(rnd)
            else:
                entry["rounds_trained"].append(rnd)
            if "epsilon" in privacy:
                if entry["epsilon_before"] is None:
                    entry["epsilon_before"] = last_epsilon
                entry["epsilon_after"] = last_epsilon = float(privacy["epsilon"])
                entry["dp_steps"] = int(privacy.get("steps", 0))
            if "evaluation" in records:
                entry["rounds_evaluated"].append(rnd - 1 if isinstance(rnd, int) else rnd)
        elif phase == "evaluate":
            entry["rounds_evaluated"].append(rnd)
    return list(runs.values())


def site_status(site: SiteConfig) -> dict[str, Any]:
    """What ran on this site's data, from its state folder (nothing is asked of the server).

    Returns:
        ``site``, ``state_dir``, ``runs`` (per run id: accepted/refused decisions, task-config
        sha256s, rounds trained/declined/evaluated, errors sent, replies and bytes sent, ε
        before and after, the record and metric names sent), ``privacy`` (the ledger's ε,
        budget, δ, accountant, steps; None without a ledger), ``sent_names`` (every record
        and metric name ever sent), ``failures`` (site.log), ``last_contact`` (unix time).

    Raises:
        FedscanError: the state folder does not exist, or the ledger is corrupt.
    """
    if not site.state_dir or not Path(site.state_dir).is_dir():
        raise FedscanError(f"{site.state_dir}: no state folder yet (the site has not run; "
                           "state_dir in site.yaml names it)")
    state_dir = Path(site.state_dir)
    audit, sent = _jsonl(state_dir / AUDIT_LOG), _jsonl(state_dir / SENT_LOG)
    runs = _runs(audit, sent)
    names: dict[str, list[str]] = {}
    for entry in runs:
        for record, keys in entry["metric_names"].items():
            names.setdefault(record, [])
            names[record].extend(k for k in keys if k not in names[record])
    contacts = [r["last"] for r in runs if r["last"] is not None]
    return {
        "site": site.name,
        "state_dir": str(state_dir),
        "runs": runs,
        "privacy": _ledger(state_dir, effective_privacy(site.privacy)),
        "sent_names": names,
        "bytes_sent": sum(r["bytes_sent"] for r in runs),
        "failures": _failures(state_dir),
        "last_contact": max(contacts) if contacts else None,
    }


def format_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_when(unix: float | None) -> str:
    if unix is None:
        return "never"
    ago = max(0.0, time.time() - unix)
    span = (f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min" if ago < 7200
            else f"{ago / 3600:.1f} h" if ago < 172800 else f"{ago / 86400:.0f} days")
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(unix))} ({span} ago)"


def _rounds(rounds: list[Any]) -> str:
    return ", ".join(str(r) for r in rounds) if rounds else "none"


def format_status(status: dict[str, Any]) -> str:
    """``fedscan client status``'s text."""
    lines = [f"site {status['site']} (state folder {status['state_dir']})",
             f"last contact with the server: {format_when(status['last_contact'])}"]
    privacy = status["privacy"]
    if privacy is None:
        lines.append("privacy: no DP ledger (this site has not trained with DP)")
    else:
        budget = privacy["budget"]
        of = f" of {budget:g}" if budget is not None else " (no budget now: DP is off)"
        lines.append(f"privacy: epsilon {privacy['epsilon']:.4f} spent{of} in total "
                     f"(delta {privacy['delta']:g}, {privacy['accountant']} accountant, "
                     f"{privacy['steps']} DP-SGD steps)")
    lines.append(f"runs: {len(status['runs'])}; sent {format_size(status['bytes_sent'])} in all")
    for run in status["runs"]:
        verdict = ("refused" if run["refused"] and not run["accepted"] else
                   "accepted, then refused" if run["refused"] else "accepted")
        lines.append(f"  run {run['run_id']}: {verdict}; last seen {format_when(run['last'])}")
        for digest in run["sha256"]:
            lines.append(f"    task config sha256 {digest}")
        if run["fab_hash"]:
            lines.append(f"    FAB sha256 {run['fab_hash']}")
        for reason in run["refusals"]:
            lines.append(f"    refused: {reason}")
        lines.append(f"    rounds trained: {_rounds(run['rounds_trained'])}; declined: "
                     f"{_rounds(run['rounds_declined'])}; models evaluated: "
                     f"{_rounds(run['rounds_evaluated'])}")
        if run["epsilon_after"] is not None:
            lines.append(f"    epsilon {run['epsilon_before']:.4f} -> "
                         f"{run['epsilon_after']:.4f} over this run "
                         f"({run['dp_steps']} DP-SGD steps in all after it)")
        for error in run["errors"]:
            lines.append(f"    round {error['round']} {error['phase']}: sent error "
                         f"{error['code']}")
        lines.append(f"    sent {run['replies']} replies, {format_size(run['bytes_sent'])}")
    if status["sent_names"]:
        lines.append("what was sent (record: names; weights as tensors, nothing per case):")
        for record, names in status["sent_names"].items():
            lines.append(f"  {record}: {', '.join(names)}")
    failures = status["failures"]
    if failures:
        last = failures[-1]
        lines.append(f"failures in site.log: {len(failures)}; last {last['time']} "
                     f"{last['where']} (sent {last['code']})")
    return "\n".join(lines)
