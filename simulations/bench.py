"""Benchmarks of differential privacy: what DP-SGD costs in time and in Dice.

- :func:`dp_overhead`: time of one DP-SGD step against one plain step for the default model,
  patch and batch, for fedscan's micro-batch per-sample gradients (the sites' mode, in
  parallel threads and one case after another) and each per-sample-gradient mode Opacus
  offers, with each mode's clipped update checked against Opacus' hooks mode (noise 0) so
  only exact modes count; and the same ratio for whole training steps (data loading
  included) as a site runs them.
- :func:`dp_utility`: the default federation at ε ∈ {1, 3, 8, ∞}, final Dice and its ratio to
  the non-private run.

Opacus is used only through the client side (``client/privacy.py``), where it lives.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.losses import DiceCELoss
from torch import nn

from fedscan.shared.config import Config

#: Per-sample gradient modes tried: fedscan's micro-batches (threads as the sites run them, and
#: one case at a time), then Opacus' modes; "ghost" also with a per-sample loss (see below).
MICRO = "micro-batch"
MICRO_SEQUENTIAL = "micro-batch, sequential"
MODES = (MICRO, MICRO_SEQUENTIAL, "hooks", "functorch", "ew", "ghost")
#: A mode is exact when its clipped update differs from hooks mode by at most this (relative).
EXACT_RTOL = 1e-4
#: ε values of the utility benchmark (inf: no DP).
EPSILONS = (1.0, 3.0, 8.0, math.inf)
#: ``train`` overrides for DP runs. What limits Dice under DP is the noise per step,
#: σ·C / (expected batch), against the gradient's signal: a larger expected batch lowers it, and
#: fewer, larger steps charge the accountant fewer updates (lower σ for the same ε). Under DP
#: noise Adam's per-coordinate steps are mostly noise, so the signal advances by about
#: lr x SNR per step and a larger lr than the plain run's 2e-3 is needed. Measured at ε=8 on the
#: default federation (final mean site Dice, one run each; non-private about 0.965):
#: 6-9 training cases per site, batch 2: lr 1e-3 0.43, 2e-3 0.65, 5e-3 0.74, 1e-2 0.76;
#: 110/92/40 cases, batch 16 x 50 steps: lr 1e-2 0.868; lr 5e-3 with C=0.5 0.848;
#: 240/212/40 cases: batch 16 x 50 steps lr 1e-2 0.893, lr 2e-2 0.887; batch 32 x 25 steps
#: lr 2e-2 0.907; 400/372/40 cases (the default), batch 32 x 25 steps, lr 2e-2: C=1 0.918,
#: C=0.5 0.928 (:data:`DP_PRIVACY`).
DP_TRAIN: dict[str, Any] = {"lr": 2e-2, "batch_size": 32, "local_steps": 25}
#: ``privacy`` keys of the DP runs besides ε: a clipping bound near the per-case gradient norms
#: of a trained UNet (0.3-0.6; about 1.2 at initialisation), so less of the noise is wasted.
DP_PRIVACY: dict[str, Any] = {"max_grad_norm": 0.5}


# -- DP step time ------------------------------------------------------------------------------


class PerSampleDiceCE(nn.Module):
    """DiceCE per sample, as Opacus' ghost clipping needs (``reduction="none"`` gives ``(B,)``).

    MONAI's ``DiceCELoss(reduction="none")`` returns per-class, per-voxel shapes that ghost
    clipping would broadcast wrongly, so each sample's scalar loss is computed here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.reduction = "mean"

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = torch.stack([self.loss(pred[i:i + 1], target[i:i + 1])
                           for i in range(pred.shape[0])])
        if self.reduction == "none":
            return per
        return per.mean() if self.reduction == "mean" else per.sum()


@dataclass
class ModeResult:
    """One per-sample-gradient mode: exactness against hooks and step time."""

    mode: str
    rel_error: float | None = None
    dp_ms: float | None = None
    plain_ms: float | None = None
    error: str | None = None

    @property
    def exact(self) -> bool:
        return self.rel_error is not None and self.rel_error <= EXACT_RTOL

    @property
    def ratio(self) -> float | None:
        return self.dp_ms / self.plain_ms if self.dp_ms and self.plain_ms else None


@dataclass
class OverheadResult:
    """:func:`dp_overhead`'s measurements."""

    batch_shape: tuple[int, ...]
    params: int
    threads: int
    modes: list[ModeResult] = field(default_factory=list)
    #: Whole training steps (loader, augmentation, step) as a site runs them, in ms.
    train_plain_ms: float | None = None
    train_dp_ms: float | None = None
    train_mode: str | None = None


def _dp_objects(model: nn.Module, mode: str, batch: dict[str, torch.Tensor], noise: float,
                optimizer: Callable[[Any], torch.optim.Optimizer], loss: nn.Module | None = None,
                max_grad_norm: float = 1.0):
    from fedscan.client.privacy import opacus_private

    data = torch.utils.data.TensorDataset(batch["image"], batch["label"])
    loader = torch.utils.data.DataLoader(data, batch_size=len(data))
    criterion = loss if loss is not None else DiceCELoss(to_onehot_y=True, softmax=True)
    return opacus_private(model, optimizer, loader, noise_multiplier=noise,
                          max_grad_norm=max_grad_norm, grad_sample_mode=mode,
                          criterion=criterion)


def _micro_objects(task: Any, model: nn.Module, batch: dict[str, torch.Tensor], noise: float,
                   optimizer: Callable[[Any], torch.optim.Optimizer], workers: int | None,
                   max_grad_norm: float = 1.0):
    """A DP step by micro-batches, as :func:`~fedscan.client.privacy.dp_train_steps` takes it.

    Returns:
        (model, ``step(pool)``, ``open_pool()``): a site holds one pool for a round's steps.
    """
    from fedscan.client.privacy import SamplePool, dp_optimizer, dp_ready, per_sample_grads

    model = dp_ready(model)
    (phase,) = task.phases(model)
    size = batch["image"].shape[0]
    opt = dp_optimizer(optimizer(phase.params), noise, max_grad_norm, size,
                       torch.Generator().manual_seed(0))

    def step(pool: SamplePool) -> None:
        opt.zero_grad(set_to_none=True)
        grads, _ = per_sample_grads(phase, model, batch, pool=pool)
        for p, g in zip(phase.params, grads, strict=True):
            p.grad_sample = g
        opt.step()

    return model, step, lambda: SamplePool(workers, size)


def _clipped_update(model: nn.Module, mode: str, batch: dict[str, torch.Tensor],
                    loss: nn.Module | None = None, task: Any = None) -> torch.Tensor:
    """Parameter change of one SGD(lr=1) DP step with noise 0 and a clipping bound of 0.1.

    With noise 0 the update is the mean of per-sample clipped gradients: equal across modes
    iff their per-sample gradients (and clipping) agree. The bound is small enough to clip.
    """
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    if mode in (MICRO, MICRO_SEQUENTIAL):
        dp_model, step, open_pool = _micro_objects(
            task, model, batch, 0.0, lambda ps: torch.optim.SGD(ps, lr=1.0),
            1 if mode == MICRO_SEQUENTIAL else None, max_grad_norm=0.1)
        with open_pool() as pool:
            step(pool)
        return torch.cat([(b - p.detach()).flatten()
                          for b, p in zip(before, dp_model.parameters(), strict=True)])
    dp_model, dp_opt, criterion = _dp_objects(
        model, mode, batch, 0.0, lambda ps: torch.optim.SGD(ps, lr=1.0), loss, max_grad_norm=0.1)
    dp_opt.zero_grad()
    criterion(dp_model(batch["image"]), batch["label"]).backward()
    dp_opt.step()
    return torch.cat([(b - p.detach()).flatten()
                      for b, p in zip(before, dp_model.parameters(), strict=True)])


def _time_steps(step: Callable[[], None], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        out.append(time.perf_counter() - started)
    return out


def dp_overhead(cfg: Config | None = None, *, modes: Sequence[str] = MODES, repeats: int = 15,
                warmup: int = 3, train_steps: int = 40) -> OverheadResult:
    """DP-SGD step time ÷ plain step time for the default model, patch and batch.

    Every mode runs on the same real batch (patches of the first site), plain and DP steps
    interleaved so machine noise hits both alike; the median step time is kept. Exactness
    of each mode: its noise-free clipped update against Opacus' hooks mode's.

    Args:
        cfg: the config (default: the embedded federation).
        modes: per-sample gradient modes to try (:data:`MODES`).
        repeats: timed steps per mode (after ``warmup``).
        warmup: untimed steps first (allocations, functorch tracing).
        train_steps: whole training steps timed per variant as a site runs them (0: skip).
    """
    from fedscan.client.privacy import GRAD_SAMPLE_MODE, PrivacyLedger, dp_train_steps
    from fedscan.shared.config import PrivacyConfig
    from fedscan.shared.data import read_site
    from fedscan.shared.tasks import build_task
    from fedscan.shared.tasks.loop import train_steps as plain_train_steps
    from fedscan.simulations.run import default_config

    cfg = cfg or default_config()
    task = build_task(cfg)
    site = cfg.sites[0]
    cases = read_site(site, cfg.data, check=False).train
    loader = task.make_train_loader(cases, seed=0)
    batch = next(iter(loader))
    base = task.build_model()
    result = OverheadResult(batch_shape=tuple(batch["image"].shape),
                            params=sum(p.numel() for p in base.parameters()),
                            threads=torch.get_num_threads())
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    image, label = batch["image"], batch["label"]

    plain_model = copy.deepcopy(base)
    plain_opt = task.make_optimizer(plain_model.parameters())

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        loss_fn(plain_model(image), label).backward()
        plain_opt.step()

    reference = _clipped_update(base, "hooks", batch)  # Opacus' reference implementation
    variants = [(m, None) for m in modes]
    if "ghost" in modes:
        variants.append(("ghost", PerSampleDiceCE()))
    block = max(1, repeats // 3)  # timed steps per block; blocks of plain and DP alternate
    for mode, loss in variants:
        name = mode if loss is None else f"{mode} (per-sample loss)"
        res = ModeResult(name)
        result.modes.append(res)
        try:
            update = _clipped_update(base, mode, batch, loss, task)
            res.rel_error = float((update - reference).norm() / reference.norm())
            if mode in (MICRO, MICRO_SEQUENTIAL):
                _, micro_step, open_pool = _micro_objects(
                    task, copy.deepcopy(base), batch, 1.0, task.make_optimizer,
                    1 if mode == MICRO_SEQUENTIAL else None)

                def dp_block(step=micro_step, open_pool=open_pool) -> list[float]:
                    # The pool lives for the block, as for a site's round, and is gone while
                    # plain steps run (its threads would otherwise compete with them).
                    with open_pool() as pool:
                        return _time_steps(lambda: step(pool), warmup, block)
            else:
                dp_model, dp_opt, criterion = _dp_objects(copy.deepcopy(base), mode, batch,
                                                          1.0, task.make_optimizer, loss)

                def dp_step(m=dp_model, o=dp_opt, c=criterion) -> None:
                    o.zero_grad(set_to_none=True)
                    c(m(image), label).backward()
                    o.step()

                def dp_block(step=dp_step) -> list[float]:
                    return _time_steps(step, warmup, block)
        except Exception as exc:  # a mode that cannot handle a layer (e.g. ew and PReLU)
            res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue

        plain, dp = [], []
        for _ in range(3):  # interleaved blocks
            plain += _time_steps(plain_step, warmup, block)
            dp += dp_block()
        res.plain_ms, res.dp_ms = 1e3 * statistics.median(plain), 1e3 * statistics.median(dp)

    if train_steps > 0:
        # Whole steps as a site runs them: loader (Poisson for DP), augmentation, step.
        privacy = PrivacyConfig(epsilon=1e9, noise_multiplier=1.0)
        plain_times, dp_times = [], []
        for _ in range(2):
            model = copy.deepcopy(base)
            started = time.perf_counter()
            plain_train_steps(task, model, task.make_optimizer(model.parameters()),
                              task.make_train_loader(cases, seed=1), train_steps)
            plain_times.append((time.perf_counter() - started) / train_steps)
            dp_loader = task.make_train_loader(cases, seed=1)
            ledger = PrivacyLedger(privacy)
            ledger.setup(1.0 / len(dp_loader), planned_steps=train_steps)
            model = copy.deepcopy(base)
            started = time.perf_counter()
            dp_train_steps(task, model, task.phases(model), dp_loader, ledger, train_steps)
            dp_times.append((time.perf_counter() - started) / train_steps)
        result.train_plain_ms = 1e3 * min(plain_times)
        result.train_dp_ms = 1e3 * min(dp_times)
        result.train_mode = GRAD_SAMPLE_MODE
    return result


def format_overhead(result: OverheadResult) -> str:
    """The overhead table as plain text."""
    lines = [f"DP-SGD step vs plain step: default UNet ({result.params:,} parameters), batch "
             f"{tuple(result.batch_shape)}, {result.threads} threads, median step time",
             f"{'mode':<28}{'exact':>8}{'rel.err':>10}{'plain ms':>10}{'DP ms':>9}{'DP/plain':>10}"]
    for m in result.modes:
        if m.error:
            lines.append(f"{m.mode:<28}{'—':>8}  unsupported: {m.error}")
            continue
        lines.append(f"{m.mode:<28}{'yes' if m.exact else 'NO':>8}{m.rel_error:>10.1e}"
                     f"{m.plain_ms:>10.1f}{m.dp_ms:>9.1f}{m.ratio:>10.2f}")
    exact = [m for m in result.modes if m.exact and m.ratio]
    if exact:
        best = min(exact, key=lambda m: m.ratio)
        lines.append(f"fastest exact mode: {best.mode} ({best.ratio:.2f}x plain)")
    if result.train_dp_ms and result.train_plain_ms:
        lines.append(f"whole training step as a site runs it (loader + augmentation + step, "
                     f"{result.train_mode} mode, Poisson batches): plain "
                     f"{result.train_plain_ms:.1f} ms, DP {result.train_dp_ms:.1f} ms, "
                     f"ratio {result.train_dp_ms / result.train_plain_ms:.2f}")
    return "\n".join(lines)


# -- Dice at several ε -------------------------------------------------------------------------


def utility_config(base: Config, epsilon: float, privacy: dict[str, Any] | None = None,
                   dp_train: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config (as YAML-ready dict) of one utility run: ``base`` with a privacy block.

    Args:
        base: the federation (its sites, rounds, training).
        epsilon: the budget; ``inf`` gives the non-private reference.
        privacy: further privacy keys (``delta``, ``max_grad_norm``, ``accountant``).
        dp_train: ``train`` keys that change for DP runs only (e.g. a larger batch).
    """
    data = base.to_dict()
    data["privacy"] = {**(privacy or {}), "epsilon": float(epsilon)}
    if math.isfinite(epsilon) and dp_train:
        data["train"] = {**data["train"], **dp_train}
    return data


def dp_utility(out: Path, *, epsilons: Sequence[float] = EPSILONS, base: Config | None = None,
               privacy: dict[str, Any] | None = DP_PRIVACY,
               dp_train: dict[str, Any] | None = DP_TRAIN,
               rounds: int | None = None) -> list[dict[str, Any]]:
    """Run the federation once per ε into ``out/eps-<ε>/``; return one row per run.

    DP runs use ``dp_train`` on top of the federation's ``train`` block and ``privacy`` (e.g.
    the clipping bound) besides ε; the ε=∞ run is the federation exactly as configured (the
    non-private reference).

    Each row: ``epsilon`` (the budget), ``dice`` (final mean site Dice; None for a
    harmonisation run), ``ratio`` (to the ε=∞ run), ``spent`` (largest ε any site spent),
    ``seconds``, and for a harmonisation run whose study ran, ``study`` (its study.json).
    """
    from fedscan.shared.report import site_mean
    from fedscan.simulations.run import default_config, simulate

    base = base or default_config()
    if rounds is not None:
        base.rounds = rounds
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in epsilons:
        name = "eps-inf" if math.isinf(eps) else f"eps-{eps:g}"
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(utility_config(base, eps, privacy, dp_train),
                                       sort_keys=False))
        if rows and base.task == "harmonisation":
            _share_segmentation_runs(out / rows[0]["name"], out / name)
        started = time.time()
        summary = simulate(path, ["federated"], out / name)["federated"]
        spent = [t.get("epsilon") for r in summary["rounds"] for t in r["train"].values()
                 if isinstance(t.get("epsilon"), (int, float))]
        dice = site_mean(summary) if base.task == "segmentation" else None
        row = {"epsilon": eps, "name": name, "dice": dice,
               "spent": max(spent) if spent else None,
               "seconds": round(time.time() - started, 1)}
        study = out / name / "study" / "study.json"
        if study.is_file():
            row["study"] = json.loads(study.read_text())
        rows.append(row)
    reference = next((r["dice"] for r in rows if math.isinf(r["epsilon"])), None)
    for row in rows:
        row["ratio"] = row["dice"] / reference if reference and row["dice"] is not None else None
    (out / "utility.yaml").write_text(yaml.safe_dump(rows, sort_keys=False))
    return rows


def _share_segmentation_runs(first: Path, run: Path) -> None:
    """Copy the first run's study segmentation runs into ``run``'s study: they do not depend
    on ε, and the study reuses a finished run only when its config is identical."""
    import shutil

    from fedscan.simulations.harmonisation import SEGMENTATION_RUNS

    for folder in SEGMENTATION_RUNS:
        source = first / "study" / folder
        if source.is_dir() and not (run / "study" / folder).exists():
            shutil.copytree(source, run / "study" / folder)


def format_utility(rows: list[dict[str, Any]]) -> str:
    """The utility table as plain text."""
    lines = [f"{'ε budget':>9}{'ε spent':>9}{'mean site Dice':>16}{'÷ non-private':>15}"
             f"{'seconds':>9}"]
    for r in rows:
        eps = "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
        spent = "—" if r["spent"] is None else f"{r['spent']:.3f}"
        dice = "—" if r["dice"] is None else f"{r['dice']:.4f}"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
        lines.append(f"{eps:>9}{spent:>9}{dice:>16}{ratio:>15}{r['seconds']:>9.0f}")
    return "\n".join(lines)


def format_harmonisation_utility(rows: list[dict[str, Any]]) -> str:
    """A harmonisation utility table: per ε and site, PSNR and SSIM against the paired truth
    on the scan's own grid and downstream Dice of the reference-scanner model."""
    lines = [f"{'ε budget':>9}{'ε spent':>9}  {'site':<10}{'PSNR raw → harmonised':>24}"
             f"{'SSIM raw → harmonised':>24}{'Dice raw → harmonised first':>30}"]
    for r in rows:
        eps = "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
        spent = "—" if r["spent"] is None else f"{r['spent']:.3f}"
        study = r.get("study")
        if not study:
            lines.append(f"{eps:>9}{spent:>9}  (no study: the sites have no paired truth)")
            continue
        down = study.get("downstream", {})
        for name, m in study["sites"].items():
            d = down.get("sites", {}).get(name, {})
            dice = (f"{d['reference_raw']:.4f} → {d['reference_harmonised']:.4f}"
                    if "reference_raw" in d else "—")
            mark = " *" if down.get("most_shifted") == name else ""
            lines.append(
                f"{eps:>9}{spent:>9}  {name + mark:<10}"
                f"{m['native_psnr_raw']:>10.2f} → {m['native_psnr_harmonised']:<6.2f} dB   "
                f"{m['native_ssim_raw']:>10.3f} → {m['native_ssim_harmonised']:<8.3f}   "
                f"{dice:>27}")
            eps = spent = ""
    lines.append("(* most-shifted site; PSNR/SSIM on each scan's own grid)")
    return "\n".join(lines)

