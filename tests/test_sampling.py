"""Site sampling (``strategy.fraction_train``, ``min_sites``): Flower's sample size, sites
drawn by name from (seed, round), the same in a rerun with other node ids and after a resume.
Driven through the real round loop and Flower strategies with a scripted grid."""

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from test_rounds import ScriptedGrid, _task_identity, final_state  # noqa: F401 (fixture)

from fedscan.server.sampling import choose_sites, sample_size
from fedscan.server.server_app import run_federation
from fedscan.shared.config import parse_config
from fedscan.shared.errors import ConfigError
from fedscan.shared.messages import site_record

NAMES = [f"h{i:02d}" for i in range(10)]


@pytest.fixture(autouse=True)
def _dice_in_range(monkeypatch):
    """test_rounds' fake Dice grows with the node id; these ten sites' ids (20-29) would put
    it above 1, which the server rightly rejects. Sampling does not read the score."""
    import test_rounds

    monkeypatch.setattr(test_rounds, "dice", lambda state, node: round(0.05 * (node - 19), 6))


class NamedGrid(ScriptedGrid):
    """Ten nodes with ids that differ per ``offset`` (as a new simulation's do); each
    answers a query with its site name and records the train messages it got."""

    def __init__(self, offset: int):
        self.nodes = {offset + i: name for i, name in enumerate(NAMES)}
        # ScriptedGrid's update step depends on its node id: give it one per site.
        super().__init__(declared={20 + i: name for i, name in enumerate(NAMES)})
        self.trained: dict[int, list[str]] = {}
        self.queries = 0

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        queries = [m for m in messages if m.metadata.message_type == MessageType.QUERY]
        others = [m for m in messages if m not in queries]
        replies = []
        for msg in queries:
            self._n += 1
            msg.metadata.__dict__["_message_id"] = f"q{self._n}"
            content = RecordDict({"site": site_record(self.nodes[msg.metadata.dst_node_id])})
            if msg.content["config"]["ask"] == "site":
                self.queries += 1
            else:  # the data check before round 1: these sites keep their statistics
                content["data-stats-withheld"] = ConfigRecord({"reason": "policy"})
            reply = Message(content, reply_to=msg)
            replies.append(reply)
        for msg in others:
            if msg.metadata.message_type == MessageType.TRAIN:
                rnd = int(msg.content["config"]["server-round"])
                self.trained.setdefault(rnd, []).append(self.nodes[msg.metadata.dst_node_id])
        real = {}
        for msg in others:
            node = msg.metadata.dst_node_id
            canonical = 20 + NAMES.index(self.nodes[node])
            real[canonical] = node
            msg.metadata.__dict__["_dst_node_id"] = canonical
        answered = super().send_and_receive(others, timeout=timeout)
        for msg, reply in zip(others, answered, strict=True):
            node = real[msg.metadata.dst_node_id]
            msg.metadata.__dict__["_dst_node_id"] = node
            reply.metadata.__dict__["_src_node_id"] = node
        return replies + answered


def config(rounds: int, seed: int = 0, **strategy):
    return parse_config({
        "sites": [{"name": n, "data": "/x"} for n in NAMES], "rounds": rounds, "seed": seed,
        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
        "strategy": {"name": "fedavg", "fraction_train": 0.3, **strategy}})


def test_sample_size_is_flowers_formula():
    assert sample_size(10, 0.3, None) == 3
    assert sample_size(10, 0.05, None) == 1  # int(0.5) = 0, at least one site
    assert sample_size(10, 0.3, 5) == 5  # min_sites wins
    assert sample_size(3, 0.5, 5) == 3  # never more than online
    assert sample_size(1000, 0.2, 2) == 200


def test_choice_depends_on_seed_round_and_phase_not_on_order():
    a = choose_sites(NAMES, 3, 0, 1, "train")
    assert a == choose_sites(list(reversed(NAMES)), 3, 0, 1, "train")
    assert len(a) == 3 and set(a) <= set(NAMES)
    draws = {tuple(choose_sites(NAMES, 3, seed, rnd, "train"))
             for seed in range(3) for rnd in range(1, 4)}
    assert len(draws) > 4  # the seed and the round change the draw


def test_sampled_sites_repeat_with_the_seed_and_after_resume(tmp_path):
    full = NamedGrid(offset=100)
    summary = run_federation(full, config(4), tmp_path / "full")
    assert all(len(sites) == 3 for sites in full.trained.values())
    assert [r["sampled"] for r in summary["rounds"]] == [sorted(full.trained[r])
                                                         for r in (1, 2, 3, 4)]
    assert full.queries == 10  # each node asked its name once
    assert len({tuple(s) for s in full.trained.values()}) > 1  # not the same sites each round

    # A new run: other node ids, the same seed -> the same sites every round...
    run_federation(NamedGrid(offset=500), config(2), tmp_path / "split")
    resumed = NamedGrid(offset=900)  # ...and after a resume (a new simulation's node ids).
    summary = run_federation(resumed, config(4), tmp_path / "split", resume=True)
    assert sorted(resumed.trained) == [3, 4]
    assert [r["sampled"] for r in summary["rounds"]] == [sorted(full.trained[r])
                                                         for r in (1, 2, 3, 4)]
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "split")
    for key in a:  # each site's update is its own: the same sites give the same model
        assert torch.allclose(a[key], b[key], atol=1e-6), key

    other = NamedGrid(offset=100)
    run_federation(other, config(4, seed=1), tmp_path / "other-seed")
    assert other.trained != full.trained


def test_sampling_keys_are_checked():
    with pytest.raises(ConfigError, match="strategy.min_sites"):
        config(1, min_sites=11)
    with pytest.raises(ConfigError, match="strategy.fraction_train"):
        config(1, fraction_train=0.0)
    with pytest.raises(ConfigError, match="strategy.fraction_evaluate"):
        config(1, fraction_evaluate=1.5)


def test_min_sites_sampled_each_round(tmp_path):
    grid = NamedGrid(offset=0)  # fraction 0.1 of 10 is 1 site; min_sites 4 makes it 4
    run_federation(grid, config(2, min_sites=4, fraction_train=0.1), tmp_path / "run")
    assert [len(grid.trained[r]) for r in (1, 2)] == [4, 4]


def test_query_reply_carries_only_the_site_name(tmp_path):
    from flwr.app import Context

    from fedscan.client.client_app import make_client_app
    from fedscan.shared.config import SiteConfig

    site = SiteConfig(name="h07", data="/secret/path", state_dir=str(tmp_path))
    app = make_client_app(lambda ctx: site)
    msg = Message(RecordDict({"config": ConfigRecord({"ask": "site"})}), dst_node_id=7,
                  message_type=MessageType.QUERY)
    msg.metadata.__dict__["_message_id"] = "q1"
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert not reply.has_error()
    assert dict(reply.content.config_records) == {"site": {"name": "h07"}}
    assert not reply.content.array_records and not reply.content.metric_records
