"""Fuzz the server's message path with real Flower messages.

An admitted node (``site-d``, node 14) answers every round of a real round loop
(:func:`run_rounds` with :class:`RecordingStrategy`, :class:`UpdateValidator` and
:class:`AdmittedGrid`) with a malformed, oversized or wrongly typed reply, an error, or several
replies at once; an outsider that was never admitted (node 99) and the admitted node answer
other nodes' messages and messages nobody sent. Three honest sites send identical updates, so
the global model after each round is known exactly: if any fuzzed reply were aggregated, it
would differ. Evaluate replies are fuzzed through the same strategy.
"""

from __future__ import annotations

import json
import logging
import random
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
from flwr.supercore.task_identity import TaskIdentity

from fedscan.server.admission import Admission, AdmittedGrid
from fedscan.server.rounds import run_rounds
from fedscan.server.strategies import RecordingStrategy, build_strategy
from fedscan.server.validation import UpdateValidator
from fedscan.shared.config import parse_config
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import RoundConfig, site_record
from fedscan.shared.tasks.base import MetricSpec

HONEST = {11: "site-a", 12: "site-b", 13: "site-c"}
FUZZER, OUTSIDER = 14, 99
NAMES = {**HONEST, FUZZER: "site-d"}
SPEC = {"conv.weight": torch.zeros(4, 2, 3), "conv.bias": torch.zeros(4),
        "norm.weight": torch.ones(4)}
METRICS = (MetricSpec("dice", True, 0.0, 1.0, per_class=True, headline=True),
           MetricSpec("hd95", False, 0.0, per_class=True))
STEP = 0.01
#: Rounds of the real loop (about 4.7 fuzzed replies each), then train and evaluate replies
#: fuzzed straight through the strategy (no grid), for >= 1,000 in all.
ROUNDS = 110
DIRECT_TRAIN = 400
DIRECT_EVALUATE = 300


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Flower's strategies build messages that need a run id, as inside a runtime.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _float_arrays(sent: ArrayRecord, step: float) -> dict[str, torch.Tensor]:
    return {k: v + step for k, v in sent.to_torch_state_dict().items()}


def honest_content(msg: Message, site: str) -> RecordDict:
    """What an honest site answers: identical updates everywhere (sent + STEP)."""
    content = RecordDict({"site": site_record(site),
                          "privacy": ConfigRecord({"status": "off"})})
    if msg.metadata.message_type == MessageType.TRAIN:
        content["arrays"] = ArrayRecord(_float_arrays(msg.content["arrays"], STEP))
        content["metrics"] = MetricRecord({"loss": 0.5, "steps": 4, "num-examples": 10,
                                           "samples": 8})
        if msg.content["config"]["evaluate-received"]:
            content["evaluation"] = ConfigRecord({"dice": 0.8, "hd95": 3.0, "num-examples": 2})
    else:
        del content["privacy"]
        content["metrics"] = MetricRecord({"dice": 0.8, "hd95": 3.0, "num-examples": 2})
    return content


def _reply(content: RecordDict | Error, question: Message, src: int,
           message_type: str | None = None, reply_to: str | None = None) -> Message:
    md = Metadata(run_id=1, message_id=f"r{random.random()}", src_node_id=src, dst_node_id=1,
                  reply_to_message_id=reply_to or question.metadata.message_id,
                  group_id=question.metadata.group_id, created_at=time.time(), ttl=3600,
                  message_type=message_type or question.metadata.message_type)
    if isinstance(content, Error):
        return Message(content, reply_to=question)
    return Message(content=content, metadata=md)


class Fuzzer:
    """Malformed versions of an honest reply (seeded); each says what makes it malformed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)

    def _array_key(self, content: RecordDict) -> str:
        return self.rng.choice(list(content["arrays"].keys()))

    def _set_array(self, content: RecordDict, key: str, value) -> None:
        arrays = dict(content["arrays"].items())
        arrays[key] = value if isinstance(value, Array) else Array(np.asarray(value))
        content["arrays"] = ArrayRecord(arrays)

    def train(self, content: RecordDict, evaluation_asked: bool) -> str:
        """Mutate a train reply's content in place; returns the mutation's name."""
        r, rng = self.rng, self.np
        key = self._array_key(content)
        values = content["arrays"][key].numpy().copy()
        kind = r.randrange(27)
        if kind == 0:
            values.flat[r.randrange(values.size)] = np.nan
            self._set_array(content, key, values)
            return "nan in array"
        if kind == 1:
            values.flat[r.randrange(values.size)] = r.choice([np.inf, -np.inf])
            self._set_array(content, key, values)
            return "inf in array"
        if kind == 2:
            size = r.choice([10**5, 10**6, values.size + 1])
            self._set_array(content, key, rng.standard_normal(size).astype(np.float32))
            return "oversized array"
        if kind == 3:
            dtype = r.choice([np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_])
            self._set_array(content, key, values.astype(dtype))
            return "wrong dtype"
        if kind == 4:
            self._set_array(content, key, values.reshape(-1) if values.ndim > 1
                            else values.reshape(1, -1))
            return "wrong shape"
        if kind == 5:
            arrays = dict(content["arrays"].items())
            del arrays[key]
            content["arrays"] = ArrayRecord(arrays)
            return "missing array"
        if kind == 6:
            arrays = dict(content["arrays"].items())
            arrays[f"extra.{r.randrange(100)}"] = Array(np.zeros(3, dtype=np.float32))
            content["arrays"] = ArrayRecord(arrays)
            return "extra array"
        if kind == 7:
            record = r.choice([ConfigRecord({"x": "y"}), MetricRecord({"x": 1.0}),
                               ArrayRecord({"x": torch.zeros(2)})])
            content[r.choice(["extra", "arrays2", "config", "evaluation2"])] = record
            return "extra record"
        if kind == 8:
            del content[r.choice(["arrays", "metrics"])]
            return "missing record"
        if kind == 9:
            metrics = dict(content["metrics"].items())
            del content["metrics"]
            content["metrics"] = ConfigRecord(metrics)
            return "metrics of the wrong kind"
        if kind == 10:
            content["metrics"]["num-examples"] = r.choice(
                [10**9, 1e300, -1, -10**6, float("nan"), float("inf"), 2.5, 0, [1, 2]])
            return "bad num-examples"
        if kind == 11:
            value = r.choice([float("nan"), -8, float("-inf"), 1e15, None])
            if value is None:
                del content["metrics"]["samples"]
            else:
                content["metrics"]["samples"] = value
            return "bad samples"
        if kind == 12:
            content["metrics"][r.choice(["evil", "num_examples", "dice", "x" * 300])] = 1.0
            return "unknown train metric"
        if kind == 13:
            content["metrics"]["loss"] = r.choice([float("inf"), [0.1, 0.2]])
            return "bad loss"
        if kind == 14:
            bad = r.choice([{"dice": 1e9}, {"dice": -0.5}, {"dice": float("nan")},
                            {"dice": "0.9"}, {"dice": b"\x00"}, {"dice": True},
                            {"accuracy": 0.9}, {"hd95": -5.0}, {"hd95": float("inf")},
                            {"num-examples": 0}, {"num-examples": float("nan")},
                            {"num-examples": 10**12}, {"dice/" + "c" * 500: 0.5}])
            evaluation = {"dice": 0.8, "num-examples": 2, **bad}
            content["evaluation"] = ConfigRecord(evaluation)
            return "bad evaluation"
        if kind == 15:
            if evaluation_asked:
                content["evaluation"] = ConfigRecord({"dice": 0.8, "num-examples": 2})
                content["metrics"]["num-examples"] = -1
                return "bad num-examples"
            content["evaluation"] = ConfigRecord({"dice": 0.8, "num-examples": 2})
            return "unrequested evaluation"
        if kind == 16:
            content["site"] = ConfigRecord({"name": r.choice(
                [5, b"site-a", "x" * 100_000, "site\n-a", "", "site-a\x1b[2J"])})
            # The admitted name overrides a declared one: keep the reply malformed otherwise.
            content["metrics"]["num-examples"] = -1
            return "bad site record"
        if kind == 17:
            content["privacy"] = ConfigRecord(r.choice(
                [{"status": "x" * 10_000}, {"status": b"\x00" * 100},
                 {f"k{i}": i for i in range(500)}, {"status": "ok\nforged log line"}]))
            return "bad privacy record"
        if kind == 18:
            content["arrays"] = ArrayRecord({**dict(content["arrays"].items()), key: Array(
                dtype="float32", shape=values.shape, stype="numpy.ndarray",
                data=bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(40))))})
            return "garbage array bytes"
        if kind == 19:
            content["arrays2"] = ArrayRecord({"x": torch.zeros(1)})
            return "two array records"
        if kind == 20:
            for name in list(content.keys()):
                del content[name]
            return "empty content"
        if kind == 21:
            values *= 1e30  # finite, but far from everyone else
            self._set_array(content, key, values)
            return "huge update"
        if kind == 22:
            content["metrics"] = MetricRecord({"num-examples": 10})
            content["metrics2"] = MetricRecord({"num-examples": 10})
            return "two metric records"
        if kind == 23:
            content["metrics"]["num-examples"] = r.choice([10**7 + 1, 123456789])
            return "bad num-examples"
        if kind == 24:
            self._set_array(content, key, values.astype(np.complex64))
            return "wrong dtype"
        if kind == 25:
            content["metrics"]["steps"] = r.choice([-4, float("nan"), 0.5])
            return "bad steps"
        content["arrays"] = ArrayRecord({k: torch.zeros(0) for k in content["arrays"]})
        return "empty arrays"

    def evaluate(self, content: RecordDict) -> str:
        r = self.rng
        kind = r.randrange(8)
        metrics = content["metrics"]
        if kind == 0:
            metrics["dice"] = r.choice([1e9, -1.0, float("nan"), float("inf"), 1.0000001])
            return "dice out of range"
        if kind == 1:
            metrics["hd95"] = r.choice([-1.0, float("-inf"), float("inf")])
            return "hd95 out of range"
        if kind == 2:
            metrics[r.choice(["accuracy", "loss", "dice_score"])] = 0.5
            return "unknown metric"
        if kind == 3:
            metrics["num-examples"] = r.choice([0, -2, 10**9, float("nan"), 1.5])
            return "bad num-examples"
        if kind == 4:
            content["arrays"] = ArrayRecord({"x": torch.zeros(2)})
            return "evaluate reply with arrays"
        if kind == 5:
            del content["metrics"]
            return "no metrics"
        if kind == 6:
            values = dict(metrics.items())
            del content["metrics"]
            content["metrics"] = ConfigRecord({**values, "dice": "0.8"})
            return "non-numeric metric"
        metrics["dice/" + "\x07" * 3] = 0.5
        return "unreadable metric key"


class FuzzGrid:
    """Honest nodes 11-13; node 14 (admitted) fuzzes; node 99 (never admitted) is online too.

    ``expected`` counts the records (rejections, drops, errors) the server must write.
    """

    def __init__(self, seed: int = 0) -> None:
        self.fuzz = Fuzzer(seed)
        self.r = random.Random(seed + 1)
        self.fuzz_replies = 0
        self.expected_records = 0
        self.kinds: dict[str, int] = {}
        self.sent_to: set[int] = set()
        self._n = 0

    def get_node_ids(self):
        return [*NAMES, OUTSIDER]

    def _count(self, kind: str, replies: int = 1, records: int = 1) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + replies
        self.fuzz_replies += replies
        self.expected_records += records

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        messages = list(messages)
        for msg in messages:
            self._n += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._n}"
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent_to.add(node)
            if node in HONEST:
                replies.append(_reply(honest_content(msg, HONEST[node]), msg, node))
                continue
            assert node == FUZZER, f"the server sent to node {node}"
            train = msg.metadata.message_type == MessageType.TRAIN
            asked = train and bool(msg.content["config"]["evaluate-received"])
            choice = self.r.random()
            if choice < 0.08:
                replies.append(_reply(Error(code=self.r.randrange(5), reason="boom " * 50),
                                      msg, node))
                self._count("error reply")
            elif choice < 0.16:
                copies = self.r.randrange(2, 5)
                content = honest_content(msg, "site-d")  # even valid copies count as none
                replies += [_reply(content, msg, node) for _ in range(copies)]
                # One drop for the node, one "no valid reply" error.
                self._count("duplicated replies", copies, records=2)
            elif choice < 0.22:
                other = MessageType.EVALUATE if train else MessageType.TRAIN
                replies.append(_reply(honest_content(msg, "site-d"), msg, node,
                                      message_type=other))
                self._count("reply of another message type", records=2)
            else:
                content = honest_content(msg, "site-d")
                kind = self.fuzz.train(content, asked) if train else self.fuzz.evaluate(content)
                replies.append(_reply(content, msg, node))
                self._count(kind)
        # Replies to messages this node was never sent, and from a node never admitted.
        honest_msgs = [m for m in messages if m.metadata.dst_node_id in HONEST]
        for _ in range(self.r.randrange(0, 5)):
            target = self.r.choice(honest_msgs)
            src, what = self.r.choice([(FUZZER, "answers another node's message"),
                                       (OUTSIDER, "outsider answers a message")])
            replies.append(_reply(honest_content(target, "site-a"), target, src))
            self._count(what)
        for _ in range(self.r.randrange(0, 2)):
            target = self.r.choice(messages)
            replies.append(_reply(honest_content(target, "site-b"), target,
                                  self.r.choice([FUZZER, OUTSIDER]), reply_to="m-unknown"))
            self._count("answers no message")
        self.r.shuffle(replies)
        return replies


def _records(history: RunHistory) -> list[dict]:
    out = []
    for r in history.rounds:
        for kind in ("rejected", "errors"):
            out += [dict(e, round=r["round"], kind=kind) for e in r.get(kind) or []
                    if e["site"] in ("site-d", f"node-{OUTSIDER}", f"node-{FUZZER}")]
    return out


def test_fuzzed_replies_are_rejected_logged_and_never_aggregated(tmp_path, caplog, request):
    cfg = parse_config({"sites": [{"name": n, "data": "/x"} for n in NAMES.values()],
                        "strategy": {"min_sites": 3}, "rounds": ROUNDS})
    history = RunHistory(tmp_path, cfg, "federated")
    validator = UpdateValidator.from_config(SPEC, cfg, METRICS)
    strategy = RecordingStrategy(build_strategy(cfg.strategy, 4), history, validator)
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({str(k): v for k, v in NAMES.items()}))
    fuzz = FuzzGrid(seed=12)
    grid = AdmittedGrid(fuzz, Admission(nodes), on_unadmitted=history.record_unadmitted)
    models = []

    def on_round_end(rnd, arrays):
        models.append({k: v.clone() for k, v in arrays.to_torch_state_dict().items()})

    caplog.set_level(logging.WARNING, logger="fedscan.server")
    # configure_console() (run by any earlier in-process simulation) stops fedscan's loggers
    # propagating to the root, where caplog listens: listen on the server's logger itself.
    server_log = logging.getLogger("fedscan.server")
    server_log.addHandler(caplog.handler)
    request.addfinalizer(lambda: server_log.removeHandler(caplog.handler))
    final = run_rounds(strategy, grid, ArrayRecord(SPEC), range(1, ROUNDS + 1), timeout=1.0,
                       train_config=RoundConfig(task_config="{}"),
                       evaluate_config=RoundConfig(task_config="{}"), history=history,
                       on_round_end=on_round_end, node_names=grid.names())
    # More train and evaluate replies straight through the same strategy (no grid).
    arrays = final
    for i in range(DIRECT_TRAIN + DIRECT_EVALUATE):
        rnd = ROUNDS + 1 + i
        train = i < DIRECT_TRAIN
        question = Message(RecordDict({
            "arrays": arrays, "config": ConfigRecord({"evaluate-received": False})}),
            metadata=Metadata(run_id=1, message_id=f"d{i}", src_node_id=1, dst_node_id=FUZZER,
                              reply_to_message_id="", group_id=str(rnd), created_at=time.time(),
                              ttl=3600, message_type=MessageType.TRAIN if train
                              else MessageType.EVALUATE))
        content = honest_content(question, "site-d")
        fuzz._count(fuzz.fuzz.train(content, False) if train else fuzz.fuzz.evaluate(content))
        bad = _reply(content, question, FUZZER)
        honest = [_reply(honest_content(question, s), question, n) for n, s in HONEST.items()]
        if train:
            strategy.configure_train(rnd, arrays, question.content["config"], grid)
            arrays, _ = strategy.aggregate_train(rnd, [*honest, bad])
            models.append(arrays.to_torch_state_dict())
        else:
            strategy.aggregate_evaluate(rnd, [*honest, bad])

    # 0 crashes: every round ran; 0 aggregated: the model moved exactly as the honest sites.
    assert len(models) == ROUNDS + DIRECT_TRAIN
    expected = {k: v.clone() for k, v in SPEC.items()}
    for model in models:
        expected = {k: v + STEP for k, v in expected.items()}
        for key in SPEC:
            torch.testing.assert_close(model[key], expected[key], rtol=0, atol=1e-5)
    leaked = [(r["round"], part, site) for r in history.rounds for part in ("train", "evaluate")
              for site in r[part] if site not in HONEST.values()]
    # A well-formed reply rejected for its update's norm ("huge update") still carries a valid
    # evaluation of the received model (the honest value, 0.8); nothing else gets through.
    assert all(part == "evaluate" and history.rounds[rnd - 1]["evaluate"][site] ==
               {"dice": 0.8, "hd95": 3.0, "num_examples": 2} for rnd, part, site in leaked), leaked
    assert FUZZER in fuzz.sent_to and OUTSIDER not in fuzz.sent_to
    assert history.unadmitted_nodes == [OUTSIDER]
    # Every fuzzed reply was rejected (or dropped, or its error recorded) and logged.
    records = _records(history)
    assert len(records) == fuzz.expected_records
    # A set: while fedscan's loggers still propagate, the root's copy is the same record.
    warnings = list({id(r): r for r in caplog.records if r.levelno >= logging.WARNING}.values())
    assert len(warnings) >= fuzz.expected_records - sum(1 for r in records if
                                                        r["kind"] == "errors")
    assert all("\n" not in r.getMessage() and "\x1b" not in r.getMessage()
               for r in warnings)
    assert fuzz.fuzz_replies >= 1000
    # An error reply's free text (a site could put paths or values there) is never recorded.
    assert "boom" not in json.dumps(history.write_summary())
    print(f"\nfuzz: {fuzz.fuzz_replies} fuzzed replies, {len(records)} rejections/drops/errors "
          f"recorded, 0 crashes ({ROUNDS} rounds of the loop and {DIRECT_TRAIN} + "
          f"{DIRECT_EVALUATE} direct aggregations completed), 0 aggregated "
          f"(model == honest trajectory); kinds: "
          + ", ".join(f"{k} {n}" for k, n in sorted(fuzz.kinds.items())))
