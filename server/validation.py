"""Reply validation: every reply is checked before it reaches the strategy, history or report.

Flower's strategies raise ``InconsistentMessageReplies`` (and end the run) when one reply has
other keys than the rest, plain FedAvg averages NaN into the global model, and nothing bounds
what a site claims. A consortium cannot let one hospital's broken (or malicious) reply end a
run, own the average or fake its scores, so:

1. **Each reply on its own** (:meth:`UpdateValidator.check_reply`): only the records a reply may
   carry, of the right kind; the model's keys, shapes and dtypes, finite values; train metrics
   with known keys whose counts (``num-examples``, ``samples``, ``steps``) are finite whole
   numbers within :data:`MAX_COUNT` and the site's declared ``max_examples``; evaluation
   metrics (an evaluate reply's, or the ``evaluation`` record of a train reply) that the task
   declares (:class:`~fedscan.shared.tasks.base.MetricSpec`), inside their valid range; a
   readable site name. A reply that fails any check is rejected whole: a site that lies about
   its scores is not trusted with the model either.
2. **Against the round** (:meth:`UpdateValidator.select_train`): the metric keys most replies
   agree on; an update whose distance to the global model exceeds ``max_norm_ratio`` times the
   median of the other sites' distances is rejected; every update is clipped to ``clip_norm``
   (the round's median distance by default), so a site within the ratio still moves the model
   no further than a typical one; a site's aggregation weight is capped at
   ``max_weight_ratio`` times the round's median weight unless the operator declared its
   cases.

Rejected replies are dropped and recorded with a reason, capped weights are recorded as
adjustments; the round goes on with the rest.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from fedscan.shared.config import Config
from fedscan.shared.messages import (
    ARRAYS,
    DECLINED,
    EVALUATE_REPLY_RECORDS,
    EVALUATION,
    MAX_SITE_NAME,
    METRICS,
    NUM_EXAMPLES,
    PRIVACY,
    SAMPLES,
    SITE,
    TRAIN_METRICS,
    TRAIN_REPLY_RECORDS,
    reply_site,
)
from fedscan.shared.tasks.base import MetricSpec, metric_spec

log = logging.getLogger("fedscan.server")

#: Defaults of ``strategy.max_norm_ratio`` / ``max_weight_ratio`` / ``clip_norm``.
NORM_RATIO = 3.0
WEIGHT_RATIO = 3.0
CLIP_NORM = "median"
#: Distances below this are never "far above the others" (all sites barely moved).
NORM_FLOOR = 1e-6
#: No hospital holds ten million cases for one model: a larger count is a bug or a lie.
MAX_COUNT = 10_000_000
#: Bounds on the free-form parts of a reply (site name, metric keys, privacy fields), so a
#: reply cannot flood logs, summary.json or the report.
MAX_NAME = MAX_SITE_NAME
MAX_KEYS = 64
MAX_TEXT = 64


@dataclass
class Rejection:
    """A reply that was not aggregated (or a note that was not recorded), and why."""

    site: str
    node_id: int
    reason: str


@dataclass
class Adjustment:
    """A reply that was used with less influence than it asked for (a capped weight)."""

    site: str
    node_id: int
    reason: str


def _spec(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in
            ((k, v.detach().cpu()) for k, v in state.items())}


def declined_reply(msg: Message) -> bool:
    """A train reply of a site that declined to train (its privacy budget is spent): no
    examples, privacy status ``declined``."""
    try:
        records = msg.content.config_records
        return (PRIVACY in records and records[PRIVACY].get("status") == DECLINED
                and msg.content.metric_records[METRICS].get(NUM_EXAMPLES) == 0)
    except Exception:  # a malformed reply is not a declined one (it is rejected)
        return False


def valid_name(name: object) -> bool:
    """A site or key name safe to log and record: printable text of bounded length."""
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and name.isprintable()


def check_count(value: object, key: str, limit: int | None = None,
                positive: bool = True) -> str | None:
    """Why ``value`` is not a usable count (a finite whole number in ``[1, limit]``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key!r} must be a number, got {type(value).__name__}"
    if not math.isfinite(value) or value != int(value):
        return f"{key!r} must be a finite whole number, got {value!r}"
    if value < (1 if positive else 0):
        return f"{key!r} must be {'positive' if positive else '>= 0'}, got {value!r}"
    if value > MAX_COUNT:
        return f"{key!r} = {value:g} is absurd (more than {MAX_COUNT:,})"
    if limit is not None and value > limit:
        return f"{key!r} = {value:g} exceeds the {limit} cases this site was admitted with"
    return None


def check_evaluation(record: Mapping[str, Any], specs: Sequence[MetricSpec] | None = None,
                     limit: int | None = None) -> str | None:
    """Why a site's evaluation metrics are unusable, or None when they are fine.

    Args:
        record: the metrics as sent (``num-examples`` and one value per metric key).
        specs: the task's metrics; a key none of them declares is rejected, and each value
            must lie in its metric's range (NaN is allowed for a metric that is not the
            task's headline: undefined, e.g. HD95 with no foreground; it is stored as null
            and left out of means). None: only counts and finiteness are checked.
        limit: the most cases the site may report (its declared ``max_examples``).
    """
    if NUM_EXAMPLES not in record:
        return f"no {NUM_EXAMPLES!r}"
    reason = check_count(record[NUM_EXAMPLES], NUM_EXAMPLES, limit)
    if reason:
        return reason
    if len(record) > MAX_KEYS:
        return f"{len(record)} metric keys (at most {MAX_KEYS})"
    for key, value in record.items():
        if key == NUM_EXAMPLES:
            continue
        if not valid_name(key):
            return "unreadable metric key"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {key!r} is not a number ({type(value).__name__})"
        if specs is None:
            if math.isinf(value):
                return f"infinite metric {key!r}"
            continue
        spec = metric_spec(specs, key)
        if spec is None:
            return f"unknown metric {key!r} (this task reports {[s.name for s in specs]})"
        if math.isnan(value) and not spec.headline:
            continue
        if not spec.accepts(value):
            low = "-inf" if spec.low is None else f"{spec.low:g}"
            high = "inf" if spec.high is None else f"{spec.high:g}"
            return f"metric {key!r} = {value!r} outside its range [{low}, {high}]"
    return None


class UpdateValidator:
    """Checks train and evaluate replies; keeps the valid ones.

    The server builds it with :meth:`from_config`; the keyword defaults are the product's.

    Args:
        model_state: the shared weights (keys, shapes and dtypes every update must match).
        norm_ratio: reject an update whose distance to the global model exceeds this multiple
            of the median distance of the other updates (``inf``: never).
        min_valid: fewer valid updates than this and none is aggregated.
        metrics: the task's evaluation metrics (None: unknown keys are not rejected).
        max_examples: site name -> the most cases it may report (operator-declared).
        weight_key: the metric that weighs updates (``num-examples`` or ``samples``).
        weight_ratio: cap a weight at this multiple of the round's median weight (``inf``: no
            cap); a site with a declared ``max_examples`` is bounded by that instead when
            weights are case counts.
        clip_norm: clip every update to this distance from the global model: ``"median"``
            (the round's median distance), a number, or None (no clipping).
    """

    def __init__(self, model_state: Mapping[str, torch.Tensor],
                 norm_ratio: float = NORM_RATIO, min_valid: int = 1, *,
                 metrics: Sequence[MetricSpec] | None = None,
                 max_examples: Mapping[str, int] | None = None,
                 weight_key: str = NUM_EXAMPLES, weight_ratio: float = WEIGHT_RATIO,
                 clip_norm: float | str | None = CLIP_NORM) -> None:
        self.spec = _spec(model_state)
        self.norm_ratio = norm_ratio
        self.min_valid = min_valid
        self.metrics = tuple(metrics) if metrics is not None else None
        self.max_examples = dict(max_examples or {})
        self.weight_key = weight_key
        self.weight_ratio = weight_ratio
        self.clip_norm = clip_norm
        #: Per node of the last :meth:`select_train`: ``update_norm`` and, when clipped,
        #: ``clip_scale`` (recorded with the site's train metrics).
        self.notes: dict[int, dict[str, float]] = {}
        #: Weights capped by the last :meth:`select_train` or :meth:`check_evaluate`.
        self.adjustments: list[Adjustment] = []

    @classmethod
    def from_config(cls, model_state: Mapping[str, torch.Tensor], cfg: Config,
                    metrics: Sequence[MetricSpec] | None,
                    asked: int | None = None) -> UpdateValidator:
        """The validator of a run: ``strategy`` keys, the sites' ``max_examples``.

        A round counts with ``strategy.min_sites`` valid updates, or, when that is not set,
        with a majority of the ``asked`` sites (default: all of them): one dishonest (or
        broken) site, rejected every round, must not stop the others.
        """
        s = cfg.strategy
        asked = asked or len(cfg.sites)
        return cls(model_state, norm_ratio=s.max_norm_ratio,
                   min_valid=s.min_sites or asked // 2 + 1, metrics=metrics,
                   max_examples={site.name: site.max_examples for site in cfg.sites
                                 if site.max_examples is not None},
                   weight_key=SAMPLES if s.weighted_by == "samples" else NUM_EXAMPLES,
                   weight_ratio=s.max_weight_ratio, clip_norm=s.clip_norm)

    # -- one reply ------------------------------------------------------------------------------

    def check_reply(self, msg: Message, train: bool,
                    evaluation_expected: bool | None = None) -> str | None:
        """Why one (non-error) reply is unusable, or None.

        Args:
            msg: the reply.
            train: a train reply (else an evaluate reply).
            evaluation_expected: for train replies, whether the server asked for an
                ``evaluation`` record (an unrequested one is rejected); None: not checked.
        """
        try:
            return self._check_reply(msg, train, evaluation_expected)
        except Exception as exc:  # a reply too broken to inspect never stops the server
            return f"unreadable reply ({type(exc).__name__})"

    def _check_reply(self, msg: Message, train: bool,
                     evaluation_expected: bool | None) -> str | None:
        content = msg.content
        allowed = TRAIN_REPLY_RECORDS if train else EVALUATE_REPLY_RECORDS
        extra = [k for k in content if k not in allowed]
        if extra:
            shown = [k if valid_name(k) else "?" for k in extra[:3]]
            return f"unexpected records {shown} (a reply carries only {list(allowed)})"
        kinds = {ARRAYS: content.array_records, METRICS: content.metric_records,
                 SITE: content.config_records, PRIVACY: content.config_records,
                 EVALUATION: content.config_records}
        for name in content:
            if name not in kinds[name]:
                return f"record {name!r} is of the wrong kind"
        if SITE in content:
            site = content.config_records[SITE]
            if list(site.keys()) != ["name"] or not valid_name(site["name"]):
                return "unreadable site record"
        if METRICS not in content:
            return f"no {METRICS!r} record"
        limit = self.max_examples.get(reply_site(msg))
        if not train:
            return check_evaluation(dict(content.metric_records[METRICS]), self.metrics, limit)
        return (self._check_arrays(msg) or self._check_train_metrics(msg, limit)
                or self._check_privacy(msg) or self._check_received(msg, evaluation_expected,
                                                                    limit))

    def _check_arrays(self, msg: Message) -> str | None:
        records = msg.content.array_records
        if list(records) != [ARRAYS]:
            return f"expected exactly one ArrayRecord {ARRAYS!r}, got {len(records)}"
        arrays = records[ARRAYS]
        keys = set(arrays.keys())
        if keys != set(self.spec):
            missing = sorted(set(self.spec) - keys)
            extra = [k if valid_name(k) else "?" for k in sorted(keys - set(self.spec))]
            return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
        for key, array in arrays.items():
            shape, dtype = self.spec[key]
            if tuple(array.shape) != shape:
                return f"wrong shape for {key}: {tuple(array.shape)[:8]}, expected {shape}"
            if array.dtype != dtype:
                return f"wrong dtype for {key}: {str(array.dtype)[:20]}, expected {dtype}"
            values = array.numpy()  # raises (caught above) when the bytes do not fit the shape
            if values.shape != shape or str(values.dtype) != dtype:
                return f"array {key} does not decode to its declared shape and dtype"
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"non-finite values in {key}"
        return None

    def _check_train_metrics(self, msg: Message, limit: int | None) -> str | None:
        records = msg.content.metric_records
        if len(records) != 1:
            return f"expected exactly one MetricRecord, got {len(records)}"
        metrics = records[METRICS]
        unknown = [k for k in metrics if k not in TRAIN_METRICS]
        if unknown:
            shown = [k if valid_name(k) else "?" for k in unknown[:3]]
            return f"unknown train metrics {shown} (a train reply carries {list(TRAIN_METRICS)})"
        declined = declined_reply(msg)
        if NUM_EXAMPLES not in metrics:
            return f"no {NUM_EXAMPLES!r}"
        if self.weight_key not in metrics:
            return f"no {self.weight_key!r} (the aggregation weight)"
        for key in (NUM_EXAMPLES, SAMPLES, "steps"):
            if key in metrics:
                positive = key != "steps" and not declined
                reason = check_count(metrics[key], key, limit if key == NUM_EXAMPLES else None,
                                     positive=positive)
                if reason:
                    return reason
        loss = metrics.get("loss", 0.0)
        # NaN is what a DP site sends (its loss is not released); infinity is not a loss.
        if isinstance(loss, bool) or not isinstance(loss, (int, float)) or math.isinf(loss):
            return f"'loss' must be a number or NaN, got {loss!r}"
        return None

    def _check_privacy(self, msg: Message) -> str | None:
        if PRIVACY not in msg.content:
            return None
        record = msg.content.config_records[PRIVACY]
        if len(record) > MAX_KEYS:
            return f"privacy record with {len(record)} fields"
        for key, value in record.items():
            if not valid_name(key):
                return "unreadable privacy field"
            if isinstance(value, str):
                if len(value) > MAX_TEXT or not value.isprintable():
                    return f"privacy field {key!r} is not a short text"
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"privacy field {key!r} is not a number or text"
        return None

    def _check_received(self, msg: Message, expected: bool | None,
                        limit: int | None) -> str | None:
        """The ``evaluation`` record of a train reply (the received model's scores)."""
        if EVALUATION not in msg.content:
            return None
        if expected is False:
            return "evaluation record the server did not ask for"
        reason = check_evaluation(dict(msg.content.config_records[EVALUATION]), self.metrics,
                                  limit)
        return f"evaluation: {reason}" if reason else None

    # -- train ------------------------------------------------------------------------------

    def check_train(self, replies: list[Message], reference: ArrayRecord | None,
                    declined: int = 0) -> tuple[list[Message], list[Rejection]]:
        """Split train replies into valid ones and rejections (:meth:`check_reply` on each,
        then :meth:`select_train`).

        Args:
            replies: the round's replies (error replies are passed through untouched: the
                strategy counts them as failures).
            reference: the global model sent this round (for the update-norm checks).
            declined: sites that answered but declined to train (privacy budget spent);
                they count towards the quorum, so one exhausted budget does not freeze the
                global model for everyone else.
        """
        errors = [m for m in replies if m.has_error()]
        ok, rejected = [], []
        for msg in replies:
            if msg.has_error():
                continue
            reason = self.check_reply(msg, train=True)
            if reason:
                rejected.append(_reject(msg, reason))
            else:
                ok.append(msg)
        ok, more = self.select_train(ok, reference, declined)
        return ok + errors, rejected + more

    def select_train(self, replies: list[Message], reference: ArrayRecord | None,
                     declined: int = 0) -> tuple[list[Message], list[Rejection]]:
        """The well-formed train replies that go into the aggregate, clipped and capped.

        Args:
            replies: train replies that passed :meth:`check_reply` (no error replies).
            reference: the global model sent this round.
            declined: see :meth:`check_train`.
        """
        self.notes, self.adjustments = {}, []
        ok, rejected = _majority_metric_keys(replies)
        if reference is not None and ok:
            ok, more = self._bound_norms(ok, reference)
            rejected += more
        if len(ok) >= 2:
            self._cap_weights([(m, m.content[METRICS]) for m in ok], self.weight_key)
        needed = max(1, self.min_valid - declined)
        if len(ok) < needed:
            # Too few sites for a round to count (strategy.min_sites): keep the global model.
            rejected += [_reject(m, f"only {len(ok)} valid update(s); a round needs "
                                    f"{needed}") for m in ok]
            ok = []
        return ok, rejected

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

    def _bound_norms(self, replies: list[Message], reference: ArrayRecord
                     ) -> tuple[list[Message], list[Rejection]]:
        """Reject updates far above the others' distance; clip the rest to ``clip_norm``."""
        norms = self._update_norms(replies, reference)
        for msg, norm in zip(replies, norms, strict=True):
            self.notes[int(msg.metadata.src_node_id)] = {"update_norm": norm}
        keep, kept_norms, rejected = [], [], []
        for i, msg in enumerate(replies):
            others = norms[:i] + norms[i + 1:]
            median = float(np.median(others)) if others else math.inf
            if norms[i] > max(self.norm_ratio * median, NORM_FLOOR):
                rejected.append(_reject(
                    msg, f"update norm {norms[i]:.4g} is more than {self.norm_ratio:g}x the "
                         f"median of the others ({median:.4g})"))
            else:
                keep.append(msg)
                kept_norms.append(norms[i])
        if self.clip_norm is None or not keep:
            return keep, rejected
        bound = (float(np.median(kept_norms)) if self.clip_norm == "median"
                 else float(self.clip_norm))
        for msg, norm in zip(keep, kept_norms, strict=True):
            if norm > bound * (1 + 1e-9) and norm > 0:
                self._scale_update(msg, reference, bound / norm)
                self.notes[int(msg.metadata.src_node_id)]["clip_scale"] = bound / norm
        return keep, rejected

    @staticmethod
    def _scale_update(msg: Message, reference: ArrayRecord, scale: float) -> None:
        """Replace the reply's weights by ``reference + scale * (weights - reference)``."""
        out = {}
        for key, array in msg.content[ARRAYS].items():
            values = array.numpy()
            if values.dtype.kind == "f":
                ref = reference[key].numpy().astype(np.float64)
                values = (ref + scale * (values.astype(np.float64) - ref)).astype(values.dtype)
            out[key] = torch.from_numpy(np.ascontiguousarray(values))
        msg.content[ARRAYS] = ArrayRecord(out)

    def _cap_weights(self, entries: list[tuple[Message, Any]], key: str) -> None:
        """Cap each entry's ``record[key]`` at ``weight_ratio`` x the round's median weight.

        The median over all of the round's sites (one claim cannot move it with three or
        more) is the typical site; a site the operator declared is bounded by that instead.
        """
        if not math.isfinite(self.weight_ratio):
            return
        claimed = [float(record[key]) for _, record in entries]
        median = statistics.median(claimed)
        cap = max(1, int(self.weight_ratio * median))
        for (msg, record), value in zip(entries, claimed, strict=True):
            if key == NUM_EXAMPLES and reply_site(msg) in self.max_examples:
                continue  # the operator's declaration bounds it (checked per reply)
            if value > cap:
                record[key] = cap
                adjustment = Adjustment(
                    reply_site(msg), int(msg.metadata.src_node_id),
                    f"{key} {value:g} capped at {cap} ({self.weight_ratio:g}x the round's "
                    f"median, {median:g})")
                log.warning("capped %s's weight: %s", adjustment.site, adjustment.reason)
                self.adjustments.append(adjustment)

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
        """Split evaluate replies into ones Flower can aggregate and rejections; cap the
        case counts that weigh them (:attr:`adjustments`)."""
        self.adjustments = []
        ok, errors, rejected = [], [], []
        for msg in replies:
            if msg.has_error():
                errors.append(msg)
                continue
            reason = self.check_reply(msg, train=False)
            if reason:
                rejected.append(_reject(msg, reason))
            else:
                ok.append(msg)
        ok, more = _majority_metric_keys(ok)
        if len(ok) >= 2:
            self._cap_weights([(m, m.content[METRICS]) for m in ok], NUM_EXAMPLES)
        return ok + errors, rejected + more

    def cap_evaluations(self, entries: list[tuple[Message, dict[str, Any]]]) -> None:
        """Cap the ``num-examples`` of evaluation records carried by train replies."""
        self.adjustments = []
        if len(entries) >= 2:
            self._cap_weights(entries, NUM_EXAMPLES)


def _majority_metric_keys(replies: list[Message]) -> tuple[list[Message], list[Rejection]]:
    """Keep replies whose metric keys match the most common key set (Flower requires one)."""
    if len(replies) < 2:
        return replies, []

    def keys(msg: Message) -> tuple[str, ...]:
        return tuple(sorted(msg.content[METRICS].keys()))

    order = [keys(m) for m in replies]
    counts = Counter(order)
    # Ties go to the key set seen first, so the outcome does not depend on set ordering.
    best = max(counts, key=lambda k: (counts[k], -order.index(k)))
    ok = [m for m, k in zip(replies, order, strict=True) if k == best]
    rejected = [_reject(m, f"metric keys {list(k)} differ from the others' {list(best)}")
                for m, k in zip(replies, order, strict=True) if k != best]
    return ok, rejected


def _reject(msg: Message, reason: str) -> Rejection:
    site = reply_site(msg)
    log.warning("rejected reply from %s (node %s): %s", site, msg.metadata.src_node_id, reason)
    return Rejection(site=site, node_id=int(msg.metadata.src_node_id), reason=reason)
