"""Folded-cortex head phantoms: determinism, grids, partial volume, folding, contrast, truth."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from fedscan.simulations import anatomy as A
from fedscan.simulations import phantoms as P
from fedscan.simulations.scanners import T1, T2, MRProfile, clean_profile, fine_grid

#: 1 mm grid over the head (the sub-grid is the grid: no partial volume from integration).
FINE = MRProfile("fine", "RAS", (1.0, 1.0, 1.0))
SITES = ("site-a", "site-b", "site-c")
#: A 2 mm sub-grid where the test is not about partial volume (8x fewer samples than 1 mm).
QUICK = 2.0


def _head(seed: int) -> A.FoldedHead:
    return A.sample_anatomy(np.random.default_rng(seed))


@pytest.fixture(scope="module")
def fine_fractions() -> dict[str, np.ndarray]:
    return A.render_fractions(_head(0), FINE)[0]


def test_same_seed_same_case_other_seed_other_case() -> None:
    profile = P.SITE_PROFILES["site-b"]
    img, lab, aff = A.render(_head(0), profile, np.random.default_rng(1), fine_mm=QUICK)
    again, lab_again, aff_again = A.render(_head(0), profile, np.random.default_rng(1),
                                           fine_mm=QUICK)
    assert np.array_equal(img, again) and np.array_equal(lab, lab_again)
    assert np.array_equal(aff, aff_again)
    other, lab_other, _ = A.render(_head(1), profile, np.random.default_rng(1), fine_mm=QUICK)
    assert not np.array_equal(img, other) and not np.array_equal(lab, lab_other)


def test_grid_orientation_dtype_and_labels_follow_the_profile() -> None:
    head = _head(2)
    for name in SITES:
        profile = P.SITE_PROFILES[name]
        image, label, affine = A.render(head, profile, np.random.default_rng(0), fine_mm=QUICK)
        shape, expected = P.profile_grid(profile)
        assert image.shape == label.shape == shape
        np.testing.assert_allclose(affine, expected)
        assert "".join(nib.aff2axcodes(affine)) == profile.orientation
        assert image.dtype == np.dtype(profile.dtype) and label.dtype == np.uint8
        assert set(np.unique(label)) == {0, 1}


def test_brain_volume_is_adult_and_agrees_across_grids() -> None:
    for seed in range(2):
        head = _head(seed)
        volumes = []
        for name in SITES:
            _, label, affine = A.render_clean(head, P.SITE_PROFILES[name], fine_mm=QUICK)
            volumes.append(label.sum() * abs(np.linalg.det(affine[:3, :3])) / 1e3)
        assert min(volumes) > 900 and max(volumes) < 1700, volumes
        assert (max(volumes) - min(volumes)) / min(volumes) < 0.05, volumes


def test_fractions_are_partial_volumes_that_sum_to_the_head() -> None:
    fractions, _ = A.render_fractions(_head(3), P.SITE_PROFILES["site-a"])
    tissues = [fractions[t] for t in ("csf", "gm", "wm", "deep_gm", "scalp", "skull", "soft")]
    total = sum(tissues)
    assert min(float(t.min()) for t in tissues) >= -1e-5
    assert float(total.max()) <= 1 + 1e-4
    brain = fractions["brain"] > 0.5
    # 4 mm voxels mix the 2-3 mm cortical ribbon with CSF and WM: most brain voxels are mixed,
    # with a graded, not binary, grey-matter fraction.
    mixed = np.max(np.stack(tissues), axis=0)[brain] < 0.9
    assert mixed.mean() > 0.5
    gm = fractions["gm"][brain]
    assert ((gm > 0.1) & (gm < 0.9)).mean() > 0.3
    # The voxels integrate a ~1 mm sub-grid.
    assert fine_grid(P.SITE_PROFILES["site-a"]).factors == (4, 4, 4)


def test_cortex_is_folded(fine_fractions: dict[str, np.ndarray]) -> None:
    """Sulci: along lines through the upper brain, grey/CSF alternate many times; the same
    head without sulci has its cortex on the outline only, with a far smaller GM surface."""
    head = _head(0)
    smooth = A.render_fractions(dataclasses.replace(head, depth_mm=-1e3), FINE)[0]

    def crossings(fr: dict[str, np.ndarray]) -> float:
        classes = A._labels(fr)[1]
        z = int(np.argwhere(classes > 0)[:, 2].max()) - 25  # 25 mm below the vertex
        rows = classes[:, ::8, z].T  # lines along x, every 8 mm in y
        return float(np.mean([np.count_nonzero(np.diff(r[r > 0]) != 0) for r in rows
                              if (r > 0).sum() > 40]))

    def surface_ratio(fr: dict[str, np.ndarray]) -> float:
        """White-matter surface area over the brain outline's area (voxel faces)."""
        def faces(mask: np.ndarray) -> int:
            return sum(np.count_nonzero(np.diff(mask, axis=a)) for a in range(3))

        return faces(fr["wm"] > 0.5) / faces(fr["brain"] > 0.5)

    folded, unfolded = crossings(fine_fractions), crossings(smooth)
    assert folded >= 12 and folded > 2 * unfolded, (folded, unfolded)
    ratios = surface_ratio(fine_fractions), surface_ratio(smooth)
    assert ratios[0] > 1.5 * ratios[1], ratios
    # Grey matter is ~35-55 % of an adult brain; a ribbon ~2.5 mm thick gives that only folded.
    share = (fine_fractions["gm"] + fine_fractions["deep_gm"]).sum() / fine_fractions[
        "brain"].sum()
    assert 0.3 < share < 0.6, share


def test_t1_and_t2_contrast_of_pure_tissue(fine_fractions: dict[str, np.ndarray]) -> None:
    head = _head(0)
    image, _, _ = A.render_clean(head, FINE, channels=2)
    assert image.shape[-1] == 2
    pure = {t: fine_fractions[t] > 0.95 for t in ("csf", "gm", "wm")}
    t1 = {t: float(np.median(image[..., 0][m])) for t, m in pure.items()}
    t2 = {t: float(np.median(image[..., 1][m])) for t, m in pure.items()}
    assert t1["wm"] > t1["gm"] > t1["csf"]
    assert t2["csf"] > t2["gm"] > t2["wm"]
    # Realistic T1 ratios (texture moves them by a few percent).
    assert abs(t1["gm"] / t1["wm"] - T1.gm / T1.wm) < 0.03
    assert abs(t2["wm"] / t2["csf"] - T2.wm / T2.csf) < 0.03


def test_tissue_classes_lie_inside_the_brain_mask() -> None:
    head = _head(4)
    profile = P.SITE_PROFILES["site-c"]
    classes, affine = A.render_tissues(head, profile, fine_mm=QUICK)
    _, mask, affine_mask = A.render_clean(head, profile, fine_mm=QUICK)
    np.testing.assert_array_equal(affine, affine_mask)
    assert set(np.unique(classes)) == set(A.TISSUE_CLASSES)
    np.testing.assert_array_equal(classes > 0, mask > 0)


def test_truth_is_the_same_head_on_the_site_grid() -> None:
    head = _head(5)
    profile = P.SITE_PROFILES["site-c"]  # PIL, uint16 with an offset, gamma 1.6
    image, label, affine = A.render(head, profile, np.random.default_rng(0), fine_mm=QUICK)
    truth, truth_affine = A.render_truth(head, profile, fine_mm=QUICK)
    np.testing.assert_array_equal(truth_affine, affine)
    assert truth.shape == image.shape and truth.dtype == np.float32
    _, truth_label, _ = A.render_clean(head, clean_profile(profile, P.REFERENCE_PROFILE),
                                     fine_mm=QUICK)
    np.testing.assert_array_equal(truth_label, label)
    assert float(truth.min()) == 0.0  # no noise, no offset: air is 0
    # The reference contrast, not the site's: linear, so WM/GM keeps the tissue ratio.
    fractions, _ = A.render_fractions(head, profile, QUICK)
    wm, gm = fractions["wm"] > 0.9, fractions["gm"] > 0.9
    if wm.any() and gm.any():
        assert float(np.median(truth[gm]) / np.median(truth[wm])) == pytest.approx(
            T1.gm / T1.wm, abs=0.05)
    again, _ = A.render_truth(head, profile, fine_mm=QUICK)
    assert np.array_equal(truth, again)


def test_psf_blurs_and_noise_fills_the_air() -> None:
    head = _head(6)
    sharp = MRProfile("sharp", "RAS", (2.0, 2.0, 2.0), fov_mm=(160.0, 200.0, 180.0))
    blurred = dataclasses.replace(sharp, psf_fwhm=(4.0, 4.0, 4.0))
    a, _, _ = A.render(head, sharp, np.random.default_rng(0), fine_mm=QUICK)
    b, _, _ = A.render(head, blurred, np.random.default_rng(0), fine_mm=QUICK)
    energy = [float(sum(np.square(np.diff(x, axis=k)).sum() for k in range(3))) for x in (a, b)]
    assert energy[1] < 0.5 * energy[0]
    noisy = dataclasses.replace(sharp, noise_std=0.05)
    image, _, _ = A.render(head, noisy, np.random.default_rng(0), fine_mm=QUICK)
    assert float(image[0, 0, 0]) > 0 and float(image[:, :, -1].mean()) > 0.02


def test_profile_rejects_bad_psf_and_too_many_channels() -> None:
    with pytest.raises(ValueError, match="psf_fwhm"):
        MRProfile("x", "RAS", (2.0, 2.0, 2.0), psf_fwhm=(1.0, -1.0, 0.0))
    with pytest.raises(ValueError, match="3 channel"):
        A.render(_head(0), P.SITE_PROFILES["site-a"], np.random.default_rng(0), channels=3,
                 fine_mm=QUICK)
