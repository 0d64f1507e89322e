"""Prediction returns masks in the input's own grid: shape, affine, voxel order and content."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd
from torch import nn

from fedscan.shared.checkpoint import save_model
from fedscan.shared.config import parse_config
from fedscan.shared.errors import FedscanError
from fedscan.shared.inference import predict_file, predict_volume
from fedscan.shared.preprocessing import preprocess_transforms
from fedscan.shared.tasks.segmentation import SegmentationTask

_AXES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0),
         "I": (2, -1.0)}


def grid_affine(axcodes: str, zooms: tuple[float, ...], shape: tuple[int, ...],
                oblique_deg: float = 0.0) -> np.ndarray:
    """Affine whose voxel axes point along ``axcodes`` with ``zooms`` mm, centred on 0."""
    aff = np.eye(4)
    for i, code in enumerate(axcodes):
        axis, sign = _AXES[code]
        aff[:3, i] = 0.0
        aff[axis, i] = sign * zooms[i]
    t = np.deg2rad(oblique_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff[:3, :3] = rot @ aff[:3, :3]
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(shape) - 1) / 2)  # world origin at the centre
    assert nib.aff2axcodes(aff) == tuple(axcodes)
    return aff


def blob_case(tmp_path, name: str, axcodes: str, zooms, shape, oblique_deg=0.0, seed=0):
    """Write an off-centre ellipsoid (defined in world mm) as image and label NIfTIs."""
    aff = grid_affine(axcodes, zooms, shape, oblique_deg)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    centre, radii = np.array([8.0, -6.0, 4.0]), np.array([22.0, 16.0, 12.0])
    label = (((xyz - centre) / radii) ** 2).sum(-1) < 1.0
    rng = np.random.default_rng(seed)
    image = (100 + 400 * label + rng.normal(0, 10, shape)).astype(np.int16)
    paths = {}
    for key, arr in (("image", image), ("label", label.astype(np.uint8))):
        paths[key] = tmp_path / f"{name}_{key}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), paths[key])
    return paths["image"], paths["label"], label


def tiny_config(**overrides):
    data = {"sites": [{"name": "a", "data": "/x"}],
            "data": {"spacing": [2.0, 2.0, 2.0]},
            "model": {"channels": [4, 8], "strides": [2]},
            "train": {"patch_size": [16, 16, 16]}}
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data)


class ThresholdNet(nn.Module):
    """A model-free "network": foreground where the scaled intensity exceeds 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # so evaluate can find a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], 1) * 20.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


GRIDS = [
    ("RAS", (1.5, 1.5, 1.5), (40, 36, 30), 0.0),
    ("LPS", (1.0, 1.2, 2.0), (56, 44, 22), 0.0),
    ("PIL", (2.0, 5.0, 3.0), (20, 12, 30), 0.0),
    ("PIL", (2.0, 5.0, 3.0), (20, 12, 30), 15.0),  # oblique as well as permuted
]


@pytest.mark.parametrize(("axcodes", "zooms", "shape", "oblique"), GRIDS)
def test_predict_file_keeps_input_grid(tmp_path, axcodes, zooms, shape, oblique):
    image, _, _ = blob_case(tmp_path, "case", axcodes, zooms, shape, oblique)
    cfg = tiny_config()
    model_path = save_model(tmp_path / "model.pt", config=cfg,
                            state_dict=SegmentationTask(cfg).build_model().state_dict())
    out = predict_file(model_path, image, tmp_path / "pred.nii.gz", device="cpu")
    src, pred = nib.load(image), nib.load(out)
    assert pred.shape == src.shape
    assert np.allclose(pred.affine, src.affine, atol=1e-5)
    assert np.allclose(pred.get_qform(), src.get_qform(), atol=1e-5)
    assert np.allclose(pred.get_sform(), src.get_sform(), atol=1e-5)
    assert pred.get_data_dtype() == np.uint8
    assert np.issubdtype(np.asanyarray(pred.dataobj).dtype, np.integer)


@pytest.mark.parametrize(("axcodes", "zooms", "shape", "oblique"), GRIDS)
def test_predict_volume_lands_on_the_right_voxels(tmp_path, axcodes, zooms, shape, oblique):
    # The full predict path (preprocess, sliding window, Invertd) with a thresholding "model"
    # must reproduce the ellipsoid where it is: any flip or axis swap would break the overlap.
    image, _, label = blob_case(tmp_path, "case", axcodes, zooms, shape, oblique)
    labels, img = predict_volume(ThresholdNet(), image, tiny_config(), "cpu")
    assert labels.shape == img.shape
    assert dice(labels > 0, label) > 0.9


def test_identity_prediction_round_trip(tmp_path):
    # Model-free: the one-hot of the preprocessed label, inverted to the native grid.
    image, label_path, label = blob_case(tmp_path, "case", "PIL", (2.0, 5.0, 3.0),
                                         (20, 12, 30), oblique_deg=25.0)
    cfg = tiny_config()
    pre = preprocess_transforms(cfg.data)
    data = pre({"image": str(image), "label": str(label_path)})
    assert data["label"].dtype == torch.uint8
    onehot = torch.cat([data["label"] == 0, data["label"] == 1]).float()
    inverted = Invertd("pred", pre, orig_keys="image", nearest_interp=False)(
        {"image": data["image"], "pred": MetaTensor(onehot)})["pred"]
    assert tuple(inverted.shape[1:]) == label.shape
    assert dice(inverted.argmax(0).numpy() > 0, label) > 0.95


def test_foreground_percentiles_ignore_background_padding(tmp_path):
    # The same anatomy with a much larger zero-filled field of view keeps its intensities.
    rng = np.random.default_rng(0)
    tissue = rng.uniform(200, 1200, (20, 20, 20)).astype(np.float32)
    small = np.zeros((24, 24, 24), np.float32)
    small[2:22, 2:22, 2:22] = tissue
    large = np.zeros((60, 60, 60), np.float32)
    large[20:40, 20:40, 20:40] = tissue
    cfg = tiny_config(data={"spacing": [1.0, 1.0, 1.0]})
    pre = preprocess_transforms(cfg.data, keys=("image",))
    scaled = []
    for name, arr in (("small", small), ("large", large)):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / f"{name}.nii.gz")
        scaled.append(pre({"image": str(tmp_path / f"{name}.nii.gz")})["image"])
    a, b = scaled[0][0, 2:22, 2:22, 2:22], scaled[1][0, 20:40, 20:40, 20:40]
    assert torch.allclose(a, b, atol=1e-4)
    assert float(scaled[1].min()) == 0.0 and float(scaled[1].max()) == 1.0


def test_nan_and_ct_range_are_scaled_to_unit_interval(tmp_path):
    arr = np.full((24, 24, 24), -3024.0, np.float32)  # CT padding outside the field of view
    arr[4:20, 4:20, 4:20] = np.random.default_rng(1).uniform(-1000, 2000, (16, 16, 16))
    arr[0, 0, :4] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "ct.nii.gz")
    cfg = tiny_config(data={"spacing": [1.0, 1.0, 1.0]})
    out = preprocess_transforms(cfg.data, keys=("image",))({"image": str(tmp_path / "ct.nii.gz")})
    img = out["image"]
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert float(img[0, 10, 10, 10]) > 0  # tissue is not squashed onto the padding value


def test_2d_model_predicts_in_the_input_grid(tmp_path):
    image, _, _ = blob_case(tmp_path, "case", "LPS", (1.0, 1.2, 2.0), (56, 44, 22))
    cfg = tiny_config(model={"spatial_dims": 2, "channels": [4, 8], "strides": [2]},
                      train={"patch_size": [32, 32, 1]})
    model_path = save_model(tmp_path / "model2d.pt", config=cfg,
                            state_dict=SegmentationTask(cfg).build_model().state_dict())
    out = predict_file(model_path, image, tmp_path / "pred2d.nii.gz", device="cpu")
    src, pred = nib.load(image), nib.load(out)
    assert pred.shape == src.shape
    assert np.allclose(pred.affine, src.affine, atol=1e-5)


def test_largest_component_keeps_the_biggest_blob(tmp_path):
    pytest.importorskip("skimage.measure")  # MONAI's connected components need scikit-image
    image, _, label = blob_case(tmp_path, "case", "RAS", (1.5, 1.5, 1.5), (40, 36, 30))
    arr = np.asanyarray(nib.load(image).dataobj).copy()
    arr[:3, :3, :3] = 500  # a bright speck far from the ellipsoid
    nib.save(nib.Nifti1Image(arr, nib.load(image).affine), image)
    cfg = tiny_config()
    plain, _ = predict_volume(ThresholdNet(), image, cfg, "cpu")
    kept, _ = predict_volume(ThresholdNet(), image, cfg, "cpu", largest_component=True)
    assert plain[:3, :3, :3].any() and not kept[:3, :3, :3].any()
    assert dice(kept > 0, label) > 0.9


def test_missing_or_corrupt_input_is_a_one_line_error(tmp_path):
    cfg = tiny_config()
    model_path = save_model(tmp_path / "model.pt", config=cfg,
                            state_dict=SegmentationTask(cfg).build_model().state_dict())
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FedscanError, match="nope.nii.gz"):
        predict_file(model_path, missing, tmp_path / "out.nii.gz", device="cpu")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not a nifti file")
    with pytest.raises(FedscanError, match="corrupt.nii.gz") as info:
        predict_file(model_path, corrupt, tmp_path / "out.nii.gz", device="cpu")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.nii.gz").exists()
