"""Admission: in a deployed run only nodes whose keys the operator admitted take part.

Node authentication makes the SuperLink accept only registered keys, but the Control API that
registers keys is Flower's, and Flower samples every node that is online. This is the
ServerApp's own, authoritative list, so a key registered behind the operator's back (or a node
the SuperLink accepts for any other reason) is never sampled and its replies are dropped:

- a node is admitted when its id is in ``RUN_DIR/nodes.json`` (written by ``fedscan server
  start`` and ``fedscan server register-site`` when they register a key) or its public key is
  one that server.yaml lists for a site (so a key admitted in an earlier run folder counts);
- :class:`AdmittedGrid` wraps Flower's Grid so strategies see only admitted nodes and no
  message is sent to any other; the round loop drops replies that do not come from the
  admitted node they answer (``server/rounds.py``).

In simulation every virtual node is admitted (there is no Admission).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid

log = logging.getLogger("fedscan.server")


def public_key_bytes(path: str | Path) -> bytes:
    """A site's OpenSSH public key in the form the SuperLink stores it (PEM SPKI)."""
    key = serialization.load_ssh_public_key(Path(path).read_bytes())
    return key.public_bytes(encoding=serialization.Encoding.PEM,
                            format=serialization.PublicFormat.SubjectPublicKeyInfo)


class Admission:
    """The nodes the operator admitted, by node id (nodes.json) and by public key.

    Args:
        nodes_file: ``RUN_DIR/nodes.json`` (node id -> site name); re-read on every call, so
            a key admitted while the server runs joins at the next round.
        site_keys: site name -> public key file, from server.yaml.
    """

    def __init__(self, nodes_file: Path | None = None,
                 site_keys: Mapping[str, str | Path] | None = None) -> None:
        self.nodes_file = nodes_file
        self.keys: dict[bytes, str] = {}
        for name, path in (site_keys or {}).items():
            try:
                self.keys[public_key_bytes(path)] = name
            except (OSError, ValueError, UnsupportedAlgorithm) as exc:
                log.warning("public key of site %s unreadable (%s): admitted only through "
                            "nodes.json", name, exc)
        self._names: dict[int, str] = {}

    def names(self) -> dict[int, str]:
        """Node id -> site name of every node admitted through nodes.json."""
        if self.nodes_file is not None and self.nodes_file.is_file():
            try:
                data = json.loads(self.nodes_file.read_text())
                self._names = {int(k): str(v) for k, v in data.items()}
            except (OSError, ValueError, AttributeError) as exc:  # keep the last good copy
                log.warning("%s unreadable (%s); using the admitted nodes read before",
                            self.nodes_file, exc)
        return dict(self._names)

    def site_of(self, node: NodeInfo) -> str | None:
        """The site a node was admitted as, or None when it was not admitted."""
        name = self.names().get(int(node.node_id))
        if name is None and node.public_key:
            name = self.keys.get(bytes(node.public_key))
        return name


class AdmittedGrid(Grid):
    """A Flower Grid that shows strategies only admitted nodes and sends only to them.

    Args:
        grid: the Grid the ServerApp was given.
        admission: who is admitted.
        on_unadmitted: called once per node that is online without being admitted.
    """

    def __init__(self, grid: Grid, admission: Admission,
                 on_unadmitted: Callable[[int], None] | None = None) -> None:
        self.grid = grid
        self.admission = admission
        self.on_unadmitted = on_unadmitted
        self._admitted: dict[int, str] = {}
        self._refused: set[int] = set()

    # -- what strategies see ---------------------------------------------------------------

    def get_nodes(self) -> Iterable[NodeInfo]:
        get_nodes = getattr(self.grid, "get_nodes", None)
        nodes = (list(get_nodes()) if get_nodes is not None
                 else [NodeInfo(node_id=n) for n in self.grid.get_node_ids()])
        out = []
        for node in nodes:
            name = self.admission.site_of(node)
            if name is not None:
                self._admitted[int(node.node_id)] = name
                out.append(node)
            elif int(node.node_id) not in self._refused:
                self._refused.add(int(node.node_id))
                log.warning("node %s is online but its key was not admitted: it is not sampled "
                            "and its replies are dropped", node.node_id)
                if self.on_unadmitted is not None:
                    self.on_unadmitted(int(node.node_id))
        return out

    def get_node_ids(self) -> Iterable[int]:
        return [int(n.node_id) for n in self.get_nodes()]

    def is_admitted(self, node_id: int) -> bool:
        return int(node_id) in self._admitted or int(node_id) in self.admission.names()

    def names(self) -> dict[int, str]:
        """Node id -> the site name it was admitted as."""
        return {**self._admitted, **self.admission.names()}

    # -- sending ---------------------------------------------------------------------------

    def _only_admitted(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        for msg in messages:
            if self.is_admitted(msg.metadata.dst_node_id):
                out.append(msg)
            else:
                log.warning("not sending to node %s: its key was not admitted",
                            msg.metadata.dst_node_id)
        return out

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self._only_admitted(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(self._only_admitted(messages), timeout=timeout)

    # -- the rest is the wrapped grid's ----------------------------------------------------

    def set_run(self, run) -> None:  # noqa: ANN001 (flwr.supercore.run.Run)
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)
