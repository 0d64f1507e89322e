"""What a hospital reveals and accepts, without a runtime: the error mod for every exception
class, the task-config policy (site paths, floors, caps, audit hashes) through the real
ClientApp on tiny NIfTI sites, site.yaml's new keys, the guard's sanitised Flower errors and
what the server records for an error reply."""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from tinysites import client_context, make_sites, train_message

from fedscan.client import guard
from fedscan.client.client_app import make_client_app
from fedscan.client.error_replies import SITE_LOG, error_code, make_error_mod
from fedscan.client.privacy import PrivacyError
from fedscan.client.site_config import load_site_settings
from fedscan.client.task_policy import PolicyRefused, accept_task, task_config_hash
from fedscan.shared.config import SiteConfig, SitePolicy, parse_config
from fedscan.shared.error_codes import FLOWER_ERRORS, SITE_ERRORS, UNRECOGNISED, describe_error
from fedscan.shared.errors import ConfigError, DataError, FedscanError
from fedscan.shared.messages import RoundConfig, to_arrays
from fedscan.shared.tasks import build_task

#: What a real error message of a site holds: a path, a case id, a label value.
SECRET = "/data/hospital/labelsTr/patient_0042.nii.gz: label values must be in [0, 2), found 7"


def message(message_type: str = MessageType.TRAIN, rnd: int = 3) -> Message:
    md = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=42,
                  reply_to_message_id="", group_id=str(rnd), created_at=time.time(), ttl=3600,
                  message_type=message_type)
    config = ConfigRecord({"task-config": "{}", "server-round": rnd})
    return Message(content=RecordDict({"config": config}), metadata=md)


def context() -> Context:
    return Context(run_id=1, node_id=42, node_config={}, state=RecordDict(), run_config={})


# -- the error mod -------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "code"), [
    (DataError(SECRET), "data-error"),
    (ConfigError(f"config key 'data.num_classes' from {SECRET}"), "config-error"),
    (PolicyRefused(f"train.batch_size 1 < policy.min_batch_size 4 ({SECRET})"), "policy-refused"),
    (PrivacyError(f"{SECRET}: privacy ledger is corrupt"), "budget-error"),
    (FedscanError(f"mismatched keys ({SECRET})"), "task-error"),
    (RuntimeError(f"index 7 is out of bounds ({SECRET})"), "internal-error"),
    (ValueError(SECRET), "internal-error"),
    (KeyError(SECRET), "internal-error"),
    (OSError(2, "No such file or directory", SECRET), "internal-error"),
    (MemoryError(SECRET), "internal-error"),
])
def test_mod_replies_a_code_and_logs_the_error_at_the_site(tmp_path, capsys, exc, code):
    site = SiteConfig("site-a", "/data/hospital", state_dir=str(tmp_path / "state"))
    mod = make_error_mod(lambda ctx: site)

    def failing(msg: Message, ctx: Context) -> Message:
        raise exc

    msg = message()
    reply = mod(msg, context(), failing)
    assert error_code(exc) == code and code in SITE_ERRORS
    assert reply.has_error() and reply.error.reason == code
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.metadata.reply_to_message_id == "m1" and reply.metadata.dst_node_id == 1
    wire = message_to_proto(reply).SerializeToString()
    for secret in ("/data/hospital", "patient_0042", "found 7", "Error", "index 7"):
        assert secret.encode() not in wire
    log = (tmp_path / "state" / SITE_LOG).read_text()
    assert "patient_0042.nii.gz" in log and "Traceback" in log and f"sent {code}" in log
    assert "round 3 train" in log
    err = capsys.readouterr().err  # one line on the site's console, pointing at the log
    assert err.count("\n") == 1 and f"({code} sent to the server)" in err and SITE_LOG in err


def test_mod_passes_replies_through_and_survives_a_broken_site_config(capsys):
    ok = RecordDict({"metrics": ConfigRecord({"x": 1})})
    mod = make_error_mod(lambda ctx: SiteConfig("site-a", "/d"))
    msg = message(MessageType.EVALUATE)
    reply = mod(msg, context(), lambda m, c: Message(ok, reply_to=m))
    assert not reply.has_error()

    def unreadable(ctx: Context) -> SiteConfig:
        raise ConfigError("/etc/fedscan/site.yaml: config key 'policy.max_rounds': must be >= 1")

    reply = make_error_mod(unreadable)(msg, context(), lambda m, c: unreadable(c))
    assert reply.error.reason == "config-error"
    err = capsys.readouterr().err  # no state folder known: the console gets it all
    assert "Traceback" in err and "policy.max_rounds" in err


# -- the server's side ----------------------------------------------------------------------


def test_server_records_fixed_texts_only():
    assert describe_error(2, "data-error") == f"data-error: {SITE_ERRORS['data-error']}"
    assert describe_error(2, f"<class 'ValueError'>:<'{SECRET}'>") == UNRECOGNISED
    assert describe_error(0, SECRET) == UNRECOGNISED
    # Flower's own errors are named by their code, whatever text came with them.
    assert describe_error(ErrorCode.NODE_UNAVAILABLE, SECRET) == FLOWER_ERRORS[
        ErrorCode.NODE_UNAVAILABLE]
    assert describe_error(ErrorCode.LOAD_CLIENT_APP_EXCEPTION, None).startswith("load-refused")


def test_guard_strips_text_from_the_errors_flowers_runner_builds(monkeypatch):
    from flwr.supernode.runtime import run_clientapp

    # The seam: Flower's runner builds its error reply from the module-level name `Error`.
    assert "Error(code=e_code, reason=reason)" in inspect.getsource(run_clientapp.run_clientapp)
    monkeypatch.setattr(run_clientapp, "Error", run_clientapp.Error)  # restored afterwards
    monkeypatch.setattr(run_clientapp, "get_load_client_app_fn",
                        run_clientapp.get_load_client_app_fn)
    guard.patch_runner(run_clientapp)  # what the shim's main() does
    make = run_clientapp.Error
    leaked = f"<class 'flwr.cli.install.ValueError'>:<'{SECRET}'>"
    error = make(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=leaked)
    assert isinstance(error, Error) and error.reason == "internal-error"
    assert make(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="data-error").reason == \
        "data-error"
    assert make(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason="An exception").reason is None
    assert make(code=ErrorCode.UNKNOWN, reason=SECRET).code == ErrorCode.UNKNOWN


# -- the task config a site accepts ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sitepriv")
    folders = make_sites(root)
    cfg = parse_config({
        "sites": [{"name": "site-a", "data": str(folders["site-a"])}], "rounds": 3,
        "data": {"spacing": [8, 8, 8]},
        "model": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0},
        "train": {"patch_size": [16, 16, 16], "batch_size": 2, "local_steps": 3},
        "evaluate": {"hd95": False}})
    return cfg, folders["site-a"]


def audit_lines(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "audit.log").read_text().splitlines()]


def site_with(tmp_path: Path, folder: Path, **fields) -> SiteConfig:
    return SiteConfig("site-a", str(folder), state_dir=str(tmp_path / "state"), **fields)


def test_accepted_task_is_audited_under_its_canonical_hash(tiny, tmp_path):
    cfg, folder = tiny
    site = site_with(tmp_path, folder)
    arrays = to_arrays(build_task(cfg).build_model().state_dict())
    reply = make_client_app(lambda ctx: site)(train_message(cfg, arrays, 1), client_context())
    assert not reply.has_error(), reply.error
    sent = RoundConfig.for_run(cfg).task_config
    canonical = json.dumps(json.loads(sent), sort_keys=True, separators=(",", ":"))
    (entry,) = audit_lines(tmp_path / "state")
    assert entry["event"] == "task-accepted" and entry["round"] == 1
    assert entry["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()
    assert entry["sha256"] == task_config_hash(json.dumps(json.loads(sent), indent=2))
    assert entry["phase"] == "train" and entry["clamped"] == {}


def test_a_path_from_the_server_is_refused(tiny, tmp_path):
    cfg, folder = tiny
    site = site_with(tmp_path, folder)
    arrays = to_arrays(build_task(cfg).build_model().state_dict())
    for key, value in [("harmonisation", {**cfg.to_dict()["harmonisation"],
                                          "reference": "/etc"}),
                       ("sites", [{"name": "x", "data": "/etc"}]),
                       ("test_sets", [{"name": "x", "data": "/etc"}])]:
        msg = train_message(cfg, arrays, 1)
        task = json.loads(str(msg.content["config"]["task-config"]))
        task[key] = value
        msg.content["config"]["task-config"] = json.dumps(task)
        reply = make_client_app(lambda ctx: site)(msg, client_context())
        assert reply.error.reason == "policy-refused"
        last = audit_lines(tmp_path / "state")[-1]
        assert last["event"] == "task-refused" and key in last["reason"]
        assert last["sha256"] == task_config_hash(json.dumps(task))


def test_site_paths_come_from_the_site(tiny, tmp_path):
    cfg, folder = tiny
    assert json.loads(RoundConfig.for_run(parse_config({
        **cfg.to_dict(), "harmonisation": {"reference": "/srv/ref"}})).task_config)[
        "harmonisation"]["reference"] is None  # the server never sends one
    msg = train_message(cfg, to_arrays({}), 1)
    local, _ = accept_task(msg, site_with(tmp_path, folder, harmonisation_reference="/data/ref"))
    assert local.harmonisation.reference == "/data/ref"
    assert [s.data for s in local.sites] == [str(folder)]
    from fedscan.simulations.federated import site_for_client

    researcher = parse_config({**cfg.to_dict(), "harmonisation": {"reference": "/srv/ref"}})
    virtual = site_for_client(researcher, researcher.sites[0], tmp_path)
    assert virtual.harmonisation_reference == "/srv/ref"
    # A site that trains a harmonisation task without its own reference folder says which
    # key to set (at the site; the server gets config-error).
    harmonise = parse_config({**cfg.to_dict(), "task": "harmonisation"})
    with pytest.raises(ConfigError, match="set harmonisation_reference in this site's config"):
        accept_task(train_message(harmonise, to_arrays({}), 1), site_with(tmp_path, folder))


def test_policy_refuses_below_floors_and_above_caps(tiny, tmp_path):
    cfg, folder = tiny
    arrays = to_arrays(build_task(cfg).build_model().state_dict())
    cases = [(SitePolicy(min_batch_size=4), 1, "train.batch_size 2 < policy.min_batch_size 4"),
             (SitePolicy(min_local_steps=10), 1, "3 local steps per round < policy.min_local"),
             (SitePolicy(max_rounds=2), 1, "rounds 3 > policy.max_rounds 2"),
             (SitePolicy(max_rounds=5), 6, "server round 6 > policy.max_rounds 5"),
             (SitePolicy(max_patch_voxels=1000), 1, "(4096 voxels) > policy.max_patch_voxels")]
    for policy, rnd, why in cases:
        site = site_with(tmp_path, folder, policy=policy)
        reply = make_client_app(lambda ctx, s=site: s)(train_message(cfg, arrays, rnd),
                                                       client_context())
        assert reply.has_error() and reply.error.reason == "policy-refused", policy
        last = audit_lines(tmp_path / "state")[-1]
        assert last["event"] == "task-refused" and why in last["reason"], last
        assert why in (tmp_path / "state" / SITE_LOG).read_text()
    # Evaluation is held to the same policy.
    site = site_with(tmp_path, folder, policy=SitePolicy(min_batch_size=4))
    reply = make_client_app(lambda ctx: site)(
        train_message(cfg, arrays, 3, evaluate=True), client_context())
    assert reply.error.reason == "policy-refused"


def test_policy_clamps_local_steps_and_reports_them(tiny, tmp_path, capsys):
    cfg, folder = tiny
    site = site_with(tmp_path, folder, policy=SitePolicy(max_local_steps=2, min_batch_size=2))
    arrays = to_arrays(build_task(cfg).build_model().state_dict())
    reply = make_client_app(lambda ctx: site)(train_message(cfg, arrays, 1), client_context())
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert metrics["steps"] == 2 and metrics["samples"] == 2 * 2  # 3 asked, the cap run
    assert audit_lines(tmp_path / "state")[-1]["clamped"] == {"local_steps": [3, 2]}
    assert "3 local steps asked, 2 run" in capsys.readouterr().out
    # local_epochs: the steps follow from the site's cases (2 training cases, batch 2).
    epochs = parse_config({**cfg.to_dict(), "train": {**cfg.to_dict()["train"],
                                                       "local_epochs": 5}})
    local, _ = accept_task(train_message(epochs, arrays, 1), site)
    assert (local.train.local_steps, local.train.local_epochs) == (2, None)


def test_site_yaml_policy_and_reference(tmp_path):
    (tmp_path / "data").mkdir()
    path = tmp_path / "site.yaml"
    path.write_text("name: site-a\ndata: data\nserver: fl.example.org:8000\n"
                    "harmonisation_reference: ref\n"
                    "policy: {min_batch_size: 2, max_local_steps: 100, max_rounds: 50}\n")
    site = load_site_settings(path).site
    assert site.harmonisation_reference == str(tmp_path / "ref")
    assert site.policy == SitePolicy(min_batch_size=2, max_local_steps=100, max_rounds=50)
    for bad, key in [("policy: {max_rounds: 0}", "policy.max_rounds"),
                     ("policy: {min_local_steps: 9, max_local_steps: 5}",
                      "policy.min_local_steps"),
                     ("policy: {max_steps: 5}", "policy.max_steps")]:
        path.write_text(f"name: a\ndata: data\nserver: h:1\n{bad}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_site_settings(path)
    with pytest.raises(ConfigError, match=r"test_sets\[0\]"):
        parse_config({"sites": [{"name": "a", "data": "/a"}],
                      "test_sets": [{"name": "t", "data": "/t", "policy": {"max_rounds": 1}}]})


def test_preflight_reports_policy_and_reference(tiny, tmp_path):
    from fedscan.client.preflight import check_reference

    _, folder = tiny
    path = tmp_path / "site.yaml"
    path.write_text(f"name: a\ndata: {folder}\nserver: h:1\npolicy: {{max_rounds: 9}}\n"
                    f"harmonisation_reference: {folder}\n")
    check = check_reference(load_site_settings(path))
    assert check.status == "OK" and "max_rounds 9" in check.detail and "3 cases" in check.detail
    path.write_text(f"name: a\ndata: {folder}\nserver: h:1\nharmonisation_reference: nowhere\n")
    check = check_reference(load_site_settings(path))
    assert check.status == "FAIL" and "nowhere" in check.detail
