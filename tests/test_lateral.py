"""Left-right flips never corrupt lateralised labels: pairs swap, undeclared sets never flip,
and the flipped axis is the one that runs left-right whatever the orientation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from fedscan.shared.data import (
    consortium_data_config,
    read_dataset,
    read_site,
    site_data_config,
)
from fedscan.shared.errors import DataError
from fedscan.shared.preprocessing import preprocess_case
from fedscan.shared.tasks.augmentation import (
    lateral_axis,
    lateral_axis_of,
    lateral_flip,
    lateral_swap,
)
from fedscan.shared.tasks.segmentation import SegmentationTask
from tests.tinysites import parse_with

#: Voxel axis codes of the stored files, and the preprocessing target orientations tried.
STORED = {"RAS": np.diag([1.0, 1.0, 1.0, 1.0]),
          "LPS": np.diag([-1.0, -1.0, 1.0, 1.0]),
          # PIL: voxel axis 0 runs posterior, 1 inferior, 2 left.
          "PIL": np.array([[0, 0, -1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])}
SIDE = 16


def world_case(folder, stored: str) -> dict[str, str]:
    """A 16^3 1 mm head stored in ``stored`` orientation, centred on the world origin: class
    1 (left) at world x < 0, class 2 (right) its mirror at x > 0, both only in the anterior
    half (so a flip along another axis moves them), and an image that differs left and right.
    """
    affine = STORED[stored].copy()
    centre = (SIDE - 1) / 2.0
    # Voxel (i, j, k) sits at world affine[:3,:3] @ ((i, j, k) - centre): origin in the middle.
    affine[:3, 3] = -affine[:3, :3] @ np.full(3, centre)
    ijk = np.stack(np.meshgrid(*[np.arange(SIDE)] * 3, indexing="ij"), -1).reshape(-1, 3)
    xyz = (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(SIDE, SIDE, SIDE, 3)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    inside = (np.abs(x) > 1.0) & (np.abs(x) < 6.0) & (y > 1.0) & (y < 6.0) & (np.abs(z) < 4.0)
    label = np.where(inside, np.where(x < 0, 1, 2), 0).astype(np.uint8)
    image = (100.0 + 50.0 * label + 3.0 * x + 7.0 * y + z).astype(np.float32)
    case = {"case": stored}
    for key, arr in (("image", image), ("label", label)):
        case[key] = str(folder / f"{key}_{stored}.nii.gz")
        nib.save(nib.Nifti1Image(arr, affine), case[key])
    return case


def config(**data):
    return parse_with({"sites": [{"name": "a", "data": "/x"}],
                       "data": {"spacing": [1.0, 1.0, 1.0], "num_classes": 3},
                       "model": {"channels": [4, 8], "strides": [2]},
                       "train": {"patch_size": [SIDE] * 3, "pos_fraction": 1.0,
                                 "scanner_augmentation": False,
                                 "background_augmentation": False}},
                      {"data": data})


def world_x(affine: torch.Tensor | np.ndarray) -> np.ndarray:
    """World x (mm, RAS) of every voxel of a SIDE^3 grid with this affine."""
    a = np.asarray(affine, dtype=float)
    ijk = np.stack(np.meshgrid(*[np.arange(SIDE)] * 3, indexing="ij"), -1)
    return ijk @ a[0, :3] + a[0, 3]


def draws(cfg, volume: dict[str, torch.Tensor], n: int = 24) -> list[dict[str, torch.Tensor]]:
    """``n`` samples of the task's training transform on one whole-volume patch."""
    transform = SegmentationTask(cfg).train_transforms()
    transform.set_random_state(seed=3)
    out = []
    for _ in range(n):
        item = transform({k: v.clone() for k, v in volume.items()})
        out.append(item[0] if isinstance(item, list) else item)
    return out


def test_lateral_axis_from_orientation_codes():
    assert [lateral_axis(o) for o in ("RAS", "LPS", "PIL", "SRA", "aLi")] == [0, 0, 2, 1, 1]
    for stored, affine in STORED.items():
        assert lateral_axis_of(affine) == lateral_axis(stored)
    with pytest.raises(ValueError, match="no left-right axis"):
        lateral_axis("PSI")


def test_flip_with_mirror_pairs_swaps_the_labels():
    label = torch.zeros(1, 4, 3, 2, dtype=torch.uint8)
    label[0, 0], label[0, 1], label[0, 3] = 1, 2, 3  # left, right, an unpaired class
    image = torch.arange(24, dtype=torch.float32).reshape(1, 4, 3, 2)
    flip = lateral_flip(("image", "label"), "label", 0, {1: 2, 2: 1}, prob=1.0)
    out = flip({"image": image, "label": label})
    assert torch.equal(torch.as_tensor(out["image"]), image.flip(1))
    got = torch.as_tensor(out["label"])
    assert got.dtype == torch.uint8
    assert got[0, 3].eq(2).all() and got[0, 2].eq(1).all() and got[0, 0].eq(3).all()
    assert got[0, 1].eq(0).all()


def test_default_declares_nothing_so_no_flip(tmp_path):
    cfg = config()
    assert lateral_swap(cfg.data) is None
    out, _ = preprocess_case(world_case(tmp_path, "RAS"), cfg.data)
    volume = {k: out[k].as_tensor() for k in ("image", "label")}
    for item in draws(cfg, volume):
        assert torch.equal(item["image"], volume["image"])
        assert torch.equal(item["label"], volume["label"])


@pytest.mark.parametrize(("stored", "target"), [("LPS", "RAS"), ("RAS", "PIL"),
                                                ("PIL", "LPS"), ("PIL", "PIL")])
def test_flip_is_left_right_in_any_orientation(tmp_path, stored, target):
    """Flipped samples mirror world x (the left class ends up where the right one was) and
    relabel it, so with mirror pairs a flipped sample of this symmetric head equals the
    original; declared symmetric, the flip alone puts class 1 on the right."""
    case = world_case(tmp_path, stored)
    out, _ = preprocess_case(case, config(orientation=target).data)
    assert "".join(nib.aff2axcodes(np.asarray(out["image"].affine))) == target
    x = world_x(out["image"].affine)
    volume = {k: out[k].as_tensor() for k in ("image", "label")}
    left, right = volume["label"][0] == 1, volume["label"][0] == 2
    assert (x[left.numpy()] < 0).all() and (x[right.numpy()] > 0).all()

    paired = draws(config(orientation=target, mirror_pairs=[[1, 2]]), volume)
    flipped = [d for d in paired if not torch.equal(d["image"], volume["image"])]
    assert 0 < len(flipped) < len(paired)
    for d in flipped:
        assert torch.equal(d["label"], volume["label"])  # mirrored and swapped: same anatomy
        # The image mirrored in world x: intensity at x is the original's at -x.
        assert torch.equal(d["image"], volume["image"].flip(lateral_axis(target) + 1))

    symmetric = draws(config(orientation=target, symmetric_labels=True), volume)
    flipped = [d for d in symmetric if not torch.equal(d["image"], volume["image"])]
    assert flipped
    for d in flipped:
        assert (x[(d["label"][0] == 1).numpy()] > 0).all()  # flip without relabelling
        assert (x[(d["label"][0] == 2).numpy()] < 0).all()


def write_site(folder, **meta) -> None:
    folder.mkdir()
    cases = [world_case(folder, stored) for stored in ("RAS", "LPS")]
    (folder / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "left", "2": "right"},
        "training": [{"image": c["image"], "label": c["label"]} for c in cases], **meta}))


def test_dataset_json_declarations_reach_the_training_config(tmp_path):
    data = config().data
    write_site(tmp_path / "paired", mirror_pairs=[[2, 1]])
    write_site(tmp_path / "plain")
    write_site(tmp_path / "sym", symmetric_labels=True)
    paired, plain, sym = (read_dataset(tmp_path / n, num_classes=3, check=False)
                          for n in ("paired", "plain", "sym"))
    assert paired.mirror_pairs == ((2, 1),) and lateral_swap(
        site_data_config(data, paired)) == {1: 2, 2: 1}
    assert lateral_swap(site_data_config(data, plain)) is None
    assert lateral_swap(site_data_config(data, sym)) == {}
    # A simulation sees every site: agreed declarations and names become the consortium's.
    both = consortium_data_config(data, [paired, paired])
    assert both.mirror_pairs == [[2, 1]] and both.labels == ["background", "left", "right"]
    assert lateral_swap(consortium_data_config(data, [paired, plain])) is None


@pytest.mark.parametrize(("meta", "declared", "message"), [
    ({"mirror_pairs": [[1, 1]]}, {}, "not a pair of two different classes"),
    ({"mirror_pairs": [[1, 3]]}, {}, r"foreground indices 1..2"),
    ({"mirror_pairs": [[1, 2]]}, {"symmetric_labels": True}, "contradict"),
    ({"symmetric_labels": True}, {"mirror_pairs": [[1, 2]]}, "contradicts"),
    ({"symmetric_labels": "yes"}, {}, "must be true or false"),
])
def test_bad_declarations_name_the_file(tmp_path, meta, declared, message):
    write_site(tmp_path / "s", **meta)
    cfg = config(**declared)
    site = cfg.sites[0]
    site.data = str(tmp_path / "s")
    with pytest.raises(DataError, match=message) as err:
        read_site(site, cfg.data, check=False)
    assert "dataset.json" in str(err.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"mirror_pairs": [[1, 5]]}, "'data.mirror_pairs': [1, 5]: classes must be foreground"),
    ({"mirror_pairs": [[1, 2]], "symmetric_labels": True}, "'data.symmetric_labels'"),
    ({"labels": ["background", "left"]}, "'data.labels': names 2"),
    ({"labels": ["background", "a/b", "c"]}, "without '/'"),
    ({"orientation": "RAR"}, "'data.orientation': must be three axis codes, one of L/R"),
])
def test_bad_config_declarations_name_the_key(data, message):
    from fedscan.shared.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config(**data)
    assert message in str(err.value)
