"""The harmonisation study on a site's own paired-truth folder (``sites[].truth``): the key,
its checks, the head mask, the round-trip ceiling and the study that scores against it."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from fedscan.server.settings import load_server_settings
from fedscan.shared.checkpoint import save_model
from fedscan.shared.config import load_config
from fedscan.shared.errors import ConfigError
from fedscan.shared.messages import RoundConfig
from fedscan.shared.tasks import build_task
from fedscan.simulations import phantoms as P
from fedscan.simulations.federated import site_for_client
from fedscan.simulations.harmonisation import run_study, score_against_truth
from fedscan.simulations.run import check_data
from fedscan.simulations.truth import head_mask, read_truth

#: A scanner the phantom study does not know (so only a truth folder can pair it): 8 mm,
#: another orientation and contrast than the reference.
PROFILE = P.ScannerProfile("hosp", "PIL", (8.0, 7.0, 8.0), gamma=1.6, bias_strength=0.25,
                           noise_std=0.05, scale=3000.0, offset=100.0, dtype="uint16")

CONFIG = """\
task: harmonisation
sites: [{name: hosp, data: data/hosp, truth: truth/hosp}]
data: {spacing: [8, 8, 8]}
train: {patch_size: [16, 16, 16], batch_size: 2}
harmonisation: {channels: [4, 8], strides: [2], disc_channels: 4, disc_layers: 1}
evaluate: {hd95: false}
"""


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def write_truth_folder(folder: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """An image-only MSD folder (no labels), as a user's paired truth may be."""
    (folder / "imagesTr").mkdir(parents=True)
    for cid, (image, affine) in cases.items():
        P._save_nifti(np.asarray(image, np.float32), affine, folder / "imagesTr" / f"{cid}.nii.gz")
    entries = [{"image": f"./imagesTr/{cid}.nii.gz"} for cid in cases]
    (folder / "dataset.json").write_text(json.dumps({"name": folder.name, "training": entries}))


@pytest.fixture
def federation(tmp_path) -> Path:
    """A site of three cases under ``data/hosp`` and its truth under ``truth/hosp``."""
    cases, truths = [], {}
    for i in range(3):
        image, label, affine = P.render_case(0, "hosp", i, PROFILE)
        cases.append((f"hosp_{i:03d}", image, label, affine))
        truths[f"hosp_{i:03d}"] = P.reference_truth(0, "hosp", i, PROFILE)
    P.write_dataset(tmp_path / "data" / "hosp", cases, ["hosp_002"], "a hospital of ours")
    write_truth_folder(tmp_path / "truth" / "hosp", truths)
    (tmp_path / "harmonize.yaml").write_text(CONFIG)
    return tmp_path


# -- the key --------------------------------------------------------------------------------


def test_truth_key_resolves_and_never_travels(federation):
    cfg = load_config(federation / "harmonize.yaml")
    site = cfg.sites[0]
    assert site.truth == str((federation / "truth" / "hosp").resolve())
    assert sorted(read_truth(site, 0, cfg.data)) == ["hosp_000", "hosp_001", "hosp_002"]
    # Not in what the server sends a site, and not in the site a virtual hospital runs as.
    assert site.truth not in RoundConfig.for_run(cfg).task_config
    assert "truth" not in RoundConfig.for_run(cfg).task_config
    assert site_for_client(cfg, site, federation / "run").truth is None
    # Only the harmonisation study reads it; a test set has none; a server never sees one.
    text = CONFIG.replace("task: harmonisation", "task: segmentation")
    (federation / "seg.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"sites\[0\]\.truth.*harmonisation"):
        load_config(federation / "seg.yaml")
    (federation / "test.yaml").write_text(
        CONFIG + "test_sets: [{name: held, data: data/hosp, truth: truth/hosp}]\n")
    with pytest.raises(ConfigError, match=r"test_sets\[0\].*truth"):
        load_config(federation / "test.yaml")
    (federation / "server.yaml").write_text(
        "server: {port: 1}\nsites: [{name: hosp, truth: truth/hosp}]\n")
    with pytest.raises(ConfigError, match=r"sites\[0\]\.truth: .*simulations only"):
        load_server_settings(federation / "server.yaml")


def test_truth_folder_errors_name_the_key_and_the_file(federation):
    cfg = load_config(federation / "harmonize.yaml")
    check_data(cfg)  # a good folder passes the check before training
    truth = federation / "truth" / "hosp"

    def fails(match: str) -> str:
        with pytest.raises(ConfigError, match=match) as info:
            check_data(load_config(federation / "harmonize.yaml"))
        message = str(info.value)
        assert "sites[0].truth" in message and "\n" not in message
        return message

    # A truth image on another grid (one slice short), named.
    bad = truth / "imagesTr" / "hosp_001.nii.gz"
    img = nib.load(bad)
    good_bytes = bad.read_bytes()
    P._save_nifti(np.asarray(img.dataobj)[:, :, 1:], img.affine, bad)
    assert str(bad) in fails("is not on the grid of its case")
    bad.write_bytes(good_bytes)
    # A case without a truth.
    spec = json.loads((truth / "dataset.json").read_text())
    (truth / "dataset.json").write_text(json.dumps({**spec, "training": spec["training"][:2]}))
    assert "'hosp_002'" in fails("no truth for case")
    # No folder at all.
    (truth / "dataset.json").rename(truth / "moved.json")
    fails("dataset.json: missing")
    truth.rename(federation / "elsewhere")
    assert str(truth) in fails("data folder not found")


# -- head mask and ceiling ------------------------------------------------------------------


def test_head_mask_keeps_the_head_and_excludes_air():
    truth, _ = P.reference_truth(0, "site-a", 0, P.SITE_PROFILES["site-a"])
    rng = np.random.default_rng(0)
    noisy = truth + np.abs(rng.normal(0, 0.01, truth.shape)).astype(np.float32)  # air floor
    specks = noisy.copy()
    specks[1, 1, 1] = specks[-2, -2, -2] = truth.max()  # bright specks in the air
    for image in (truth, noisy, specks):
        mask = head_mask(image)
        assert not mask[0, 0, 0] and not mask[1, 1, 1] and not mask[-2, -2, -2]
        assert mask[tuple(n // 2 for n in mask.shape)]
        # Everything bright is head; the air (truth 0 far from the head) is not.
        assert mask[truth > 0.3 * truth.max()].all()
        assert 0.1 < mask.mean() < 0.9
    # Dark tissue enclosed by the head (ventricles, CSF below the threshold) is head.
    mask = head_mask(truth)
    dark_inside = (truth < 0.1 * np.percentile(truth[truth > 0], 99)) & mask
    assert dark_inside.any()
    # Channels last from nibabel are channels first here: the union of the channels.
    assert np.array_equal(head_mask(np.stack([truth, 0 * truth])), mask)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    P._save_nifti(np.asarray(array, np.float32), affine, path)
    return path


def test_ceiling_is_the_truth_round_trip_and_a_perfect_harmoniser_reaches_it(federation,
                                                                              tmp_path):
    cfg = load_config(federation / "harmonize.yaml")
    identity = nn.Identity()  # a perfect harmoniser of the truth itself
    ceilings = {}
    for name, profile in (("grid", P.ScannerProfile("grid", "RAS", (8.0, 8.0, 8.0))),
                          ("hosp", PROFILE)):
        truth, affine = P.reference_truth(0, name, 0, profile)
        scores, out = score_against_truth(identity, _save(truth, affine, tmp_path / "t.nii.gz"),
                                          truth, affine, cfg)
        for region in ("native", "head"):
            # The truth harmonised by a perfect generator is the round trip: it scores
            # exactly the ceiling.
            for metric in ("psnr", "ssim"):
                assert scores[f"{region}_{metric}_harmonised"] == pytest.approx(
                    scores[f"{region}_{metric}_ceiling"], rel=1e-5, abs=1e-4)
        ceilings[name] = scores
        if name == "grid":
            # On the model's own grid (RAS, 8 mm) the round trip loses nothing: it returns
            # the truth exactly as the pipeline scales it.
            lo, hi = np.percentile(truth[truth > truth.min()], cfg.data.intensity_percentiles)
            scaled = np.clip((truth - lo) / (hi - lo), 0, 1)
            assert np.abs(np.asarray(out.dataobj) - scaled).max() < 1e-5
    for region in ("native", "head"):
        # Another grid (PIL, 8 x 7 x 8 mm) costs the round trip far more.
        assert (ceilings["hosp"][f"{region}_psnr_ceiling"]
                < ceilings["grid"][f"{region}_psnr_ceiling"] - 5)
        assert (ceilings["hosp"][f"{region}_ssim_ceiling"]
                < ceilings["grid"][f"{region}_ssim_ceiling"])
        assert ceilings["grid"][f"{region}_ssim_ceiling"] > 0.99
    # Inside the head the air's easy zeros no longer count: a lower PSNR than the whole.
    assert ceilings["hosp"]["head_psnr_ceiling"] < ceilings["hosp"]["native_psnr_ceiling"]


def test_two_channel_truth_is_scored_per_channel(tmp_path):
    cfg = load_config_text(tmp_path, CONFIG.replace("data: {spacing: [8, 8, 8]}",
                                                    "data: {spacing: [8, 8, 8], in_channels: 2}"))
    image, _, affine = P.render_case(0, "hosp", 0, PROFILE)
    truth, _ = P.reference_truth(0, "hosp", 0, PROFILE)
    two = np.stack([truth, truth.max() - truth], axis=-1)  # a second, inverted contrast
    raw = np.stack([image, image], axis=-1).astype(np.float32)
    scores, out = score_against_truth(nn.Identity(), _save(raw, affine, tmp_path / "r.nii.gz"),
                                      two, affine, cfg)
    assert out.shape == raw.shape
    assert all(np.isfinite(v) for v in scores.values())
    # The raw second channel has the inverted channel's opposite contrast: it scores worse
    # there, and the mean over channels falls below the one-channel score.
    one, _ = score_against_truth(nn.Identity(), _save(image, affine, tmp_path / "1.nii.gz"),
                                 truth, affine, load_config_text(tmp_path, CONFIG))
    assert scores["native_ssim_raw"] < one["native_ssim_raw"]


def test_two_channel_truth_folder_is_read_with_the_run_channels(tmp_path):
    image, label, affine = P.render_case(0, "hosp", 0, PROFILE)
    truth, _ = P.reference_truth(0, "hosp", 0, PROFILE)
    names = {"0": "T1", "1": "T2"}
    for folder, array in (("data/hosp", np.stack([image, image], -1).astype(np.float32)),
                          ("truth/hosp", np.stack([truth, truth], -1))):
        root = tmp_path / folder
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        _save(array, affine, root / "imagesTr" / "hosp_000.nii.gz")
        P._save_nifti(label, affine, root / "labelsTr" / "hosp_000.nii.gz")
        entry = {"image": "./imagesTr/hosp_000.nii.gz", "label": "./labelsTr/hosp_000.nii.gz"}
        (root / "dataset.json").write_text(json.dumps(
            {"channel_names": names, "training": [entry]}))
    cfg = load_config_text(tmp_path, CONFIG.replace(
        "data: {spacing: [8, 8, 8]}", "data: {spacing: [8, 8, 8], in_channels: 2}"))
    assert list(read_truth(cfg.sites[0], 0, cfg.data)) == ["hosp_000"]
    cfg = load_config_text(tmp_path, CONFIG)  # one channel: the truth's dataset.json says two
    with pytest.raises(ConfigError, match=r"sites\[0\]\.truth.*channel"):
        read_truth(cfg.sites[0], 0, cfg.data)


def load_config_text(folder: Path, text: str):
    path = folder / "cfg.yaml"
    path.write_text(text)
    return load_config(path)


# -- the study ------------------------------------------------------------------------------


def test_study_scores_a_site_against_its_truth_folder(federation, capsys):
    cfg = load_config(federation / "harmonize.yaml")
    run = federation / "run"
    model = build_task(cfg).build_model()  # random weights: the plumbing, not the numbers
    save_model(run / "final_model.pt", config=cfg, state_dict=model.state_dict())
    study = run_study(cfg, run, downstream=False)
    site = study["sites"]["hosp"]
    assert site["cases"] == 3 and site["truth"] == cfg.sites[0].truth
    for region in ("grid", "native", "head"):
        for key in ("psnr_raw", "psnr_harmonised", "ssim_raw", "ssim_harmonised"):
            assert np.isfinite(site[f"{region}_{key}"]), (region, key)
    for region in ("native", "head"):
        assert site[f"{region}_psnr_ceiling"] > site[f"{region}_psnr_raw"]
    out = run / "study"
    assert json.loads((out / "study.json").read_text())["sites"]["hosp"]["head_ssim_ceiling"] \
        == pytest.approx(site["head_ssim_ceiling"])
    text = (out / "study.md").read_text()
    assert "native, inside the head" in text and "PSNR ceiling" in text
    assert f"{site['head_psnr_ceiling']:.2f}" in text
    assert "round-trip ceiling" in capsys.readouterr().out
    assert (out / "panels.png").stat().st_size > 5_000
    assert len(list((out / "harmonised" / "hosp").glob("*.nii.gz"))) == 3
    # Without a truth folder this site is no phantom hospital: no pairs, no study.
    cfg.sites[0].truth = None
    assert run_study(cfg, federation / "run2", downstream=False) is None
    assert "no paired truth for hosp" in capsys.readouterr().out
