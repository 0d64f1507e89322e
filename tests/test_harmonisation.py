"""HarmonisationTask: CycleGAN losses, per-sample phases, sharing, training, harmonised output
grids, phantom reference set and paired ground truth, error messages."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedscan.client.privacy import dp_ready
from fedscan.shared.checkpoint import save_model
from fedscan.shared.config import load_config, parse_config
from fedscan.shared.errors import ConfigError, DataError, FedscanError
from fedscan.shared.inference import (
    harmonise_file,
    harmonise_on_grids,
    harmonise_volume,
    intensity_ranges,
    native_scaled,
    preprocess_image,
    to_native,
)
from fedscan.shared.metrics import (
    masked_psnr,
    normalise_intensity,
    psnr,
    region_similarity,
    ssim,
    truth_metrics,
)
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.harmonisation import (
    CURVE_GAIN,
    CycleGAN,
    HarmonisationTask,
    IntensityCurve,
    adversarial_loss,
    discriminator_loss,
    generator_loss,
    generator_terms,
    l1_loss,
)
from fedscan.shared.tasks.loop import train_steps
from fedscan.simulations import anatomy as A
from fedscan.simulations import phantoms as P
from fedscan.simulations.harmonisation import score_against_truth
from tests.tinysites import parse_with

#: Coarse phantoms (8 mm) for training data: a couple of thousand voxels per volume.
COARSE = {"site-c": P.ScannerProfile("site-c", "PIL", (8.0, 7.0, 8.0), gamma=1.6,
                                     bias_strength=0.25, noise_std=0.06, scale=3000.0,
                                     offset=100.0, dtype="uint16")}


def config(**overrides):
    data = {"sites": [{"name": "a", "data": "/x"}], "task": "harmonisation",
            "data": {"spacing": [8.0, 8.0, 8.0]},
            "train": {"patch_size": [16, 16, 16], "batch_size": 2},
            "harmonisation": {"channels": [4, 8], "strides": [2], "disc_channels": 4,
                              "disc_layers": 2, "lr": 1e-3},
            "evaluate": {"sw_batch_size": 4}}
    return parse_with(data, overrides)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: one thread is as fast and does not oversubscribe a shared machine.
    torch.set_num_threads(1)


def batch(b: int = 3, shape=(16, 16, 16), seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(b, 1, *shape, generator=g),
            "reference": torch.rand(b, 1, *shape, generator=g)}


class Affine(nn.Module):
    """``a * x + b``: an invertible toy generator."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x + self.b


class Brightness(nn.Module):
    """A discriminator that scores every patch by its mean intensity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(1, x.dim())), keepdim=True)


class Constant(nn.Module):
    """A discriminator that scores every patch ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, 2, 2, 2), self.value)


# -- config ---------------------------------------------------------------------------------


def test_config_defaults_unknown_keys_and_relative_reference(tmp_path):
    cfg = parse_config({"sites": [{"name": "a", "data": "/x"}], "task": "harmonisation"})
    h = cfg.harmonisation
    assert (h.reference, h.lambda_cycle, h.lambda_identity, h.lr) == (None, 1.0, 0.0, 1e-3)
    with pytest.raises(ConfigError, match="harmonisation.lambda_cyle"):
        parse_config({"sites": [{"name": "a", "data": "/x"}],
                      "harmonisation": {"lambda_cyle": 1.0}})
    (tmp_path / "run.yaml").write_text("sites: [{name: a, data: site-a}]\ntask: harmonisation\n"
                                       "harmonisation: {reference: ref}\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.harmonisation.reference == str((tmp_path / "ref").resolve())


@pytest.mark.parametrize("override, key", [
    ({"harmonisation": {"strides": [2, 2]}}, "harmonisation.strides"),
    ({"train": {"patch_size": [12, 12, 12]}}, "train.patch_size"),
    ({"harmonisation": {"disc_layers": 3}}, "harmonisation.disc_layers"),
    ({"harmonisation": {"lambda_identity": -1.0}}, "harmonisation.lambda_cycle"),
    ({"harmonisation": {"average_decay": 1.0}}, "harmonisation.average_decay"),
])
def test_inconsistent_keys_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        HarmonisationTask(config(**override))


def test_training_without_reference_is_a_config_error(tmp_path):
    task = build_task(config())
    with pytest.raises(ConfigError, match="harmonisation.reference"):
        task.make_train_loader([{"image": str(tmp_path / "x.nii.gz"), "label": "", "case": "x"}],
                               seed=0)


# -- losses ---------------------------------------------------------------------------------


def test_adversarial_loss_is_lsgan_per_sample():
    scores = torch.stack([torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)])
    assert adversarial_loss(scores, True).tolist() == [0.0, 1.0]
    assert adversarial_loss(scores, False).tolist() == [1.0, 0.0]
    # The generators' adversarial term falls as the discriminators score fakes as real.
    model = build_task(config()).build_model()
    b = batch()
    values = []
    for value in (0.0, 0.5, 1.0):
        model.d_site, model.d_ref = Constant(value), Constant(value)
        values.append(generator_terms(model, b)["adversarial"])
    assert torch.all(values[0] > values[1]) and torch.all(values[1] > values[2])
    assert torch.all(values[2] == 0)


def test_discriminator_loss_rewards_telling_real_from_fake():
    model = build_task(config()).build_model()  # identity generators: fakes are the inputs
    b = {"image": torch.zeros(2, 1, 16, 16, 16), "reference": torch.ones(2, 1, 16, 16, 16)}
    model.d_site, model.d_ref = Constant(0.5), Constant(0.5)
    assert torch.allclose(discriminator_loss(model, b), torch.full((2,), 0.5))
    # d_ref scores real references 1 and translated (dark) site patches 0: no loss there.
    model.d_ref = Brightness()
    assert torch.allclose(discriminator_loss(model, b), torch.full((2,), 0.25))
    model.d_site = nn.Sequential(Brightness(), Affine(-1.0, 1.0))  # dark site patches are real
    assert torch.equal(discriminator_loss(model, b), torch.zeros(2))


def test_identity_and_cycle_vanish_exactly_when_they_should():
    b = batch()
    model = build_task(config()).build_model()
    # Residual generators start as the identity: nothing to reconstruct or preserve.
    t = generator_terms(model, b)
    assert torch.all(t["identity"] == 0) and torch.all(t["cycle"] == 0)
    # Perfect inverse pair: cycle is 0, identity is not.
    model.g_site2ref, model.g_ref2site = Affine(2.0, 1.0), Affine(0.5, -0.5)
    t = generator_terms(model, b)
    assert torch.allclose(t["cycle"], torch.zeros(3), atol=1e-6)
    assert torch.all(t["identity"] > 0.5)
    # A non-inverse pair breaks the cycle.
    model.g_ref2site = Affine(0.5, 0.0)
    assert torch.all(generator_terms(model, b)["cycle"] > 0.2)
    assert torch.equal(l1_loss(b["image"], b["image"]), torch.zeros(3))


def test_generator_loss_weights_its_terms():
    model, b = build_task(config()).build_model(), batch()
    with torch.no_grad():
        model.g_site2ref.head.weight.fill_(0.1)  # away from the identity
        t = generator_terms(model, b)
        total = generator_loss(model, b, lambda_cycle=3.0, lambda_identity=0.5)
        without = generator_loss(model, b, lambda_cycle=3.0, lambda_identity=0.0)
    assert torch.allclose(total, t["adversarial"] + 3.0 * t["cycle"] + 0.5 * t["identity"])
    assert torch.allclose(without, t["adversarial"] + 3.0 * t["cycle"])
    assert torch.all(t["cycle"] > 0) and torch.all(t["identity"] > 0)


# -- model, phases, sharing -----------------------------------------------------------------


@pytest.mark.parametrize("dims, patch", [(3, [16, 16, 16]), (2, [32, 32, 1])])
def test_model_builds_runs_and_is_opacus_compatible(dims, patch):
    cfg = config(model={"spatial_dims": dims}, train={"patch_size": patch})
    task = build_task(cfg)
    model = task.build_model()
    assert isinstance(model, CycleGAN)
    assert ModuleValidator.validate(model, strict=False) == []
    # What a DP site does with it: a deep copy (pickled, the moving average included), checked.
    private = dp_ready(model)
    assert private is not model and private.g_site2ref_avg is not None
    b = batch(2, tuple(patch[:dims]))
    assert model(b["image"]).shape == b["image"].shape
    for phase in task.phases(model):
        assert phase.loss(model, b).shape == (2,)


def test_same_seed_gives_identical_weights():
    a = build_task(config(seed=3)).build_model().state_dict()
    b = build_task(config(seed=3)).build_model().state_dict()
    c = build_task(config(seed=4)).build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_shared_keys_are_the_generator_bodies():
    task = build_task(config())
    model = task.build_model()
    keys = task.shared_keys(model)
    every = list(model.state_dict())
    site_parts = {k for k in every if k.startswith(("g_site2ref.", "g_ref2site."))
                  and k.split(".")[1] in ("curve", "head")}
    assert {k.split(".")[0] for k in site_parts} == {"g_site2ref", "g_ref2site"}
    assert {k.split(".")[1] for k in site_parts} == {"curve", "head"}
    assert keys == [k for k in every if k.startswith(("g_site2ref.body.", "g_ref2site.body."))]
    assert any(k.startswith("g_site2ref.body.") for k in keys)
    assert any(k.startswith("g_ref2site.body.") for k in keys)
    # What stays at the site: its discriminators, its scanner's curves and output heads, and
    # the moving average of its site-to-reference generator.
    average = {k for k in every if k.startswith("g_site2ref_avg.")}
    assert "g_site2ref_avg.n_averaged" in average
    assert set(every) - set(keys) == site_parts | average | {
        k for k in every if k.startswith(("d_site.", "d_ref."))}


def test_intensity_curve_starts_as_identity_and_stays_monotone():
    curve = IntensityCurve(knots=8)
    x = torch.linspace(0.0, 1.5, 200)  # preprocessed images are in [0, 1]
    assert torch.allclose(curve(x), x, atol=1e-6)
    with torch.no_grad():  # any parameters: still non-decreasing, linear past the last knot
        curve.slopes.normal_(0, 1 / CURVE_GAIN)  # stored slopes are divided by the gain
        curve.offset.fill_(-0.01)
    y = curve(x)
    assert torch.all(y[1:] >= y[:-1])
    last = float(torch.nn.functional.softplus(curve.slopes[-1] * CURVE_GAIN))
    assert float(curve(torch.tensor(1.4)) - curve(torch.tensor(1.2))) == pytest.approx(
        0.2 * last, rel=1e-4)
    # Background below the offset's reach is cut to 0 by the generator, never negative.
    gen = build_task(config()).build_model().g_site2ref
    with torch.no_grad():
        gen.curve.offset.fill_(-0.05 / CURVE_GAIN)
    assert float(gen(torch.zeros(1, 1, 16, 16, 16)).min()) == 0.0


def test_curve_learns_a_contrast_change_faster_than_the_network():
    """The gain: one Adam step moves the curve's slopes CURVE_GAIN times farther."""
    curve = IntensityCurve(knots=4)
    x = torch.rand(256)
    opt = torch.optim.Adam(curve.parameters(), lr=1e-3)
    for _ in range(50):
        opt.zero_grad()
        ((curve(x) - x**0.5) ** 2).mean().backward()
        opt.step()
    fitted = float((curve(x) - x**0.5).abs().mean())
    assert fitted < 0.5 * float((x - x**0.5).abs().mean())


@pytest.mark.parametrize("which", ["generators", "discriminators"])
def test_phase_losses_are_per_sample_and_independent(which):
    task = build_task(config())
    model = task.build_model()
    with torch.no_grad():  # leave the identity, so generators depend on their input
        for gen in (model.g_site2ref, model.g_ref2site):
            gen.head.weight.normal_(0, 0.1)
    phases = {p.name: p for p in task.phases(model)}
    assert list(phases) == ["generators", "discriminators"]
    gen_params = {id(p) for p in phases["generators"].params}
    disc_params = {id(p) for p in phases["discriminators"].params}
    assert not gen_params & disc_params
    # Every trainable parameter is in one phase; the generator's moving average trains in none.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert gen_params | disc_params == trainable
    assert not trainable & {id(p) for p in model.g_site2ref_avg.parameters()}

    phase = phases[which]
    b = batch(3)
    before = phase.loss(model, b)
    assert before.shape == (3,) and torch.all(torch.isfinite(before))
    changed = {k: v.clone() for k, v in b.items()}
    changed["image"][1] = torch.rand_like(changed["image"][1]) * 3
    changed["reference"][2] = 0.0
    after = phase.loss(model, changed)
    assert torch.allclose(before[0], after[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before[1], after[1])
    # The gradient of sample 0's loss flows only into this phase's parameters.
    phase.loss(model, b)[0].backward()
    moved = {id(p) for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and moved <= {id(p) for p in phase.params} | (
        gen_params | disc_params if which == "generators" else set())


# -- data, training, evaluation -------------------------------------------------------------


def _site(root: Path, profile: P.ScannerProfile, n: int, seed: int = 0) -> list[dict]:
    cases = []
    for i in range(n):
        image, label, affine = P.render_case(seed, profile.name, i, profile)
        cases.append((f"{profile.name}_{i:03d}", image, label, affine))
    P.write_dataset(root, cases, None, "tiny harmonisation site")
    return [{"image": str(root / "imagesTr" / f"{c[0]}.nii.gz"),
             "label": str(root / "labelsTr" / f"{c[0]}.nii.gz"), "case": c[0]} for c in cases]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-case coarse site-c and a 2-case reference set (rendered at 8 mm, ~1 s)."""
    root = tmp_path_factory.mktemp("harm")
    cases = _site(root / "site-c", COARSE["site-c"], 3)
    reference = P.ScannerProfile("reference", "RAS", (8.0, 8.0, 8.0))
    ref_cases = _site(root / "reference", reference, 2, seed=99)
    return cases, ref_cases, root / "reference"


def test_loader_pairs_site_patches_with_reference_patches(tiny):
    cases, _, ref_root = tiny
    task = build_task(config(harmonisation={"reference": str(ref_root)}))
    loader = task.make_train_loader(cases, seed=0)
    assert len(loader.dataset) == 3
    b = next(iter(loader))
    assert b["image"].shape == b["reference"].shape == (2, 1, 16, 16, 16)
    assert float(b["image"].min()) >= 0.0 and float(b["image"].max()) <= 1.0
    again = next(iter(task.make_train_loader(cases, seed=0)))
    assert all(torch.equal(b[k], again[k]) for k in b)


def test_unreadable_training_image_is_a_one_line_data_error(tiny, tmp_path):
    _, _, ref_root = tiny
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    task = build_task(config(harmonisation={"reference": str(ref_root)}))
    with pytest.raises(DataError, match="not a readable NIfTI") as info:
        task.make_train_loader([{"image": str(bad), "label": "", "case": "bad"}], seed=0)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_training_moves_both_phases_and_evaluates(tiny):
    cases, _, ref_root = tiny
    task = build_task(config(harmonisation={"reference": str(ref_root)}))
    model = task.build_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    steps_seen = []
    result = train_steps(task, model, task.make_optimizer(model.parameters()),
                              task.make_train_loader(cases, seed=1), 3,
                              on_step=lambda s, n, loss: steps_seen.append(s))
    assert (result.steps, result.num_examples, steps_seen) == (3, 3, [1, 2, 3])
    assert math.isfinite(result.loss)
    end = model.state_dict()
    for prefix in ("g_site2ref.", "g_ref2site.", "d_site.", "d_ref."):
        assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith(prefix))
    assert all(p.grad is None for p in model.parameters())

    ev = task.evaluate(model, cases[:1])
    assert ev.num_examples == 1 and set(ev.metrics) == {"cycle_psnr", "cycle_ssim", "change"}
    assert all(math.isfinite(v) for v in ev.metrics.values())
    assert set(ev.per_case) == {cases[0]["case"]}


def test_site_harmonises_with_the_moving_average_of_its_generator(tiny):
    cases, _, ref_root = tiny
    decay = 0.5
    task = build_task(config(harmonisation={"reference": str(ref_root), "average_decay": decay}))
    model = task.build_model()
    assert model.harmoniser() is model.g_site2ref  # nothing averaged yet
    loader = task.make_train_loader(cases, seed=1)
    optimizer = task.make_optimizer(model.parameters())
    snapshots = []
    for _ in range(3):
        train_steps(task, model, optimizer, loader, 1)
        snapshots.append({n: p.detach().clone() for n, p in model.g_site2ref.named_parameters()})
    average = model.g_site2ref_avg
    assert int(average.n_averaged) == 3 and model.harmoniser() is average.module
    # An exponential moving average: the first update copies, each later one moves 1 - decay.
    for name, p in average.module.named_parameters():
        expected = snapshots[0][name]
        for snapshot in snapshots[1:]:
            expected = decay * expected + (1 - decay) * snapshot[name]
        assert torch.allclose(p, expected, atol=1e-6), name
    assert any(not torch.equal(p, snapshots[-1][n]) for n, p in average.module.named_parameters())
    # It travels in the site's state: a model loaded from it harmonises with the average, one
    # that received only the shared weights (the server's) with g_site2ref.
    loaded = task.build_model()
    loaded.load_state_dict(model.state_dict())
    assert loaded.harmoniser() is loaded.g_site2ref_avg.module
    x = batch(1)["image"]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), average.module(x))
        assert not torch.equal(loaded(x), model.g_site2ref(x))
    assert build_task(config(harmonisation={"average_decay": 0.0})).build_model() \
        .g_site2ref_avg is None


def test_training_learns_a_known_contrast_change():
    """Unpaired 2D toy: the site is the reference domain under gamma 2 (darker midtones)."""
    cfg = config(model={"spatial_dims": 2}, train={"patch_size": [16, 16, 1], "batch_size": 8},
                 harmonisation={"lambda_identity": 0.0, "channels": [8, 16],
                                "disc_channels": 8})
    task = build_task(cfg)
    model = task.build_model()
    g = torch.Generator().manual_seed(0)

    def smooth(n: int) -> torch.Tensor:  # smooth random images in [0, 1]
        coarse = torch.rand(n, 1, 4, 4, generator=g)
        return nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear")

    class Batches:
        dataset = range(8)

        def __iter__(self):
            for _ in range(4):  # independent draws: the pairs are unrelated images
                yield {"image": smooth(8) ** 2, "reference": smooth(8)}

    truth = smooth(64)
    before = float((truth**2 - truth).abs().mean())
    train_steps(task, model, task.make_optimizer(model.parameters()), Batches(), 120)
    with torch.no_grad():
        after = float((model.g_site2ref(truth**2) - truth).abs().mean())
    assert after < 0.5 * before


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the gradient of every parameter it updates, per step, by name."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__(model.parameters(), lr=lr)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append({self.names[id(p)]: p.grad.clone() for g in self.param_groups
                           for p in g["params"] if p.grad is not None})
        return super().step(closure)


def test_fedprox_pulls_the_shared_generator_weights_only(tiny):
    cases, _, ref_root = tiny
    task = build_task(config(harmonisation={"reference": str(ref_root)}))
    lr, mu = 1e-3, 50.0
    runs = []
    for m in (0.0, mu):
        model = task.build_model()
        opt = RecordingSGD(model, lr)
        train_steps(task, model, opt, task.make_train_loader(cases, seed=2), 2, proximal_mu=m)
        runs.append(opt.grads)  # generators, discriminators, generators, discriminators
    free, held = runs
    shared = set(task.shared_keys(task.build_model()))
    # Step 1 starts at the received weights: no pull yet, both runs identical.
    assert all(torch.equal(free[0][n], held[0][n]) for n in free[0])
    # Step 2's generator update: the same weights and batch, plus mu * (w - w0) for exactly
    # the shared weights, where w - w0 is step 1's move; the site's curves and heads get
    # nothing.
    pulled = set()
    for name, g in held[2].items():
        extra = g - free[2][name]
        if name in shared:
            assert torch.allclose(extra, mu * -lr * free[0][name], atol=1e-6), name
            pulled.add(name)
        else:
            assert name.split(".")[1] in ("curve", "head"), name
            assert torch.equal(extra, torch.zeros_like(extra)), name
    assert pulled == {n for n in shared if n in held[2]} and pulled
    assert not any(n.startswith("d_") for n in held[2])  # discriminators: their own phase


# -- harmonised output ----------------------------------------------------------------------


def _trained_file(tmp_path: Path, cfg, *, keys: str = "site", shift: float = 0.25) -> Path:
    """A model file as a site saves it (``site``: every weight), as the server does
    (``shared``), or with the discriminators only."""
    task = build_task(cfg)
    model = task.build_model()
    with torch.no_grad():
        model.g_site2ref.head.bias.fill_(shift)  # a visible, known change
    state = model.state_dict()
    if keys == "shared":
        state = {k: state[k] for k in task.shared_keys(model)}
    elif keys == "discriminators":
        state = {k: v for k, v in state.items() if k.startswith("d_")}
    return save_model(tmp_path / f"model{shift}{keys}.pt", config=cfg, state_dict=state)


@pytest.mark.parametrize("profile", [
    P.ScannerProfile("pil", "PIL", (5.0, 3.5, 4.0), fov_mm=(96.0, 112.0, 104.0),
                     gamma=1.6, scale=3000.0, offset=100.0, dtype="uint16"),
    P.ScannerProfile("lps", "LPS", (3.5, 3.5, 5.0), fov_mm=(96.0, 112.0, 104.0),
                     scale=1000.0, dtype="int16"),
])
def test_harmonised_file_keeps_the_input_grid(tmp_path, profile):
    image, _, affine = P.render_case(0, profile.name, 0, profile)
    src = tmp_path / "in.nii.gz"
    P._save_nifti(image, affine, src)
    cfg = config(data={"spacing": [4.0, 4.0, 4.0]})
    outs = []
    for shift in (0.0, 0.25):
        out = harmonise_file(_trained_file(tmp_path, cfg, shift=shift), src,
                             tmp_path / "out" / f"h{shift}.nii.gz", device="cpu")
        img = nib.load(out)
        assert img.shape == image.shape and np.allclose(img.affine, affine)
        assert nib.aff2axcodes(img.affine) == tuple(profile.orientation)
        assert img.get_data_dtype() == np.float32
        outs.append(np.asanyarray(img.dataobj))
    # The generator's +0.25 comes back unchanged (inversion is linear) ...
    assert np.allclose(outs[1] - outs[0], 0.25, atol=1e-4)
    # ... but not from the server's file: the head that made it is the site's own.
    shared = harmonise_file(_trained_file(tmp_path, cfg, keys="shared", shift=0.25), src,
                            tmp_path / "out" / "shared.nii.gz", device="cpu")
    assert np.allclose(np.asanyarray(nib.load(shared).dataobj), outs[0], atol=1e-6)
    # ... and the identity's output lands on the input's own voxels: no flip or shift.
    expected = normalise_intensity(image)

    def error(shifted: np.ndarray) -> float:
        return float(np.abs(shifted - expected)[2:-2, 2:-2, 2:-2].mean())

    for axis in range(3):
        for k in (-1, 1):
            assert error(outs[0]) < error(np.roll(outs[0], k, axis))


def test_harmonised_scan_keeps_its_own_resolution(tmp_path):
    """A scan finer than the model grid: only the correction goes through that grid."""
    profile = P.ScannerProfile("fine", "LPS", (1.5, 2.0, 1.5), fov_mm=(64.0, 64.0, 64.0),
                               gamma=1.3, noise_std=0.03, scale=1000.0, dtype="int16")
    image, _, affine = P.render_case(0, profile.name, 0, profile)
    src = tmp_path / "in.nii.gz"
    P._save_nifti(image, affine, src)
    cfg = config(data={"spacing": [4.0, 4.0, 4.0]})
    x, pre = preprocess_image(src, cfg)
    # The scan on its own grid, scaled exactly as its model-grid version was.
    scaled = native_scaled(nib.load(src), intensity_ranges(pre))[0].numpy()
    gen = build_task(cfg).build_model().g_site2ref.eval()
    out = harmonise_on_grids(gen, src, cfg, "cpu")[2]
    # The identity generator returns the scan itself, every voxel's detail included ...
    assert np.allclose(np.asarray(out.dataobj), scaled, atol=1e-6)
    # ... which the model grid's round trip would blur away.
    round_trip = to_native(x.as_tensor().clone(), x, pre, nib.load(src))
    assert np.abs(round_trip[0].numpy() - scaled).mean() > 0.01
    # A correction arrives on the fine grid as it was made, added after the curve.
    with torch.no_grad():
        gen.head.bias.fill_(0.25)
    shifted = np.asarray(harmonise_on_grids(gen, src, cfg, "cpu")[2].dataobj)
    assert np.allclose(shifted, scaled + 0.25, atol=1e-5)


def test_native_scaling_uses_each_channels_model_grid_range(tmp_path):
    rng = np.random.default_rng(0)
    t1 = rng.uniform(0, 1, (20, 18, 16)).astype(np.float32)
    t1[:3] = 0  # background, left out of the percentiles
    two = np.stack([t1, 3000 * t1 + 100], axis=-1)  # channels last, as nibabel stores them
    two[0, 0, 0, 1] = np.nan
    src = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(two, np.diag([2.0, 2.0, 2.0, 1.0])), src)
    cfg = config(data={"spacing": [3.0, 3.0, 3.0], "in_channels": 2})
    _, pre = preprocess_image(src, cfg)
    ranges = intensity_ranges(pre)
    assert len(ranges) == 2 and ranges[1][1] > 1000 > ranges[0][1]
    scaled = native_scaled(nib.load(src), ranges).numpy()
    assert scaled.shape == (2, 20, 18, 16) and scaled.min() >= 0 and scaled.max() <= 1
    # Each channel went through its own range; a non-finite voxel becomes the lowest value.
    assert scaled[1, 0, 0, 0] == 0
    expect = np.clip((t1 - ranges[0][0]) / (ranges[0][1] - ranges[0][0]), 0, 1)
    assert np.allclose(scaled[0], expect, atol=1e-6)
    with pytest.raises(ValueError, match="2 channels, 1 intensity ranges"):
        native_scaled(nib.load(src), ranges[:1])


def test_harmonise_volume_in_2d(tmp_path):
    profile = P.ScannerProfile("pil", "PIL", (5.0, 3.5, 4.0), fov_mm=(64.0, 64.0, 64.0))
    image, _, affine = P.render_clean(P.sample_anatomy(np.random.default_rng(0)), profile)
    src = tmp_path / "in.nii.gz"
    P._save_nifti(image, affine, src)
    cfg = config(model={"spatial_dims": 2}, train={"patch_size": [16, 16, 1]})
    gen = build_task(cfg).build_model().g_site2ref.eval()
    out = harmonise_volume(gen, src, cfg)
    assert out.shape == image.shape and np.allclose(out.affine, affine)


def test_bad_checkpoints_and_inputs_are_one_line_errors(tmp_path):
    cfg = config()
    profile = P.ScannerProfile("tiny", "RAS", (8.0, 8.0, 8.0), fov_mm=(64.0, 64.0, 64.0))
    image, _, affine = P.render_clean(P.sample_anatomy(np.random.default_rng(0)), profile)
    src = tmp_path / "in.nii.gz"
    P._save_nifti(image, affine, src)

    def fails(model_path, image_path, match):
        with pytest.raises(FedscanError, match=match) as info:
            harmonise_file(model_path, image_path, tmp_path / "o.nii.gz", device="cpu")
        assert "\n" not in str(info.value)
        return str(info.value)

    only_d = _trained_file(tmp_path / "d", cfg, keys="discriminators")
    assert str(only_d) in fails(only_d, src, "site-to-reference generator weights missing")
    seg_cfg = parse_config({"sites": [{"name": "a", "data": "/x"}]})
    seg = save_model(tmp_path / "seg.pt", config=seg_cfg, state_dict={})
    assert str(seg) in fails(seg, src, "not a harmonisation model")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a model")
    fails(corrupt, src, "not a readable fedscan model")

    good = _trained_file(tmp_path / "ok", cfg, keys="all")
    fails(good, tmp_path / "missing.nii.gz", "image file not found")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    assert str(bad) in fails(good, bad, "not a readable NIfTI")


# -- metrics --------------------------------------------------------------------------------


def test_metrics_and_normalisation():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, (16, 16, 16)).astype(np.float32)
    assert psnr(a, a) == math.inf and ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert 15 < psnr(noisy, a) < 25 and ssim(noisy, a) < 0.95
    # Stored gain and offset do not matter after normalisation; clipped to [0, 1].
    assert np.allclose(normalise_intensity(3000 * a + 100), normalise_intensity(a), atol=1e-5)
    n = normalise_intensity(a)
    assert n.min() == 0.0 and n.max() == 1.0
    m = truth_metrics(noisy, a, a)
    assert m["psnr_harmonised"] == math.inf and m["psnr_raw"] < 25
    assert m["ssim_harmonised"] > m["ssim_raw"]



def test_region_scores_share_one_ssim_map_and_match_the_whole_image_scores():
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 1, (2, 24, 20, 22)).astype(np.float32)
    image = truth + rng.normal(0, 0.05, truth.shape).astype(np.float32)
    image[:, :12] += rng.normal(0, 0.3, image[:, :12].shape)  # worse in one half
    left = np.zeros(truth.shape[1:], bool)
    left[:12] = True
    out = region_similarity(image, truth, {"all": None, "left": left, "right": ~left,
                                           "none": np.zeros_like(left)})
    normed = [(normalise_intensity(a), normalise_intensity(t)) for a, t
              in zip(image, truth, strict=True)]
    assert out["all"]["ssim"] == pytest.approx(np.mean([ssim(a, t) for a, t in normed]),
                                               abs=1e-6)
    assert out["all"]["psnr"] == pytest.approx(np.mean([psnr(a, t) for a, t in normed]))
    assert out["left"]["psnr"] == pytest.approx(
        np.mean([masked_psnr(a, t, left) for a, t in normed]))
    assert out["left"]["ssim"] < out["right"]["ssim"] < 1.0
    assert math.isnan(out["none"]["ssim"]) and math.isnan(out["none"]["psnr"])
    with pytest.raises(ValueError, match="mask"):
        region_similarity(image, truth, {"bad": left[:-1]})

def test_scores_against_truth_in_model_and_native_grids(tmp_path):
    profile = P.ScannerProfile("site-c", "PIL", (8.0, 7.0, 8.0), gamma=1.6, noise_std=0.05,
                               scale=3000.0, offset=100.0, dtype="uint16")
    image, _, affine = P.render_case(0, "site-c", 0, profile)
    src = tmp_path / "in.nii.gz"
    P._save_nifti(image, affine, src)
    truth, truth_affine = P.reference_truth(0, "site-c", 0, profile)
    cfg = config()
    identity = build_task(cfg).build_model().g_site2ref.eval()
    s, out = score_against_truth(identity, src, truth, truth_affine, cfg)
    assert set(s) == ({f"{g}_{m}_{w}" for g in ("grid", "native", "head")
                       for m in ("psnr", "ssim") for w in ("raw", "harmonised")}
                      | {f"{g}_{m}_ceiling" for g in ("native", "head") for m in ("psnr", "ssim")})
    # The identity changes nothing on the model grid.
    assert s["grid_psnr_harmonised"] == pytest.approx(s["grid_psnr_raw"], abs=0.01)
    assert s["grid_ssim_harmonised"] == pytest.approx(s["grid_ssim_raw"], abs=1e-3)
    # ... nor on the scan's own grid, whose detail makes no round trip through the model's
    # (not exactly: the voxels beyond the model grid's intensity range, which resampling
    # smooths, are clipped there, and the score normalises again).
    assert s["native_psnr_harmonised"] == pytest.approx(s["native_psnr_raw"], abs=0.5)
    assert s["native_ssim_harmonised"] == pytest.approx(s["native_ssim_raw"], abs=0.02)
    # The harmonised image that was scored is the one harmonise_volume writes.
    again = harmonise_volume(identity, src, cfg)
    assert np.array_equal(np.asarray(out.dataobj), np.asarray(again.dataobj))
    assert out.shape == image.shape and np.allclose(out.affine, affine)
    # A perfect harmoniser: the truth itself scores far better than the site's image.
    truth_file = tmp_path / "truth.nii.gz"
    P._save_nifti(truth, truth_affine, truth_file)
    perfect, _ = score_against_truth(identity, truth_file, truth, truth_affine, cfg)
    assert perfect["grid_psnr_raw"] > s["grid_psnr_raw"] + 10
    with pytest.raises(ValueError, match="not on the image's grid"):
        score_against_truth(identity, src, truth[1:], truth_affine, cfg)


# -- phantom reference domain ---------------------------------------------------------------


def test_reference_truth_is_the_site_anatomy_on_the_site_grid():
    for site in ("site-a", "site-c"):
        profile = P.SITE_PROFILES[site]
        image, label, affine = P.render_case(0, site, 1, profile)
        truth, truth_affine = P.reference_truth(0, site, 1, profile)
        assert truth.shape == image.shape and truth.dtype == np.float32
        assert np.array_equal(truth_affine, affine)
        # Same head: the reference-domain brain mask on this grid is the site's label.
        clean = P.ScannerProfile("x", profile.orientation, profile.spacing, profile.fov_mm)
        head = A.sample_anatomy(P.case_rngs(0, site, 1)[0])
        assert np.array_equal(A.render_clean(head, clean, fine_mm=P.PHANTOM_FINE_MM)[1], label)
        brain = truth[label == 1]
        assert P.CSF * 0.8 < brain.mean() < P.WM * 1.1
        assert truth[0, 0, 0] == 0.0  # air is 0: no noise, no offset
    # site-a shares the reference grid: its truth is exactly the reference rendering.
    truth, _ = P.reference_truth(0, "site-a", 1, P.SITE_PROFILES["site-a"])
    ref, _, _ = A.render_clean(A.sample_anatomy(P.case_rngs(0, "site-a", 1)[0]),
                               P.REFERENCE_PROFILE, fine_mm=P.PHANTOM_FINE_MM)
    assert np.array_equal(truth, ref)


def test_reference_set_is_atomic_cached_and_has_other_anatomies(tmp_path):
    root = P.generate_reference_set(tmp_path / "ref", seed=0, n_cases=2)
    assert (root / P.COMPLETE_MARKER).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    img = nib.load(root / "imagesTr" / "reference_000.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and img.get_data_dtype() == np.float32
    mtime = img.get_filename() and Path(img.get_filename()).stat().st_mtime_ns
    assert P.generate_reference_set(root, seed=0, n_cases=2) == root
    assert Path(img.get_filename()).stat().st_mtime_ns == mtime  # cached, not rewritten
    site_head = P.reference_truth(0, "site-a", 0, P.SITE_PROFILES["site-a"])[0]
    assert not np.array_equal(np.asanyarray(img.dataobj), site_head)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("mine")
    with pytest.raises(DataError, match="not a fedscan reference dataset"):
        P.generate_reference_set(foreign, n_cases=1)
    assert P.default_reference_root().parent == P.default_federation_root().parent
