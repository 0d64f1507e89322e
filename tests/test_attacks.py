"""One dishonest hospital among four, through Flower's simulation runtime: every attack of
``fedscan bench attacks`` (tiny sites, default strategy settings) is rejected and listed in
summary.json, and the global model only ever holds the honest sites' updates."""

import json

import pytest
import torch
from tinysites import EXTRA_PROFILE, PROFILES, TINY_RUN, make_sites

from fedscan.shared.checkpoint import load_model
from fedscan.shared.config import load_config
from fedscan.simulations.attacks import adversary
from fedscan.simulations.federated import run_federated

pytestmark = pytest.mark.slow

#: Round -> the attack on site-d's train reply; the final evaluation reports Dice 1e9.
TRAIN_ATTACKS = {1: "claims-1e9-examples", 2: "nan-samples", 3: "flip-5x"}


def test_each_attack_is_rejected_and_recorded(tmp_path):
    names = [p.name for p in (*PROFILES, EXTRA_PROFILE)]
    make_sites(tmp_path / "data", profiles=(*PROFILES, EXTRA_PROFILE))
    (tmp_path / "run.yaml").write_text(
        "sites:\n" + "".join(f"  - {{name: {s}, data: data/{s}}}\n" for s in names)
        + "rounds: 3\n" + TINY_RUN)
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.strategy.clip_norm == "median" and cfg.strategy.max_norm_ratio == 3.0

    def schedule(rnd: int, train: bool) -> str:
        return TRAIN_ATTACKS[rnd] if train else "dice-1e9"

    out = tmp_path / "run"
    summary = run_federated(cfg, out, client_mods=[adversary(schedule, names.index("site-d"))])
    rounds = {r["round"]: r for r in summary["rounds"]}
    assert sorted(rounds) == [1, 2, 3]
    reasons = {rnd: [e["reason"] for e in r.get("rejected", []) if e["site"] == "site-d"]
               for rnd, r in rounds.items()}
    assert any("'num-examples' = 1e+09 is absurd" in x for x in reasons[1]), reasons
    assert any("'samples' must be a finite whole number, got nan" in x for x in reasons[2])
    assert any("update norm" in x and "3x the median" in x for x in reasons[3]), reasons
    assert any("metric 'dice' = 1000000000.0 outside its range" in x for x in reasons[3])
    # Nothing of site-d's entered training or the reported metrics.
    for rnd, r in rounds.items():
        assert set(r["train"]) == set(names) - {"site-d"}, rnd
        assert all(0.0 <= m["dice"] <= 1.0 for m in r["evaluate"].values())
    assert "site-d" not in summary["final"]["per_site"]
    assert set(summary["final"]["median"]) >= {"dice"}
    _, state, _ = load_model(out / "final_model.pt")
    assert all(torch.isfinite(v).all() for v in state.values())
    print(json.dumps(reasons, indent=1))
