"""The federated data check before round 1: each site's statistics against the others'.

The server sends every online site a ``query`` with the run's task config and ``ask:
data-stats``; each answers with aggregate statistics
(:class:`~fedscan.shared.data_stats.SiteStats`) or a reason it keeps them
(``client/data_stats_reply.py``). A malformed reply is dropped with one warning line. Each
site is then compared with the consortium without it (leave-one-out, so a bad site does not
pull the reference towards itself; at least :data:`MIN_OTHERS` other sites, since one other
site cannot tell which of the two is off) and flagged, one line per reason with its number:

- intensity: Jensen-Shannon distance of its histogram to the others' (their mean; with three or
  more, their per-bin median, so one dishonest member cannot move it far) above
  ``data_check.max_js``;
- orientation: the others agree on one orientation code (≥ 80 % of their cases) that fewer
  than 20 % of this site's cases have (preprocessing reorients every case, so this points at
  a wrong affine rather than a problem by itself);
- spacing: its median voxel size (the geometric mean of the spacing, so thick slices along
  different axes are alike) is more than ``max_spacing_ratio`` times off the others' median;
- labels: more than ``max_empty_fraction`` of its cases have an empty label; a class the
  others have is in none of its cases; a class's voxel fraction is more than
  ``max_class_ratio`` times off the others' mean.

Thresholds and their calibration on the phantom sites: docs/data_quality.md.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedscan.shared.config import Config, DataCheckConfig, class_names
from fedscan.shared.data_stats import SUPPRESSED, SiteStats, js_distance
from fedscan.shared.messages import (
    ASK,
    CONFIG,
    DATA_STATS,
    DATA_STATS_WITHHELD,
    RoundConfig,
    message_bytes,
    reply_site,
)

log = logging.getLogger("fedscan.server")

#: Share of the others' cases that must agree on an orientation code, and the share of this
#: site's cases below which it is flagged for lacking it.
ORIENTATION_MAJORITY = 0.8
ORIENTATION_MINORITY = 0.2
#: Other sites a site's statistics are compared with at least (the empty-label check, which
#: needs no comparison, runs for every site).
MIN_OTHERS = 2
#: Reasons a site may give for keeping its statistics (anything else is malformed).
WITHHELD_REASONS = {"policy": "its policy keeps them", "few-cases": "too few cases"}


def consensus(histograms: list[np.ndarray]) -> np.ndarray:
    """The others' histogram: their mean, or with three or more their per-bin median
    (renormalised), so one member's invented statistics cannot move it far."""
    stacked = np.stack(histograms)
    if len(stacked) < 3:
        return stacked.mean(axis=0)
    median = np.median(stacked, axis=0)
    return median / max(median.sum(), 1e-12)


def compare_sites(stats: Mapping[str, SiteStats], check: DataCheckConfig,
                  classes: list[str]) -> list[dict[str, Any]]:
    """Flag each site whose statistics are far from the others' (leave-one-out).

    Args:
        stats: site name -> its statistics (at least two sites are needed to compare).
        check: thresholds.
        classes: class names by index, background first.

    Returns:
        Flags ``{"site", "check", "value", "threshold", "reason"}``, in site order.
    """
    flags: list[dict[str, Any]] = []

    def flag(site: str, what: str, value: float, threshold: float, reason: str) -> None:
        flags.append({"site": site, "check": what, "value": round(float(value), 4),
                      "threshold": threshold, "reason": f"{site}: {reason}"})

    for site, mine in stats.items():
        if mine.empty_cases != SUPPRESSED:
            empty = mine.empty_cases / mine.sampled
            if empty > check.max_empty_fraction:
                flag(site, "empty-labels", empty, check.max_empty_fraction,
                     f"{100 * empty:.0f} % of labels empty (> "
                     f"{100 * check.max_empty_fraction:g} %)")
        others = [s for name, s in stats.items() if name != site]
        if len(others) < MIN_OTHERS:
            continue  # one other site is no consensus: it cannot tell which of two is off
        if all(len(s.histograms) == len(mine.histograms) for s in others):
            reference = consensus([s.intensity() for s in others])
            js = js_distance(mine.intensity(), reference)
            if js > check.max_js:
                flag(site, "intensity", js, check.max_js,
                     f"intensity histogram far from the others (JS {js:.2f} > {check.max_js:g})")
        _orientation(site, mine, others, flag)
        same_dims = [s for s in others if len(s.spacing) == len(mine.spacing)]
        if same_dims:
            # Voxel size, not each axis: thick slices along different axes (1 x 1 x 5 mm
            # sagittal here, axial there) are ordinary clinical data; a header in the wrong
            # unit or a far coarser scanner changes the voxel's volume.
            median = float(np.median([voxel_size(s.spacing) for s in same_dims]))
            own = voxel_size(mine.spacing)
            ratio = max(own / median, median / own)
            if ratio > check.max_spacing_ratio:
                flag(site, "spacing", ratio, check.max_spacing_ratio,
                     f"voxel size {own:.3g} mm ({' x '.join(f'{v:g}' for v in mine.spacing)} "
                     f"mm) is {ratio:.1f}x the others' median ({median:.3g} mm)")
        _classes(site, mine, others, check, classes, flag)
    return flags


def voxel_size(spacing: Any) -> float:
    """A voxel's size as one length: the geometric mean of its spacing (mm)."""
    return float(np.exp(np.mean(np.log(np.asarray(spacing, dtype=float)))))


def _orientation(site: str, mine: SiteStats, others: list[SiteStats], flag: Any) -> None:
    counts: dict[str, int] = {}
    for s in others:
        for code, n in s.orientation.items():
            counts[code] = counts.get(code, 0) + n
    total = sum(s.sampled for s in others)
    if not counts or not total:
        return
    code, n = max(counts.items(), key=lambda kv: kv[1])
    share = mine.orientation.get(code, 0) / mine.sampled
    if n / total >= ORIENTATION_MAJORITY and share < ORIENTATION_MINORITY:
        own = max(mine.orientation.items(), key=lambda kv: kv[1], default=("other", 0))[0]
        flag(site, "orientation", share, ORIENTATION_MINORITY,
             f"orientation {own}, the others' cases are {100 * n / total:.0f} % {code} "
             f"(check the affines)")


def _classes(site: str, mine: SiteStats, others: list[SiteStats], check: DataCheckConfig,
             classes: list[str], flag: Any) -> None:
    for c in range(1, len(mine.class_fractions)):
        name = classes[c] if c < len(classes) else f"class_{c}"
        others_have = [s for s in others if s.class_cases[c] != 0]
        if not others_have:
            continue
        if mine.class_cases[c] == 0:
            flag(site, "class-missing", 0, 0, f"class {c} ({name}) missing")
            continue
        reference = float(np.mean([s.class_fractions[c] for s in others_have]))
        fraction = mine.class_fractions[c]
        if reference > 0 and fraction > 0:
            ratio = max(fraction / reference, reference / fraction)
            if ratio > check.max_class_ratio:
                flag(site, "class-fraction", ratio, check.max_class_ratio,
                     f"class {c} ({name}) is {100 * fraction:.2f} % of voxels, the others' "
                     f"{100 * reference:.2f} % ({ratio:.1f}x)")


def _decode(reply: Message, num_classes: int) -> tuple[str, SiteStats | str]:
    """(site, statistics or a withheld reason). Raises ValueError on a malformed reply."""
    if reply.has_error():
        raise ValueError(f"error reply (code {reply.error.code})")
    site = reply_site(reply)
    records = reply.content.config_records
    if DATA_STATS_WITHHELD in records:
        reason = records[DATA_STATS_WITHHELD].get("reason")
        if reason not in WITHHELD_REASONS:
            raise ValueError("unknown reason for withholding statistics")
        return site, WITHHELD_REASONS[reason]
    if DATA_STATS not in records:
        raise ValueError("no statistics in the reply")
    return site, SiteStats.from_record(records[DATA_STATS], num_classes)


def request_stats(grid: Grid, cfg: Config, timeout: float, expected: int = 0,
                  grace: float = 0.0
                  ) -> tuple[dict[str, SiteStats], dict[str, str], list[str],
                             dict[str, dict[str, int]]]:
    """Ask every online node for its statistics.

    Returns:
        (site -> statistics, site -> why it kept them, one line per dropped reply,
        site -> bytes of its query and reply, ``query_down`` / ``query_up``, counted like a
        round's).
    """
    deadline = time.monotonic() + grace
    while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
    record = RoundConfig.for_run(cfg).to_record()
    record[ASK] = DATA_STATS
    nodes = list(grid.get_node_ids())
    messages = [Message(RecordDict({CONFIG: record}), dst_node_id=node,
                        message_type=MessageType.QUERY) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    stats: dict[str, SiteStats] = {}
    withheld: dict[str, str] = {}
    dropped: list[str] = []
    answered: set[int] = set()
    down = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
    sizes: dict[str, dict[str, int]] = {}
    for reply in replies:
        node = asked.get(reply.metadata.reply_to_message_id)
        if node is None or node in answered:
            dropped.append(f"a reply from node {reply.metadata.src_node_id} that answers no "
                           "data-check query of its own")
            continue
        answered.add(node)
        try:
            site, found = _decode(reply, cfg.data.num_classes)
        except ValueError as exc:
            dropped.append(f"{reply_site(reply)}: malformed data-check reply dropped ({exc})")
            continue
        if site in stats or site in withheld:
            dropped.append(f"{site}: answered twice (node {node}); second reply dropped")
            continue
        sizes[site] = {"query_down": down[node], "query_up": message_bytes(reply)}
        if isinstance(found, str):
            withheld[site] = found
        else:
            stats[site] = found
    return stats, withheld, dropped, sizes


def run_data_check(grid: Grid, cfg: Config, timeout: float, expected: int = 0,
                   grace: float = 0.0) -> dict[str, Any]:
    """Query the sites, compare them and print the result (once, before round 1).

    Returns:
        summary.json's ``data_check``: the sites compared, those that kept their
        statistics, dropped replies, the flags, each site's statistics, ``stopped``
        (flags with ``data_check.on_flag: stop``) and ``bytes`` (per site, the query and
        its reply).
    """
    check = cfg.data_check
    stats, withheld, dropped, sizes = request_stats(grid, cfg, timeout, expected, grace)
    for line in dropped:
        log.warning("data check: %s", line)
    flags = compare_sites(stats, check, class_names(cfg.data))
    stopped = bool(flags) and check.on_flag == "stop"
    lines = [f"data check: {len(stats)} site(s) compared, {len(flags)} flag(s)"
             + (f"; {', '.join(f'{s} ({why})' for s, why in withheld.items())} sent no "
                "statistics" if withheld else "")]
    lines += [f"  {f['reason']}" for f in flags]
    if len(stats) <= MIN_OTHERS:
        lines.append(f"  fewer than {MIN_OTHERS + 1} sites sent statistics: only empty labels "
                     "were checked (no consensus to compare a site with)")
    if stopped:
        lines.append("  round 1 not started (data_check.on_flag: stop)")
    print("\n".join(lines), flush=True)
    return {
        "enabled": True, "on_flag": check.on_flag, "compared": sorted(stats),
        "withheld": withheld, "dropped": dropped, "flags": flags, "stopped": stopped,
        "thresholds": dataclasses.asdict(check),
        "sites": {name: _stats_dict(s) for name, s in stats.items()},
        "bytes": sizes,
    }


def _stats_dict(stats: SiteStats) -> dict[str, Any]:
    return dataclasses.asdict(stats)
