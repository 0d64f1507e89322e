"""Update validation: malformed replies are rejected and recorded; the round goes on."""

import time

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    Error,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from fedscan.server.strategies import RecordingStrategy, build_strategy
from fedscan.server.validation import UpdateValidator
from fedscan.shared.config import parse_config
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import site_record

SPEC = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


def _md(node: int, train: bool = True) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=3600,
                    message_type=MessageType.TRAIN if train else MessageType.EVALUATE)


def reply(site: str, node: int, arrays: dict | None, metrics: dict | None = None,
          train: bool = True) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics or {"loss": 0.5, "num-examples": 2}),
                          "site": site_record(site)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: v for k, v in arrays.items()})
    return Message(content=content, metadata=_md(node, train))


def good(value: float = 1.0) -> dict:
    return {"w": torch.full((4, 3), value), "b": torch.full((3,), value)}


@pytest.mark.parametrize("arrays, reason", [
    ({"w": torch.full((4, 3), float("nan")), "b": torch.ones(3)}, "non-finite"),
    ({"w": torch.full((4, 3), float("inf")), "b": torch.ones(3)}, "non-finite"),
    ({"w": torch.ones(3, 4), "b": torch.ones(3)}, "wrong shape"),
    ({"w": torch.ones(4, 3, dtype=torch.float64), "b": torch.ones(3)}, "wrong dtype"),
    ({"w": torch.ones(4, 3)}, "wrong keys"),
    ({"w": torch.ones(4, 3), "b": torch.ones(3), "extra": torch.ones(1)}, "wrong keys"),
])
def test_malformed_update_is_rejected(arrays, reason):
    validator = UpdateValidator(SPEC)
    replies = [reply("a", 1, good()), reply("b", 2, good(1.1)), reply("bad", 3, arrays)]
    ok, rejected = validator.check_train(replies, ArrayRecord(good(0.0)))
    assert [reply_name(m) for m in ok] == ["a", "b"]
    assert [r.site for r in rejected] == ["bad"]
    assert reason in rejected[0].reason


def reply_name(msg: Message) -> str:
    return msg.content.config_records["site"]["name"]


def test_norm_outlier_rejected_but_similar_updates_kept():
    validator = UpdateValidator(SPEC, norm_ratio=10.0)
    replies = [reply("a", 1, good(1.0)), reply("b", 2, good(1.3)), reply("c", 3, good(0.8)),
               reply("huge", 4, good(500.0))]
    ok, rejected = validator.check_train(replies, ArrayRecord(good(0.0)))
    assert sorted(reply_name(m) for m in ok) == ["a", "b", "c"]
    assert [r.site for r in rejected] == ["huge"] and "norm" in rejected[0].reason


def test_metric_problems_rejected():
    validator = UpdateValidator(SPEC)
    replies = [reply("a", 1, good()), reply("b", 2, good()),
               reply("zero", 3, good(), {"loss": 0.5, "num-examples": 0}),
               reply("keys", 4, good(), {"loss": 0.5, "other": 1.0, "num-examples": 2})]
    ok, rejected = validator.check_train(replies, ArrayRecord(good(0.0)))
    assert sorted(reply_name(m) for m in ok) == ["a", "b"]
    assert {r.site for r in rejected} == {"zero", "keys"}


def test_error_replies_pass_through_and_minimum_enforced():
    validator = UpdateValidator(SPEC, min_valid=2)
    err = Message(Error(code=0, reason="boom"), reply_to=Message(
        RecordDict(), metadata=_md(9)))
    ok, rejected = validator.check_train([reply("a", 1, good()), err], ArrayRecord(good(0.0)))
    assert ok == [err]  # the only valid update is below the minimum of 2
    assert "a round needs 2" in rejected[0].reason


def test_recording_strategy_keeps_global_finite_and_records(tmp_path):
    """A NaN and a wrong-shape reply among good ones: the aggregate is finite and the
    rejections land in summary.json; Flower's own strategy would have raised."""
    cfg = parse_config({"sites": [{"name": s, "data": "/x"} for s in "abcd"],
                        "strategy": {"min_sites": 2}})
    history = RunHistory(tmp_path, cfg, "federated")
    # No clipping here: the aggregate is then FedAvg's plain mean of the good replies.
    strategy = RecordingStrategy(build_strategy(cfg.strategy, 4), history,
                                 UpdateValidator(SPEC, min_valid=2, clip_norm=None))
    strategy._sent = ArrayRecord(good(0.0))
    replies = [reply("a", 1, good(1.0)), reply("b", 2, good(3.0)),
               reply("c", 3, {"w": torch.full((4, 3), float("nan")), "b": torch.ones(3)}),
               reply("d", 4, {"w": torch.ones(2, 2), "b": torch.ones(3)})]
    arrays, _ = strategy.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["w"].numpy()
    assert np.isfinite(w).all() and np.allclose(w, 2.0)
    # Without validation Flower raises on the inconsistent keys/shapes; with it, no raise.
    evaluate = [reply("a", 1, None, {"dice": 0.5, "num-examples": 1}, train=False),
                reply("b", 2, None, {"dice": 0.7, "hd95": 3.0, "num-examples": 1}, train=False),
                reply("c", 3, None, {"dice": 0.6, "num-examples": 1}, train=False)]
    strategy.aggregate_evaluate(1, evaluate)
    entry = history.finish_round(1, None)
    assert set(entry["train"]) == {"a", "b"}
    assert set(entry["evaluate"]) == {"a", "c"}
    assert {(r["site"], r["phase"]) for r in entry["rejected"]} == {
        ("c", "train"), ("d", "train"), ("b", "evaluate")}


def test_unvalidated_flower_strategy_would_raise():
    """The reason for all of this: one odd reply ends a plain Flower run."""
    from flwr.serverapp.exception import InconsistentMessageReplies

    strategy = build_strategy(parse_config({"sites": [{"name": "a", "data": "/x"}]}).strategy, 2)
    with pytest.raises(InconsistentMessageReplies):
        strategy.aggregate_train(1, [reply("a", 1, good()),
                                     reply("b", 2, {"w": torch.ones(4, 3)})])


def test_reply_without_site_record_is_named_by_node():
    # A reply without a site record is named after its node, never crashes validation.
    msg = reply("a", 7, good())
    del msg.content["site"]
    ok, rejected = UpdateValidator(SPEC).check_train([msg], ArrayRecord(good(0.0)))
    assert ok == [msg] and not rejected


@pytest.mark.slow
def test_bad_sites_rejected_in_a_real_run(tmp_path):
    """Flower's simulation runtime, 3 sites: in round 1 site-b sends NaN and site-c a wrong
    shape, in round 2 site-b sends a scaled update. Both rounds complete with the good
    replies, the global model stays finite and every rejection is in summary.json."""
    import json

    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation
    from tinysites import TINY_RUN, make_sites

    from fedscan.client.client_app import make_client_app
    from fedscan.server.server_app import make_server_app
    from fedscan.shared.checkpoint import load_model
    from fedscan.shared.config import load_config
    from fedscan.simulations.federated import simulation_backend

    make_sites(tmp_path / "data")
    (tmp_path / "run.yaml").write_text(
        "sites:\n" + "".join(f"  - {{name: {s}, data: data/{s}}}\n"
                             for s in ("site-a", "site-b", "site-c"))
        + "rounds: 2\nstrategy: {min_sites: 1}\n" + TINY_RUN)
    cfg = load_config(tmp_path / "run.yaml")
    sites = list(cfg.sites)
    honest = make_client_app(lambda ctx: sites[int(ctx.node_config["partition-id"])])
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        out = honest(message=msg, context=context)
        name = sites[int(context.node_config["partition-id"])].name
        rnd = int(msg.content["config"]["server-round"])
        state = out.content["arrays"].to_torch_state_dict()
        if name == "site-b":
            scale = float("nan") if rnd == 1 else 1e4
            out.content["arrays"] = ArrayRecord({k: v * scale if v.is_floating_point() else v
                                                 for k, v in state.items()})
        if name == "site-c" and rnd == 1:
            first = next(iter(state))
            state[first] = state[first].reshape(-1)
            out.content["arrays"] = ArrayRecord(state)
        return out

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(message=msg, context=context)

    out = tmp_path / "run"
    run_simulation(server_app=make_server_app(cfg, out), client_app=client, num_supernodes=3,
                   backend_config=simulation_backend(cfg))
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    r1, r2 = summary["rounds"]
    assert set(r1["train"]) == {"site-a"} and set(r2["train"]) == {"site-a", "site-c"}
    assert {(r["site"], r["reason"].split(" ")[0]) for r in r1["rejected"]} == {
        ("site-b", "non-finite"), ("site-c", "wrong")}
    assert [(r["site"], "norm" in r["reason"]) for r in r2["rejected"]] == [("site-b", True)]
    _, state, _ = load_model(out / "final_model.pt")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert set(summary["final"]["per_site"]) == {"site-a", "site-b", "site-c"}
