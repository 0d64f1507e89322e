"""Synthetic head-phantom federation: determinism, geometry, MSD layout, caching."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedscan.shared.errors import DataError
from fedscan.simulations import anatomy as A
from fedscan.simulations import phantoms as P

SITES = ("site-a", "site-b", "site-c")


#: The default layout's sites and profiles with a few cases each (the default sites hold
#: hundreds of cases so that DP-SGD has enough of them; generating those takes ~40 s).
SMALL_COUNTS = {"site-a": (5, 2), "site-b": (4, 1), "site-c": (4, None), "heldout": (2, None)}
#: The real default layout (the ``federation`` fixture patches the module's for its tests).
DEFAULT_LAYOUT = P.FEDERATION_LAYOUT


def _small_layout() -> tuple:
    return tuple((name, profile, *SMALL_COUNTS[name]) for name, profile, _, _ in DEFAULT_LAYOUT)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """The default layout with fewer cases, generated once for the module (~1 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(P, "FEDERATION_LAYOUT", _small_layout())
        yield P.generate_federation(tmp_path_factory.mktemp("fed") / "phantoms", seed=0)


@pytest.fixture
def tiny_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two-case federation for the tests of caching and atomicity (fast)."""
    layout = (("site-a", P.SITE_PROFILES["site-a"], 2, 1),)
    monkeypatch.setattr(P, "FEDERATION_LAYOUT", layout)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _case(seed: int, site: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return P.render_case(seed, site, index, P.SITE_PROFILES[site])


def _head(seed: int) -> A.FoldedHead:
    """A head of the default data (folded cortex)."""
    return A.sample_anatomy(np.random.default_rng(seed))


def _render(head: A.FoldedHead, profile: P.ScannerProfile, rng: np.random.Generator | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As the default federation renders (its partial-volume sub-grid); None: no bias or noise."""
    if rng is None:
        return A.render_clean(head, profile, fine_mm=P.PHANTOM_FINE_MM)
    return A.render(head, profile, rng, fine_mm=P.PHANTOM_FINE_MM)


def test_same_seed_gives_identical_files(federation: dict[str, Path], tmp_path: Path) -> None:
    again = P.generate_federation(tmp_path / "again", seed=0)
    root = federation["site-a"].parent
    assert set(again) == set(federation)
    assert _files(tmp_path / "again") == _files(root)


def test_a_pool_of_processes_writes_the_same_files(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    serial, pooled = tmp_path / "serial" / "site-b", tmp_path / "pooled" / "site-b"
    P.write_phantom_site(serial, "site-b", P.SITE_PROFILES["site-b"], 3, 1, seed=0)
    monkeypatch.setattr(P, "PARALLEL_CASES", 0)
    monkeypatch.setattr(P, "_workers", lambda: 2)
    P.write_phantom_site(pooled, "site-b", P.SITE_PROFILES["site-b"], 3, 1, seed=0)
    assert _files(serial) == _files(pooled) and len(_files(serial)) == 7


def test_different_seeds_and_cases_differ() -> None:
    img0, lab0, _ = _case(0, "site-a", 0)
    img1, lab1, _ = _case(1, "site-a", 0)
    img_next, lab_next, _ = _case(0, "site-a", 1)
    assert not np.array_equal(img0, img1) and not np.array_equal(lab0, lab1)
    assert not np.array_equal(img0, img_next) and not np.array_equal(lab0, lab_next)
    again, lab_again, _ = _case(0, "site-a", 0)
    assert np.array_equal(img0, again) and np.array_equal(lab0, lab_again)


def test_files_carry_profile_orientation_grid_and_dtype(federation: dict[str, Path]) -> None:
    profiles = {**P.SITE_PROFILES, "heldout": P.HELDOUT_PROFILE}
    for name, folder in federation.items():
        profile = profiles[name]
        shape, affine = P.profile_grid(profile)
        images = sorted((folder / "imagesTr").glob("*.nii.gz"))
        assert images
        for image_path in images:
            img = nib.load(image_path)
            lab = nib.load(folder / "labelsTr" / image_path.name)
            assert "".join(nib.aff2axcodes(img.affine)) == profile.orientation
            assert "".join(nib.aff2axcodes(lab.affine)) == profile.orientation
            assert img.shape == lab.shape == shape
            np.testing.assert_allclose(img.header.get_zooms(), profile.spacing)
            np.testing.assert_allclose(img.affine, affine, atol=1e-5)
            assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1
            assert img.get_data_dtype() == np.dtype(profile.dtype)
            assert lab.get_data_dtype() == np.uint8
            assert set(np.unique(np.asanyarray(lab.dataobj))) == {0, 1}
        # Small grids keep CPU training fast.
        assert all(30 <= n <= 64 for n in shape)


def test_brain_volume_agrees_across_sites() -> None:
    for seed in range(3):
        head = _head(seed)
        volumes = []
        for site in SITES:
            _, label, affine = _render(head, P.SITE_PROFILES[site], np.random.default_rng(0))
            volumes.append(label.sum() * abs(np.linalg.det(affine[:3, :3])))
        assert (max(volumes) - min(volumes)) / min(volumes) < 0.05, volumes
        # Adult-brain scale (ml), not a degenerate blob.
        assert min(volumes) > 700e3 and max(volumes) < 2000e3


def test_label_is_consistent_in_world_space() -> None:
    """Brain voxels of one grid, looked up in another grid, are brain there too."""
    head = _head(3)
    _, lab_a, aff_a = _render(head, P.SITE_PROFILES["site-a"], None)
    _, lab_c, aff_c = _render(head, P.SITE_PROFILES["site-c"], None)
    ijk_a = np.argwhere(lab_a > 0)
    world = aff_a[:3, :3] @ ijk_a.T + aff_a[:3, 3:4]
    ijk_c = np.rint(np.linalg.inv(aff_c[:3, :3]) @ (world - aff_c[:3, 3:4])).astype(int).T
    inside = np.all((ijk_c >= 0) & (ijk_c < lab_c.shape), axis=1)
    agree = lab_c[tuple(ijk_c[inside].T)].mean()
    assert inside.all() and agree > 0.95


def test_sites_differ_in_contrast_and_storage() -> None:
    """Gamma changes grey/white contrast: the 10th/50th percentile ratio inside the brain."""
    ratios: dict[str, list[float]] = {site: [] for site in SITES}
    for seed in range(2):
        head = _head(seed)
        for site in SITES:
            profile = P.SITE_PROFILES[site]
            image, label, _ = _render(head, profile, np.random.default_rng(seed))
            assert image.dtype == np.dtype(profile.dtype)
            brain = image[label > 0].astype(np.float64) - profile.offset
            ratios[site].append(np.percentile(brain, 10) / np.median(brain))
    a, b, c = (float(np.mean(ratios[s])) for s in SITES)
    assert b - a > 0.05 and a - c > 0.05, (a, b, c)


def test_not_separable_by_one_global_threshold() -> None:
    """Scalp is brighter than brain, so no threshold alone gives a good brain mask."""
    image, label, _ = _render(_head(0), P.SITE_PROFILES["site-a"], np.random.default_rng(0))
    truth = label > 0
    best = 0.0
    for t in np.quantile(image, np.linspace(0.3, 0.995, 100)):
        mask = image > t
        best = max(best, 2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    assert best < 0.9


def test_render_clean_is_render_without_bias_and_noise() -> None:
    """The ellipsoid heads (still behind the artefact and bad-site datasets)."""
    anatomy = P.sample_anatomy(np.random.default_rng(4))
    ref = P.REFERENCE_PROFILE
    clean, lab_clean, aff_clean = P.render_clean(anatomy, ref)
    noisy, lab, aff = P.render(anatomy, ref, np.random.default_rng(0))
    np.testing.assert_allclose(noisy, clean, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(lab, lab_clean)
    np.testing.assert_array_equal(aff, aff_clean)
    site = P.SITE_PROFILES["site-c"]
    clean_c, lab_c, _ = P.render_clean(anatomy, site)
    noisy_c, lab_noisy_c, _ = P.render(anatomy, site, np.random.default_rng(0))
    np.testing.assert_array_equal(lab_c, lab_noisy_c)
    assert clean_c.min() == site.offset  # air stays air without noise
    assert not np.array_equal(clean_c, noisy_c)


def test_default_layout_sizes() -> None:
    """Sites big enough for DP-SGD at ε=8, validation small (evaluated every round)."""
    from fedscan.shared.config import DataConfig
    from fedscan.shared.data import _split

    data = DataConfig()
    layout = {name: (n, n_val) for name, _, n, n_val in DEFAULT_LAYOUT}
    assert list(layout) == [*SITES, "heldout"]
    assert layout["site-c"][1] is None  # the consumer's deterministic split must kick in
    for name in SITES:
        n, n_val = layout[name]
        if n_val is None:  # what the consumer's default split holds out
            cases = [{"case": str(i)} for i in range(n)]
            n_val = len(_split(cases, data.val_fraction, data.split_seed)[1])
        assert n - n_val >= 40 and 2 <= n_val <= 10, (name, n, n_val)
    assert layout["heldout"][1] is None and layout["heldout"][0] <= 10


def test_dataset_json_has_msd_structure(federation: dict[str, Path]) -> None:
    expected = {name: (n - (n_val or 0), n_val) for name, (n, n_val) in SMALL_COUNTS.items()}
    all_ids: list[str] = []
    for name, (n_train, n_val) in expected.items():
        folder = federation[name]
        meta = json.loads((folder / "dataset.json").read_text())
        assert meta["labels"] == {"0": "background", "1": "brain"}
        assert meta["modality"] == {"0": "T1-phantom"}
        assert isinstance(meta["name"], str) and isinstance(meta["description"], str)
        assert meta["numTraining"] == len(meta["training"]) == n_train
        entries = meta["training"] + meta.get("validation", [])
        for entry in entries:
            assert set(entry) == {"image", "label"}
            assert entry["image"].startswith("./imagesTr/") and entry["image"].endswith(".nii.gz")
            assert entry["label"] == entry["image"].replace("./imagesTr/", "./labelsTr/")
            assert (folder / entry["image"]).is_file() and (folder / entry["label"]).is_file()
        if n_val is None:
            assert "validation" not in meta
        else:
            train = {e["image"] for e in meta["training"]}
            val = {e["image"] for e in meta["validation"]}
            assert len(val) == n_val and not train & val
        all_ids += [e["image"] for e in entries]
    assert len(all_ids) == len(set(all_ids))  # case ids unique across the federation
    assert (federation["site-a"].parent / P.COMPLETE_MARKER).read_text().startswith(
        P.PHANTOM_VERSION)


def test_second_call_is_cached(federation: dict[str, Path]) -> None:
    root = federation["site-a"].parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    start = time.perf_counter()
    again = P.generate_federation(root, seed=0)
    assert time.perf_counter() - start < 0.5
    assert again == federation
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_progress_is_reported_only_while_generating(tiny_layout: None, tmp_path: Path) -> None:
    lines: list[str] = []
    P.generate_federation(tmp_path / "fed", seed=0, progress=lines.append)
    assert len(lines) == 2
    assert lines[0].startswith("phantoms: generating") and str(tmp_path / "fed") in lines[0]
    assert lines[1] == "phantoms: site-a written (2 cases)"
    P.generate_federation(tmp_path / "fed", seed=0, progress=lines.append)  # cached: silent
    assert len(lines) == 2


def test_stale_federation_is_replaced(tiny_layout: None, tmp_path: Path) -> None:
    root = tmp_path / "fed"
    P.generate_federation(root, seed=0)
    first = _files(root)
    P.generate_federation(root, seed=1)  # our own marker, another seed: regenerate
    assert (root / P.COMPLETE_MARKER).read_text() == f"{P.PHANTOM_VERSION} seed=1\n"
    assert _files(root) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed"]  # no temp leftovers


def test_interrupted_run_leaves_nothing(
    tiny_layout: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "write_dataset", crash)
    with pytest.raises(KeyboardInterrupt):
        P.generate_federation(tmp_path / "fed", seed=0)
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_foreign_folder(tiny_layout: None, tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine"):
        P.generate_federation(root, seed=0)
    assert (root / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (P.generate_federation(empty)["site-a"] / "dataset.json").is_file()


def test_write_dataset_rejects_unknown_validation_id(tmp_path: Path) -> None:
    image, label, affine = _case(0, "site-a", 0)
    with pytest.raises(ValueError, match="nope"):
        P.write_dataset(tmp_path / "ds", [("c0", image, label, affine)], ["nope"], "x")


def test_default_root_honours_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDSCAN_CACHE_DIR", str(tmp_path))
    name = f"phantoms-v{P.PHANTOM_FORMAT}-seed0"
    assert P.default_federation_root() == tmp_path / name
    monkeypatch.delenv("FEDSCAN_CACHE_DIR")
    assert P.default_federation_root() == Path.home() / ".cache" / "fedscan" / name


def test_profile_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        P.ScannerProfile("x", "RRS", (4.0, 4.0, 4.0))
    with pytest.raises(ValueError):
        P.ScannerProfile("x", "RAXS", (4.0, 4.0, 4.0))
    with pytest.raises(ValueError):
        P.ScannerProfile("x", "RAS", (4.0, 4.0, 4.0), dtype="int8")
