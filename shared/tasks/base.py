"""The Task seam: what every federated task (segmentation, harmonisation) offers both sides.

Task code is plain PyTorch/MONAI and imports no Flower, so the same code serves federated,
local and pooled runs and is unit-testable without a runtime. It follows ``monai.fl``'s
``ClientAlgo`` split: build the model, say how one local step updates it (its phases),
evaluate, say what is shared. The loops that run the phases are not the task's:
:func:`fedscan.shared.tasks.loop.train_steps` (plain) and ``client/privacy.py`` (DP-SGD).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import nn

from fedscan.shared.data import Case


@dataclass
class TrainResult:
    """What one local training call did.

    Attributes:
        loss: mean training loss over the steps taken.
        num_examples: training cases available (the aggregation weight).
        steps: optimiser steps actually taken.
    """

    loss: float
    num_examples: int
    steps: int


@dataclass
class EvalResult:
    """Evaluation of one model on a set of cases.

    Attributes:
        metrics: mean over cases, e.g. ``{"dice": 0.93, "hd95": 4.1}``.
        num_examples: number of cases evaluated (the aggregation weight).
        per_case: per-case metrics keyed by case id. Never leaves a hospital; only the
            server's own test sets report it.
    """

    metrics: dict[str, float]
    num_examples: int
    per_case: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSpec:
    """One evaluation metric a task reports (history, aggregation, report, plots, validation
    and the status page iterate over these; nothing outside ``shared/tasks/`` names a metric).

    Per-class values travel as separate keys ``f"{name}/{class_name}"`` (class names from the
    data contract's ``labels``), each validated against the same range.

    Attributes:
        name: key in :attr:`EvalResult.metrics` and in evaluation replies.
        higher_is_better: direction (Dice: True, HD95: False).
        low, high: the valid range, inclusive; a site reporting a value outside it (or a
            non-finite one) is rejected by the server. None: unbounded on that side.
        per_class: the task also reports ``name/<class>`` for each foreground class.
        headline: the run's main number (exactly one metric per task).
        unit: shown after values in reports (``"mm"``, ``"dB"``), or empty.
        aggregate: the case-weighted mean over sites is meaningful (history and summary
            average it); False keeps the metric per site only.
        description: one sentence for readers of the report.
    """

    name: str
    higher_is_better: bool
    low: float | None = None
    high: float | None = None
    per_class: bool = False
    headline: bool = False
    unit: str = ""
    aggregate: bool = True
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The spec as summary.json stores it (``metrics``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MetricSpec:
        """A spec from :meth:`to_dict`'s output; unknown keys are ignored (newer writers)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def label(self) -> str:
        """``"hd95 (mm)"``: the name with its unit, for axes and table headers."""
        return f"{self.name} ({self.unit})" if self.unit else self.name

    def accepts(self, value: object) -> bool:
        """Whether ``value`` is a finite number inside this metric's range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value):
            return False
        return ((self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))


def metric_spec(specs: Iterable[MetricSpec], key: str) -> MetricSpec | None:
    """The spec a reply key belongs to: ``dice`` and ``dice/<class>`` both map to ``dice``."""
    base = key.split("/", 1)[0]
    return next((s for s in specs if s.name == base and (s.per_class or "/" not in key)), None)


def metric_keys(specs: Iterable[MetricSpec], keys: Iterable[str]) -> list[str]:
    """The keys among ``keys`` that some spec declares, in spec order, each spec's own key
    first and its per-class keys (``name/<class>``) after it, sorted."""
    keys = set(keys)
    out = []
    for spec in specs:
        if spec.name in keys:
            out.append(spec.name)
        if spec.per_class:
            out += sorted(k for k in keys if k.startswith(f"{spec.name}/"))
    return out


def headline(specs: Iterable[MetricSpec]) -> MetricSpec | None:
    """The spec marked ``headline`` (else the first; None for no specs)."""
    specs = list(specs)
    return next((s for s in specs if s.headline), specs[0] if specs else None)


#: Called after every optimiser step with (step, steps, loss) for progress reporting.
StepCallback = Callable[[int, int, float], None]

#: ``(model, batch) -> per-sample losses`` of shape ``(B,)``; item i may depend on batch item
#: i and on public data only, never on another private case (per-sample clipping needs it).
PhaseLoss = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class Phase:
    """One optimiser update within a local step: which parameters it moves, by which loss.

    Segmentation has one phase (the UNet, Dice+CE); a CycleGAN has two (generators, then
    discriminators). A DP site clips and noises each phase's per-sample gradients on its own
    fresh Poisson batch, so every phase update is one step of the site's accountant.

    Attributes:
        name: e.g. ``"generators"``.
        params: the parameters this phase updates (the others are held fixed).
        loss: per-sample losses of a batch, see :data:`PhaseLoss`.
        after_update: called after each of this phase's optimiser updates (e.g. to fold the
            new weights into a moving average), or None.
    """

    name: str
    params: list[nn.Parameter]
    loss: PhaseLoss
    after_update: Callable[[], None] | None = None


class Task(Protocol):
    """Interface both sides use. A new task is a new module under ``shared/tasks/`` (see
    :mod:`fedscan.shared.tasks` for how a config names it).

    A task is built from the run's :class:`~fedscan.shared.config.Config` (``Task(cfg)``);
    its constructor raises :class:`~fedscan.shared.errors.ConfigError` for keys it cannot use.
    """

    name: str
    #: What :meth:`evaluate` reports (see :class:`MetricSpec`).
    metrics: tuple[MetricSpec, ...]

    def build_model(self) -> nn.Module:
        """A freshly initialised model (deterministic for the config's seed)."""

    def make_train_loader(self, cases: list[Case], seed: int) -> torch.utils.data.DataLoader:
        """Map-style loader with one item per training case (Poisson sampling over cases
        under DP); items are dicts of batch-first tensors."""

    def make_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The configured local optimiser."""

    def evaluate(self, model: nn.Module, cases: list[Case]) -> EvalResult:
        """Evaluate on ``cases`` in each case's native grid."""

    def shared_keys(self, model: nn.Module) -> list[str]:
        """State-dict keys that leave the site; the rest stay local."""

    def phases(self, model: nn.Module) -> list[Phase]:
        """The updates of one local step, in order (what DP-SGD clips and noises)."""


def proximal_hook(optimizer: torch.optim.Optimizer, mu: float,
                  shared: Iterable[nn.Parameter] | None = None):
    """FedProx: add ``mu * (w - w0)`` to each gradient right before the optimiser's update.

    ``w0`` are the weights when the hook is made (the received global model). Under DP the
    caller hooks the optimiser that the DP optimiser wraps, so the data-independent term lands
    after clipping and noise, where it belongs (a loss term would be missed by per-sample
    gradients). Parameters without a gradient are not part of this update (one optimiser
    serving several phases, e.g. a CycleGAN's generators and discriminators) and get no pull.

    Args:
        optimizer: the optimiser to hook (under DP, the one the DP optimiser wraps).
        mu: FedProx's proximal weight.
        shared: the parameters the server averages (:func:`shared_params`); the optimiser's
            others (weights kept at the site) have no global model to stay close to. None:
            all of the optimiser's parameters.

    Returns:
        The hook handle (``.remove()`` it after the round).
    """
    keep = None if shared is None else {id(p) for p in shared}
    params = [p for group in optimizer.param_groups for p in group["params"]
              if keep is None or id(p) in keep]
    anchors = [p.detach().clone() for p in params]

    def add_proximal_grad(*_: object) -> None:
        with torch.no_grad():
            for p, w0 in zip(params, anchors, strict=True):
                if p.grad is not None:
                    p.grad.add_((p - w0).mul_(mu))

    return optimizer.register_step_pre_hook(add_proximal_grad)


def shared_params(task: Task, model: nn.Module) -> list[nn.Parameter]:
    """The parameters behind ``task.shared_keys(model)``."""
    keys = set(task.shared_keys(model))
    return [p for name, p in model.named_parameters() if name in keys]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without gradients; its train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
