"""DP-SGD by micro-batches: exact per-sample gradients, one accountant step per phase update,
whole local steps under a budget, empty Poisson batches, FedProx, and the thread pool."""

import math
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedscan.client.privacy import (
    PrivacyLedger,
    SamplePool,
    dp_train_steps,
    per_sample_grads,
    train_private,
)
from fedscan.shared.config import PrivacyConfig, parse_config
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import Phase


class Pairs(Dataset):
    """Private ``image`` vectors, each with a public ``reference`` vector."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.image = torch.randn(n, 4, generator=g)
        self.reference = torch.randn(n, 4, generator=g)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "reference": self.reference[i]}


class TwoPhaseTask:
    """A toy GAN-like task: a generator phase whose loss calls the discriminator twice, then a
    discriminator phase. The DP loop knows nothing about it but its phases."""

    name = "toy"

    def __init__(self, batch_size: int = 3, lr: float = 0.1) -> None:
        self.batch_size, self.lr = batch_size, lr

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        return nn.ModuleDict({"g": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)),
                              "d": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))})

    def make_train_loader(self, cases, seed: int) -> DataLoader:
        return DataLoader(Pairs(len(cases)), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(seed))

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr)

    def shared_keys(self, model: nn.Module) -> list[str]:
        return [k for k in model.state_dict() if k.startswith("g.")]  # "d" stays local

    def phases(self, model: nn.Module) -> list[Phase]:
        g, d = model["g"], model["d"]

        def generators(_: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
            fake = g(b["image"])
            cycle = (g(fake) - b["image"]).pow(2).mean(1)
            return (d(fake) - 1).pow(2)[:, 0] + d(g(b["reference"])).pow(2)[:, 0] + cycle

        def discriminators(_: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                fake = g(b["image"])
            return (d(b["reference"]) - 1).pow(2)[:, 0] + d(fake).pow(2)[:, 0]

        return [Phase("generators", list(g.parameters()), generators),
                Phase("discriminators", list(d.parameters()), discriminators)]


def _toy_cfg(rounds: int = 2, local_steps: int = 3):
    return parse_config({"sites": [{"name": "a", "data": "/a"}], "rounds": rounds,
                         "train": {"local_steps": local_steps, "batch_size": 3}})


def _cases(n: int) -> list[dict[str, str]]:
    return [{"case": f"c{i}", "image": "", "label": ""} for i in range(n)]


def _batch(n: int) -> dict[str, torch.Tensor]:
    data = Pairs(n)
    return {"image": data.image, "reference": data.reference}


# -- per-sample gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_per_sample_grads_equal_each_cases_own_gradient(workers):
    task = TwoPhaseTask()
    model = task.build_model()
    batch = _batch(5)
    for phase in task.phases(model):
        with SamplePool(workers, expected_batch=5) as pool:
            grads, losses = per_sample_grads(phase, model, batch, pool=pool)
        full = phase.loss(model, batch)  # (B,) from one batched pass
        assert torch.allclose(losses, full.detach(), atol=1e-6)
        for i in range(5):
            expected = torch.autograd.grad(full[i], phase.params, retain_graph=True)
            for g, e in zip(grads, expected, strict=True):
                assert g.shape == (5, *e.shape)
                assert torch.allclose(g[i], e, atol=1e-6)


def test_empty_batch_gives_empty_grad_samples():
    task = TwoPhaseTask()
    model = task.build_model()
    phase = task.phases(model)[0]
    grads, losses = per_sample_grads(phase, model, {"image": torch.zeros(0, 4),
                                                     "reference": torch.zeros(0, 4)})
    assert losses.shape == (0,)
    assert [g.shape for g in grads] == [(0, *p.shape) for p in phase.params]


def test_a_loss_that_is_not_per_case_is_refused():
    model = nn.Linear(4, 1)
    phase = Phase("bad", list(model.parameters()), lambda m, b: m(b["image"]).sum())
    with pytest.raises(ValueError, match="one loss per case"):
        per_sample_grads(phase, model, _batch(2))


def test_sample_pool_leaves_torch_threads_as_they_were():
    before = torch.get_num_threads()
    with SamplePool(4, expected_batch=4) as pool:
        assert pool.map(lambda i: i * i, 3) == [0, 1, 4]
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert torch.get_num_threads() == before and seen == [before]


def test_unet_clipped_update_matches_opacus_hooks():
    """The micro-batch clipped sum equals Opacus' (hooks mode) for a UNet and Dice+CE."""
    from fedscan.simulations.bench import MICRO, MICRO_SEQUENTIAL, _clipped_update

    cfg = parse_config({"sites": [{"name": "a", "data": "/a"}],
                        "model": {"channels": [4, 8, 16], "strides": [2, 2]},
                        "train": {"patch_size": [16, 16, 16]}})
    task = build_task(cfg)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 1, 16, 16, 16, generator=g)
    label = (image > 0.5).to(torch.uint8)
    batch = {"image": image, "label": label}
    model = task.build_model()
    reference = _clipped_update(model, "hooks", batch)
    assert reference.norm() > 0
    for mode in (MICRO, MICRO_SEQUENTIAL):
        update = _clipped_update(model, mode, batch, task=task)
        assert float((update - reference).norm() / reference.norm()) <= 1e-4


def test_segmentation_phase_is_the_training_loss_per_case():
    from monai.losses import DiceCELoss

    cfg = parse_config({"sites": [{"name": "a", "data": "/a"}],
                        "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
                        "train": {"patch_size": [8, 8, 8]}})
    task = build_task(cfg)
    model = task.build_model()
    (phase,) = task.phases(model)
    assert phase.name == "unet" and len(phase.params) == len(list(model.parameters()))
    image = torch.rand(3, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = {"image": image, "label": (image > 0.4).to(torch.uint8)}
    per_case = phase.loss(model, batch)
    assert per_case.shape == (3,)
    batch_loss = DiceCELoss(to_onehot_y=True, softmax=True)(model(image), batch["label"])
    assert torch.allclose(per_case.mean(), batch_loss, atol=1e-6)


# -- the DP loop --------------------------------------------------------------------------------


def test_every_phase_update_is_one_accountant_step():
    task, cfg = TwoPhaseTask(), _toy_cfg(rounds=2, local_steps=3)
    ledger = PrivacyLedger(PrivacyConfig(epsilon=1e6, noise_multiplier=1.0))
    model = task.build_model()
    done = train_private(task, cfg, model, _cases(12), ledger)
    assert done.status == "trained" and done.result.steps == 3
    q = 1 / 4  # 12 cases, batch 3
    assert ledger.history == [(1.0, q, 6)]  # 3 local steps x 2 phases
    record = ledger.record(done.status, done.result.steps)
    assert record["steps"] == 6 and record["steps_this_round"] == 3
    assert record["updates_per_step"] == 2
    start = model.state_dict()
    assert all(not torch.equal(start[k], done.weights[k]) for k in start)  # both phases moved


def _toy_round(planned_updates: int):
    """The toy task, its model, a 12-case loader and a ledger set up for it."""
    task = TwoPhaseTask()
    ledger = PrivacyLedger(PrivacyConfig(epsilon=1e6, noise_multiplier=1.0))
    loader = task.make_train_loader(_cases(12), seed=0)
    ledger.setup(1 / len(loader), planned_steps=planned_updates)
    return task, task.build_model(), loader, ledger


def test_after_update_follows_every_update_of_its_phase():
    task, model, loader, ledger = _toy_round(planned_updates=8)
    seen = []
    generators, discriminators = task.phases(model)
    generators.after_update = lambda: seen.append(model["g"][0].weight.detach().clone())
    dp_train_steps(task, model, [generators, discriminators], loader, ledger, 4)
    # Once per generator update (after it: the weights it sees differ each time), not per
    # discriminator update.
    assert len(seen) == 4 and ledger.steps == 8
    assert all(not torch.equal(a, b) for a, b in zip(seen, seen[1:], strict=False))
    assert torch.equal(seen[-1], model["g"][0].weight)


def test_a_phase_moves_only_its_own_parameters():
    task, model, loader, ledger = _toy_round(planned_updates=4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    generators = task.phases(model)[:1]
    dp_train_steps(task, model, generators, loader, ledger, 4)
    after = model.state_dict()
    assert all(torch.equal(start[k], after[k]) for k in start if k.startswith("d."))
    assert all(not torch.equal(start[k], after[k]) for k in start if k.startswith("g."))
    assert ledger.steps == 4


def test_budget_takes_whole_local_steps_then_declines():
    task, cfg = TwoPhaseTask(), _toy_cfg(rounds=2, local_steps=3)
    probe = PrivacyLedger(PrivacyConfig(epsilon=1e6, noise_multiplier=2.0))
    probe.setup(1 / 4, planned_steps=12)
    # A budget that 5 updates fit but 6 do not: 2 whole local steps (4 updates) this round,
    # then the single update left is no whole step.
    budget = (probe.epsilon_after(5) + probe.epsilon_after(6)) / 2
    ledger = PrivacyLedger(PrivacyConfig(epsilon=budget, noise_multiplier=2.0))
    first = train_private(task, cfg, task.build_model(), _cases(12), ledger)
    assert first.status == "budget-limited" and first.result.steps == 2
    assert ledger.steps == 4 and ledger.epsilon() <= budget
    second = train_private(task, cfg, task.build_model(), _cases(12), ledger)
    assert second.status == "declined" and second.result is None and ledger.steps == 4
    # The ledger's ε is a fresh accountant's replay of (σ, q, updates).
    assert ledger.epsilon() == pytest.approx(probe.epsilon_after(4), rel=1e-12)


def test_calibration_plans_every_phase_update():
    task, cfg = TwoPhaseTask(), _toy_cfg(rounds=2, local_steps=3)
    ledger = PrivacyLedger(PrivacyConfig(epsilon=5.0))
    train_private(task, cfg, task.build_model(), _cases(12), ledger)
    train_private(task, cfg, task.build_model(), _cases(12), ledger)
    assert ledger.steps == 2 * 3 * 2
    assert 4.9 < ledger.epsilon() <= 5.0  # σ spends the budget over exactly these updates


def test_mostly_empty_poisson_batches_still_step_with_noise():
    task = TwoPhaseTask(batch_size=1)
    model = task.build_model()
    loader = task.make_train_loader(_cases(40), seed=0)  # q = 1/40: most draws are empty
    ledger = PrivacyLedger(PrivacyConfig(epsilon=1e6, noise_multiplier=1.0))
    ledger.setup(1 / len(loader), planned_steps=10)
    start = [p.detach().clone() for p in model.parameters()]
    result = dp_train_steps(task, model, task.phases(model), loader, ledger, 5)
    assert result.steps == 5 and ledger.steps == 10
    assert all(not torch.equal(s, p) for s, p in zip(start, model.parameters(), strict=True))


def _distance_moved(mu: float) -> dict[str, float]:
    task = TwoPhaseTask(lr=0.05)
    model = task.build_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    loader = task.make_train_loader(_cases(12), seed=0)
    ledger = PrivacyLedger(PrivacyConfig(epsilon=1e6, noise_multiplier=1.0))
    ledger.setup(1 / len(loader), planned_steps=60)
    torch.manual_seed(0)
    dp_train_steps(task, model, task.phases(model), loader, ledger, 30, proximal_mu=mu)
    return {net: math.sqrt(sum(float((p.detach() - start[n]).norm() ** 2)
                               for n, p in model.named_parameters() if n.startswith(net)))
            for net in ("g", "d")}


def test_fedprox_term_holds_shared_weights_near_the_start():
    free, held = _distance_moved(0.0), _distance_moved(10.0)
    assert held["g"] < 0.5 * free["g"], (held, free)
    # The discriminator stays at the site: no global model to be held near.
    assert held["d"] > 0.5 * free["d"], (held, free)
