"""Admission: in deployment only nodes the operator admitted are sampled and heard."""

import json

import pytest
from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from test_rounds import SITES, ScriptedGrid, _task_identity, config  # noqa: F401 (fixture)

from fedscan.server.admission import Admission, AdmittedGrid, public_key_bytes
from fedscan.server.server_app import run_federation
from fedscan.shared.certs import create_site_key
from fedscan.shared.messages import site_record

OUTSIDER = 99


def test_key_bytes_are_what_flower_stores_for_a_registered_node(tmp_path):
    from cryptography.hazmat.primitives import serialization

    _, pub = create_site_key("site-a", tmp_path)
    flower = public_key_to_bytes(serialization.load_ssh_public_key(pub.read_bytes()))
    assert public_key_bytes(pub) == flower


def test_admitted_by_nodes_file_or_by_listed_key(tmp_path):
    _, key_a = create_site_key("site-a", tmp_path)
    _, key_x = create_site_key("intruder", tmp_path)
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"11": "site-b"}))
    admission = Admission(nodes, {"site-a": key_a, "site-c": tmp_path / "missing.pub"})
    assert admission.site_of(NodeInfo(node_id=11)) == "site-b"
    assert admission.site_of(NodeInfo(node_id=12, public_key=public_key_bytes(key_a))) == \
        "site-a"
    assert admission.site_of(NodeInfo(node_id=13, public_key=public_key_bytes(key_x))) is None
    assert admission.site_of(NodeInfo(node_id=14)) is None
    nodes.write_text(json.dumps({"11": "site-b", "14": "site-c"}))  # register-site, later
    assert admission.site_of(NodeInfo(node_id=14)) == "site-c"
    nodes.write_text("{broken")  # a half-written file keeps the last good list
    assert admission.site_of(NodeInfo(node_id=14)) == "site-c"


class GridWithOutsider(ScriptedGrid):
    """Three admitted sites and node 99, online with a key nobody admitted, which also forges
    a reply to site-a's train message every round."""

    def get_node_ids(self):
        return [*SITES, OUTSIDER]

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        assert all(m.metadata.dst_node_id != OUTSIDER for m in messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        to_a = next(m for m in messages if m.metadata.dst_node_id == 11)
        honest_a = next(r for r in replies if r.metadata.src_node_id == 11)
        forged = Message(RecordDict(dict(honest_a.content.items())), reply_to=to_a)
        forged.metadata.__dict__["_src_node_id"] = OUTSIDER
        forged.content["site"] = site_record("site-a")
        return [*replies, forged]


def test_unadmitted_node_is_not_sampled_and_its_replies_are_dropped(tmp_path):
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({str(k): v for k, v in SITES.items()}))
    grid = GridWithOutsider()
    summary = run_federation(grid, config(2), tmp_path, admission=Admission(nodes))
    assert summary["unadmitted_nodes"] == [OUTSIDER]
    for entry in summary["rounds"]:
        assert set(entry["train"]) == set(SITES.values())
        dropped = [e for e in entry["rejected"] if e["site"] == f"node-{OUTSIDER}"]
        assert dropped and "answers the message sent to node 11" in dropped[0]["reason"]


def test_sending_to_an_unadmitted_node_is_refused(tmp_path):
    nodes = tmp_path / "nodes.json"
    nodes.write_text(json.dumps({"11": "site-a"}))
    seen = []
    grid = AdmittedGrid(GridWithOutsider(), Admission(nodes), on_unadmitted=seen.append)
    assert list(grid.get_node_ids()) == [11]
    assert list(grid.get_node_ids()) == [11] and seen == [12, 13, OUTSIDER]  # told once each
    assert grid.names() == {11: "site-a"}
    assert not grid.is_admitted(OUTSIDER)


@pytest.mark.parametrize("copies", [2, 3])
def test_a_node_answering_twice_is_not_heard(tmp_path, copies):
    class Twice(ScriptedGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            extra = [r for r in replies if r.metadata.src_node_id == 13] * (copies - 1)
            return [*replies, *extra]

    summary = run_federation(Twice(), config(1, min_sites=2), tmp_path)
    entry = summary["rounds"][0]
    assert set(entry["train"]) == {"site-a", "site-b"}
    assert any(f"answered {copies} times" in e["reason"] for e in entry["rejected"])
