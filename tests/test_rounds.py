"""The resumable round loop, driven through a scripted Grid (no runtime): a run stopped after
round k and resumed equals the uninterrupted run, strategy state (FedAdam moments) included."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedscan.server.rounds import RoundFailed
from fedscan.server.server_app import run_federation
from fedscan.shared.checkpoint import load_model
from fedscan.shared.config import parse_config
from fedscan.shared.messages import site_record

SITES = {11: "site-a", 12: "site-b", 13: "site-c"}


class ScriptedGrid:
    """A Grid whose nodes answer at once: train adds a site-specific step to every float."""

    def __init__(self, declared: dict[int, str] | None = None, broken_round: int = 0):
        self.declared = declared or SITES
        self.broken_round = broken_round
        self.train_rounds: list[int] = []
        self.evaluate_messages = 0
        self._n = 0

    def get_node_ids(self):
        return list(SITES)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self._n += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._n}"
            node = msg.metadata.dst_node_id
            step = 0.01 * (node - 10)
            content = RecordDict({"site": site_record(self.declared[node])})
            if msg.metadata.message_type == MessageType.QUERY:
                # The data check before round 1: these sites keep their statistics.
                content["data-stats-withheld"] = ConfigRecord({"reason": "policy"})
            elif msg.metadata.message_type == MessageType.TRAIN:
                rnd = int(msg.content["config"]["server-round"])
                self.train_rounds.append(rnd)
                state = msg.content["arrays"].to_torch_state_dict()
                if rnd == self.broken_round:
                    step = float("nan")
                content["arrays"] = ArrayRecord({k: v + step if v.is_floating_point() else v
                                                 for k, v in state.items()})
                content["metrics"] = MetricRecord({"loss": 1.0, "num-examples": 2})
                if msg.content["config"]["evaluate-received"]:
                    content["evaluation"] = ConfigRecord({"dice": dice(state, node),
                                                          "num-examples": 1})
            else:
                self.evaluate_messages += 1
                state = msg.content["arrays"].to_torch_state_dict()
                content["metrics"] = MetricRecord({"dice": dice(state, node), "num-examples": 1})
            reply = Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def dice(state, node):
    """A fake score that identifies the model a site evaluated (its mean weight) and the site,
    inside Dice's range [0, 1] (the server rejects anything else)."""
    mean = torch.cat([v.flatten().float() for v in state.values()]).mean().item()
    return round(0.1 * (node - 10) + 0.5 * mean, 6)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Flower's strategies build messages that need a run id, as inside a runtime.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def config(rounds: int, **strategy):
    return parse_config({
        "sites": [{"name": n, "data": "/x"} for n in SITES.values()], "rounds": rounds,
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "strategy": {"name": "fedadam", **strategy}})


def final_state(out):
    return load_model(out / "final_model.pt")[1]


def test_resume_equals_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    run_federation(ScriptedGrid(), config(3), tmp_path / "full")
    torch.manual_seed(0)
    run_federation(ScriptedGrid(), config(1), tmp_path / "split")  # "crash" after round 1
    round1 = (tmp_path / "split/checkpoints/round_001.pt").read_bytes()
    grid = ScriptedGrid()
    summary = run_federation(grid, config(3), tmp_path / "split", resume=True)
    assert grid.train_rounds == [2, 2, 2, 3, 3, 3]  # round 1 is not repeated
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert summary["resumed_after"] == [1]
    assert (tmp_path / "split/checkpoints/round_001.pt").read_bytes() == round1
    full, split = final_state(tmp_path / "full"), final_state(tmp_path / "split")
    for key in full:  # FedAdam's moments were restored, so the trajectories coincide
        assert torch.allclose(full[key], split[key], atol=1e-6), key


def test_failed_round_stops_and_resume_repeats_only_it(tmp_path):
    with pytest.raises(RoundFailed, match="round 2"):
        run_federation(ScriptedGrid(broken_round=2), config(3), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"] if r["seconds"]] == [1]
    assert {r["site"] for r in summary["rounds"][1]["rejected"]} == set(SITES.values())
    grid = ScriptedGrid()
    run_federation(grid, config(3), tmp_path, resume=True)
    assert sorted(set(grid.train_rounds)) == [2, 3]


def test_registered_name_wins_over_declared_name(tmp_path):
    liar = {**SITES, 13: "site-a"}  # site-c claims to be site-a
    summary = run_federation(ScriptedGrid(declared=liar), config(1), tmp_path,
                             node_names=SITES)
    entry = summary["rounds"][0]
    assert set(entry["train"]) == set(SITES.values())
    assert set(entry["bytes"]) == set(SITES.values())
    assert summary["model_fp32_bytes"] > 0


def test_each_round_model_is_evaluated_once_by_the_next_train_message(tmp_path):
    grid = ScriptedGrid()
    summary = run_federation(grid, config(3), tmp_path)
    assert grid.evaluate_messages == 3  # only the final model gets an evaluate message
    for entry in summary["rounds"]:
        state = load_model(tmp_path / "checkpoints" / f"round_{entry['round']:03d}.pt")[1]
        # Round r's metrics are those of round r's checkpoint, whichever message carried them.
        assert entry["evaluate"] == {site: {"dice": pytest.approx(dice(state, node)),
                                            "num_examples": 1}
                                     for node, site in SITES.items()}
        # One model down and one up per round (the ratio to the model's size is checked with
        # the real model in test_deployment.py; this toy model is smaller than the config).
        assert all(set(t) <= {"train_down", "train_up", "final_evaluate_down",
                              "final_evaluate_up"} for t in entry["bytes"].values())
    assert all("final_evaluate_down" in t for t in summary["rounds"][-1]["bytes"].values())
    assert not any("final_evaluate_down" in t for r in summary["rounds"][:-1]
                   for t in r["bytes"].values())


def test_resumed_run_evaluates_the_last_checkpoint_in_its_first_train_message(tmp_path):
    run_federation(ScriptedGrid(), config(1), tmp_path)  # "crash" before any evaluation
    (tmp_path / "summary.json").write_text(
        (tmp_path / "summary.json").read_text())  # summary as the crash left it
    summary = run_federation(ScriptedGrid(), config(2), tmp_path, resume=True)
    state = load_model(tmp_path / "checkpoints" / "round_001.pt")[1]
    assert summary["rounds"][0]["evaluate"]["site-a"]["dice"] == pytest.approx(dice(state, 11))
    assert summary["rounds"][0]["aggregate"]["dice"] == pytest.approx(
        sum(dice(state, n) for n in SITES) / 3)
