"""Real-anatomy federation (MNI ICBM152, deformed per patient): data contract, grids, sides,
paired truth, partial volume, determinism and caching."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nilearn")

from fedscan.shared.data import read_dataset  # noqa: E402
from fedscan.shared.errors import DataError  # noqa: E402
from fedscan.simulations import realanatomy as R  # noqa: E402
from fedscan.simulations.phantoms import case_rngs, profile_grid  # noqa: E402
from fedscan.simulations.scanners import MRProfile  # noqa: E402

#: Coarse grids in three orientations (and a fourth held out) keep the module to seconds.
SMALL = tuple((name, dataclasses.replace(R.SITE_PROFILES[name], spacing=spacing), 2, 1)
              for name, spacing in (("site-a", (3.0, 3.0, 3.0)), ("site-b", (2.5, 2.5, 4.0)),
                                    ("site-c", (3.0, 2.5, 5.0))))
HELDOUT = ("heldout", dataclasses.replace(R.HELDOUT_PROFILE, spacing=(3.0, 3.0, 4.0)), 1)
REFERENCE = dataclasses.replace(R.REFERENCE_PROFILE, spacing=(3.0, 3.0, 3.0))
QUICK = 2.0


def _write(root: Path, **kwargs: object) -> R.RealFederation:
    options = {"layout": SMALL, "heldout": HELDOUT, "reference": REFERENCE,
               "reference_cases": 1, "fine_mm": QUICK, **kwargs}
    return R.write_federation(root, seed=0, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> R.RealFederation:
    return _write(tmp_path_factory.mktemp("real") / "fed")


def _folders(fed: R.RealFederation) -> list[Path]:
    return [*fed.sites.values(), fed.heldout, fed.reference, *fed.truth.values()]


def test_every_folder_passes_the_data_contract(federation: R.RealFederation) -> None:
    for folder in _folders(federation):
        site = read_dataset(folder, num_classes=5, in_channels=2)
        assert site.cases
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["labels"] == {"0": "background", "1": "left_gm", "2": "right_gm",
                                  "3": "white_matter", "4": "ventricles"}
        assert meta["channel_names"] == meta["modality"] == {"0": "T1", "1": "T2"}
        assert meta["tensorImageSize"] == "4D" and meta["mirror_pairs"] == [[1, 2]]
        assert "Louis Collins" in meta["licence"]
    with pytest.raises(DataError, match="channel"):
        read_dataset(federation.sites["site-a"], num_classes=5, in_channels=1)


def test_files_carry_each_profile_grid(federation: R.RealFederation) -> None:
    profiles = {name: p for name, p, *_ in (*SMALL, HELDOUT)}
    for name, folder in {**federation.sites, "heldout": federation.heldout}.items():
        profile = profiles[name]
        shape, affine = profile_grid(profile)
        for path in sorted((folder / "imagesTr").glob("*.nii.gz")):
            img, lab = nib.load(path), nib.load(folder / "labelsTr" / path.name)
            truth = nib.load(federation.truth[name] / "imagesTr" / path.name)
            assert img.shape == (*shape, 2) and lab.shape == shape == truth.shape[:3]
            assert "".join(nib.aff2axcodes(img.affine)) == profile.orientation
            np.testing.assert_allclose(img.affine, affine, atol=1e-5)
            np.testing.assert_allclose(truth.affine, affine, atol=1e-5)
            np.testing.assert_allclose(img.header.get_zooms()[:3], profile.spacing)
            assert img.get_data_dtype() == np.dtype(profile.dtype)
            assert truth.get_data_dtype() == np.float32
            assert set(np.unique(np.asanyarray(lab.dataobj))) == {0, 1, 2, 3, 4}
    orientations = {p.orientation for _, p, *_ in (*SMALL, HELDOUT)}
    assert len(orientations) == 4


def test_left_and_right_classes_lie_on_the_anatomical_sides(
    federation: R.RealFederation,
) -> None:
    """In RAS voxel order the first axis runs left to right; the patient's own midsagittal
    plane (template x = 0, carried through the deformation) separates the two classes."""
    for name, folder in {**federation.sites, "heldout": federation.heldout}.items():
        for index, path in enumerate(sorted((folder / "labelsTr").glob("*.nii.gz"))):
            canonical = nib.as_closest_canonical(nib.load(path))
            label = np.asanyarray(canonical.dataobj)
            left, right = (np.argwhere(label == k) for k in (1, 2))
            assert left[:, 0].mean() + 5 < right[:, 0].mean(), (name, path.name)
            # Template x of each voxel centre (the deformation's affine part): < 0 is left.
            patient = R.sample_patient(case_rngs(0, name, index)[0])
            world = canonical.affine[:3, :3] @ np.concatenate([left, right]).T
            world += canonical.affine[:3, 3:4]
            template_x = patient.linear[0] @ world + patient.offset[0]
            side = template_x < 0
            assert side[: len(left)].mean() > 0.9 and side[len(left):].mean() < 0.1


def test_truth_shares_grid_labels_and_anatomy_not_the_scanner(
    federation: R.RealFederation,
) -> None:
    for name, folder in federation.sites.items():
        for path in sorted((folder / "imagesTr").glob("*.nii.gz")):
            label = np.asanyarray(nib.load(folder / "labelsTr" / path.name).dataobj)
            truth_label = np.asanyarray(
                nib.load(federation.truth[name] / "labelsTr" / path.name).dataobj)
            np.testing.assert_array_equal(truth_label, label)
            image = nib.load(path).get_fdata()
            truth = nib.load(federation.truth[name] / "imagesTr" / path.name).get_fdata()
            # Noise fills the site's air; the truth's air is empty.
            air = label == 0
            corner = (slice(0, 3),) * 3
            assert float(truth[corner].max()) == 0.0 and float(image[corner].min()) > 0
            # Same anatomy: the T1 channels correlate strongly inside the head.
            head = truth[..., 0] > 0.05
            r = np.corrcoef(image[..., 0][head], truth[..., 0][head])[0, 1]
            assert r > 0.6, (name, path.name, r)
            assert air.any()
    # Reference set and truths hold no site's training folder.
    assert not {p.name for p in (federation.reference / "imagesTr").iterdir()} & {
        p.name for p in (federation.sites["site-a"] / "imagesTr").iterdir()}


def test_fractions_are_partial_volumes() -> None:
    patient = R.sample_patient(np.random.default_rng(0))
    profile = MRProfile("thick", "RAS", (2.0, 2.0, 4.0), fov_mm=R.HEAD_FOV)
    fractions, _ = R.render_fractions(patient, profile, fine_mm=1.0)
    tissues = [fractions[t] for t in ("csf", "gm", "wm", "scalp", "skull", "soft")]
    assert min(float(t.min()) for t in tissues) >= -1e-5
    assert float(sum(tissues).max()) <= 1 + 1e-4
    brain = fractions["brain"]
    edge = (brain > 0.02) & (brain < 0.98)
    assert edge.sum() > 0.05 * (brain > 0.5).sum()
    gm = fractions["gm"][brain > 0.5]
    assert ((gm > 0.1) & (gm < 0.9)).mean() > 0.3
    np.testing.assert_allclose(fractions["left_gm"] + fractions["right_gm"], fractions["gm"],
                               atol=1e-5)


def test_deformation_and_ventricle_growth_change_the_anatomy() -> None:
    profile = MRProfile("p", "RAS", (3.0, 3.0, 3.0), fov_mm=R.HEAD_FOV)
    patient = R.sample_patient(np.random.default_rng(1))
    grown = dataclasses.replace(patient, ventricle_growth=0.3)
    flat = dataclasses.replace(patient, ventricle_growth=0.0)
    vent = [R.render_fractions(p, profile, QUICK)[0]["ventricles"].sum() for p in (grown, flat)]
    assert vent[0] > 1.3 * vent[1], vent
    other = R.sample_patient(np.random.default_rng(2))
    brains = [R.render_fractions(p, profile, QUICK)[0]["brain"] >= 0.5 for p in (flat, other)]
    overlap = (brains[0] & brains[1]).sum() / np.sqrt(brains[0].sum() * brains[1].sum())
    assert overlap < 0.95  # two patients are not one brain moved


def test_same_seed_same_case_and_cached(federation: R.RealFederation) -> None:
    root = federation.root
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    start = time.perf_counter()
    again = _write(root)
    assert time.perf_counter() - start < 1.0 and again == federation
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    # Case i of a site depends only on (seed, site, i): re-rendered, it is the file.
    name, profile = SMALL[1][0], SMALL[1][1]
    anatomy_rng, scanner_rng = case_rngs(0, name, 1)
    image, label, _ = R.render(R.sample_patient(anatomy_rng), profile, scanner_rng,
                               channels=2, label_set="parcellation", fine_mm=QUICK)
    stored = nib.load(federation.sites[name] / "imagesTr" / f"{name}_001.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(stored.dataobj), image)
    stored_label = nib.load(federation.sites[name] / "labelsTr" / f"{name}_001.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(stored_label.dataobj), label)
    other, _, _ = R.render(R.sample_patient(case_rngs(1, name, 1)[0]), profile, scanner_rng,
                           channels=2, label_set="parcellation", fine_mm=QUICK)
    assert not np.array_equal(other, image)


def test_one_channel_brain_masks(tmp_path: Path) -> None:
    coarse = dataclasses.replace(SMALL[0][1], spacing=(5.0, 5.0, 5.0))
    fed = _write(tmp_path / "t1", layout=(("site-a", coarse, 1, None),),
                 heldout=("heldout", dataclasses.replace(HELDOUT[1], spacing=(5.0, 5.0, 6.0)), 1),
                 reference=dataclasses.replace(REFERENCE, spacing=(5.0, 5.0, 5.0)),
                 channels=1, label_set="brain")
    for folder in _folders(fed):
        read_dataset(folder, num_classes=2, in_channels=1)
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["labels"] == {"0": "background", "1": "brain"}
        assert meta["channel_names"] == {"0": "T1"} and meta["tensorImageSize"] == "3D"
    with pytest.raises(ValueError, match="label_set"):
        _write(tmp_path / "bad", label_set="lobes")


def test_default_root_honours_the_cache_env(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSCAN_CACHE_DIR", str(tmp_path))
    assert R.default_root(3, 1, "brain") == tmp_path / "realanatomy-v1-brain-1ch-seed3"
