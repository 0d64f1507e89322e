"""A hospital's differential privacy: Opacus DP-SGD with an exact, persistent ε ledger.

Everything privacy-related happens here, at the site, under the site's own
:class:`~fedscan.shared.config.PrivacyConfig`; the server never sees or sets it.

- :class:`PrivacyLedger` is an Opacus accountant whose history ``[(σ, q, steps), ...]``
  persists across rounds and process restarts, so ε covers every step the site ever took on
  its data (Flower's Opacus example rebuilds the engine each round and reports one round's ε).
- :func:`load_ledger` / :func:`save_ledger` keep it in Flower's ``context.state`` and in
  ``<state_dir>/privacy_ledger.json``; on start the copy with more steps wins, so ε never
  resets.
- :func:`train_private` runs one round of DP-SGD with Opacus' ``PrivacyEngine`` whose
  accountant is the restored ledger, after checking how many steps still fit the budget.

The unit of privacy is a training case (one patient's scan): Poisson sampling picks each case
with probability ``q = 1 / ceil(cases / batch_size)`` per step (Opacus' rate, expected batch
about ``batch_size``), and each case's gradient is clipped to ``max_grad_norm``.

Noise and Poisson sampling draw from generators seeded from OS entropy, never from the run's
seed (the server knows it and could replay them). Opacus' ``secure_mode`` (a cryptographic RNG
that also resists floating-point attacks) needs ``torchcsprng``, which is not a dependency.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from flwr.app import ConfigRecord, RecordDict
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.validators import ModuleValidator
from torch import nn

from fedscan.shared.config import Config, PrivacyConfig
from fedscan.shared.errors import FedscanError
from fedscan.shared.tasks.base import Case, StepCallback, Task, TrainResult

#: ``context.state`` key of the ledger (a ConfigRecord holding its JSON).
LEDGER_KEY = "privacy-ledger"
#: File name of the ledger in a site's state folder.
LEDGER_FILE = "privacy_ledger.json"
#: Opacus per-sample gradient mode. functorch was the fastest mode whose clipped update matches
#: hooks mode for the MONAI UNet (PReLU rules out "ew"; ghost clipping has no Conv3d norm
#: sampler and was slower); see ``fedscan bench dp-overhead``.
GRAD_SAMPLE_MODE = "functorch"
LEDGER_FORMAT = 1

Status = Literal["trained", "budget-limited", "declined", "off"]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
History = list[tuple[float, float, int]]


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

    @property
    def history(self) -> History:
        return list(self.accountant.history)

    @property
    def steps(self) -> int:
        """DP-SGD steps taken over the whole run (every round)."""
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
        ``planned_steps`` (rounds x local steps) at rate ``sample_rate`` spend exactly the
        budget. A later change of q (the site gained cases) is recorded; the history keeps
        the old steps at the old rate.
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
                raise FedscanError(f"privacy.epsilon {self.privacy.epsilon} is too small for "
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
        """What the train reply says about privacy (a ConfigRecord: no None allowed)."""
        return ConfigRecord({
            "status": status,
            "epsilon": float(self.epsilon()),
            "epsilon_budget": float(self.privacy.epsilon),
            "delta": float(self.privacy.delta),
            "noise_multiplier": float(self.noise_multiplier or 0.0),
            "sample_rate": float(self.sample_rate or 0.0),
            "steps": int(self.steps),
            "steps_this_round": int(steps_this_round),
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
        FedscanError: a stored ledger is unreadable (refusing beats silently resetting ε).
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
            raise FedscanError(f"{path}: privacy ledger unreadable ({exc.strerror})") from None
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
        raise FedscanError(f"{where}: privacy ledger is corrupt ({exc}); refusing to train "
                           "rather than reset the privacy budget") from None


# -- one round of DP-SGD ------------------------------------------------------------------------


@dataclass
class PrivateRound:
    """What one DP round did.

    Attributes:
        status: ``trained``, ``budget-limited`` (fewer steps than asked) or ``declined``.
        result: the task's train result (``None`` when declined).
        weights: the trained model's state dict without Opacus' ``_module.`` prefix
            (``None`` when declined).
    """

    status: Status
    result: TrainResult | None
    weights: dict[str, torch.Tensor] | None


def _secret_generator() -> torch.Generator:
    # Noise and Poisson sampling must be unpredictable to the server, which knows the run's
    # seed: draw them from OS entropy, never from cfg.seed.
    return torch.Generator().manual_seed(secrets.randbits(63))


def make_private(model: nn.Module, optimizer_factory: OptimizerFactory,
                 loader: torch.utils.data.DataLoader,
                 ledger: PrivacyLedger, *, mode: str = GRAD_SAMPLE_MODE
                 ) -> tuple[PrivacyEngine, nn.Module, torch.optim.Optimizer, Any]:
    """Opacus' ``make_private`` with the ledger's accountant, σ, clipping and Poisson sampling.

    Args:
        model: a fresh model (Opacus hooks cannot be attached twice, opacus#608).
        optimizer_factory: builds the optimiser from parameters (after the model is fixed).
        loader: the task's training loader (its generator must be secret, see below).
        ledger: the site's ledger, already :meth:`~PrivacyLedger.setup`.
        mode: Opacus grad-sample mode.

    Returns:
        (engine, wrapped model, DP optimiser, Poisson loader).
    """
    model = ModuleValidator.fix(model)  # a no-op for InstanceNorm/GroupNorm UNets
    ModuleValidator.validate(model, strict=True)
    optimizer = optimizer_factory(model.parameters())
    engine = PrivacyEngine(accountant=ledger.privacy.accountant)
    # The engine continues the site's ledger instead of starting a fresh ε each round.
    engine.accountant.load_state_dict({"history": ledger.history,
                                       "mechanism": ledger.privacy.accountant})
    dp_model, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader,
        noise_multiplier=ledger.noise_multiplier, max_grad_norm=ledger.privacy.max_grad_norm,
        poisson_sampling=True, noise_generator=_secret_generator(), grad_sample_mode=mode)
    if not math.isclose(dp_loader.sample_rate, ledger.sample_rate, rel_tol=1e-12):
        raise RuntimeError(f"Opacus samples at {dp_loader.sample_rate}, the ledger assumed "
                           f"{ledger.sample_rate}")
    # Opacus builds an empty batch from the first non-empty one it collated; if the very first
    # Poisson draw is empty it falls back to dataset[0]'s fields, which fails for dict samples.
    # Collating one sample (not used for training) teaches it the batch structure up front.
    dp_loader.collate_fn([dp_loader.dataset[0]])
    return engine, dp_model, dp_optimizer, dp_loader


def train_private(task: Task, cfg: Config, model: nn.Module, cases: list[Case],
                  ledger: PrivacyLedger, *, proximal_mu: float = 0.0,
                  on_step: StepCallback | None = None) -> PrivateRound:
    """One round of DP-SGD at a site, within what its budget still allows.

    The site asks for ``cfg.steps_per_round`` steps, trains as many as fit its ε (possibly
    fewer: ``budget-limited``; none: ``declined``) and updates ``ledger`` with exactly the
    steps Opacus' accountant counted. Persisting the ledger is the caller's job.
    """
    requested = cfg.steps_per_round(len(cases))
    # Secret seed: Poisson sampling uses the loader's generator (see _secret_generator).
    loader = task.make_train_loader(cases, seed=secrets.randbits(63))
    sample_rate = 1.0 / len(loader)  # what Opacus' DPDataLoader uses: 1 / batches per epoch
    ledger.setup(sample_rate, planned_steps=cfg.rounds * requested)
    steps = ledger.steps_that_fit(requested)
    if steps == 0:
        return PrivateRound("declined", None, None)
    engine, dp_model, dp_optimizer, dp_loader = make_private(
        model, task.make_optimizer, loader, ledger)
    before = ledger.steps
    try:
        result = task.train_steps(dp_model, dp_optimizer, dp_loader, steps,
                                  proximal_mu=proximal_mu, on_step=on_step)
    finally:
        # Whatever happened, every step Opacus released is in the ledger.
        ledger.accountant.load_state_dict(engine.accountant.state_dict())
    if ledger.steps != before + steps:
        raise RuntimeError(f"accountant counted {ledger.steps - before} steps, trained {steps}")
    weights = {k: v.detach().clone() for k, v in dp_model._module.state_dict().items()}
    dp_model.remove_hooks()
    status: Status = "trained" if steps == requested else "budget-limited"
    return PrivateRound(status, result, weights)
