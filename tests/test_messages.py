"""The message schema between server and sites: one versioned record, decoded once at the
site, with the keys Flower's strategies add (the round, FedProx's μ), and what a hospital
refuses (another schema version, a privacy block, a task it would have to import)."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedscan.client.client_app import make_client_app
from fedscan.server.strategies import build_strategy
from fedscan.shared.config import SiteConfig, StrategyConfig, parse_config
from fedscan.shared.errors import ConfigError, FedscanError
from fedscan.shared.messages import SCHEMA, SCHEMA_VERSION, RoundConfig, to_arrays
from fedscan.shared.tasks import build_task
from tests.tinysites import client_context, make_sites, train_message


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folders = make_sites(tmp_path_factory.mktemp("msg"))
    cfg = parse_config({
        "sites": [{"name": "site-a", "data": str(folders["site-a"])}], "rounds": 1,
        "data": {"spacing": [8, 8, 8]},
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "train": {"patch_size": [16, 16, 16], "batch_size": 2, "local_steps": 12, "lr": 0.02},
        "evaluate": {"hd95": False}})
    return cfg, SiteConfig("site-a", str(folders["site-a"]))


def test_round_config_round_trips_through_a_record():
    cfg = parse_config({"sites": [{"name": "a", "data": "/a"}], "rounds": 7})
    sent = dataclasses.replace(RoundConfig.for_run(cfg), server_round=3, proximal_mu=0.5,
                               evaluate_received=True)
    record = sent.to_record()
    assert record[SCHEMA] == SCHEMA_VERSION and record["server-round"] == 3
    assert RoundConfig.from_record(record) == sent
    on_site = sent.site_config(SiteConfig("b", "/b"))
    assert on_site.rounds == 7 and [s.name for s in on_site.sites] == ["b"]


@pytest.mark.parametrize("change, match", [
    ({SCHEMA: SCHEMA_VERSION + 1}, f"message schema {SCHEMA_VERSION + 1}; this site's "
                                   f"fedscan reads schema {SCHEMA_VERSION}"),
    ({SCHEMA: None}, "message schema None"),
    ({"server-round": "3"}, "'server-round' has type str"),
    ({"evaluate-received": 1}, "'evaluate-received' has type int"),
])
def test_a_site_refuses_another_schema_or_a_malformed_record(change, match):
    cfg = parse_config({"sites": [{"name": "a", "data": "/a"}]})
    record = RoundConfig.for_run(cfg).to_record()
    for key, value in change.items():
        if value is None:
            del record[key]
        else:
            record[key] = value
    with pytest.raises(FedscanError, match=match) as info:
        RoundConfig.from_record(record)
    assert "\n" not in str(info.value)


def test_the_client_app_refuses_a_message_of_another_schema_version(site):
    cfg, site_cfg = site
    msg = train_message(cfg, to_arrays(build_task(cfg).build_model().state_dict()), 1,
                        schema_version=SCHEMA_VERSION + 1)
    reply = make_client_app(lambda ctx: site_cfg)(msg, client_context())
    assert reply.has_error() and reply.error.reason == "schema-mismatch"


class _OneNode:
    """The grid Flower's strategies sample from: a single hospital, node 42."""

    def get_node_ids(self):
        return [42]


def _update_distance(cfg, site_cfg, mu: float, monkeypatch) -> float:
    """How far the site's update moves from the global model, trained from a message that
    Flower's FedProx (``mu`` > 0) or FedAvg configured."""
    for attr in ("_run_id", "_node_id", "_task_id"):  # strategies build runtime messages
        monkeypatch.setattr(TaskIdentity, attr, 1)
    name = "fedprox" if mu else "fedavg"
    strategy = build_strategy(StrategyConfig(name=name, proximal_mu=mu), 1)
    state = build_task(cfg).build_model().state_dict()
    (msg,) = strategy.configure_train(1, to_arrays(state), RoundConfig.for_run(cfg).to_record(),
                                      _OneNode())
    assert RoundConfig.from_record(msg.content["config"]).proximal_mu == mu
    # As it arrives at the site: the strategy's message, addressed to node 42.
    arrived = Message(content=RecordDict(dict(msg.content.items())), dst_node_id=42,
                      message_type=MessageType.TRAIN)
    reply = make_client_app(lambda ctx: site_cfg)(arrived, client_context())
    update = reply.content["arrays"].to_torch_state_dict()
    return sum(float((update[k] - v).float().norm() ** 2) for k, v in state.items()) ** 0.5


def test_fedprox_mu_reaches_the_sites_update(site, monkeypatch):
    cfg, site_cfg = site
    free = _update_distance(cfg, site_cfg, 0.0, monkeypatch)
    held = _update_distance(cfg, site_cfg, 100.0, monkeypatch)
    assert free > 0 and held < 0.5 * free, (held, free)


def test_a_hospital_never_imports_a_task_module_the_server_names(site, tmp_path, monkeypatch,
                                                                 capsys):
    cfg, site_cfg = site
    marker = tmp_path / "imported"
    (tmp_path / "server_chosen_task.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Task:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sent = dataclasses.replace(cfg, task="server_chosen_task:Task")
    msg = train_message(sent, to_arrays(build_task(cfg).build_model().state_dict()), 1)
    reply = make_client_app(lambda ctx: site_cfg)(msg, client_context())
    assert reply.has_error() and reply.error.reason == "config-error"
    # The site's own console (never the server) says why.
    assert "this process runs built-in tasks only" in capsys.readouterr().err
    assert not marker.exists()


def test_a_task_name_is_checked_against_the_registry():
    with pytest.raises(ConfigError, match="config key 'task': 'segmentaton' is not a task: "
                                          "use one of segmentation, harmonisation"):
        parse_config({"sites": [{"name": "a", "data": "/a"}], "task": "segmentaton"})
    cfg = parse_config({"sites": [{"name": "a", "data": "/a"}], "task": "no_such.module:Task"})
    with pytest.raises(ConfigError, match="cannot import 'no_such.module:Task'"):
        build_task(cfg, allow_import=True)
    assert type(build_task(parse_config({"sites": [{"name": "a", "data": "/a"}]}))).__name__ \
        == "SegmentationTask"


@pytest.mark.parametrize("strategy", [{"min_sites": 3}, {"name": "bulyan", "num_malicious": 1},
                                      {"name": "multikrum", "num_selected": 5},
                                      {"fraction_train": 0.3}])
def test_a_site_parses_the_task_config_of_any_valid_strategy(strategy):
    """The strategy is the server's: it is not sent, so checks that count the federation's
    sites (a site sees itself as the only one) never fail at a hospital."""
    import json

    cfg = parse_config({"sites": [{"name": f"s{i}", "data": "/x"} for i in range(7)],
                        "strategy": strategy})
    sent = RoundConfig.for_run(cfg)
    assert "strategy" not in json.loads(sent.task_config)
    site_cfg = sent.site_config(SiteConfig(name="s0", data="/x"))
    assert [s.name for s in site_cfg.sites] == ["s0"]
