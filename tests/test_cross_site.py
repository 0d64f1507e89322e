"""Cross-site evaluation through the real ClientApp (each tiny site's own handlers, in this
process) and the server's stage: matrix shape, policy refusal, dishonest replies dropped.

The end-to-end run on Flower's simulation runtime is in test_simulation_e2e.py.
"""

import dataclasses
import math

import pytest
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedscan.client.client_app import make_client_app
from fedscan.server.cross_site import run_cross_site
from fedscan.server.validation import UpdateValidator
from fedscan.shared.config import SitePolicy
from fedscan.shared.cross_site import GLOBAL, format_matrix, plot_heatmaps
from fedscan.shared.messages import CROSS_SITE_EVALUATE, CROSS_SITE_TRAIN, MODEL_PREFIX
from fedscan.shared.tasks import build_task
from tests.tinysites import TINY_RUN, make_sites, parse_with

NODES = {11: "site-a", 12: "site-b", 13: "site-c"}


class ClientAppGrid:
    """A Grid that hands every message to the real ClientApp of the site it is addressed to
    (one Context per node, as a SuperNode keeps it); ``tamper`` rewrites a node's replies
    (a dishonest member)."""

    def __init__(self, cfg, tamper=None):
        self.sites = {node: cfg.sites[i] for i, node in enumerate(NODES)}
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={},
                                       state=RecordDict(), run_config={}) for node in NODES}
        self.app = make_client_app(lambda ctx: self.sites[ctx.node_id], echo=False)
        self.tamper = tamper or {}
        self.received: list[Message] = []  # every reply the server got
        self._n = 0

    def get_node_ids(self):
        return list(NODES)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self._n += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._n}"
            node = msg.metadata.dst_node_id
            reply = self.app(msg, self.contexts[node])
            if node in self.tamper:
                reply = self.tamper[node](msg, reply)
            self.received.append(reply)
            replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Messages built outside a runtime need a run id.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    import yaml

    root = tmp_path_factory.mktemp("cross")
    folders = make_sites(root / "data", n_cases=3)
    base = yaml.safe_load(TINY_RUN)
    base["model"] = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}
    sites = [{"name": n, "data": str(p), "state_dir": str(root / "state" / n)}
             for n, p in folders.items()]
    return parse_with(base, {"sites": sites, "rounds": 1,
                             "cross_site": {"enabled": True, "fine_tune_steps": 2}})


def stage(cfg, grid):
    task = build_task(cfg)
    model = task.build_model()
    state = {k: v for k, v in model.state_dict().items() if k in set(task.shared_keys(model))}
    validator = UpdateValidator.from_config(state, cfg, task.metrics)
    return run_cross_site(grid, cfg, state, list(task.metrics), validator, NODES), task


def test_matrix_of_global_and_local_models_on_every_site(config, tmp_path):
    cs, task = stage(config, ClientAppGrid(config))
    sites = ["site-a", "site-b", "site-c"]
    assert cs["models"] == [GLOBAL, *sites] and cs["sites"] == sites
    assert cs["dropped"] == [] and cs["not_shared"] == {}
    for model in cs["models"]:
        for site in sites:
            metrics = cs["matrix"][model][site]
            assert 0.0 <= metrics["dice"] <= 1.0
            assert metrics["num_examples"] == 1
            assert set(metrics) == {"dice", "num_examples"} | {k for k in metrics
                                                               if k.startswith("dice/")}
    # Fine-tuning changed the models: local rows differ from the global row somewhere.
    assert any(cs["matrix"][s][t]["dice"] != cs["matrix"][GLOBAL][t]["dice"]
               for s in sites for t in sites)
    comparison = cs["comparison"]
    assert set(comparison) == set(sites)
    for site, c in comparison.items():
        assert c["sites"] == [s for s in sites if s != site]
        assert c["local_off_diagonal"] == pytest.approx(
            sum(cs["matrix"][site][s]["dice"] for s in c["sites"]) / 2)
    text = format_matrix(cs)
    rows = text.splitlines()[2:6]
    assert [r.split("  ")[0] for r in rows] == ["global", *(f"{s} (local)" for s in sites)]
    for model, row in zip(cs["models"], rows, strict=True):
        assert row.split()[-3:] == [f"{cs['matrix'][model][s]['dice']:.4f}" for s in sites]
    paths = plot_heatmaps(tmp_path, cs, task.metrics)
    assert [p.name for p in paths] == ["cross_site_dice.png"]


def test_site_that_keeps_its_local_model_sends_no_weights(config):
    sites = [dataclasses.replace(s, policy=SitePolicy(share_local_model=False))
             if s.name == "site-b" else s for s in config.sites]
    cfg = dataclasses.replace(config, sites=sites)
    grid = ClientAppGrid(cfg)
    cs, _ = stage(cfg, grid)
    fine_tune = [r for r in grid.received if r.metadata.message_type == CROSS_SITE_TRAIN]
    from_b = [r for r in fine_tune if r.metadata.src_node_id == 12]
    assert len(from_b) == 1 and from_b[0].has_error()
    assert from_b[0].error.reason == "policy-refused"  # a code, no weights, nothing else
    assert not from_b[0].has_content()
    assert all(r.content.array_records for r in fine_tune if r.metadata.src_node_id != 12)
    assert cs["models"] == [GLOBAL, "site-a", "site-c"]
    assert "refused" in cs["not_shared"]["site-b"]
    # It still evaluates the others' models on its own data.
    assert set(cs["matrix"]["site-a"]) == {"site-a", "site-b", "site-c"}
    # No evaluate message carried site-b's weights to anyone.
    assert all(MODEL_PREFIX + "site-b" not in r.content for r in grid.received
               if r.metadata.message_type == CROSS_SITE_EVALUATE and r.has_content())


def test_malformed_and_out_of_range_metric_replies_are_dropped(config):
    def out_of_range(msg, reply):  # site-b claims a perfect-plus Dice for the global model
        reply.content[MODEL_PREFIX + GLOBAL]["dice"] = 1.5
        return reply

    def extra_record(msg, reply):  # site-c slips per-case values into its reply
        if msg.metadata.message_type == CROSS_SITE_EVALUATE:
            reply.content["cases"] = MetricRecord({"case-000": 0.9})
        return reply

    tamper = {12: lambda m, r: (out_of_range(m, r) if m.metadata.message_type
                                == CROSS_SITE_EVALUATE else r),
              13: extra_record}
    cs, _ = stage(config, ClientAppGrid(config, tamper))
    assert "site-b" not in cs["matrix"][GLOBAL]  # the bad cell only
    assert "site-b" in cs["matrix"]["site-a"]
    assert all("site-c" not in row for row in cs["matrix"].values())  # the whole reply
    reasons = {(d["site"], d["phase"]): d["reason"] for d in cs["dropped"]}
    assert "outside its range" in reasons[("site-b", "cross_evaluate")]
    assert "unexpected records" in reasons[("site-c", "cross_evaluate")]
    assert all(math.isfinite(v) for row in cs["matrix"].values() for m in row.values()
               for v in m.values())


def test_a_tampered_local_model_is_rejected(config):
    def nan_weights(msg, reply):
        if msg.metadata.message_type == CROSS_SITE_TRAIN:
            arrays = reply.content["arrays"]
            state = arrays.to_torch_state_dict()
            first = next(k for k, v in state.items() if v.is_floating_point())
            state[first] = torch.full_like(state[first], float("nan"))
            from fedscan.shared.messages import to_arrays
            reply.content["arrays"] = to_arrays(state)
        return reply

    cs, _ = stage(config, ClientAppGrid(config, {13: nan_weights}))
    assert "site-c" not in cs["models"]
    assert "non-finite" in cs["not_shared"]["site-c"]


def test_mode_all_adds_models_trained_alone_and_pooled(config, tmp_path):
    """``--mode all``: the local (alone) and pooled baselines' models join the matrix."""
    import json

    from fedscan.server.cross_site import add_to_summary
    from fedscan.shared.checkpoint import save_model
    from fedscan.simulations.baselines import add_baselines_to_cross_site

    cs, task = stage(config, ClientAppGrid(config))
    federated, local, pooled = (tmp_path / m for m in ("federated", "local", "pooled"))
    for folder in (federated, local, pooled):
        folder.mkdir()
    metrics = [spec.to_dict() for spec in task.metrics]
    (federated / "summary.json").write_text(json.dumps({"mode": "federated", "rounds": [],
                                                       "final": {}, "metrics": metrics}))
    add_to_summary(federated, json.loads((federated / "summary.json").read_text()), cs)
    torch.manual_seed(1)
    for path in [*(local / f"final_model_{s.name}.pt" for s in config.sites),
                 pooled / "final_model.pt"]:
        save_model(path, config=config, state_dict=task.build_model().state_dict())
    summary = add_baselines_to_cross_site(config, federated, local, pooled)
    cs = json.loads((federated / "summary.json").read_text())["cross_site"]
    assert summary["cross_site"] == cs
    sites = ["site-a", "site-b", "site-c"]
    assert cs["models"] == [GLOBAL, *sites, *(f"alone:{s}" for s in sites), "pooled"]
    for model in cs["models"]:
        assert all(0.0 <= cs["matrix"][model][s]["dice"] <= 1.0 for s in sites)
    assert cs["comparison"]["alone:site-a"]["sites"] == ["site-b", "site-c"]
    assert cs["comparison"]["pooled"]["sites"] == sites
    report = (federated / "report.md").read_text()
    assert "| site-a (alone) |" in report and "| pooled |" in report
    assert (federated / "cross_site_dice.png").is_file()
