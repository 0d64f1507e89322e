"""The federated round loop, resumable from any completed round.

Flower's ``Strategy.start`` always begins at round 1 and keeps its state in memory, so a
server that crashes after round k would repeat rounds 1..k. This loop calls the same strategy
methods (``configure_train``/``aggregate_train``/``configure_evaluate``/``aggregate_evaluate``)
for rounds ``first..last`` and hands every completed round to a callback that checkpoints it;
:func:`load_resume_point` finds the last completed round of a run folder. Simulation and
deployment both run through here, so there is one code path.

It also counts the bytes each site receives and sends per round (the serialized Flower
objects of each message, i.e. what crosses the network, apart from HTTP framing).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedscan.server.admission import AdmittedGrid
from fedscan.shared.checkpoint import load_model
from fedscan.shared.error_codes import describe_error
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import SITE, RoundConfig, message_bytes, reply_site, site_record

log = logging.getLogger("fedscan.server")

#: Strategy attributes that carry state across rounds (FedOpt moments, adaptive DP clipping
#: norm). ``current_arrays`` is not listed: strategies reset it from the arrays each round.
STATE_ATTRS = ("m_t", "v_t", "clipping_norm")


class RoundFailed(RuntimeError):
    """No site answered a round's training validly (errors, rejections); the run stops there.

    The round is not counted as completed, so ``--resume`` repeats it.
    """


def model_fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size of a model's weights stored as fp32 (4 bytes per value)."""
    return sum(int(v.numel()) * 4 for v in state.values())


def _chain(strategy: Strategy) -> list[Strategy]:
    """The strategy and the strategies it wraps (recording, DP wrappers, the base strategy)."""
    out, seen = [], set()
    while strategy is not None and id(strategy) not in seen:
        out.append(strategy)
        seen.add(id(strategy))
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return out


def strategy_state(strategy: Strategy) -> list[dict[str, Any]]:
    """State of every strategy in the chain that a restart would otherwise lose."""
    state = []
    for s in _chain(strategy):
        entry: dict[str, Any] = {}
        for attr in STATE_ATTRS:
            value = getattr(s, attr, None)
            if isinstance(value, dict):
                entry[attr] = {k: torch.from_numpy(np.array(v)) for k, v in value.items()}
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[attr] = float(value)
        state.append(entry)
    return state


def restore_strategy_state(strategy: Strategy, state: list[dict[str, Any]]) -> None:
    """Put state saved by :func:`strategy_state` back into the same strategy chain."""
    for s, entry in zip(_chain(strategy), state, strict=False):
        for attr, value in entry.items():
            if isinstance(value, dict):
                value = {k: v.numpy() for k, v in value.items()}
            setattr(s, attr, value)


def save_strategy_state(out_dir: Path, rnd: int, strategy: Strategy) -> Path:
    """Write ``checkpoints/strategy_NNN.pt`` (before the round's model checkpoint)."""
    path = out_dir / "checkpoints" / f"strategy_{rnd:03d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save({"round": rnd, "chain": strategy_state(strategy)}, tmp)
    tmp.replace(path)
    return path


def load_resume_point(out_dir: Path) -> tuple[int, dict[str, torch.Tensor], list, dict] | None:
    """The last completed round of a run folder, or None when it has none.

    A round counts as completed when summary.json lists it as finished and its checkpoint
    exists; both are written at the end of the round, the checkpoint first.

    Returns:
        ``(round, global weights, strategy state, summary)``.
    """
    summary_path = out_dir / "summary.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    done = sorted(r["round"] for r in summary.get("rounds", []) if r.get("seconds") is not None
                  and (out_dir / "checkpoints" / f"round_{r['round']:03d}.pt").is_file())
    if not done:
        return None
    last = done[-1]
    _, state_dict, _ = load_model(out_dir / "checkpoints" / f"round_{last:03d}.pt")
    strategy_path = out_dir / "checkpoints" / f"strategy_{last:03d}.pt"
    chain = (torch.load(strategy_path, weights_only=True)["chain"]
             if strategy_path.is_file() else [])
    return last, state_dict, chain, summary


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    rounds: Iterable[int],
    timeout: float,
    train_config: RoundConfig,
    evaluate_config: RoundConfig,
    history: RunHistory,
    on_round_end: Callable[[int, ArrayRecord], None],
    expected_sites: int = 0,
    site_grace: float = 0.0,
    node_names: dict[int, str] | None = None,
) -> ArrayRecord:
    """Run ``rounds`` (e.g. ``range(k + 1, n + 1)``) and return the final global model.

    Mirrors Flower's ``Strategy.start`` loop, without its initial round-0 evaluation and with
    one model transfer per round each way: round r's train message also has the sites
    evaluate round r-1's model (``evaluate-received``), and one evaluate message after the
    last round evaluates the final model. Bytes are recorded per round as ``train_down`` /
    ``train_up`` and, for that last message, ``final_evaluate_down`` / ``_up``. Before
    each round it waits up to ``site_grace`` seconds for ``expected_sites`` to be online;
    after that the strategy starts the round with those connected (at least its minimum), so
    a site that is down does not stall the federation and one that comes back rejoins.
    """
    registered = dict(node_names or {})  # node id -> name its key was admitted under
    sites: dict[int, str] = dict(registered)  # ... plus names learned from replies
    admitted = grid if isinstance(grid, AdmittedGrid) else None

    def drop(rnd: int, phase: str, node: int, reason: str) -> None:
        site = sites.get(node, f"node-{node}")
        log.warning("round %d: dropped a %s reply from %s (node %s): %s", rnd, phase, site,
                    node, reason)
        history.record_rejection(rnd, site, phase, reason)

    def screen(rnd: int, phase: str, messages: list[Message], replies: list[Message]
               ) -> list[tuple[int, Message]]:
        """The replies that answer a message of this exchange from the node it was sent to
        (an admitted one), each node once; the others are dropped and recorded."""
        asked = {m.metadata.message_id: m for m in messages}
        kept: list[tuple[int, Message]] = []
        for reply in replies:
            src = int(reply.metadata.src_node_id)
            question = asked.get(reply.metadata.reply_to_message_id)
            if question is None:
                drop(rnd, phase, src, "answers no message sent in this exchange")
                continue
            node = int(question.metadata.dst_node_id)
            # Flower's own "node unavailable" replies come from the SuperLink, not the node.
            if src != node and not (reply.has_error() and src == SUPERLINK_NODE_ID):
                drop(rnd, phase, src, f"answers the message sent to node {node}")
            elif admitted is not None and not admitted.is_admitted(src) and src == node:
                drop(rnd, phase, src, "node not admitted by the operator")
            elif reply.metadata.message_type != question.metadata.message_type:
                drop(rnd, phase, node, "reply of another message type")
            else:
                kept.append((node, reply))
        counts = Counter(node for node, _ in kept)
        for node, n in counts.items():
            if n > 1:
                drop(rnd, phase, node, f"answered {n} times; none of its replies is used")
        return [(node, reply) for node, reply in kept if counts[node] == 1]

    def name_reply(node: int, reply: Message) -> None:
        declared = reply_site(reply)
        if node in registered:
            if declared != registered[node]:
                # The key's registered name wins over what the reply claims.
                log.warning("node %s registered as %r declares %r; recorded as %r", node,
                            registered[node], declared, registered[node])
                reply.content[SITE] = site_record(registered[node])
        elif any(s == declared and n != node for n, s in sites.items()):
            # Another node already answers as this site: never mix two nodes' records.
            log.warning("node %s declares %r, the name of another node; recorded as "
                        "node-%s", node, declared, node)
            reply.content[SITE] = site_record(f"node-{node}")
        sites[node] = reply_site(reply)

    def exchange(rnd: int, phase: str, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        sent = {m.metadata.dst_node_id: message_bytes(m) for m in messages}
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        answered = set()
        kept = []
        for node, reply in screen(rnd, phase, messages, replies):
            answered.add(node)
            kept.append(reply)
            if reply.has_error():
                # A fixed text per code: nothing the site wrote reaches summary.json.
                history.record_error(rnd, sites.get(node, f"node-{node}"), phase,
                                     describe_error(reply.error.code, reply.error.reason))
            else:
                name_reply(node, reply)
                history.record_bytes(rnd, sites[node], f"{phase}_up", message_bytes(reply))
        for node, n in sent.items():
            site = sites.get(node, f"node-{node}")
            history.record_bytes(rnd, site, f"{phase}_down", n)
            if node not in answered:
                history.record_error(rnd, site, phase, f"no valid reply within {timeout:.0f}s")
        return kept

    last = None
    for rnd in rounds:
        if admitted is not None:  # keys admitted while the server runs join this round
            registered.update(admitted.names())
            sites.update(registered)
        deadline = time.monotonic() + site_grace
        while (len(list(grid.get_node_ids())) < expected_sites
               and time.monotonic() < deadline):
            time.sleep(1.0)
        log.info("round %d: train (%d sites online)", rnd, len(list(grid.get_node_ids())))
        # From round 2 on, the received model is round rnd-1's aggregate: the sites evaluate
        # it before training, so the model crosses the network once per round each way.
        config = dataclasses.replace(train_config, evaluate_received=rnd > 1).to_record()
        replies = exchange(rnd, "train", strategy.configure_train(rnd, arrays, config, grid))
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        trained = next((r["train"] for r in history.rounds if r["round"] == rnd), {})
        # A simulated consortium's round may lose every site (dropouts, cut stragglers).
        if new_arrays is None and not trained and not getattr(strategy, "empty_rounds_ok",
                                                                 False):
            # No site trained or declined validly (all errors or rejections): stop here.
            history.write_summary()  # keep the round's errors and rejections on record
            raise RoundFailed(f"round {rnd}: no update aggregated (errors and rejections are "
                              f"in summary.json); fix the sites and continue with --resume")
        if new_arrays is None:  # sites answered but none changed the model (DP budgets spent)
            log.warning("round %d: no update aggregated; the global model is unchanged", rnd)
        else:
            arrays = new_arrays
        on_round_end(rnd, arrays)
        last = rnd
    if last is not None:
        # The final model is the only one not evaluated by a following train message.
        log.info("round %d: final evaluation", last)
        replies = exchange(last, "final_evaluate",
                           strategy.configure_evaluate(last, arrays, evaluate_config.to_record(),
                                                       grid))
        strategy.aggregate_evaluate(last, replies)
    return arrays
