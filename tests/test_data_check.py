"""The federated data check before round 1, ``fedscan client check --data-stats`` and
``fedscan client drift``, on tiny phantom sites (real NIfTI files, the real ClientApp)."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from tinysites import EXTRA_PROFILE, PROFILES, TINY_RUN

from fedscan.client.client_app import make_client_app
from fedscan.server.data_check import compare_sites, run_data_check
from fedscan.shared.config import (
    DataCheckConfig,
    DataConfig,
    PrivacyConfig,
    SiteConfig,
    SitePolicy,
    parse_config,
)
from fedscan.shared.data import read_dataset
from fedscan.shared.data_stats import (
    BINS,
    SUPPRESSED,
    CaseStats,
    SiteStats,
    aggregate,
    case_stats,
    site_stats,
)
from fedscan.shared.messages import site_record
from fedscan.simulations.bad_sites import spoil
from fedscan.simulations.phantoms import render, sample_anatomy, write_dataset

DATA = DataConfig(spacing=[8.0, 8.0, 8.0])
CASES = 5


def write_site(root: Path, profile, seed: int, n: int = CASES, bad: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        image, label, affine = render(sample_anatomy(rng), profile, rng)
        if bad:
            image, label, affine = spoil(bad, image, label, affine, i)
        cases.append((f"{profile.name}_{i:03d}", image, label, affine))
    write_dataset(root / profile.name, cases, [cases[-1][0]], description="tiny")
    return root / profile.name


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quality")
    out = {p.name: write_site(root, p, seed) for seed, p in enumerate(PROFILES)}
    out["site-d"] = write_site(root, EXTRA_PROFILE, 9, bad="inverted")
    return out


def test_aggregates_suppress_every_group_smaller_than_min_cases():
    def case(code: str, bins: dict[int, int], classes: list[int]) -> CaseStats:
        hist = np.zeros(BINS, dtype=np.int64)
        for b, n in bins.items():
            hist[b] = n
        return CaseStats(code, (1.0, 1.0, 1.0), (8, 8, 8), [hist], np.array(classes))

    stats = [case("RAS", {0: 50, 5: 10}, [90, 10, 0]) for _ in range(3)]
    stats.append(case("LPS", {0: 50, 5: 10, 31: 40}, [90, 0, 10]))  # the odd one out
    stats.append(case("RAS", {0: 60}, [100, 0, 0]))  # an empty label
    site = aggregate(stats, total_cases=7, min_cases=3)
    assert site.orientation == {"RAS": 4}  # LPS (1 case) is not shown
    assert site.histograms[0][31] == 0.0 and site.suppressed_bins == 1
    assert math.isclose(sum(site.histograms[0]), 1.0, abs_tol=1e-5)
    assert site.class_cases == [5, 3, SUPPRESSED]  # class 2 in 1 case: "fewer than 3"
    assert site.empty_cases == SUPPRESSED and site.cases == 7 and site.sampled == 5
    with pytest.raises(ValueError, match="fewer than the 3"):
        aggregate(stats[:2], total_cases=2, min_cases=3)


def test_site_statistics_describe_no_bin_fewer_cases_contribute_to(sites):
    cases = read_dataset(sites["site-b"], check=False).cases
    per_case = [case_stats(c, DATA) for c in cases]
    site = site_stats(cases, DATA, min_cases=3)
    contributing = (np.stack([c.histograms[0] for c in per_case]) > 0).sum(axis=0)
    shown = np.asarray(site.histograms[0]) > 0
    assert shown.any() and (contributing[shown] >= 3).all()
    assert site.orientation == {"LPS": CASES} and site.spacing == [7.0, 8.0, 9.0]
    record = site.to_record()
    assert not any(isinstance(v, str) and "site-b_" in v for v in record.values())
    assert SiteStats.from_record(record, 2) == site


@pytest.mark.parametrize("key,value,why", [
    ("histogram", [float("nan")] * BINS, "histogram"),
    ("histogram", [0.1] * 3, "histogram"),
    ("cases", "many", "cases"),
    ("class-fractions", [0.5, 2.0], "class-fractions"),
    ("orientation-codes", ["R A S"], "orientation"),
    ("empty-cases", 999, "empty-cases"),
])
def test_malformed_statistics_are_refused(sites, key, value, why):
    record = site_stats(read_dataset(sites["site-a"], check=False).cases, DATA,
                        min_cases=3).to_record()
    record[key] = value
    with pytest.raises(ValueError, match=why):
        SiteStats.from_record(record, 2)


class AppGrid:
    """Nodes that are real ClientApps for the given sites; ``forged`` nodes reply with the
    given content instead (a dishonest or broken member)."""

    def __init__(self, sites: dict[int, SiteConfig], forged: dict[int, RecordDict]):
        self.apps = {n: make_client_app(lambda ctx, s=s: s, echo=False) for n, s in sites.items()}
        self.forged = forged
        self._n = 0

    def get_node_ids(self):
        return [*self.apps, *self.forged]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self._n += 1
            msg.metadata.__dict__["_message_id"] = f"q{self._n}"
            node = msg.metadata.dst_node_id
            if node in self.forged:
                reply = Message(self.forged[node], reply_to=msg)
            else:
                context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(),
                                  run_config={})
                reply = self.apps[node](msg, context)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def test_data_check_names_the_bad_site_drops_forged_replies_and_respects_dp(
        sites, tmp_path, capsys, monkeypatch):
    # The identity a ServerApp process has (Flower sets it when it starts one).
    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    small = SitePolicy(data_stats_min_cases=3)
    members = {11 + i: SiteConfig(name=name, data=str(sites[name]), policy=small,
                                  state_dir=str(tmp_path / name))
               for i, name in enumerate(["site-a", "site-b", "site-c", "site-d"])}
    members[15] = SiteConfig(name="site-e", data=str(sites["site-a"]), policy=small,
                             state_dir=str(tmp_path / "e"), privacy=PrivacyConfig(epsilon=8.0))
    forged_stats = ConfigRecord({"cases": 3, "histogram": [float("inf")]})
    forged = {16: RecordDict({"site": site_record("site-f"), "data-stats": forged_stats}),
              17: RecordDict({"site": site_record("site-g")})}
    cfg = parse_config({"sites": [{"name": "x", "data": "."}], **_tiny_run()})
    result = run_data_check(AppGrid(members, forged), cfg, timeout=60)
    assert result["compared"] == ["site-a", "site-b", "site-c", "site-d"]
    assert [f["site"] for f in result["flags"]] == ["site-d"], result["flags"]
    assert result["flags"][0]["check"] == "intensity" and result["flags"][0]["value"] > 0.6
    assert result["withheld"] == {"site-e": "its policy keeps them"}
    assert len(result["dropped"]) == 2 and not result["stopped"]
    assert any(d.startswith("site-f: malformed") for d in result["dropped"])
    out = capsys.readouterr().out
    assert "data check: 4 site(s) compared, 1 flag(s)" in out
    assert "site-d: intensity histogram far from the others (JS 0." in out
    assert out.count("site-d: intensity") == 1
    audit = (tmp_path / "site-a" / "audit.log").read_text()
    assert "task-accepted" in audit and '"phase": "query"' in audit


def _tiny_run() -> dict:
    import yaml

    return yaml.safe_load(TINY_RUN)


def test_comparison_flags_empty_labels_missing_class_and_spacing():
    def stats(**kw) -> SiteStats:
        base = dict(cases=10, sampled=10, min_cases=3, orientation={"RAS": 10},
                    spacing=[1.0, 1.0, 1.0], size=[100.0, 100.0, 100.0],
                    histograms=[[1.0 / BINS] * BINS], class_fractions=[0.8, 0.1, 0.1],
                    class_cases=[10, 10, 10], empty_cases=0)
        return SiteStats(**{**base, **kw})

    honest = {f"h{i}": stats() for i in range(3)}
    flags = compare_sites({**honest, "odd": stats(spacing=[3.0, 3.0, 3.0], empty_cases=4,
                                                  class_cases=[10, 6, 0],
                                                  class_fractions=[0.9, 0.1, 0.0],
                                                  orientation={"LPI": 10})},
                          DataCheckConfig(), ["background", "left", "right"])
    reasons = [f["reason"] for f in flags]
    assert reasons == [
        "odd: 40 % of labels empty (> 20 %)",
        "odd: orientation LPI, the others' cases are 100 % RAS (check the affines)",
        "odd: voxel size 3 mm (3 x 3 x 3 mm) is 3.0x the others' median (1 mm)",
        "odd: class 2 (right) missing",
    ], reasons
    assert compare_sites(honest, DataCheckConfig(), ["background", "a", "b"]) == []
    # Thick slices along a different axis at every site (sagittal, coronal, axial): alike.
    thick = {"a": stats(spacing=[5.0, 0.9, 0.9]), "b": stats(spacing=[1.2, 3.0, 1.2]),
             "c": stats(spacing=[1.5, 1.5, 1.5])}
    assert compare_sites(thick, DataCheckConfig(), ["background", "a", "b"]) == []
    # Two sites: no consensus to compare with, so only the empty labels are flagged.
    pair = {"h0": honest["h0"], "odd": stats(spacing=[1.0, 1.0, 3.0], empty_cases=4)}
    assert [f["check"] for f in compare_sites(pair, DataCheckConfig(), ["b", "x", "y"])] == [
        "empty-labels"]


def test_client_check_data_stats_prints_what_would_be_sent(sites, tmp_path, capsys):
    from fedscan.cli import main

    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"name: site-a\ndata: {sites['site-a']}\nserver: 127.0.0.1:1\n"
                   "policy: {data_stats_min_cases: 3}\n")
    assert main(["client", "check", "--config", str(cfg), "--data-stats"]) == 0
    out = capsys.readouterr().out
    assert "site-a: 5 cases" in out and "orientation   RAS 5" in out
    sent = json.loads(out.split("allows it):\n")[1].splitlines()[0])
    assert sent["cases"] == CASES and len(sent["histogram"]) == BINS
    cfg.write_text(f"name: site-a\ndata: {sites['site-a']}\nserver: 127.0.0.1:1\n"
                   "privacy: {epsilon: 4.0}\npolicy: {data_stats_min_cases: 3}\n")
    assert main(["client", "check", "--config", str(cfg), "--data-stats"]) == 0
    assert "not sent: this site's policy keeps" in capsys.readouterr().out


def test_drift_exit_codes(sites, tmp_path, capsys):
    from fedscan.cli import main
    from fedscan.shared.checkpoint import save_model
    from fedscan.shared.tasks import build_task

    cfg = parse_config({"sites": [{"name": "site-a", "data": str(sites["site-a"])}],
                        **_tiny_run()})
    model = build_task(cfg).build_model()
    path = save_model(tmp_path / "model.pt", config=cfg, state_dict=model.state_dict())
    site = tmp_path / "site.yaml"
    site.write_text(f"name: site-a\ndata: {sites['site-a']}\nserver: 127.0.0.1:1\n")
    own = write_site(tmp_path / "own", PROFILES[0], 21, n=4)
    inverted = write_site(tmp_path / "inv", PROFILES[0], 22, n=4, bad="inverted")
    base = ["client", "drift", "--config", str(site), "--model", str(path)]
    report = tmp_path / "drift.json"
    assert main([*base, "--data", str(own), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "no drift" in out and "Dice:" in out
    assert json.loads(report.read_text())["drifted"] is False
    assert main([*base, "--data", str(inverted), "--no-model-check"]) == 1
    out = capsys.readouterr().out
    assert "DRIFT: 4 of 4 scans have intensities unlike this site's" in out
    # Without labels (a folder of images): predict's uncertainty instead of Dice.
    images = own / "imagesTr"
    assert main([*base, "--data", str(images), "--json", str(report)]) in (0, 1)
    assert "uncertainty: " in capsys.readouterr().out
    result = json.loads(report.read_text())
    assert result["scans"] == 4 and result["dice_new"] is None
    assert 0.0 <= result["uncertainty_new"] <= 1.0
    assert main([*base, "--data", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_report_and_status_page_show_the_flags(tmp_path):
    from fedscan.shared.report import write_report
    from fedscan.shared.status.view import build_view

    flag = {"site": "site-d", "check": "intensity", "value": 0.74, "threshold": 0.6,
            "reason": "site-d: intensity histogram far from the others (JS 0.74 > 0.6)"}
    stats = SiteStats(cases=40, sampled=24, min_cases=5, orientation={"RAS": 24},
                      spacing=[4.0, 4.0, 4.0], size=[48.0, 56.0, 52.0],
                      histograms=[[1.0 / BINS] * BINS], class_fractions=[0.85, 0.15],
                      class_cases=[24, 24], empty_cases=SUPPRESSED)
    summary = {"mode": "federated", "sites": ["site-d"], "rounds": [], "final": {},
               "data_check": {"on_flag": "stop", "compared": ["site-d"], "flags": [flag],
                              "withheld": {"site-e": "its policy keeps them"},
                              "stopped": True,
                              "sites": {"site-d": dataclasses.asdict(stats)}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = write_report(tmp_path, summary).read_text()
    assert "## Data check before round 1" in report
    assert f"- **{flag['reason']}**" in report and "Round 1 was not started" in report
    assert "`site-e` sent no statistics (its policy keeps them)" in report
    assert "| site-d | 40 | 24 | RAS 24 | 4 x 4 x 4 | 15.00 % | <5 |" in report
    assert "JS 0.74" in (tmp_path / "report.html").read_text()
    faults = build_view(tmp_path)["faults"]
    assert faults == [{"round": "before 1", "kind": "flagged", "site": "site-d",
                       "phase": "data check", "reason": flag["reason"]}]
