"""SegmentationTask: Opacus-safe model, deterministic init, training that learns, FedProx, 2D."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from fedscan.shared.errors import ConfigError, DataError
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.loop import train_steps
from fedscan.shared.tasks.segmentation import SegmentationTask
from tests.tinysites import parse_with


def sphere_case(folder, i: int, rng: np.random.Generator, shape=(32, 32, 32)) -> dict:
    """A noisy volume with a bright sphere (label 1) at a random place, 2 mm voxels."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    centre, radius = rng.uniform(10, 22, 3), rng.uniform(5, 9)
    label = (((grid - centre) ** 2).sum(-1) < radius**2).astype(np.uint8)
    gain = rng.uniform(0.5, 2.0)  # scanner gain differs per case
    image = gain * (100 + 150 * label + rng.normal(0, 20, shape))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    case = {"case": f"case{i}"}
    for key, arr in (("image", image.astype(np.float32)), ("label", label)):
        case[key] = str(folder / f"{key}{i}.nii.gz")
        nib.save(nib.Nifti1Image(arr, affine), case[key])
    return case


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spheres")
    rng = np.random.default_rng(0)
    return [sphere_case(folder, i, rng) for i in range(8)]


def config(**overrides):
    data = {"sites": [{"name": "a", "data": "/x"}],
            "data": {"spacing": [2.0, 2.0, 2.0]},
            "model": {"channels": [4, 8, 16], "strides": [2, 2]},
            "train": {"patch_size": [24, 24, 24], "lr": 1e-2},
            "evaluate": {"sw_batch_size": 8}}
    return parse_with(data, overrides)


@pytest.fixture(autouse=True)
def two_threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_model_is_opacus_compatible(norm):
    model = SegmentationTask(config(model={"norm": norm})).build_model()
    assert ModuleValidator.validate(model, strict=False) == []


def test_same_seed_gives_identical_initial_weights():
    a = SegmentationTask(config(seed=3)).build_model().state_dict()
    b = SegmentationTask(config(seed=3)).build_model().state_dict()
    c = SegmentationTask(config(seed=4)).build_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert SegmentationTask(config()).shared_keys(SegmentationTask(config()).build_model()) \
        == list(a)


def test_loader_has_one_item_per_case_and_batches_patches(cases):
    task = build_task(config(train={"batch_size": 3}))
    loader = task.make_train_loader(cases[:5], seed=0)
    assert len(loader.dataset) == 5
    batch = next(iter(loader))
    assert batch["image"].shape == (3, 1, 24, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (3, 1, 24, 24, 24)
    assert set(batch["label"].unique().tolist()) <= {0, 1}


def test_training_reaches_dice_on_held_out_cases(cases):
    task = build_task(config())
    model = task.build_model()
    loader = task.make_train_loader(cases[:6], seed=0)
    optimizer = task.make_optimizer(model.parameters())
    seen = []
    result = train_steps(task, model, optimizer, loader, 60, on_step=lambda *a: seen.append(a))
    assert result.steps == 60 and result.num_examples == 6 and math.isfinite(result.loss)
    assert [s[0] for s in seen] == list(range(1, 61))
    assert model.training
    evaluation = task.evaluate(model, cases[6:])
    assert model.training  # train mode restored
    assert evaluation.num_examples == 2 and set(evaluation.per_case) == {"case6", "case7"}
    assert evaluation.metrics["dice"] > 0.8, evaluation.metrics
    assert math.isfinite(evaluation.metrics["hd95"])


def _distance_moved(mu: float, cases) -> float:
    task = build_task(config(train={"lr": 1e-2}))
    model = task.build_model()
    start = [p.detach().clone() for p in model.parameters()]
    loader = task.make_train_loader(cases[:4], seed=0)
    train_steps(task, model, task.make_optimizer(model.parameters()), loader, 15, proximal_mu=mu)
    return sum(float((p.detach() - s).norm() ** 2) for p, s in zip(
        model.parameters(), start, strict=True)) ** 0.5


def test_fedprox_term_holds_weights_near_the_start(cases):
    free, held = _distance_moved(0.0, cases), _distance_moved(1e3, cases)
    assert held < 0.3 * free, (held, free)


def test_2d_config_trains_and_evaluates(cases):
    task = build_task(config(model={"spatial_dims": 2, "channels": [4, 8], "strides": [2]},
                             train={"patch_size": [24, 24, 1]}))
    model = task.build_model()
    loader = task.make_train_loader(cases[:4], seed=0)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, 24, 24) and batch["label"].shape == (2, 1, 24, 24)
    result = train_steps(task, model, task.make_optimizer(model.parameters()), loader, 5)
    assert math.isfinite(result.loss)
    evaluation = task.evaluate(model, cases[6:])
    assert 0.0 <= evaluation.metrics["dice"] <= 1.0


def test_label_outside_num_classes_names_the_file(tmp_path):
    case = sphere_case(tmp_path, 0, np.random.default_rng(1))
    label = nib.load(case["label"])
    nib.save(nib.Nifti1Image(np.asanyarray(label.dataobj) * 255, label.affine), case["label"])
    with pytest.raises(DataError, match="label0.nii.gz"):
        build_task(config()).make_train_loader([case], seed=0)


def test_patch_must_fit_the_strides():
    with pytest.raises(ConfigError, match="train.patch_size"):
        SegmentationTask(config(train={"patch_size": [22, 24, 24]}))
