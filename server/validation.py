"""Update validation: replies are checked before the strategy sees them.

Flower's strategies raise ``InconsistentMessageReplies`` (and end the run) when one reply has
other keys than the rest, and plain FedAvg averages NaN into the global model. A consortium
cannot let one hospital's broken (or malicious) reply end a run for everyone, so every train
reply is checked against the model's specification and the global model it was sent, and every
evaluate reply against the shape the others agree on. Rejected replies are dropped and
recorded with a reason; the round goes on with the rest.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedscan.shared.messages import ARRAYS, NUM_EXAMPLES, reply_site

log = logging.getLogger("fedscan.server")

#: An update whose distance to the global model is this many times the median of the other
#: sites' distances is rejected (a scaled or poisoned update, or a diverged site).
NORM_RATIO = 10.0
#: Distances below this are never "far above the others" (all sites barely moved).
NORM_FLOOR = 1e-6


@dataclass
class Rejection:
    """A reply that was not aggregated, and why."""

    site: str
    node_id: int
    reason: str


def _spec(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in
            ((k, v.detach().cpu()) for k, v in state.items())}


class UpdateValidator:
    """Checks train and evaluate replies; keeps the valid ones.

    Args:
        model_state: the model's state dict (keys, shapes and dtypes every update must match).
        norm_ratio: reject an update whose distance to the global model exceeds this multiple
            of the median distance of the other updates.
        min_valid: fewer valid updates than this and none is aggregated.
    """

    def __init__(self, model_state: Mapping[str, torch.Tensor],
                 norm_ratio: float = NORM_RATIO, min_valid: int = 1) -> None:
        self.spec = _spec(model_state)
        self.norm_ratio = norm_ratio
        self.min_valid = min_valid

    # -- train ------------------------------------------------------------------------------

    def _check_arrays(self, msg: Message) -> str | None:
        records = msg.content.array_records
        if list(records) != [ARRAYS]:
            return f"expected exactly one ArrayRecord {ARRAYS!r}, got {sorted(records)}"
        arrays = records[ARRAYS]
        keys = set(arrays.keys())
        if keys != set(self.spec):
            missing, extra = sorted(set(self.spec) - keys), sorted(keys - set(self.spec))
            return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
        for key, array in arrays.items():
            shape, dtype = self.spec[key]
            if tuple(array.shape) != shape:
                return f"wrong shape for {key}: {tuple(array.shape)}, expected {shape}"
            if array.dtype != dtype:
                return f"wrong dtype for {key}: {array.dtype}, expected {dtype}"
            values = array.numpy()
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"non-finite values in {key}"
        return None

    def _update_norms(self, replies: list[Message], reference: ArrayRecord) -> list[float]:
        ref = {k: v.numpy().astype(np.float64) for k, v in reference.items()}
        norms = []
        for msg in replies:
            total = 0.0
            for key, array in msg.content[ARRAYS].items():
                values = array.numpy()
                if values.dtype.kind != "f" or key not in ref:
                    continue
                total += float(np.sum((values.astype(np.float64) - ref[key]) ** 2))
            norms.append(math.sqrt(total))
        return norms

    def check_train(self, replies: list[Message], reference: ArrayRecord | None,
                    declined: int = 0) -> tuple[list[Message], list[Rejection]]:
        """Split train replies into valid ones and rejections.

        Args:
            replies: the round's replies (error replies are passed through untouched: the
                strategy counts them as failures).
            reference: the global model sent this round (for the update-norm check).
            declined: sites that answered but declined to train (privacy budget spent);
                they count towards the quorum, so one exhausted budget does not freeze the
                global model for everyone else.
        """
        ok: list[Message] = []
        errors: list[Message] = []
        rejected: list[Rejection] = []
        for msg in replies:
            if msg.has_error():
                errors.append(msg)
                continue
            reason = self._check_arrays(msg) or _check_metrics(msg)
            if reason:
                rejected.append(_reject(msg, reason))
            else:
                ok.append(msg)
        ok, more = _majority_metric_keys(ok)
        rejected += more
        if reference is not None and len(ok) >= 2:
            norms = self._update_norms(ok, reference)
            keep = []
            for i, msg in enumerate(ok):
                others = norms[:i] + norms[i + 1:]
                limit = self.norm_ratio * float(np.median(others))
                if norms[i] > max(limit, NORM_FLOOR):
                    rejected.append(_reject(
                        msg, f"update norm {norms[i]:.4g} is more than {self.norm_ratio:g}x the "
                             f"median of the others ({float(np.median(others)):.4g})"))
                else:
                    keep.append(msg)
            ok = keep
        needed = max(1, self.min_valid - declined)
        if len(ok) < needed:
            # Too few sites for a round to count (strategy.min_sites): keep the global model.
            rejected += [_reject(m, f"only {len(ok)} valid update(s); a round needs "
                                    f"{needed}") for m in ok]
            ok = []
        return ok + errors, rejected

    def conform(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the model's dtypes.

        Strategies compute in float64 (FedAdam's moments, FedAvg's int buffers); sending that
        back would double every download and change the dtype sites must return.
        """
        out = {}
        for key, array in arrays.items():
            values = array.numpy()
            dtype = self.spec[key][1] if key in self.spec else str(values.dtype)
            out[key] = torch.from_numpy(np.ascontiguousarray(values.astype(dtype, copy=False)))
        return ArrayRecord(out)

    # -- evaluate ---------------------------------------------------------------------------

    def check_evaluate(self, replies: list[Message]) -> tuple[list[Message], list[Rejection]]:
        """Split evaluate replies into ones Flower can aggregate and rejections."""
        ok, errors, rejected = [], [], []
        for msg in replies:
            if msg.has_error():
                errors.append(msg)
                continue
            reason = None
            if msg.content.array_records:
                reason = "evaluate reply carries arrays"
            reason = reason or _check_metrics(msg)
            if reason:
                rejected.append(_reject(msg, reason))
            else:
                ok.append(msg)
        ok, more = _majority_metric_keys(ok)
        return ok + errors, rejected + more


def _check_metrics(msg: Message) -> str | None:
    records = msg.content.metric_records
    if len(records) != 1:
        return f"expected exactly one MetricRecord, got {len(records)}"
    return check_evaluation(dict(next(iter(records.values())).items()))


def check_evaluation(record: dict) -> str | None:
    """Why a site's evaluation metrics are unusable (no positive example count, an infinite
    value), or None when they are fine."""
    n = record.get(NUM_EXAMPLES)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not n > 0:
        return f"{NUM_EXAMPLES!r} must be a positive number, got {n!r}"
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and math.isinf(v) for v in values):
            return f"infinite metric {key!r}"
    return None


def _majority_metric_keys(replies: list[Message]) -> tuple[list[Message], list[Rejection]]:
    """Keep replies whose metric keys match the most common key set (Flower requires one)."""
    if len(replies) < 2:
        return replies, []

    def keys(msg: Message) -> tuple[str, ...]:
        return tuple(sorted(next(iter(msg.content.metric_records.values())).keys()))

    counts = Counter(keys(m) for m in replies)
    # Ties go to the key set seen first, so the outcome does not depend on set ordering.
    best = max(counts, key=lambda k: (counts[k], -[keys(m) for m in replies].index(k)))
    ok = [m for m in replies if keys(m) == best]
    rejected = [_reject(m, f"metric keys {list(keys(m))} differ from the others' {list(best)}")
                for m in replies if keys(m) != best]
    return ok, rejected


def _reject(msg: Message, reason: str) -> Rejection:
    site = reply_site(msg)
    log.warning("rejected reply from %s (node %s): %s", site, msg.metadata.src_node_id, reason)
    return Rejection(site=site, node_id=int(msg.metadata.src_node_id), reason=reason)
