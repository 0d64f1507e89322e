"""Update validation: malformed replies are rejected and recorded; the round goes on."""

import time

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
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
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import MetricSpec

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


# -- weights, metric ranges, clipping (issue 12) -----------------------------------------------

def train_reply(site: str, node: int, arrays: dict, n=2, samples=8, evaluation=None,
                **metrics) -> Message:
    msg = reply(site, node, arrays, {"loss": 0.5, "steps": 4, "num-examples": n,
                                     "samples": samples, **metrics})
    if evaluation is not None:
        msg.content["evaluation"] = ConfigRecord(evaluation)
    return msg


def honest_three() -> list[Message]:
    return [train_reply("a", 1, good(1.0)), train_reply("b", 2, good(1.2)),
            train_reply("c", 3, good(0.9))]


@pytest.mark.parametrize("field, value, reason", [
    ("n", 10**9, "absurd"),
    ("n", float("nan"), "finite whole number"),
    ("n", float("inf"), "finite whole number"),
    ("n", -3, "positive"),
    ("n", 2.5, "finite whole number"),
    ("samples", float("nan"), "finite whole number"),
    ("samples", 0, "positive"),
    ("samples", 1e12, "absurd"),
])
def test_counts_that_are_not_plausible_case_counts_are_rejected(field, value, reason):
    bad = train_reply("bad", 4, good(1.1), **{field: value})
    ok, rejected = UpdateValidator(SPEC).check_train([*honest_three(), bad],
                                                     ArrayRecord(good(0.0)))
    assert sorted(reply_name(m) for m in ok) == ["a", "b", "c"]
    assert [r.site for r in rejected] == ["bad"] and reason in rejected[0].reason


def test_a_site_cannot_claim_more_cases_than_the_operator_admitted_it_with():
    validator = UpdateValidator(SPEC, max_examples={"bad": 50})
    replies = [*honest_three(), train_reply("bad", 4, good(1.1), n=51)]
    ok, rejected = validator.check_train(replies, ArrayRecord(good(0.0)))
    assert "admitted with" in rejected[0].reason and len(ok) == 3
    # Its evaluation counts are bounded the same way.
    assert validator.check_reply(reply("bad", 4, None, {"dice": 0.5, "num-examples": 60},
                                       train=False), train=False)


def test_weight_capped_at_ratio_times_the_round_median_unless_declared():
    replies = [train_reply("a", 1, good(1.0), n=400), train_reply("b", 2, good(1.0), n=372),
               train_reply("c", 3, good(1.0), n=40), train_reply("big", 4, good(1.0), n=100_000)]
    validator = UpdateValidator(SPEC, weight_ratio=3.0)
    ok, rejected = validator.check_train(replies, ArrayRecord(good(0.0)))
    assert not rejected and len(ok) == 4
    weights = {reply_name(m): m.content["metrics"]["num-examples"] for m in ok}
    assert weights == {"a": 400, "b": 372, "c": 40, "big": 3 * 386}  # median (372 + 400) / 2
    assert [a.site for a in validator.adjustments] == ["big"]
    assert "100000 capped at 1158" in validator.adjustments[0].reason
    # Honest sites 10x apart in size keep their weights (400 <= 3 x 232).
    honest = [train_reply("a", 1, good(1.0), n=400), train_reply("b", 2, good(1.0), n=372),
              train_reply("c", 3, good(1.0), n=40), train_reply("d", 4, good(1.0), n=92)]
    validator.check_train(honest, ArrayRecord(good(0.0)))
    assert not validator.adjustments
    # A site the operator declared keeps its claim (bounded by the declaration instead).
    replies[3] = train_reply("big", 4, good(1.0), n=100_000)
    validator = UpdateValidator(SPEC, weight_ratio=3.0, max_examples={"big": 200_000})
    ok, _ = validator.check_train(replies, ArrayRecord(good(0.0)))
    assert ok[3].content["metrics"]["num-examples"] == 100_000 and not validator.adjustments


def test_updates_clipped_to_the_round_median_norm():
    validator = UpdateValidator(SPEC, norm_ratio=3.0, clip_norm="median")
    replies = [train_reply("a", 1, good(1.0)), train_reply("b", 2, good(2.0)),
               train_reply("c", 3, good(1.5))]
    ok, rejected = validator.check_train(replies, ArrayRecord(good(0.0)))
    assert not rejected
    values = {reply_name(m): m.content["arrays"].to_torch_state_dict()["w"][0, 0].item()
              for m in ok}
    assert values == pytest.approx({"a": 1.0, "b": 1.5, "c": 1.5})  # median norm: c's
    assert validator.notes[2]["clip_scale"] == pytest.approx(0.75)
    # A fixed norm clips everyone above it.
    validator = UpdateValidator(SPEC, clip_norm=float(np.sqrt(15)))  # = a's norm
    replies = [train_reply("a", 1, good(1.0)), train_reply("b", 2, good(2.0)),
               train_reply("c", 3, good(1.5))]
    ok, _ = validator.check_train(replies, ArrayRecord(good(0.0)))
    assert [m.content["arrays"].to_torch_state_dict()["b"][0].item() for m in ok] == \
        pytest.approx([1.0, 1.0, 1.0])


def test_sign_flipped_update_at_5x_is_rejected_by_default_and_2x_clipped():
    sent = ArrayRecord(good(0.0))
    flipped = train_reply("bad", 4, good(-5.0))  # honest updates have norm ~1x
    ok, rejected = UpdateValidator(SPEC).check_train([*honest_three(), flipped], sent)
    assert [r.site for r in rejected] == ["bad"] and "norm" in rejected[0].reason
    # Within the ratio, it is clipped to the round's median norm instead.
    validator = UpdateValidator(SPEC)
    ok, rejected = validator.check_train([*honest_three(), train_reply("bad", 4, good(-2.0))],
                                         sent)
    assert not rejected
    bad = next(m for m in ok if reply_name(m) == "bad")
    assert bad.content["arrays"].to_torch_state_dict()["w"][0, 0].item() == \
        pytest.approx(-1.1)  # median of 1.0, 1.2, 0.9, 2.0


SEG_METRICS = (MetricSpec("dice", True, 0.0, 1.0, per_class=True, headline=True),
               MetricSpec("hd95", False, 0.0, per_class=True))


@pytest.mark.parametrize("metrics, reason", [
    ({"dice": 1e9}, "outside its range"),
    ({"dice": -0.1}, "outside its range"),
    ({"dice": float("nan")}, "outside its range"),
    ({"dice": 0.5, "hd95": -1.0}, "outside its range"),
    ({"dice": 0.5, "hd95": float("inf")}, "outside its range"),
    ({"dice": 0.5, "accuracy": 0.9}, "unknown metric"),
    ({"dice": 0.5, "num-examples": 10**8}, "absurd"),
    ({"dice": 0.5, "num-examples": 0}, "positive"),
    ({"dice": 0.5, "dice/csf": 1.5}, "metric 'dice/csf' = 1.5 outside its range [0, 1]"),
    ({"dice": 0.5, "hd95/brain": -2.0}, "metric 'hd95/brain' = -2.0 outside its range"),
    ({"dice": 0.5, "dice/csf": float("nan")}, "outside its range"),
])
def test_evaluation_metrics_outside_the_task_ranges_are_rejected(metrics, reason):
    validator = UpdateValidator(SPEC, metrics=SEG_METRICS)
    msg = reply("bad", 4, None, {"num-examples": 3, **metrics}, train=False)
    ok, rejected = validator.check_evaluate([msg])
    assert not ok and reason in rejected[0].reason


def test_valid_evaluations_pass_including_undefined_hd95_and_per_class_keys():
    validator = UpdateValidator(SPEC, metrics=SEG_METRICS)
    fine = [reply("a", 1, None, {"dice": 0.9, "hd95": float("nan"), "num-examples": 3},
                  train=False),
            reply("b", 2, None, {"dice": 1.0, "hd95": 0.0, "num-examples": 3}, train=False)]
    ok, rejected = validator.check_evaluate(fine)
    assert len(ok) == 2 and not rejected
    assert validator.check_reply(reply("c", 3, None, {"dice/brain": 0.7, "num-examples": 1},
                                       train=False), train=False) is None


def test_a_train_reply_with_bad_received_evaluation_is_rejected_whole(tmp_path):
    cfg = parse_config({"sites": [{"name": s, "data": "/x"} for s in ("a", "b", "c", "d")]})
    history = RunHistory(tmp_path, cfg, "federated")
    strategy = RecordingStrategy(build_strategy(cfg.strategy, 4), history,
                                 UpdateValidator(SPEC, metrics=SEG_METRICS, clip_norm=None))
    strategy._sent, strategy._evaluation_expected = ArrayRecord(good(0.0)), True
    replies = [train_reply("a", 1, good(1.0), evaluation={"dice": 0.8, "num-examples": 2}),
               train_reply("b", 2, good(1.0), evaluation={"dice": 0.6, "num-examples": 2}),
               train_reply("c", 3, good(1.0), evaluation={"dice": 0.7, "num-examples": 2}),
               train_reply("d", 4, good(9.0), evaluation={"dice": 1e9, "num-examples": 2})]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert np.allclose(arrays.to_torch_state_dict()["w"].numpy(), 1.0)  # d's update unused
    round1 = history.finish_round(1, None)
    assert set(round1["evaluate"]) == {"a", "b", "c"}
    assert round1["aggregate"]["dice"] == pytest.approx(0.7)
    assert round1["median"]["dice"] == pytest.approx(0.7)
    entry = history.finish_round(2, None)
    assert [(r["site"], "evaluation: metric 'dice'" in r["reason"]) for r in entry["rejected"]] \
        == [("d", True)]
    # An evaluation the server did not ask for (round 1) is refused too.
    strategy._evaluation_expected = False
    assert strategy.validator.check_reply(replies[0], train=True, evaluation_expected=False)


def test_non_finite_aggregate_keeps_the_global_model(tmp_path):
    """If the inner strategy ever produced a non-finite model, it would not be used."""
    from flwr.serverapp.strategy import FedAvg

    class Overflowing(FedAvg):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            return ArrayRecord({k: v * np.inf for k, v in
                                arrays.to_torch_state_dict().items()}), metrics

    cfg = parse_config({"sites": [{"name": "a", "data": "/x"}]})
    history = RunHistory(tmp_path, cfg, "federated")
    strategy = RecordingStrategy(Overflowing(), history, UpdateValidator(SPEC))
    strategy._sent = ArrayRecord(good(0.0))
    assert strategy.aggregate_train(1, honest_three()) == (None, None)
    assert history.finish_round(1, None)["rejected"][-1]["site"] == "aggregate"


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m.content.__setitem__("extra", ConfigRecord({"x": 1})), "unexpected records"),
    (lambda m: m.content.__setitem__("site", ConfigRecord({"name": "a\nb"})), "site record"),
    (lambda m: m.content.__setitem__("privacy", ConfigRecord({"status": "x" * 500})),
     "short text"),
    (lambda m: m.content["metrics"].__setitem__("evil", 1.0), "unknown train metrics"),
    (lambda m: m.content["metrics"].__setitem__("loss", float("inf")), "loss"),
    (lambda m: m.content.__setitem__("arrays", ArrayRecord(
        {"w": Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=b"x"),
         "b": Array(np.ones(3, dtype=np.float32))})), "unreadable"),
])
def test_malformed_records_are_rejected_not_raised(mutate, reason):
    msg = train_reply("bad", 4, good(1.0))
    mutate(msg)
    ok, rejected = UpdateValidator(SPEC).check_train([*honest_three(), msg],
                                                     ArrayRecord(good(0.0)))
    assert len(ok) == 3 and reason in rejected[0].reason


@pytest.mark.parametrize("task, fine, bad", [
    ("segmentation", {"dice": 0.8, "dice/wm": 0.9, "hd95": 2.0, "hd95/wm": float("nan")},
     {"dice": 0.8, "dice/wm": 1e9, "hd95": 2.0}),
    ("harmonisation", {"cycle_psnr": 31.0, "cycle_ssim": 0.9, "change": 0.05},
     {"cycle_psnr": 31.0, "cycle_ssim": 1.5, "change": 0.05}),
])
def test_ranges_come_from_the_task_metric_specs(tmp_path, task, fine, bad):
    cfg = parse_config({"task": task, "sites": [{"name": "a", "data": "/x"}]})
    metrics = build_task(cfg).metrics
    validator = UpdateValidator.from_config(SPEC, cfg, metrics)
    assert validator.check_reply(reply("a", 1, None, {**fine, "num-examples": 2}, train=False),
                                 train=False) is None
    reason = validator.check_reply(reply("a", 1, None, {**bad, "num-examples": 2},
                                         train=False), train=False)
    assert reason is not None and "outside its range" in reason
    # A per-class key of a metric the task does not declare per class is unknown.
    other = next(s.name for s in metrics if not s.per_class) if task == "harmonisation" else None
    if other:
        reason = validator.check_reply(reply("a", 1, None, {**fine, f"{other}/x": 0.5,
                                                            "num-examples": 2}, train=False),
                                       train=False)
        assert reason is not None and "unknown metric" in reason
