"""Weights a task keeps at the site (FedBN's normalisation layers) never leave it, persist in
the ClientApp's context state across rounds, and the received model is evaluated in the train
exchange. Real ClientApp handlers, real tiny NIfTI sites, no runtime."""

import re

import pytest
import torch

from fedscan.client.client_app import LOCAL_WEIGHTS, LOCAL_WEIGHTS_DIR, make_client_app
from fedscan.shared.checkpoint import SITE_MODEL, load_model
from fedscan.shared.config import SiteConfig, parse_config
from fedscan.shared.messages import to_arrays
from fedscan.shared.tasks import build_task
from tests.tinysites import client_context, make_sites, train_message


@pytest.fixture(scope="module")
def fedbn(tmp_path_factory):
    root = tmp_path_factory.mktemp("fedbn")
    folders = make_sites(root)
    cfg = parse_config({
        "sites": [{"name": "site-a", "data": str(folders["site-a"])}], "rounds": 2,
        "data": {"spacing": [8, 8, 8]},
        "model": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0,
                  "local_norm": True},
        "train": {"patch_size": [16, 16, 16], "batch_size": 2, "local_steps": 2},
        "evaluate": {"hd95": False}})
    site = SiteConfig("site-a", str(folders["site-a"]))
    return cfg, site


def _shared(cfg):
    task = build_task(cfg)
    model = task.build_model()
    keys = set(task.shared_keys(model))
    return {k: v for k, v in model.state_dict().items() if k in keys}, model


def test_norm_layers_stay_local_and_persist_across_rounds(fedbn):
    cfg, site = fedbn
    shared, model = _shared(cfg)
    norm_keys = set(model.state_dict()) - set(shared)
    assert norm_keys and all(".N." in k or "norm" in k.lower() for k in norm_keys)
    app = make_client_app(lambda ctx: site)
    context = client_context()
    reply1 = app(train_message(cfg, to_arrays(shared), 1), context)
    assert not reply1.has_error(), reply1.error
    assert set(reply1.content["arrays"]) == set(shared)  # norms never leave the site
    metrics = reply1.content["metrics"]
    assert (metrics["steps"], metrics["samples"], metrics["num-examples"]) == (2, 2 * 2, 2)
    local1 = context.state.array_records[LOCAL_WEIGHTS].to_torch_state_dict()
    assert set(local1) == norm_keys
    assert any(not torch.equal(local1[k], model.state_dict()[k]) for k in norm_keys)  # trained
    reply2 = app(train_message(cfg, reply1.content["arrays"], 2, evaluate_received=True),
                 context)
    assert not reply2.has_error(), reply2.error
    local2 = context.state.array_records[LOCAL_WEIGHTS].to_torch_state_dict()
    # Round 2 continued from round 1's local norms: its weights moved on from them, and the
    # evaluation of the received model came back in the train reply.
    assert any(not torch.equal(local1[k], local2[k]) for k in norm_keys)
    evaluation = dict(reply2.content["evaluation"])
    assert 0.0 <= evaluation["dice"] <= 1.0 and evaluation["num-examples"] == 1
    assert "evaluation" not in reply1.content.config_records  # round 1: nothing to evaluate


def test_site_refuses_arrays_that_are_not_the_shared_weights(fedbn, tmp_path):
    cfg, site = fedbn
    site = SiteConfig(site.name, site.data, state_dir=str(tmp_path / "state"))
    _, model = _shared(cfg)
    app = make_client_app(lambda ctx: site)
    reply = app(train_message(cfg, to_arrays(model.state_dict()), 1), client_context())
    # The server learns a code; the keys at fault are in the site's own log.
    assert reply.has_error() and reply.error.reason == "task-error"
    assert re.search(r"mismatched keys: .*\.N\.", (tmp_path / "state" / "site.log").read_text())


def test_final_evaluation_saves_the_sites_own_model(fedbn, tmp_path):
    cfg, site = fedbn
    site = SiteConfig(site.name, site.data, state_dir=str(tmp_path / "state"))
    shared, model = _shared(cfg)
    app = make_client_app(lambda ctx: site)
    context = client_context()
    reply = app(train_message(cfg, to_arrays(shared), 1), context)
    assert not reply.has_error(), reply.error
    assert not (tmp_path / "state" / SITE_MODEL).exists()  # training alone writes no model
    reply = app(train_message(cfg, reply.content["arrays"], 1, evaluate=True), context)
    assert not reply.has_error(), reply.error
    saved_cfg, state, meta = load_model(tmp_path / "state" / SITE_MODEL)
    local = context.state.array_records[LOCAL_WEIGHTS].to_torch_state_dict()
    assert set(state) == set(model.state_dict())  # the whole model: shared and local weights
    assert all(torch.equal(state[k], local[k]) for k in local)  # with this site's own norms
    assert meta == {"site": "site-a", "round": 1} and saved_cfg.model.local_norm


def test_no_site_model_when_everything_is_shared(fedbn, tmp_path):
    cfg, site = fedbn
    cfg = parse_config({**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                   "local_norm": False}})
    site = SiteConfig(site.name, site.data, state_dir=str(tmp_path / "state"))
    shared, _ = _shared(cfg)
    reply = make_client_app(lambda ctx: site)(
        train_message(cfg, to_arrays(shared), 1, evaluate=True), client_context())
    assert not reply.has_error(), reply.error
    assert not (tmp_path / "state" / SITE_MODEL).exists()


def test_a_restarted_site_continues_with_this_runs_local_weights(fedbn, tmp_path):
    """A fresh process (a resumed simulation, a restarted hospital daemon) reads the run's
    local weights from the site's state folder; a run with another id never does."""
    cfg, site = fedbn
    site = SiteConfig(site.name, site.data, state_dir=str(tmp_path / "state"))
    shared, model = _shared(cfg)
    app = make_client_app(lambda ctx: site)
    run = "0123456789abcdef" * 2
    reply1 = app(train_message(cfg, to_arrays(shared), 1, run_uid=run), client_context())
    assert not reply1.has_error(), reply1.error
    on_disk = torch.load(tmp_path / "state" / LOCAL_WEIGHTS_DIR / f"{run}.pt")
    assert set(on_disk) == set(model.state_dict()) - set(shared)

    # The site's final evaluation after a restart saves the model with round 1's norms.
    reply = app(train_message(cfg, reply1.content["arrays"], 1, evaluate=True, run_uid=run),
                client_context())
    assert not reply.has_error(), reply.error
    _, state, _ = load_model(tmp_path / "state" / SITE_MODEL)
    assert all(torch.equal(state[k], on_disk[k]) for k in on_disk)
    # Another run (another id) starts from the model's own norms, not this run's.
    other = "f" * 32
    reply = app(train_message(cfg, reply1.content["arrays"], 1, evaluate=True, run_uid=other),
                client_context())
    assert not reply.has_error(), reply.error
    _, state, _ = load_model(tmp_path / "state" / SITE_MODEL)
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in on_disk)
    assert not (tmp_path / "state" / LOCAL_WEIGHTS_DIR / f"{other}.pt").exists()


@pytest.mark.parametrize("run_uid", ["../../etc/passwd", "0" * 31, "G" * 32, "0" * 33])
def test_a_run_id_that_is_not_32_hex_digits_is_refused(fedbn, tmp_path, run_uid):
    cfg, site = fedbn
    site = SiteConfig(site.name, site.data, state_dir=str(tmp_path / "state"))
    shared, _ = _shared(cfg)
    reply = make_client_app(lambda ctx: site)(
        train_message(cfg, to_arrays(shared), 1, run_uid=run_uid), client_context())
    assert reply.has_error()
    assert not (tmp_path / "state" / LOCAL_WEIGHTS_DIR).exists()
    assert run_uid not in reply.error.reason
