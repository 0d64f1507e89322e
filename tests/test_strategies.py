"""Each configured Flower strategy aggregates real reply messages; per-site metrics are kept."""

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedscan.server.strategies import RecordingStrategy, build_strategy
from fedscan.shared.config import parse_config
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import site_record


def reply(site: str, node: int, value: float, n: int, train: bool = True,
          samples: int = 8) -> Message:
    md = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                  reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=3600,
                  message_type=MessageType.TRAIN if train else MessageType.EVALUATE)
    metrics = {"loss": value, "dice": value, "num-examples": n}
    if train:
        metrics["samples"] = samples
    content = RecordDict({"metrics": MetricRecord(metrics),
                          "site": site_record(site)})
    if train:
        content["arrays"] = ArrayRecord({"w": torch.full((3,), value)})
    return Message(content=content, metadata=md)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedmedian"])
def test_strategy_aggregates_and_records_sites(tmp_path, name):
    cfg = parse_config({"sites": [{"name": s, "data": "/x"} for s in ("a", "b", "c")],
                        "strategy": {"name": name}})
    history = RunHistory(tmp_path, cfg, "federated")
    inner = build_strategy(cfg.strategy, 3)
    strategy = RecordingStrategy(inner, history)
    if name == "fedadam":  # FedOpt strategies keep the current global model between rounds
        inner.current_arrays = {"w": np.zeros(3, dtype=np.float32)}
    replies = [reply("a", 1, 1.0, 1), reply("b", 2, 2.0, 1), reply("c", 3, 9.0, 2)]
    arrays, _ = strategy.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["w"].numpy()
    expected = {"fedavg": (1 + 2 + 18) / 4, "fedprox": (1 + 2 + 18) / 4, "fedmedian": 2.0}
    if name in expected:
        assert np.allclose(w, expected[name])
    else:  # FedAdam moves from 0 towards the average by at most ~eta per round
        assert np.all(w > 0) and np.all(w <= cfg.strategy.eta * 1.01)
    strategy.aggregate_evaluate(1, [reply("a", 1, 0.5, 1, False), reply("c", 3, 0.8, 3, False)])
    entry = history.finish_round(1, None)
    assert entry["train"]["c"] == {"loss": 9.0, "dice": 9.0, "num_examples": 2, "samples": 8}
    assert set(entry["evaluate"]) == {"a", "c"}
    assert entry["aggregate"]["dice"] == pytest.approx((0.5 + 0.8 * 3) / 4)


def test_weighting_by_samples_counts_sites_by_what_they_trained_this_round(tmp_path):
    cfg = parse_config({"sites": [{"name": s, "data": "/x"} for s in ("a", "b", "c")],
                        "strategy": {"weighted_by": "samples"}})
    strategy = RecordingStrategy(build_strategy(cfg.strategy, 3), RunHistory(tmp_path, cfg,
                                                                            "federated"))
    # Case counts 400, 400 and 50, the same steps: each site counts equally...
    replies = [reply("a", 1, 1.0, 400), reply("b", 2, 2.0, 400), reply("c", 3, 9.0, 50)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays.to_torch_state_dict()["w"].numpy(), (1 + 2 + 9) / 3)
    # ...and a site that took half the steps (a spent privacy budget) counts half.
    replies = [reply("a", 1, 1.0, 400, samples=8), reply("c", 3, 4.0, 50, samples=4)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert np.allclose(arrays.to_torch_state_dict()["w"].numpy(), (8 + 16) / 12)
