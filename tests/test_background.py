"""Background artefacts in training never touch labels or anatomy, and the noisy-background
held-out scanner puts signal only around the head."""

from __future__ import annotations

import numpy as np
import torch

from fedscan.shared.tasks.augmentation import background_artefacts
from fedscan.shared.tasks.segmentation import SegmentationTask
from fedscan.simulations.background import NOISY_PROFILE, air_artefacts
from fedscan.simulations.phantoms import case_rngs, render, sample_anatomy
from tests.tinysites import parse_with

SIDE = 16


def volume() -> dict[str, torch.Tensor]:
    """A 2-channel 16^3 image with a 3-class cube in the middle and a zero background."""
    label = torch.zeros(1, SIDE, SIDE, SIDE, dtype=torch.uint8)
    label[0, 4:12, 4:12, 4:12] = 1
    label[0, 6:10, 6:10, 6:10] = 2
    image = torch.stack([0.5 * label[0].float(), 0.25 * label[0].float()])
    return {"image": image, "label": label}


def test_artefacts_change_only_background_voxels_never_labels():
    data = volume()
    transform = background_artefacts(["image"], "label", [SIDE] * 3, prob=1.0)
    transform.set_random_state(seed=0)
    changed = 0
    for _ in range(10):
        out = transform({k: v.clone() for k, v in data.items()})
        assert torch.equal(out["label"], data["label"])
        foreground = (data["label"] > 0).expand_as(data["image"])
        assert torch.equal(out["image"][foreground], data["image"][foreground])
        changed += int((out["image"] != data["image"])[~foreground].sum())
        assert out["image"].dtype == torch.float32
    assert changed > 0.5 * 10 * (~foreground).sum()  # noise floor on most background voxels


def test_artefacts_are_seeded_through_compose():
    data = volume()
    runs = []
    for _ in range(2):
        transform = background_artefacts(["image"], "label", [SIDE] * 3, prob=1.0)
        transform.set_random_state(seed=5)
        runs.append(transform({k: v.clone() for k, v in data.items()})["image"])
    assert torch.equal(runs[0], runs[1])


def task_transform(background: bool):
    cfg = parse_with({"sites": [{"name": "a", "data": "/x"}],
                      "data": {"spacing": [1.0, 1.0, 1.0], "num_classes": 3, "in_channels": 2},
                      "model": {"channels": [4, 8], "strides": [2]},
                      "train": {"patch_size": [SIDE] * 3, "scanner_augmentation": False}},
                     {"train": {"background_augmentation": background}})
    transform = SegmentationTask(cfg).train_transforms()
    transform.set_random_state(seed=1)
    return transform


def test_training_transform_adds_background_artefacts_only_when_asked():
    data = volume()
    for background in (True, False):
        transform = task_transform(background)
        differs = False
        for _ in range(8):
            item = transform({k: v.clone() for k, v in data.items()})
            item = item[0] if isinstance(item, list) else item
            label, image = item["label"].to(torch.uint8), item["image"]
            assert image.shape[1:] == label.shape[1:] == (SIDE,) * 3
            if not background:  # a whole-volume patch: the crop is the identity
                assert torch.equal(label, data["label"])
            # The image is a function of the label (0.5 and 0.25 per class), so a label
            # moved or changed, or an anatomy voxel touched, breaks this where label > 0.
            clean = torch.cat([0.5 * label.float(), 0.25 * label.float()])
            inside = (label > 0).expand_as(image)
            assert torch.equal(image[inside], clean[inside])
            differs |= not torch.equal(image, clean)
        assert differs == background


def test_noisy_scanner_artefacts_leave_the_label_and_brighten_the_air():
    anatomy_rng, _ = case_rngs(0, "noisy", 0)
    anatomy = sample_anatomy(anatomy_rng)
    plain, label, _ = render(anatomy, NOISY_PROFILE, np.random.default_rng(1))
    noisy, label2, _ = render(anatomy, NOISY_PROFILE, np.random.default_rng(1),
                              artefacts=air_artefacts())
    assert np.array_equal(label, label2)
    air = label == 0
    assert noisy[air].astype(float).mean() > 1.05 * plain[air].astype(float).mean()
    assert noisy[air].max() > plain[air].max()


def centre_classes(class_balanced: bool | None, num_classes: int = 3, n: int = 300) -> list[int]:
    """The class at the centre of ``n`` training patches of a 48^3 volume whose class 2 is a
    small 3^3 cube inside a large class 1."""
    label = torch.zeros(1, 48, 48, 48, dtype=torch.uint8)
    label[0, 12:36, 12:36, 12:36] = 1
    label[0, 23:26, 23:26, 23:26] = 2 if num_classes > 2 else 1
    data = {"image": label.float() / 2 + 0.1, "label": label}
    cfg = parse_with({"sites": [{"name": "a", "data": "/x"}],
                      "data": {"spacing": [1.0, 1.0, 1.0], "num_classes": num_classes},
                      "model": {"channels": [4, 8], "strides": [2]},
                      "train": {"patch_size": [8, 8, 8], "pos_fraction": 0.5,
                                "scanner_augmentation": False,
                                "background_augmentation": False}},
                     {"train": {"class_balanced": class_balanced}})
    transform = SegmentationTask(cfg).train_transforms()
    transform.set_random_state(seed=2)
    out = []
    for _ in range(n):
        item = transform({k: v.clone() for k, v in data.items()})
        item = item[0] if isinstance(item, list) else item
        out.append(int(item["label"][0, 4, 4, 4]))  # the patch centre
    return out


def test_class_balanced_patches_see_small_classes_as_often_as_large_ones():
    balanced = centre_classes(None)  # default with two foreground classes: balanced
    assert 0.18 < balanced.count(2) / len(balanced) < 0.32  # pos_fraction / 2 = 0.25
    assert 0.18 < balanced.count(1) / len(balanced) < 0.32
    plain = centre_classes(False)
    assert plain.count(2) / len(plain) < 0.03  # 27 of ~14k foreground voxels
    assert SegmentationTask(parse_with({"sites": [{"name": "a", "data": "/x"}]}, {})
                            ).class_balanced is False  # one foreground class: off by default
