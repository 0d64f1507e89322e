"""A hospital's differential privacy: Opacus DP-SGD with an exact, persistent ε ledger.

Everything privacy-related happens here, at the site, under the site's own
:class:`~fedscan.shared.config.PrivacyConfig`; the server never sees or sets it.

- :class:`PrivacyLedger` is an Opacus accountant whose history ``[(σ, q, steps), ...]``
  persists across rounds and process restarts, so ε covers every step the site ever took on
  its data (Flower's Opacus example rebuilds the engine each round and reports one round's ε).
- :func:`load_ledger` / :func:`save_ledger` keep it in Flower's ``context.state`` and in
  ``<state_dir>/privacy_ledger.json``; on start the copy with more steps wins, so ε never
  resets.
- :func:`train_private` runs one round of DP-SGD after checking how many steps still fit the
  budget: for every phase of the task (:class:`~fedscan.shared.tasks.base.Phase`) a fresh
  Poisson batch, each case's gradient by its own forward/backward pass
  (:func:`per_sample_grads`, see the note there), then Opacus' ``DPOptimizer`` (clipping,
  noise) whose step hook is the ledger's accountant. One local step is one such update per
  phase, and every update is one accountant step.

The unit of privacy is a training case (one patient's scan): Poisson sampling picks each case
with probability ``q = 1 / ceil(cases / batch_size)`` per update (Opacus' rate, expected batch
about ``batch_size``), and each case's gradient is clipped to ``max_grad_norm``.

Noise and Poisson sampling draw from generators seeded from OS entropy, never from the run's
seed (the server knows it and could replay them). The one exception is a simulation, where one
researcher holds every site and the server, so there is nobody to hide the noise from: there
it is replayed from a seed (``replay_seed``) so that a resumed simulation equals an
uninterrupted one; a deployed ClientApp never passes one. Opacus' ``secure_mode`` (a
cryptographic RNG that also resists floating-point attacks) needs ``torchcsprng``, which is
not a dependency.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from fedscan.shared.config import Config, PrivacyConfig
from fedscan.shared.errors import FedscanError
from fedscan.shared.tasks.base import (
    Case,
    Phase,
    StepCallback,
    Task,
    TrainResult,
    proximal_hook,
    shared_params,
)
from fedscan.shared.tasks.loop import batch_size, cycle, mean_or_nan

#: ``context.state`` key of the ledger (a ConfigRecord holding its JSON).
LEDGER_KEY = "privacy-ledger"
#: File name of the ledger in a site's state folder.
LEDGER_FILE = "privacy_ledger.json"
#: How per-sample gradients are computed: one forward/backward per case (:func:`per_sample_grads`).
#: Exact, and the fastest on CPU of the modes ``fedscan bench dp-overhead`` compares (1.8x a
#: plain step; Opacus' hooks, functorch and ghost clipping 2.8-3.9x).
GRAD_SAMPLE_MODE = "micro-batch"
LEDGER_FORMAT = 1

Status = Literal["trained", "budget-limited", "declined", "off"]
History = list[tuple[float, float, int]]


class PrivacyError(FedscanError):
    """The site's privacy ledger or budget does not allow training (unreadable or corrupt
    ledger, a budget too small to calibrate σ for)."""


class PrivacyLedger:
    """ε spent by one site: an Opacus accountant over every DP-SGD step it ever took.

    The history ``[(noise_multiplier, sample_rate, steps), ...]`` is the persistent truth;
    the accountant kind (``rdp`` or ``prv``) is whatever the site's config names now, and
    replays it. σ and q are fixed at first use (:meth:`setup`) and kept for the run.

    Args:
        privacy: the site's privacy setting (budget ε, δ, accountant).
        history: steps already taken, as Opacus accountant history.
        noise_multiplier: σ fixed at first use, if any.
        sample_rate: Poisson rate q fixed at first use, if any.
    """

    def __init__(self, privacy: PrivacyConfig, history: History | None = None,
                 noise_multiplier: float | None = None, sample_rate: float | None = None) -> None:
        self.privacy = privacy
        self.accountant = create_accountant(mechanism=privacy.accountant)
        self.accountant.history = [(float(s), float(q), int(n)) for s, q, n in history or []]
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        #: DP updates (accountant steps) per local step: the task's number of phases.
        self.updates_per_step = 1

    @property
    def history(self) -> History:
        return list(self.accountant.history)

    @property
    def steps(self) -> int:
        """DP-SGD updates (accountant steps) taken over the whole run (every round)."""
        return sum(int(n) for _, _, n in self.accountant.history)

    def epsilon(self) -> float:
        """ε spent so far at the site's δ (0 before the first step)."""
        return _epsilon(self.privacy, self.accountant.history)

    def epsilon_after(self, steps: int) -> float:
        """ε the ledger would show after ``steps`` more steps at the fixed (σ, q)."""
        return _epsilon(self.privacy, self._extended(steps))

    def setup(self, sample_rate: float, planned_steps: int) -> float:
        """Fix q and σ for the run (σ only once) and return σ.

        σ is the config's ``noise_multiplier`` if set, else calibrated with Opacus so that
        ``planned_steps`` updates (rounds x local steps x phases) at rate ``sample_rate``
        spend exactly the budget. A later change of q (the site gained cases) is recorded;
        the history keeps the old steps at the old rate.
        """
        self.sample_rate = float(sample_rate)
        if self.privacy.noise_multiplier is not None:
            self.noise_multiplier = float(self.privacy.noise_multiplier)
        elif self.noise_multiplier is None:
            try:
                self.noise_multiplier = float(get_noise_multiplier(
                    target_epsilon=self.privacy.epsilon, target_delta=self.privacy.delta,
                    sample_rate=self.sample_rate, steps=max(1, planned_steps),
                    accountant=self.privacy.accountant))
            except ValueError as exc:  # Opacus gives up beyond σ = 1e6
                raise PrivacyError(f"privacy.epsilon {self.privacy.epsilon} is too small for "
                                   f"{planned_steps} steps at sample rate {sample_rate:.4g} "
                                   f"({exc})") from None
        return self.noise_multiplier

    def steps_that_fit(self, requested: int) -> int:
        """The largest ``k <= requested`` with ε(history + k steps) <= the budget.

        ε grows with k, so a binary search over copies of the history finds it.
        """
        if requested <= 0 or self.noise_multiplier is None or self.sample_rate is None:
            return 0
        budget = self.privacy.epsilon
        if self.epsilon_after(requested) <= budget:
            return requested
        lo, hi = 0, requested  # invariant: lo fits (0 always does), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.epsilon_after(mid) <= budget:
                lo = mid
            else:
                hi = mid
        return lo

    def _extended(self, steps: int) -> History:
        history = self.history
        if steps <= 0:
            return history
        entry = (self.noise_multiplier, self.sample_rate)
        if history and history[-1][:2] == entry:  # Opacus merges equal consecutive steps too
            history[-1] = (*entry, history[-1][2] + steps)
        else:
            history.append((*entry, steps))
        return history

    def to_json(self) -> str:
        return json.dumps({
            "format": LEDGER_FORMAT,
            "accountant": self.privacy.accountant,
            "delta": self.privacy.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "epsilon": self.epsilon(),  # informational; the history is what counts
            "history": [list(h) for h in self.accountant.history],
        })

    @classmethod
    def from_json(cls, text: str, privacy: PrivacyConfig) -> PrivacyLedger:
        """Restore a ledger; the site's current ``privacy`` decides budget and accountant.

        Raises:
            ValueError: not a ledger this version understands.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise ValueError("not a fedscan privacy ledger (format 1)")
        history = data["history"]
        if not isinstance(history, list) or any(len(h) != 3 for h in history):
            raise ValueError("bad history")
        return cls(privacy, history=history, noise_multiplier=data.get("noise_multiplier"),
                   sample_rate=data.get("sample_rate"))

    def record(self, status: Status, steps_this_round: int) -> ConfigRecord:
        """What the train reply says about privacy (a ConfigRecord: no None allowed).

        ``steps`` is the accountant's cumulative count of updates, ``steps_this_round`` the
        local steps of this round (``updates_per_step`` updates each).
        """
        return ConfigRecord({
            "status": status,
            "epsilon": float(self.epsilon()),
            "epsilon_budget": float(self.privacy.epsilon),
            "delta": float(self.privacy.delta),
            "noise_multiplier": float(self.noise_multiplier or 0.0),
            "sample_rate": float(self.sample_rate or 0.0),
            "steps": int(self.steps),
            "steps_this_round": int(steps_this_round),
            "updates_per_step": int(self.updates_per_step),
            "accountant": self.privacy.accountant,
            "max_grad_norm": float(self.privacy.max_grad_norm),
        })


def _epsilon(privacy: PrivacyConfig, history: History) -> float:
    if not history:
        return 0.0
    accountant = create_accountant(mechanism=privacy.accountant)
    accountant.history = history
    return float(accountant.get_epsilon(delta=privacy.delta))


def privacy_off_record() -> ConfigRecord:
    """The privacy record of a site that trains without DP."""
    return ConfigRecord({"status": "off"})


# -- persistence ----------------------------------------------------------------------------


def load_ledger(privacy: PrivacyConfig, state: RecordDict,
                state_dir: str | Path | None) -> PrivacyLedger:
    """The site's ledger from ``context.state`` and ``state_dir``: the one with more steps.

    Keeping the larger one means a lost or stale copy can never make ε go down.

    Raises:
        PrivacyError: a stored ledger is unreadable (refusing beats silently resetting ε).
    """
    found: list[PrivacyLedger] = []
    if LEDGER_KEY in state.config_records:
        text = str(state.config_records[LEDGER_KEY]["json"])
        found.append(_parse(text, privacy, "the ClientApp context state"))
    path = _ledger_path(state_dir)
    if path is not None and path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise PrivacyError(f"{path}: privacy ledger unreadable ({exc.strerror})") from None
        found.append(_parse(text, privacy, str(path)))
    if not found:
        return PrivacyLedger(privacy)
    return max(found, key=lambda ledger: ledger.steps)


def save_ledger(ledger: PrivacyLedger, state: RecordDict, state_dir: str | Path | None) -> None:
    """Store the ledger in ``context.state`` and, atomically, in ``state_dir``."""
    text = ledger.to_json()
    state[LEDGER_KEY] = ConfigRecord({"json": text})
    path = _ledger_path(state_dir)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{LEDGER_FILE}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the ledger must survive a power cut, not just a crash
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ledger_path(state_dir: str | Path | None) -> Path | None:
    return Path(state_dir) / LEDGER_FILE if state_dir else None


def _parse(text: str, privacy: PrivacyConfig, where: str) -> PrivacyLedger:
    try:
        return PrivacyLedger.from_json(text, privacy)
    except (ValueError, KeyError, TypeError) as exc:
        raise PrivacyError(f"{where}: privacy ledger is corrupt ({exc}); refusing to train "
                           "rather than reset the privacy budget") from None


# -- one round of DP-SGD ------------------------------------------------------------------------


@dataclass
class PrivateRound:
    """What one DP round did.

    Attributes:
        status: ``trained``, ``budget-limited`` (fewer steps than asked) or ``declined``.
        result: the task's train result (``None`` when declined); ``steps`` counts local
            steps, each of which is one DP update per phase.
        weights: the trained model's state dict (``None`` when declined).
    """

    status: Status
    result: TrainResult | None
    weights: dict[str, torch.Tensor] | None


def _secret_generator(replay_seed: int | None = None) -> torch.Generator:
    # Noise and Poisson sampling must be unpredictable to the server, which knows the run's
    # seed: draw them from OS entropy, never from cfg.seed (a simulation's replay seed apart).
    if replay_seed is not None:
        return torch.Generator().manual_seed(replay_seed)
    return torch.Generator().manual_seed(secrets.randbits(63))


def dp_ready(model: nn.Module) -> nn.Module:
    """``model`` made and checked fit for per-sample clipping (Opacus' ``ModuleValidator``).

    A copy: BatchNorm (which mixes the cases of a batch) would be replaced; the UNet's
    instance or group norm passes unchanged.
    """
    model = ModuleValidator.fix(model)
    ModuleValidator.validate(model, strict=True)
    return model


def train_private(task: Task, cfg: Config, model: nn.Module, cases: list[Case],
                  ledger: PrivacyLedger, *, proximal_mu: float = 0.0,
                  on_step: StepCallback | None = None,
                  replay_seed: int | None = None) -> PrivateRound:
    """One round of DP-SGD at a site, within what its budget still allows.

    The site asks for ``cfg.steps_per_round`` local steps. A local step is one DP update per
    phase of the task (:meth:`~fedscan.shared.tasks.base.Task.phases`), each an accountant
    step at (σ, q), so the ledger plans ``rounds x local steps x phases`` updates. The round
    trains the whole local steps that fit the ε budget (possibly fewer: ``budget-limited``;
    none: ``declined``) and the ledger's accountant counts every update as it is released.
    Persisting the ledger is the caller's job. ``replay_seed`` (simulations only) replaces
    the OS entropy of the augmentation, Poisson sampling and noise.
    """
    requested = cfg.steps_per_round(len(cases))
    model = dp_ready(model)
    phases = task.phases(model)
    if not phases:
        raise FedscanError(f"task {task.name!r} has no training phases")
    per_step = len(phases)
    # Secret seed: it drives the augmentation; Poisson sampling gets its own secret generator.
    loader = task.make_train_loader(
        cases, seed=secrets.randbits(63) if replay_seed is None else replay_seed)
    sample_rate = 1.0 / len(loader)  # Opacus' DPDataLoader rate: 1 / batches per epoch
    ledger.updates_per_step = per_step
    ledger.setup(sample_rate, planned_steps=cfg.rounds * requested * per_step)
    # ε grows with the updates, so the whole local steps that fit are those of the updates
    # that fit, rounded down.
    steps = ledger.steps_that_fit(requested * per_step) // per_step
    if steps == 0:
        return PrivateRound("declined", None, None)
    before = ledger.steps
    result = dp_train_steps(task, model, phases, loader, ledger, steps,
                            proximal_mu=proximal_mu, on_step=on_step, replay_seed=replay_seed)
    if ledger.steps != before + steps * per_step:
        raise RuntimeError(f"accountant counted {ledger.steps - before} updates, trained "
                           f"{steps} steps x {per_step} phases")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    status: Status = "trained" if steps == requested else "budget-limited"
    return PrivateRound(status, result, weights)


def dp_train_steps(task: Task, model: nn.Module, phases: list[Phase],
                   loader: torch.utils.data.DataLoader, ledger: PrivacyLedger, steps: int, *,
                   proximal_mu: float = 0.0, on_step: StepCallback | None = None,
                   workers: int | None = None, replay_seed: int | None = None) -> TrainResult:
    """``steps`` local steps of DP-SGD; each step updates every phase in turn.

    Each phase update draws a fresh Poisson batch (Opacus' ``DPDataLoader`` at the ledger's
    q, secret generator), computes each case's gradient of ``phase.loss`` for the phase's
    parameters (:func:`per_sample_grads`), and lets an Opacus ``DPOptimizer`` over the task's
    optimiser clip them to ``max_grad_norm``, add N(0, σ²C²) noise from a secret generator,
    divide by the expected batch size, step the ledger's accountant once at (σ, q) and update.
    An empty batch still takes that step (noise only). With ``proximal_mu > 0`` FedProx's
    gradient ``mu * (w - w0)`` is added after the noise, just before the update, as
    :meth:`SegmentationTask.train_steps` does: it is data-independent, so it costs no privacy.

    Args:
        task: builds the phases' optimisers.
        model: a :func:`dp_ready` model; ``phases`` must be its phases.
        phases: the task's phases for ``model``.
        loader: the task's training loader; its ``1 / len`` is the ledger's q.
        ledger: the site's ledger, already :meth:`~PrivacyLedger.setup`; its accountant
            takes one step per phase update.
        steps: local steps.
        proximal_mu: FedProx μ (0: off).
        on_step: called after each local step with the running mean per-case loss.
        workers: CPU threads for per-sample passes (default: see :class:`SamplePool`).
        replay_seed: simulations only: sampling and noise replayable from this seed instead
            of OS entropy.

    Returns:
        Mean per-case loss over the non-empty batches, ``len(loader.dataset)``, ``steps``.
    """
    if ledger.noise_multiplier is None or ledger.sample_rate is None:
        raise RuntimeError("the ledger is not set up")
    q = ledger.sample_rate
    dp_loader = DPDataLoader.from_data_loader(loader, generator=_secret_generator(replay_seed))
    if not math.isclose(dp_loader.sample_rate, q, rel_tol=1e-12):
        raise RuntimeError(f"Opacus samples at {dp_loader.sample_rate}, the ledger assumed {q}")
    # Opacus builds an empty batch from the first non-empty one it collated; collating one
    # sample (not used for training) up front teaches it the batch structure.
    dp_loader.collate_fn([dp_loader.dataset[0]])
    # Opacus' make_private divides by int(N q); the expected batch size is N q itself.
    expected_batch = len(loader.dataset) * q
    noise = _secret_generator(None if replay_seed is None else replay_seed + 1)
    optimizers = []
    for phase in phases:
        optimizer = dp_optimizer(task.make_optimizer(phase.params), ledger.noise_multiplier,
                                 ledger.privacy.max_grad_norm, expected_batch, noise)
        optimizer.attach_step_hook(ledger.accountant.get_optimizer_hook_fn(sample_rate=q))
        optimizers.append(optimizer)
    # Anchors at the round's start, before any phase moves; on the wrapped optimisers, so the
    # term is added after clipping and noise.
    hooks = []
    if proximal_mu > 0:
        shared = shared_params(task, model)
        hooks = [proximal_hook(o.original_optimizer, proximal_mu, shared) for o in optimizers]
    device = next(iter(phases[0].params)).device
    model.train()
    losses: list[float] = []
    batches = cycle(dp_loader)
    try:
        with SamplePool(workers, expected_batch, device) as pool:
            for step in range(1, steps + 1):
                for phase, optimizer in zip(phases, optimizers, strict=True):
                    batch = next(batches)
                    optimizer.zero_grad(set_to_none=True)
                    grads, case_losses = per_sample_grads(phase, model, batch, pool=pool)
                    for p, g in zip(phase.params, grads, strict=True):
                        p.grad_sample = g
                    optimizer.step()  # clip, noise, accountant step, update
                    if phase.after_update is not None:  # post-processing: no privacy cost
                        phase.after_update()
                    if len(case_losses):
                        losses.append(float(case_losses.mean()))
                if on_step is not None:
                    on_step(step, steps, mean_or_nan(losses))
    finally:
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.remove()
    return TrainResult(loss=mean_or_nan(losses), num_examples=len(loader.dataset), steps=steps)


def dp_optimizer(optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float, expected_batch: float,
                 generator: torch.Generator) -> DPOptimizer:
    """Opacus' ``DPOptimizer`` over ``optimizer``: clips each case's ``p.grad_sample`` to
    ``max_grad_norm``, adds N(0, σ²C²) noise from ``generator`` and divides by the expected
    batch size before the wrapped optimiser steps."""
    return DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                       expected_batch_size=expected_batch, loss_reduction="mean",
                       generator=generator)


def opacus_private(model: nn.Module,
                   make_optimizer: Callable[[Any], torch.optim.Optimizer],
                   loader: torch.utils.data.DataLoader, *, noise_multiplier: float,
                   max_grad_norm: float, grad_sample_mode: str,
                   criterion: nn.Module) -> tuple[nn.Module, DPOptimizer, nn.Module]:
    """Opacus' own per-sample gradients (``hooks``, ``functorch``, ``ew``, ``ghost``), for the
    benchmark that compares them with :data:`GRAD_SAMPLE_MODE` (sites never train this way).

    Args:
        model: the model (a :func:`dp_ready` copy is wrapped).
        make_optimizer: builds the optimiser over the copy's parameters.
        loader: the data (Opacus derives the sample rate from it).
        noise_multiplier: σ.
        max_grad_norm: the clipping bound.
        grad_sample_mode: Opacus' mode.
        criterion: the loss (ghost clipping wraps it).

    Returns:
        ``(model, optimizer, criterion)`` as ``PrivacyEngine.make_private`` wraps them
        (the criterion changes only in ghost mode); ``model.parameters()`` are the wrapped
        module's.
    """
    from opacus import PrivacyEngine

    model = dp_ready(model)
    out = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=make_optimizer(model.parameters()), data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=False, grad_sample_mode=grad_sample_mode, criterion=criterion)
    if "ghost" in grad_sample_mode:
        dp_model, dp_opt, criterion, _ = out
    else:
        dp_model, dp_opt, _ = out
    return dp_model, dp_opt, criterion


# -- per-sample gradients by micro-batch ---------------------------------------------------------
#
# Opacus computes per-sample gradients inside one batched backward pass (hooks, functorch,
# ghost clipping). On CPU each of those cost 2.8-3.9x a plain step for the default 3D UNet
# (``fedscan bench dp-overhead``): the 3D convolutions' per-sample weight gradients are
# unfolds or grouped convolutions far slower than the fused kernel of a plain backward. Here
# each case gets its own ordinary forward/backward (a batch of one), which is exact by
# construction and runs the plain kernels: 1.8x a plain step of batch 2 on 2 CPU cores.
# It is not 1x because a batch of one is not half the work of a batch of two on CPU: PyTorch
# runs batch-1 3D convolutions on its native kernel rather than oneDNN (a size heuristic), and
# that kernel barely uses a second core, so the cases of a batch run concurrently, each on its
# share of the cores (:class:`SamplePool`; 2.05x one after another). It also needs nothing
# from the model: a multi-network task (a CycleGAN whose generators are called several times
# per loss) works as is, where Opacus' module hooks assume each module is called once per
# batch. Everything else stays Opacus': Poisson sampling, clipping, noise, the accountant.


class SamplePool:
    """Threads that run the per-sample passes of a batch concurrently on the CPU.

    torch's intra-op threads are split between ``workers`` threads (each gets
    ``threads // workers``), so a batch of B cases runs as about B/workers rounds of
    single-case passes that together use every core. Autograd runs a CPU backward on the
    calling thread and ``torch.autograd.grad`` writes no ``.grad``, so the passes share the
    model safely; a phase loss must not mutate shared state (its contract already forbids
    mixing cases).

    Args:
        workers: threads (default: the expected batch size rounded up, at most torch's
            intra-op threads; 1 runs the passes one after another on the calling thread).
        expected_batch: the expected Poisson batch size (for the default).
        device: CUDA runs the passes sequentially (the device parallelises each).
    """

    def __init__(self, workers: int | None = None, expected_batch: float = 1.0,
                 device: torch.device | None = None) -> None:
        total = torch.get_num_threads()
        if workers is None:
            workers = math.ceil(expected_batch)
        if device is not None and device.type != "cpu":
            workers = 1
        self.workers = max(1, min(int(workers), total))
        self.threads_each = max(1, total // self.workers)
        self._executor: ThreadPoolExecutor | None = None
        if self.workers == 1:
            return
        ready = threading.Barrier(self.workers + 1)

        def init() -> None:
            torch.set_num_threads(self.threads_each)  # this thread's OpenMP team size
            ready.wait()

        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="fedscan-dp",
                                            initializer=init)
        for _ in range(self.workers):  # each submit starts a thread: none is idle yet
            self._executor.submit(int)
        try:
            ready.wait(timeout=60)
        finally:
            # torch.set_num_threads also sets the default of threads started later; restore it.
            torch.set_num_threads(total)

    def map(self, fn: Callable[[int], Any], n: int) -> list[Any]:
        if self._executor is None:
            return [fn(i) for i in range(n)]
        return list(self._executor.map(fn, range(n)))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> SamplePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def per_sample_grads(phase: Phase, model: nn.Module, batch: Any, *,
                     pool: SamplePool | None = None
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each case's gradient of ``phase.loss`` for ``phase.params``, one pass per case.

    Every tensor in ``batch`` must be batch-first (as Opacus' Poisson loader and its empty
    batches assume): case ``i`` gets row ``i`` of each, moved to the phase's device.
    Parameters the loss does not reach get zero gradients.

    Returns:
        ``(grad_samples, losses)``: one ``(B, *p.shape)`` tensor per parameter, in Opacus'
        ``p.grad_sample`` layout, and the ``(B,)`` per-case losses (detached).
    """
    params = list(phase.params)
    n = batch_size(batch)
    if n == 0:
        return [p.new_zeros((0, *p.shape)) for p in params], torch.zeros(0)
    device = params[0].device

    def one(i: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        loss = phase.loss(model, _case(batch, i, n, device))
        if loss.shape != (1,):
            raise ValueError(f"phase {phase.name!r}: the loss of one case has shape "
                             f"{tuple(loss.shape)}, expected (1,) (one loss per case)")
        grads = torch.autograd.grad(loss.sum(), params, allow_unused=True,
                                    materialize_grads=True)
        return loss.detach(), grads

    results = (pool or SamplePool(1)).map(one, n)
    losses = torch.cat([loss for loss, _ in results]).cpu()
    grads = [torch.stack(per_param) for per_param in zip(*(g for _, g in results), strict=True)]
    return grads, losses


def _case(batch: Any, i: int, n: int, device: torch.device) -> Any:
    """Case ``i`` of an ``n``-case batch: row ``i`` of every tensor, as a batch of one."""
    if torch.is_tensor(batch):
        if batch.dim() == 0 or batch.shape[0] != n:
            raise ValueError(f"a batch tensor of shape {tuple(batch.shape)} is not batch-first "
                             f"over the batch's {n} cases")
        return batch[i:i + 1].to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _case(v, i, n, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_case(v, i, n, device) for v in batch)
    return batch




