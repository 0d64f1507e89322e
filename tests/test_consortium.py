"""A simulated consortium: long-tailed generated sites (linked, data contract intact), and
dropouts and stragglers cut on the simulated clock, the same for the same seed, recorded in
summary.json and the report. Round loop driven by a scripted grid."""

import json

import pytest
from test_rounds import _task_identity  # noqa: F401 (fixture)
from test_sampling import NAMES, NamedGrid, _dice_in_range  # noqa: F401 (fixture)

from fedscan.server.server_app import run_federation
from fedscan.shared.config import ConsortiumConfig, parse_config
from fedscan.shared.data import read_site
from fedscan.shared.errors import ConfigError
from fedscan.simulations.consortium import (
    ConsortiumStrategy,
    drops_out,
    seconds_per_step,
    site_sizes,
    with_consortium_sites,
)

STEPS = 10


class TimedGrid(NamedGrid):
    """Every site reports ``STEPS`` local steps in its train reply."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if "arrays" in reply.content:
                reply.content["metrics"]["steps"] = STEPS
        return replies


def test_sizes_are_long_tailed_and_seeded():
    c = ConsortiumConfig(sites=100, min_cases=2, max_cases=40, size_alpha=1.0)
    sizes = site_sizes(c, seed=0)
    assert sizes == site_sizes(c, seed=0) and sizes != site_sizes(c, seed=1)
    assert sorted(sizes, reverse=True)[:3] == [40, 20, 13]  # a few large...
    assert sum(s <= 3 for s in sizes) > 50  # ...many small
    assert min(sizes) == 2
    speeds = [seconds_per_step(c, 0, f"s{i}") for i in range(200)]
    assert min(speeds) < 0.6 < 1.6 < max(speeds)  # log-normal spread around 1 s
    c.dropout = 0.25
    rate = sum(drops_out(c, 0, f"s{i}", r) for i in range(100) for r in range(10)) / 1000
    assert 0.2 < rate < 0.3


def test_generated_sites_link_one_pool_and_pass_the_data_contract(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSCAN_CACHE_DIR", str(tmp_path / "cache"))
    data = with_consortium_sites({"rounds": 1, "consortium": {
        "sites": 5, "min_cases": 2, "max_cases": 6, "spacing": 12.0}})
    cfg = parse_config(data)
    assert [s.name for s in cfg.sites] == [f"hospital-{i}" for i in range(5)]
    assert cfg.data.spacing == [12.0] * 3
    sizes = site_sizes(cfg.consortium, 0)
    for site, n in zip(cfg.sites, sizes, strict=True):
        contract = read_site(site, cfg.data, check=True)
        assert len(contract.train) + len(contract.validation) == n
        images = list((tmp_path / "cache").glob(f"consortium-5-*/{site.name}/imagesTr/*"))
        assert images and all(p.is_symlink() and p.resolve().is_file() for p in images)
    again = with_consortium_sites({"rounds": 1, "consortium": {
        "sites": 5, "min_cases": 2, "max_cases": 6, "spacing": 12.0}})
    assert again["sites"] == data["sites"]  # generated once
    with pytest.raises(ConfigError, match="consortium.dropout"):
        parse_config({**data, "consortium": {"dropout": 1.0}})


def config(rounds: int, **consortium):
    return parse_config({
        "sites": [{"name": n, "data": "/x"} for n in NAMES], "rounds": rounds,
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "strategy": {"name": "fedavg"},
        "consortium": {"seconds_per_step": 1.0, "speed_sigma": 0.5, **consortium}})


def run(tmp_path, name, cfg):
    return run_federation(TimedGrid(offset=100), cfg, tmp_path / name,
                          wrap_strategy=lambda s, h: ConsortiumStrategy(s, cfg, h))


def test_dropouts_and_stragglers_are_cut_on_the_simulated_clock(tmp_path):
    cfg = config(3, dropout=0.2, round_timeout=11.0)
    summary = run(tmp_path, "a", cfg)
    c = cfg.consortium
    late = {n for n in NAMES if STEPS * seconds_per_step(c, 0, n) > 11.0}
    assert late and len(late) < len(NAMES)  # this seed has stragglers and on-time sites
    for r in summary["rounds"]:
        entry = r["consortium"]
        dropped = {n for n in NAMES if drops_out(c, 0, n, r["round"])}
        assert set(entry["dropped"]) == dropped
        assert set(entry["cut"]) == late - dropped
        assert set(entry["arrived"]) == set(NAMES) - late - dropped
        assert set(r["train"]) == set(entry["arrived"])  # only replies in time count
        assert entry["wasted_steps"] == STEPS * len(entry["cut"])
        assert entry["sim_seconds"] == 11.0  # someone was late or absent: the full timeout
    assert any(r["consortium"]["dropped"] for r in summary["rounds"])
    again = run(tmp_path, "b", cfg)
    assert [r["consortium"] for r in again["rounds"]] == [r["consortium"]
                                                          for r in summary["rounds"]]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## Participation" in report and "Wasted steps" in report


def test_a_round_that_loses_every_site_keeps_the_model_and_goes_on(tmp_path):
    cfg = config(2, round_timeout=0.01)  # every reply is late
    summary = run(tmp_path, "all-cut", cfg)
    assert [len(r["consortium"]["cut"]) for r in summary["rounds"]] == [10, 10]
    assert all(not r["train"] for r in summary["rounds"])
    json.dumps(summary)  # the facts are plain JSON
