"""Differential privacy at the sites: the ε ledger, the ClientApp's DP-SGD rounds, budgets,
restarts, and what the server records."""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedscan.client.client_app import make_client_app
from fedscan.client.privacy import (
    LEDGER_FILE,
    LEDGER_KEY,
    PrivacyLedger,
    load_ledger,
    save_ledger,
)
from fedscan.server.strategies import RecordingStrategy, build_strategy
from fedscan.shared.config import PrivacyConfig, SiteConfig, parse_config
from fedscan.shared.errors import ConfigError, FedscanError
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import RoundConfig, site_record, to_arrays
from fedscan.shared.tasks import build_task
from fedscan.simulations.phantoms import ScannerProfile, render, sample_anatomy, write_dataset
from tests.tinysites import train_message

LOCAL_STEPS = 4


def replay(record: dict) -> float:
    """ε from a fresh Opacus accountant fed only what the site reported."""
    accountant = create_accountant(mechanism=record["accountant"])
    accountant.history = [(record["noise_multiplier"], record["sample_rate"], record["steps"])]
    return accountant.get_epsilon(delta=record["delta"])


# -- the ledger ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, steps, expected", [
    ("rdp", 2250, 7.32911117143),       # opacus/tests/accountants_test.py
    ("prv", 2249, 6.777395712150674),   # same file; Opacus checks both to 7 places
])
def test_known_accountant_vectors(kind, steps, expected):
    ledger = PrivacyLedger(PrivacyConfig(epsilon=100.0, accountant=kind, noise_multiplier=1.5))
    ledger.setup(sample_rate=0.04, planned_steps=steps)
    assert ledger.epsilon() == 0.0
    assert ledger.epsilon_after(steps) == pytest.approx(expected, abs=1e-7)
    # The same steps recorded one by one, as Opacus' optimizer hook does, give the same ε.
    for _ in range(steps):
        ledger.accountant.step(noise_multiplier=1.5, sample_rate=0.04)
    assert ledger.history == [(1.5, 0.04, steps)]
    assert ledger.epsilon() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_ledger_json_round_trip_and_monotone(kind):
    privacy = PrivacyConfig(epsilon=50.0, accountant=kind, noise_multiplier=1.1)
    ledger = PrivacyLedger(privacy)
    ledger.setup(sample_rate=0.2, planned_steps=100)
    values = [ledger.epsilon_after(k) for k in (1, 5, 20, 50, 100)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    ledger.accountant.history = [(1.1, 0.2, 20)]
    restored = PrivacyLedger.from_json(ledger.to_json(), privacy)
    assert restored.steps == 20 and restored.history == ledger.history
    assert restored.noise_multiplier == 1.1 and restored.sample_rate == 0.2
    assert restored.epsilon() == ledger.epsilon() == values[2]
    # The history is mechanism-agnostic: another accountant kind replays it.
    other = PrivacyConfig(epsilon=50.0, accountant="prv" if kind == "rdp" else "rdp")
    assert PrivacyLedger.from_json(ledger.to_json(), other).steps == 20


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_steps_that_fit_respect_the_budget_exactly(kind):
    ledger = PrivacyLedger(PrivacyConfig(epsilon=6.0, accountant=kind, noise_multiplier=1.0))
    ledger.setup(sample_rate=0.2, planned_steps=10)
    ledger.accountant.history = [(1.0, 0.2, 5)]  # already spent some
    k = ledger.steps_that_fit(1000)
    assert 0 < k < 1000
    assert ledger.epsilon_after(k) <= 6.0 < ledger.epsilon_after(k + 1)
    assert ledger.steps_that_fit(k) == k and ledger.steps_that_fit(k - 1) == k - 1
    ledger.accountant.history = [(1.0, 0.2, 5 + k)]
    assert ledger.steps_that_fit(1) == 0


def test_calibration_spends_the_budget_over_the_planned_run():
    ledger = PrivacyLedger(PrivacyConfig(epsilon=8.0))
    sigma = ledger.setup(sample_rate=0.2, planned_steps=250)
    assert sigma == get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.2,
                                         steps=250, accountant="rdp")
    assert 7.9 < ledger.epsilon_after(250) <= 8.0
    assert ledger.steps_that_fit(250) == 250
    # σ is fixed at first use: a later, longer plan does not lower it.
    assert ledger.setup(sample_rate=0.2, planned_steps=25) == sigma


def test_load_keeps_the_copy_with_more_steps(tmp_path: Path):
    privacy = PrivacyConfig(epsilon=50.0, noise_multiplier=1.0)
    ledger = PrivacyLedger(privacy, history=[(1.0, 0.2, 20)], noise_multiplier=1.0,
                           sample_rate=0.2)
    state = RecordDict()
    save_ledger(ledger, state, tmp_path)
    assert (tmp_path / LEDGER_FILE).is_file()
    stale = PrivacyLedger(privacy, history=[(1.0, 0.2, 10)], noise_multiplier=1.0,
                          sample_rate=0.2)
    save_ledger(stale, RecordDict(), tmp_path / "other")
    # The context holds 20 steps, the file 10 (a stale copy): ε must not go down.
    state2 = RecordDict({LEDGER_KEY: ConfigRecord({"json": ledger.to_json()})})
    assert load_ledger(privacy, state2, tmp_path / "other").steps == 20
    assert load_ledger(privacy, RecordDict(), tmp_path).steps == 20  # a restart: file only
    assert load_ledger(privacy, RecordDict(), None).steps == 0  # a brand-new site
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(FedscanError, match="corrupt"):
        load_ledger(privacy, RecordDict(), tmp_path)


# -- config -------------------------------------------------------------------------------------


def test_privacy_config_resolution_and_errors():
    cfg = parse_config({
        "sites": [{"name": "a", "data": "/a", "privacy": {"epsilon": 3}},
                  {"name": "b", "data": "/b", "privacy": {"epsilon": float("inf")}},
                  {"name": "c", "data": "/c"}],
        "privacy": {"epsilon": 8.0, "accountant": "prv"},
    })
    a, b, c = (cfg.site_privacy(s) for s in cfg.sites)
    assert a.epsilon == 3.0 and a.accountant == "rdp"  # the site's own block wins whole
    assert b is None  # epsilon .inf: no DP
    assert c.epsilon == 8.0 and c.accountant == "prv"
    assert parse_config({"sites": [{"name": "a", "data": "/a"}]}).site_privacy(cfg.sites[2]) \
        is None
    for block, key in [({"epsilon": 0}, "sites[0].privacy.epsilon"),
                       ({"epsilon": 1, "delta": 1.0}, "sites[0].privacy.delta"),
                       ({"epsilon": 1, "max_grad_norm": 0}, "sites[0].privacy.max_grad_norm"),
                       ({"epsilon": 1, "accountant": "gdp"}, "sites[0].privacy.accountant"),
                       ({"epsilon": 1, "noise_multiplier": -1}, "sites[0].privacy.noise_mult"),
                       ({"delta": 1e-5}, "sites[0].privacy.epsilon")]:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            parse_config({"sites": [{"name": "a", "data": "/a", "privacy": block}]})


def test_server_never_carries_privacy():
    cfg = parse_config({"sites": [{"name": "a", "data": "/a", "privacy": {"epsilon": 1}}],
                        "privacy": {"epsilon": 2.0}})
    sent = RoundConfig.for_run(cfg)
    data = json.loads(sent.task_config)
    assert not {"privacy", "sites", "test_sets"} & set(data)
    site = SiteConfig("a", "/a", privacy=PrivacyConfig(epsilon=1.0))
    on_site = RoundConfig.from_record(sent.to_record()).site_config(site)
    assert on_site.privacy is None and on_site.sites[0].privacy.epsilon == 1.0
    # A server that sends a privacy block anyway can neither set nor loosen the site's own:
    # the site refuses the message.
    forged = dataclasses.replace(sent, task_config=json.dumps(
        {**data, "privacy": {"epsilon": 1000.0}}))
    with pytest.raises(FedscanError, match="'privacy', which only the site sets"):
        forged.site_config(site)


# -- the ClientApp ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("dp")
    profile = ScannerProfile("site-a", "RAS", (8.0, 8.0, 8.0), noise_std=0.02)
    rng = np.random.default_rng(0)
    cases = []
    for i in range(5):
        image, label, affine = render(sample_anatomy(rng), profile, rng)
        cases.append((f"a{i}", image, label, affine))
    write_dataset(root / "site-a", cases, ["a3", "a4"], description="tiny DP site")
    cfg = parse_config({
        "sites": [{"name": "site-a", "data": str(root / "site-a")}], "rounds": 2,
        "data": {"spacing": [8, 8, 8]},
        "model": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
        "train": {"patch_size": [16, 16, 16], "batch_size": 2, "local_steps": LOCAL_STEPS},
    })
    return root, cfg


def _context() -> Context:
    return Context(run_id=1, node_id=42, node_config={"partition-id": 0}, state=RecordDict(),
                   run_config={})


def _rounds(app, cfg, context: Context, rounds: list[int]) -> list[tuple[dict, dict, dict]]:
    arrays = to_arrays(build_task(cfg).build_model().state_dict())
    out = []
    for rnd in rounds:
        reply = app(train_message(cfg, arrays, rnd), context)
        assert not reply.has_error(), reply.error
        privacy = dict(reply.content["privacy"])
        metrics = dict(reply.content["metrics"])
        weights = reply.content["arrays"].to_torch_state_dict()
        out.append((privacy, metrics, weights))
        arrays = reply.content["arrays"]
    return out


def test_client_rounds_accumulate_epsilon_and_survive_a_restart(tiny):
    root, cfg = tiny
    site = SiteConfig("site-a", str(root / "site-a"), state_dir=str(root / "state-restart"),
                      privacy=PrivacyConfig(epsilon=50.0, noise_multiplier=1.0))
    app = make_client_app(lambda ctx: site)
    (p1, m1, w1), (p2, m2, w2) = _rounds(app, cfg, _context(), [1, 2])
    model_keys = set(build_task(cfg).build_model().state_dict())
    for p, m, w in [(p1, m1, w1), (p2, m2, w2)]:
        assert p["status"] == "trained" and p["accountant"] == "rdp"
        assert p["steps_this_round"] == LOCAL_STEPS == m["steps"]
        assert m["num-examples"] == 3 and math.isnan(m["loss"])  # loss never leaves a DP site
        assert set(w) == model_keys and not any(k.startswith("_module.") for k in w)
        assert p["epsilon"] == pytest.approx(replay(p), rel=0.01)
    assert p1["sample_rate"] == 0.5  # 3 training cases, batch 2: Opacus' q = 1 / ceil(3/2)
    assert p1["steps"] == LOCAL_STEPS and p2["steps"] == 2 * LOCAL_STEPS
    assert 0 < p1["epsilon"] < p2["epsilon"]
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # it trained
    # A new process (new Context, empty state) with the same state folder continues the ledger.
    ((p3, _, _),) = _rounds(app, cfg, _context(), [3])
    assert p3["steps"] == 3 * LOCAL_STEPS and p3["epsilon"] > p2["epsilon"]
    assert p3["epsilon"] == pytest.approx(replay(p3), rel=0.01)


def test_tiny_budget_limits_then_declines(tiny):
    root, cfg = tiny
    # σ=7 at q=0.5: 2 steps cost ε≈0.42, a 3rd would make it 0.515 > 0.5.
    site = SiteConfig("site-a", str(root / "site-a"), state_dir=str(root / "state-tiny"),
                      privacy=PrivacyConfig(epsilon=0.5, noise_multiplier=7.0))
    app = make_client_app(lambda ctx: site)
    context = _context()
    (p1, m1, _), (p2, m2, w2) = _rounds(app, cfg, context, [1, 2])
    assert p1["status"] == "budget-limited" and 0 < p1["steps_this_round"] < LOCAL_STEPS
    assert p2["status"] == "declined" and p2["steps_this_round"] == 0
    assert m2["num-examples"] == 0 and m2["steps"] == 0
    assert p1["steps"] == p2["steps"] == m1["steps"] == 2
    assert p1["epsilon"] == p2["epsilon"] <= 0.5
    assert p1["epsilon"] == pytest.approx(replay(p1), rel=0.01)
    assert set(w2) == set(build_task(cfg).build_model().state_dict())


# -- the server ---------------------------------------------------------------------------------


def _reply(site: str, node: int, value: float, n: int, privacy: dict | None) -> Message:
    md = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                  reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=3600,
                  message_type=MessageType.TRAIN)
    content = RecordDict({"metrics": MetricRecord({"loss": value, "steps": 4,
                                                   "num-examples": n}),
                          "site": site_record(site),
                          "arrays": ArrayRecord({"w": torch.full((3,), value)})})
    if privacy is not None:
        content["privacy"] = ConfigRecord(privacy)
    return Message(content=content, metadata=md)


@pytest.mark.parametrize("name", ["fedavg", "fedmedian"])
def test_declined_sites_are_recorded_but_not_aggregated(tmp_path, name):
    cfg = parse_config({"sites": [{"name": s, "data": "/x"} for s in ("a", "b", "c")],
                        "strategy": {"name": name}})
    history = RunHistory(tmp_path, cfg, "federated")
    strategy = RecordingStrategy(build_strategy(cfg.strategy, 3), history)
    declined = {"status": "declined", "epsilon": 0.49, "steps": 2, "steps_this_round": 0,
                "accountant": "rdp", "delta": 1e-5, "noise_multiplier": 7.0, "sample_rate": 0.5}
    trained = {**declined, "status": "trained", "steps": 8, "steps_this_round": 4}
    replies = [_reply("a", 1, 0.0, 0, declined), _reply("b", 2, 2.0, 1, trained),
               _reply("c", 3, 4.0, 3, {"status": "off"})]
    arrays, _ = strategy.aggregate_train(1, replies)
    # FedMedian over b and c only: the declined site's unchanged model is no vote.
    expected = (2.0 + 12.0) / 4 if name == "fedavg" else 3.0
    assert np.allclose(arrays.to_torch_state_dict()["w"].numpy(), expected)
    entry = history.finish_round(1, None)
    assert entry["train"]["a"]["status"] == "declined" and entry["train"]["a"]["steps"] == 2
    assert entry["train"]["b"]["epsilon"] == 0.49 and entry["train"]["b"]["steps"] == 8
    assert entry["train"]["c"]["status"] == "off" and entry["train"]["c"]["steps"] == 4
    # Nobody trained: the global model stays.
    assert strategy.aggregate_train(2, [_reply("a", 1, 0.0, 0, declined)]) == (None, None)


def test_declined_site_counts_towards_the_quorum(tmp_path):
    from fedscan.server.validation import UpdateValidator

    cfg = parse_config({"sites": [{"name": s, "data": "/x"} for s in ("a", "b", "c")]})
    history = RunHistory(tmp_path, cfg, "federated")
    validator = UpdateValidator({"w": torch.zeros(3)}, min_valid=3)
    strategy = RecordingStrategy(build_strategy(cfg.strategy, 3), history, validator=validator)
    declined = {"status": "declined", "epsilon": 0.5, "steps": 2}
    replies = [_reply("a", 1, 0.0, 0, declined), _reply("b", 2, 1.0, 1, None),
               _reply("c", 3, 1.0, 1, None)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and np.allclose(arrays.to_torch_state_dict()["w"].numpy(), 1.0)
    assert validator.min_valid == 3


def test_first_poisson_batch_may_be_empty(tiny, monkeypatch):
    from opacus.data_loader import DPDataLoader

    from fedscan.client import privacy
    from fedscan.shared.data import read_dataset

    root, cfg = tiny
    task = build_task(cfg)
    cases = read_dataset(root / "site-a", name="site-a", check=False).train
    loader = task.make_train_loader(cases, seed=0)
    q = 1.0 / len(loader)
    # A Poisson generator whose first draw over the 3 cases is empty (q = 0.5). The real one
    # is secret; this test pins it with a simulation's replay seed.
    def first_draw(seed: int) -> int:
        dp_loader = DPDataLoader.from_data_loader(
            loader, generator=torch.Generator().manual_seed(seed))
        dp_loader.collate_fn([dp_loader.dataset[0]])  # as dp_train_steps primes it
        return privacy.batch_size(next(iter(dp_loader)))

    seed = next(s for s in range(1000) if first_draw(s) == 0)
    ledger = PrivacyLedger(PrivacyConfig(epsilon=10.0, noise_multiplier=1.0))
    ledger.setup(q, planned_steps=4)
    model = task.build_model()
    start = [p.detach().clone() for p in model.parameters()]
    # Opacus 1.6 fails on an empty first draw with dict samples unless primed (it is).
    result = privacy.dp_train_steps(task, model, task.phases(model), loader, ledger, 1,
                                    replay_seed=seed)
    assert result.steps == 1 and math.isnan(result.loss)  # the only batch was empty
    assert ledger.history == [(1.0, q, 1)]  # ... and still one accountant step
    assert any(not torch.equal(a, p) for a, p in zip(start, model.parameters(), strict=True))
