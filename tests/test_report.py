"""Tests for the run report: plots, report.md and the federated/local/pooled comparison."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fedscan.shared.report import (
    MISSING,
    format_comparison,
    site_mean,
    write_comparison,
    write_plots,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITES = ["site-a", "site-b", "site-c"]
#: As the segmentation task declares them (summary.json's ``metrics``).
SEGMENTATION_METRICS = [
    {"name": "dice", "higher_is_better": True, "low": 0.0, "high": 1.0, "per_class": True,
     "headline": True, "unit": "", "aggregate": True, "description": "overlap"},
    {"name": "hd95", "higher_is_better": False, "low": 0.0, "high": None, "per_class": True,
     "headline": False, "unit": "mm", "aggregate": True, "description": "boundary distance"},
]


def _is_png(path: Path) -> bool:
    """A real, non-trivial PNG (an empty axes alone is a few kB)."""
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 5_000


def _federated() -> dict[str, Any]:
    """3 sites, 3 rounds; site-c failed in round 2 (no train, no evaluate entry)."""
    rounds = []
    for rnd in (1, 2, 3):
        train, evaluate = {}, {}
        for i, site in enumerate(SITES):
            if rnd == 2 and site == "site-c":
                continue
            train[site] = {"loss": 0.7 - 0.1 * rnd - 0.01 * i, "num_examples": 9 + i,
                           "steps": 25}
            evaluate[site] = {"dice": 0.5 + 0.1 * rnd + 0.01 * i, "hd95": 10.0 - rnd,
                              "num_examples": 3}
        rounds.append({"round": rnd, "train": train, "evaluate": evaluate,
                       "aggregate": {"dice": 0.6 + 0.1 * rnd, "hd95": 10.0 - rnd},
                       "seconds": 20.0 + rnd})
    return {
        "mode": "federated",
        "task": "segmentation",
        "strategy": "fedavg",
        "sites": SITES,
        "test_sets": ["heldout"],
        "metrics": SEGMENTATION_METRICS,
        "rounds": rounds,
        "final": {
            "headline": "dice",
            "dice": 0.8123,
            "hd95": 7.0,
            "per_site": {"site-a": {"dice": 0.8, "hd95": 7.5, "num_examples": 3},
                         "site-b": {"dice": 0.82, "hd95": 6.5, "num_examples": 3},
                         "site-c": {"dice": 0.84, "hd95": None, "num_examples": 3}},
            "test_sets": {"heldout": {"dice": 0.91, "hd95": 4.0, "num_examples": 2,
                                      "cases": {"case_000": {"dice": 0.92, "hd95": 3.9},
                                                "case_001": {"dice": 0.9, "hd95": 4.1}}}},
        },
        "model": "final_model.pt",
        "seconds": 130.2,
        "config": {"rounds": 3},
    }


def _pooled() -> dict[str, Any]:
    rounds = [{"round": r, "train": {"pooled": {"loss": 0.6 / r, "num_examples": 30, "steps": 25}},
               "evaluate": {s: {"dice": 0.7 + 0.05 * r} for s in SITES},
               "aggregate": {"dice": 0.7 + 0.05 * r}, "seconds": 30.0} for r in (1, 2, 3)]
    return {"mode": "pooled", "task": "segmentation", "strategy": None, "sites": SITES,
            "rounds": rounds,
            "final": {"dice": 0.9, "per_site": {"site-a": {"dice": 0.9}, "site-b": {"dice": 0.88},
                                                "site-c": {"dice": 0.92}}},
            "model": "final_model.pt", "seconds": 95.0, "config": {}}


def _local() -> dict[str, Any]:
    rounds = [{"round": r, "train": {s: {"loss": 0.5 / r} for s in SITES},
               "evaluate": {s: {"dice": 0.6 + 0.04 * r} for s in SITES},
               "aggregate": {}, "seconds": 12.0} for r in (1, 2, 3)]
    return {"mode": "local", "task": "segmentation", "sites": SITES, "rounds": rounds,
            "final": {"dice": 0.7, "per_site": {"site-a": {"dice": 0.6}, "site-b": {"dice": 0.7},
                                                "site-c": {"dice": 0.8}}},
            "model": {s: f"models/{s}.pt" for s in SITES}, "seconds": 50.0, "config": {}}


def test_write_plots_creates_valid_pngs(tmp_path: Path) -> None:
    paths = write_plots(tmp_path, _federated())
    assert [p.name for p in paths] == ["dice.png", "hd95.png", "loss.png"]
    assert all(_is_png(p) for p in paths)


@pytest.mark.parametrize("keep", [[], [0], [0, 2]], ids=["empty", "single", "round-2-lost"])
def test_write_plots_empty_single_and_missing_round(tmp_path: Path, keep: list[int]) -> None:
    summary = _federated()
    summary["rounds"] = [summary["rounds"][i] for i in keep]
    for p in write_plots(tmp_path, summary):
        assert _is_png(p)
    assert write_report(tmp_path, summary).is_file()


def test_report_federated(tmp_path: Path) -> None:
    path = write_report(tmp_path, _federated())
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "report.md"
    for name in ("dice.png", "loss.png"):
        assert _is_png(tmp_path / name)
        assert f"]({name})" in text  # embedded with a relative link
    for site in SITES:
        assert site in text
    for dice in ("0.8000", "0.8200", "0.8400", "0.8200"):  # per site and their mean
        assert dice in text
    assert "| **mean over sites** | **0.8200** |" in text
    assert "fedavg" in text and "130.2 s (2 min 10 s)" in text
    assert "heldout" in text and "0.9100" in text and "case_001" in text
    assert "final_model.pt" in text and "summary.json" in text and "checkpoints/" in text


def test_report_missing_site_shows_dash(tmp_path: Path) -> None:
    text = write_report(tmp_path, _federated()).read_text(encoding="utf-8")
    round2 = next(line for line in text.splitlines() if line.startswith("| 2 | 22.0 |"))
    cells = [c.strip() for c in round2.strip("|").split("|")]
    # Round, seconds, 3 losses, 3 Dice, aggregate: site-c is the third of each group.
    assert cells[4] == MISSING and cells[7] == MISSING
    assert cells[2] != MISSING and cells[8] == "0.8000"


def test_report_extra_train_fields(tmp_path: Path) -> None:
    summary = _federated()
    summary["rounds"][0]["train"]["site-a"].update(
        {"epsilon": 1.25, "delta": 1e-5, "status": "ok", "clip": [1, 2]})
    summary["rounds"][2]["train"]["site-b"]["status"] = "budget | exhausted"
    text = write_report(tmp_path, summary).read_text(encoding="utf-8")
    assert "epsilon" in text and "1.2500" in text
    assert "1.00e-05" in text  # tiny delta stays readable instead of 0.0000
    assert "| ok |" in text and "budget \\| exhausted" in text  # pipe escaped in the cell
    assert "clip" not in text  # non-scalar fields are skipped, not dumped


def test_report_pooled(tmp_path: Path) -> None:
    text = write_report(tmp_path, _pooled()).read_text(encoding="utf-8")
    assert "pooled loss" in text
    assert "site-a loss" not in text  # pooled trains one model: no empty per-site columns
    assert "0.9000" in text and "0.8800" in text
    assert _is_png(tmp_path / "loss.png")


def test_report_local_model_dict(tmp_path: Path) -> None:
    text = write_report(tmp_path, _local()).read_text(encoding="utf-8")
    for site in SITES:
        assert f"models/{site}.pt" in text
    assert "0.6000" in text and "0.7000" in text and "0.8000" in text


def test_report_survives_sparse_summary(tmp_path: Path) -> None:
    """A summary written after a crash in round 1: nulls everywhere, no final results."""
    summary = {"mode": "federated", "sites": ["a"], "rounds": [
        {"round": 1, "train": {}, "evaluate": {"a": {"dice": None}}, "aggregate": {},
         "seconds": None}], "final": None, "model": None}
    text = write_report(tmp_path, summary).read_text(encoding="utf-8")
    assert "No final results recorded" in text
    assert _is_png(tmp_path / "dice.png")


def test_report_from_json_roundtrip(tmp_path: Path) -> None:
    """Works on what summary.json holds after a trip through JSON (NaN written as null)."""
    summary = json.loads(json.dumps(_federated()))
    assert write_report(tmp_path, summary).is_file()


def test_comparison_ratios(tmp_path: Path) -> None:
    summaries = {"federated": _federated(), "local": _local(), "pooled": _pooled()}
    ratios = write_comparison(tmp_path, summaries)
    # Mean final Dice over sites: fed (0.8+0.82+0.84)/3 = 0.82, local 0.7, pooled 0.9.
    assert ratios["federated/pooled"] == pytest.approx(0.82 / 0.9)
    assert ratios["local/pooled"] == pytest.approx(0.7 / 0.9)
    text = (tmp_path / "comparison.md").read_text(encoding="utf-8")
    assert f"{0.82 / 0.9:.4f}" in text and f"{0.7 / 0.9:.4f}" in text
    for site in SITES:
        assert site in text
    assert _is_png(tmp_path / "comparison.png")


def test_comparison_without_pooled(tmp_path: Path) -> None:
    ratios = write_comparison(tmp_path, {"federated": _federated(), "local": _local()})
    assert ratios == {}
    assert _is_png(tmp_path / "comparison.png")


def test_comparison_flags_missing_site(tmp_path: Path) -> None:
    local = _local()
    del local["final"]["per_site"]["site-c"]
    ratios = write_comparison(tmp_path, {"local": local, "pooled": _pooled()})
    assert ratios["local/pooled"] == pytest.approx(((0.6 + 0.7) / 2) / 0.9)
    assert "no final dice for site-c" in (tmp_path / "comparison.md").read_text(encoding="utf-8")


def test_format_comparison() -> None:
    text = format_comparison({"pooled": _pooled(), "federated": _federated()})
    lines = text.splitlines()
    assert lines[1].split() == ["mode", *SITES, "mean"]
    assert lines[3].split()[0] == "federated"  # federated listed before pooled
    assert "0.8200" in lines[3] and "0.9000" in lines[4]
    assert f"federated/pooled: {0.82 / 0.9:.4f}" in text


def test_site_mean_falls_back_to_final() -> None:
    summary = copy.deepcopy(_pooled())
    summary["final"] = {"dice": 0.77}
    assert site_mean(summary) == pytest.approx(0.77)


def test_report_lists_bytes_rejections_and_errors(tmp_path):
    from fedscan.shared.report import write_report

    summary = {"mode": "federated", "task": "segmentation", "sites": ["a", "b"],
               "model_fp32_bytes": 1000,
               "rounds": [{"round": 1, "train": {}, "evaluate": {}, "aggregate": {},
                           "bytes": {"a": {"train_down": 1040, "train_up": 1046},
                                     "b": {"train_down": 1030, "train_up": 1020}},
                           "rejected": [{"site": "b", "phase": "train",
                                         "reason": "non-finite values in conv.weight"}],
                           "errors": [{"site": "c", "phase": "train",
                                       "reason": "no reply within 60s"}]}]}
    text = write_report(tmp_path, summary).read_text()
    section = text.split("## Network and faults")[1]
    row = next(line for line in section.splitlines() if line.startswith("| 1 "))
    assert "1.040" in row and "1.046" in row
    assert "non-finite values in conv.weight" in row and "no reply within 60s" in row


def test_report_shows_the_median_beside_the_weighted_mean(tmp_path):
    summary = _federated()
    summary["final"]["median"] = {"dice": 0.8177, "hd95": 7.25}
    for r in summary["rounds"]:
        r["median"] = {"dice": 0.5 + 0.1 * r["round"] + 0.0077}
    text = write_report(tmp_path, summary).read_text(encoding="utf-8")
    assert ("Median over sites (one vote per site, whatever its case count): dice 0.8177; "
            "hd95 7.2500.") in text
    assert "| Median dice |" in text and "0.6077" in text and "0.8077" in text


HARMONISATION_METRICS = [
    {"name": "cycle_psnr", "higher_is_better": True, "low": 0.0, "high": None,
     "per_class": False, "headline": True, "unit": "dB", "aggregate": True,
     "description": "reconstruction PSNR"},
    {"name": "cycle_ssim", "higher_is_better": True, "low": -1.0, "high": 1.0,
     "per_class": False, "headline": False, "unit": "", "aggregate": True, "description": ""},
    {"name": "change", "higher_is_better": False, "low": 0.0, "high": None,
     "per_class": False, "headline": False, "unit": "", "aggregate": True, "description": ""},
]


def _harmonisation() -> dict[str, Any]:
    rounds = []
    for rnd in (1, 2):
        evaluate = {s: {"cycle_psnr": 30.0 + rnd + i, "cycle_ssim": 0.9 + 0.01 * i,
                        "change": 0.05 * rnd, "num_examples": 2} for i, s in enumerate(SITES)}
        rounds.append({"round": rnd, "train": {s: {"loss": 1.0 / rnd} for s in SITES},
                       "evaluate": evaluate,
                       "aggregate": {"cycle_psnr": 31.0 + rnd, "cycle_ssim": 0.91,
                                     "change": 0.05 * rnd}, "seconds": 10.0})
    per_site = rounds[-1]["evaluate"]
    return {"mode": "federated", "task": "harmonisation", "strategy": "fedavg", "sites": SITES,
            "metrics": HARMONISATION_METRICS, "rounds": rounds,
            "final": {"headline": "cycle_psnr", "cycle_psnr": 33.0, "cycle_ssim": 0.91,
                      "change": 0.1, "per_site": per_site, "test_sets": {}},
            "model": "final_model.pt", "seconds": 20.0, "config": {}}


def test_a_task_gets_its_own_metric_plots_and_no_dice(tmp_path: Path) -> None:
    paths = write_plots(tmp_path, _harmonisation())
    assert [p.name for p in paths] == ["cycle_psnr.png", "cycle_ssim.png", "change.png",
                                       "loss.png"]
    assert all(_is_png(p) for p in paths)
    text = write_report(tmp_path, _harmonisation()).read_text(encoding="utf-8")
    assert not (tmp_path / "dice.png").exists() and "dice" not in text.lower()
    assert "| Site | cycle_psnr (dB) | cycle_ssim | change | Validation cases |" in text
    assert "| `site-c` | 34.0000 | 0.9200 | 0.1000 | 2 |" in text
    assert "Final cycle_psnr (dB), mean over sites: **33.0000** (reconstruction PSNR)" in text
    assert "cycle_psnr (dB): reconstruction PSNR (higher is better)." in text
    assert "| Round | Seconds | site-a loss | site-b loss | site-c loss | site-a cycle_psnr" in text
    assert "](cycle_ssim.png)" in text and "`change.png`" in text


def test_per_class_values_sit_next_to_their_metric(tmp_path: Path) -> None:
    summary = _federated()
    for m in summary["final"]["per_site"].values():
        m.update({"dice/csf": 0.5, "dice/brain": 0.7, "hd95/brain": 3.0})
    for r in summary["rounds"]:
        r["aggregate"].update({"dice/brain": 0.7, "dice/csf": 0.5})
    text = write_report(tmp_path, summary).read_text(encoding="utf-8")
    assert ("| Site | dice | dice/brain | dice/csf | hd95 (mm) | hd95/brain (mm) | "
            "Validation cases |") in text
    assert "Aggregate dice | Aggregate dice/brain | Aggregate dice/csf | Aggregate hd95 (mm)" \
        in text
    assert [p.name for p in write_plots(tmp_path, summary)] == ["dice.png", "hd95.png",
                                                                "loss.png"]


def test_comparison_uses_the_headline_metric(tmp_path: Path) -> None:
    pooled = _harmonisation()
    pooled["mode"] = "pooled"
    for m in pooled["final"]["per_site"].values():
        m["cycle_psnr"] = 40.0
    ratios = write_comparison(tmp_path, {"federated": _harmonisation(), "pooled": pooled})
    assert ratios["federated/pooled"] == pytest.approx(33.0 / 40.0)
    text = (tmp_path / "comparison.md").read_text(encoding="utf-8")
    assert "Final validation cycle_psnr per site" in text and "Dice" not in text
