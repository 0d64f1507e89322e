"""Does harmonisation help? The study a researcher runs on hospitals with a paired truth.

Each site's scans need a paired ground truth in the reference domain (the same anatomy
through the reference scanner, on the scan's grid), used here for evaluation only: a site's
``truth:`` folder (:mod:`~fedscan.simulations.truth`; real-anatomy federations write one),
else, for the built-in phantom hospitals, the phantom generator's
(:func:`~fedscan.simulations.phantoms.reference_truth`). After a federated CycleGAN run
(``task: harmonisation``) this:

1. harmonises each site's cases with its own site-to-reference generator (``site_model.pt``)
   and scores raw and harmonised images against the truth (PSNR, SSIM, same normalisation
   for all, on the model grid, on the scan's own grid and there inside the head), beside the
   round-trip ceiling (the truth itself through the model's grid and back: the grid's share
   of the gap);
2. segments each site's scored cases with segmentation models trained on the reference
   domain (the consortium's public reference set, which has labels), once on the raw scans
   and once harmonised first: one model of the reference scanner alone, and one trained with
   scanner-imitating intensity augmentation; the most-shifted site is where the first
   model's raw Dice is lowest;
3. trains FedBN (federated segmentation whose normalisation layers stay at each site) on the
   same hospitals, the cheap alternative for scanner shift, and reports its Dice per site;
4. writes ``study.json``, ``study.md`` (the tables) and ``panels.png`` (before/after per site).

Up to :data:`STUDY_CASES` cases per site are harmonised and scored (evenly spaced, training
cases included: the CycleGAN saw those images, never labels or truth, and harmonising its own
archive is what a hospital does).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from torch import nn

from fedscan.shared.checkpoint import SITE_MODEL
from fedscan.shared.config import Config, SiteConfig, parse_config
from fedscan.shared.data import AFFINE_ATOL, case_id, load_nifti, read_dataset, read_site
from fedscan.shared.errors import DataError
from fedscan.shared.inference import (
    harmonise_on_grids,
    load_cyclegan,
    preprocess_image,
    to_native,
)
from fedscan.shared.metrics import (
    normalise_intensity,
    region_similarity,
    region_truth_metrics,
    truth_metrics,
)
from fedscan.shared.report import _table
from fedscan.shared.tasks.base import Case, resolve_device
from fedscan.simulations.federated import site_for_client
from fedscan.simulations.phantoms import SITE_PROFILES, profile_grid, reference_truth
from fedscan.simulations.truth import channels_first, head_mask, load_truth, read_truth

#: Row labels of the scoring grids (and the head region of the native grid).
_GRID_NAMES = {"grid": "model", "native": "native", "head": "native, inside the head"}

#: Case ids the phantom generator writes: ``<site>_<index>``.
_CASE_ID = re.compile(r"^(?P<site>.+)_(?P<index>\d{3})$")


def phantom_seed(site: SiteConfig) -> int | None:
    """The federation seed if ``site`` is a phantom hospital as ``fedscan phantoms`` writes
    it (so a paired truth exists), else None."""
    profile = SITE_PROFILES.get(site.name)
    try:
        data = read_dataset(site.data, name=site.name, check=False)
    except DataError:
        return None
    found = re.search(r"scanner profile (\S+) .*seed (\d+)$", data.description)
    if profile is None or not found or found[1] != profile.name:
        return None
    shape, affine = profile_grid(profile)
    for case in data.cases[:1]:
        img = load_nifti(case["image"], header_only=True)
        if tuple(img.shape[:3]) != shape or not np.allclose(img.affine, affine, atol=1e-3):
            return None
    ok = all(_CASE_ID.match(case_id(c)) for c in data.cases)
    return int(found[2]) if ok and data.cases else None


def _all_cases(cfg: Config, site: SiteConfig) -> list[Case]:
    data = read_site(site, cfg.data, check=False)
    return sorted(data.train + data.validation, key=case_id)


#: Cases scored per site: evenly spaced over the sorted case ids. A site mean over 60 cases
#: is stable to a few hundredths of a dB, and scoring all 400 of a large site took minutes.
STUDY_CASES = 60


def study_cases(cfg: Config, site: SiteConfig, limit: int = STUDY_CASES) -> list[Case]:
    """Up to ``limit`` of the site's cases (training and validation), evenly spaced."""
    cases = _all_cases(cfg, site)
    if len(cases) <= limit:
        return cases
    # More cases than picks: the rounded, evenly spaced indices are distinct.
    return [cases[i] for i in np.linspace(0, len(cases) - 1, limit).round().astype(int)]


def score_against_truth(generator: nn.Module, image_path: str | Path, truth: np.ndarray,
                        truth_affine: np.ndarray, cfg: Config,
                        device: torch.device | str = "cpu"
                        ) -> tuple[dict[str, float], nib.Nifti1Image]:
    """Raw and harmonised image against a paired ground truth, in two grids, and the
    round-trip ceiling.

    ``grid_*``: on the model's grid. The raw image, the truth and the generator's output all
    come out of the same preprocessing (resampling, percentile scaling), so the score
    isolates what the generator changes. ``native_*``: on the input's own grid, the
    harmonised image as ``fedscan harmonize`` writes it (the curve applied on this grid,
    the correction mapped back from the model's) against the stored raw image.
    ``head_*``: the native grid inside the head
    (:func:`~fedscan.simulations.truth.head_mask` of the truth), where the anatomy is.
    ``*_ceiling``: the truth itself through the model grid's round trip (preprocessing and
    inversion): what a generator whose whole output went through the model grid could score
    at best natively, the grid's share of the gap. A harmonised scan keeps its own detail
    and can score above it.

    Args:
        generator: the site-to-reference generator, in eval mode, on ``device``.
        image_path: the site's raw image.
        truth: the same anatomy in the reference domain on the image's grid, as nibabel
            orders it (channels last).
        truth_affine: its affine (the image's).
        cfg: the model's config.
        device: where the generator runs.

    Returns:
        ``{grid,native,head}_{psnr,ssim}_{raw,harmonised}``,
        ``{native,head}_{psnr,ssim}_ceiling``, and the harmonised image (the input's grid,
        as ``fedscan harmonize`` writes it).
    """
    img = load_nifti(image_path)
    if (not np.allclose(img.affine, truth_affine, rtol=0.0, atol=AFFINE_ATOL)
            or img.shape != truth.shape):
        raise ValueError(f"{image_path}: the truth is not on the image's grid")
    truth_img = nib.Nifti1Image(np.asarray(truth, dtype=np.float32), truth_affine)
    with tempfile.TemporaryDirectory() as tmp:
        # The truth goes through exactly the pipeline's preprocessing, from a file like the
        # image, so both land on identical model grids.
        truth_path = Path(tmp) / "truth.nii"
        nib.save(truth_img, truth_path)
        t, pre = preprocess_image(truth_path, cfg)
    ceiling = to_native(t.as_tensor().clone(), t, pre, truth_img).numpy()
    x, on_grid, harmonised = harmonise_on_grids(generator, image_path, cfg, device)
    pct = cfg.data.intensity_percentiles
    out = {f"grid_{k}": v for k, v in truth_metrics(x.as_tensor().numpy(), on_grid.numpy(),
                                                     t.as_tensor().numpy(), pct).items()}
    raw, moved, truth = (channels_first(a) for a in (np.asanyarray(img.dataobj),
                                                     np.asarray(harmonised.dataobj), truth))
    regions = {"native": None, "head": head_mask(truth)}
    scores = region_truth_metrics(raw, moved, truth, regions, pct)
    best = region_similarity(ceiling, truth, regions, pct)
    for region in regions:
        out.update({f"{region}_{k}": v for k, v in scores[region].items()})
        out.update({f"{region}_{k}_ceiling": v for k, v in best[region].items()})
    return out, harmonised


def site_model_path(cfg: Config, site: SiteConfig, run_dir: Path) -> Path:
    """The model a site harmonises with: its own ``site_model.pt`` (the final generators
    with its intensity curves), else the run's global ``final_model.pt`` (identity curves)."""
    own = Path(str(site_for_client(cfg, site, run_dir).state_dir)) / SITE_MODEL
    return own if own.is_file() else run_dir / "final_model.pt"


#: A site's paired truth: case id -> (truth as nibabel orders it, affine).
TruthLoader = Callable[[str], tuple[np.ndarray, np.ndarray]]


def site_truths(cfg: Config) -> dict[str, tuple[TruthLoader, str] | None]:
    """Each site's paired truth and where it comes from: its ``truth:`` folder (checked,
    :func:`~fedscan.simulations.truth.read_truth`), else the phantom generator's
    :func:`~fedscan.simulations.phantoms.reference_truth` for a phantom hospital, else None."""
    out: dict[str, tuple[TruthLoader, str] | None] = {}
    for i, site in enumerate(cfg.sites):
        if site.truth is not None:
            paths = read_truth(site, i, cfg.data)
            out[site.name] = (lambda cid, paths=paths: load_truth(paths[cid]), site.truth)
            continue
        seed = phantom_seed(site)
        out[site.name] = None if seed is None else (
            lambda cid, seed=seed, name=site.name: reference_truth(
                seed, name, int(_CASE_ID.match(cid)["index"]), SITE_PROFILES[name]),
            f"phantom seed {seed}")
    return out


def harmonise_sites(cfg: Config, run_dir: Path, out_dir: Path,
                    truths: dict[str, TruthLoader]) -> dict[str, dict[str, Any]]:
    """Harmonise each site's study cases and score them against the paired truth.

    Args:
        cfg: the harmonisation run's config.
        run_dir: the finished run (``final_model.pt``, ``site-state/<site>/site_model.pt``).
        out_dir: harmonised images go to ``out_dir/harmonised/<site>/<case>.nii.gz``.
        truths: site name -> its paired truth (:func:`site_truths`).

    Returns:
        Per site: means of :func:`score_against_truth`'s scores, ``cases``, ``model``
        (the file used) and ``harmonised`` (case id -> output file).
    """
    device = resolve_device(cfg.device)
    results: dict[str, dict[str, Any]] = {}
    for site in cfg.sites:
        model_path = site_model_path(cfg, site, run_dir)
        model_cfg, model = load_cyclegan(model_path)
        generator = model.harmoniser().to(device).eval()
        folder = out_dir / "harmonised" / site.name
        folder.mkdir(parents=True, exist_ok=True)
        scores, harmonised = [], {}
        for case in study_cases(cfg, site):
            cid = case_id(case)
            truth, affine = truths[site.name](cid)
            score, out = score_against_truth(generator, case["image"], truth, affine,
                                             model_cfg, device)
            path = folder / f"{cid}.nii.gz"
            out.to_filename(path)
            harmonised[cid] = str(path)
            scores.append(score)
            print(f"[study] {site.name} {cid}: PSNR {score['grid_psnr_raw']:.2f} -> "
                  f"{score['grid_psnr_harmonised']:.2f} dB (model grid), "
                  f"{score['native_psnr_raw']:.2f} -> {score['native_psnr_harmonised']:.2f} dB "
                  f"(native grid; round-trip ceiling {score['native_psnr_ceiling']:.2f})",
                  flush=True)
        # A plain mean: a perfect ceiling (PSNR inf) must stay inf, not drop out.
        means = {k: float(np.mean([sc[k] for sc in scores])) for k in scores[0]}
        results[site.name] = {**means, "cases": len(scores), "model": str(model_path),
                              "harmonised": harmonised}
    return results


def segmentation_config(cfg: Config, sites: list[dict[str, Any]], *,
                        train: dict[str, Any] | None = None, **model: Any) -> Config:
    """The segmentation run of the study: the harmonisation config's ``data``, ``model`` (the
    segmentation UNet) and ``train`` blocks and rounds on ``sites``, without privacy (the
    study compares answers to scanner shift, not privacy levels); ``train`` and ``model``
    entries override."""
    data = cfg.to_dict()
    data.update(task="segmentation", sites=sites, test_sets=[], privacy=None)
    data["model"] = {**data["model"], **model}
    data["train"] = {**data["train"], **(train or {})}
    del data["harmonisation"]
    return parse_config(data)


#: The study's segmentation runs, which depend on the sites and the reference set only.
SEGMENTATION_RUNS = ("reference-segmentation", "augmented-segmentation", "fedbn")


def finished_run(folder: Path, cfg: Config) -> dict[str, Any] | None:
    """The summary of a finished run in ``folder`` made with exactly ``cfg``, else None.

    The study's segmentation runs do not depend on the harmonisation model, so a study that
    finds them already there (copied from a run of the same federation, as the DP utility
    benchmark does) reuses them instead of training them again.
    """
    from fedscan.shared.checkpoint import load_model

    summary, model = folder / "summary.json", folder / "final_model.pt"
    if not (summary.is_file() and model.is_file()):
        return None
    if load_model(model)[0].to_dict() != cfg.to_dict():  # the config the model was saved with
        return None
    return json.loads(summary.read_text())


def downstream_dice(cfg: Config, harmonised: dict[str, dict[str, str]],
                    reference: str, out_dir: Path) -> dict[str, Any]:
    """Dice at every site: reference-domain models on raw vs harmonised scans, and FedBN.

    Two models are trained on the labelled reference set: one of its scanner alone
    (``train.scanner_augmentation: false``), the model harmonisation is for, and one with
    the default scanner-imitating intensity augmentation, the other cheap answer to shift.
    The most-shifted site is where the scanner shift costs the first model most: its
    lowest Dice on raw scans (the rule reads raw scans only).

    Args:
        cfg: the harmonisation run's config.
        harmonised: site name -> (case id -> harmonised image file): the cases segmented.
        reference: the public reference-domain dataset (with labels).
        out_dir: where the segmentation runs write their outputs.

    Returns:
        ``sites``: per site ``reference_raw`` and ``reference_harmonised`` (no augmentation),
        ``augmented_raw`` and ``augmented_harmonised``, ``cases``, ``fedbn_validation`` (mean
        Dice) and ``fedbn_validation_cases``; ``most_shifted``: the site's name.
    """
    from fedscan.shared.checkpoint import load_model
    from fedscan.shared.tasks import build_task
    from fedscan.simulations.baselines import run_pooled
    from fedscan.simulations.federated import run_federated

    raw = {s.name: [c for c in _all_cases(cfg, s) if case_id(c) in harmonised[s.name]]
           for s in cfg.sites}
    sites: dict[str, dict[str, Any]] = {name: {"cases": len(cases)} for name, cases in raw.items()}
    for prefix, augment in (("reference", False), ("augmented", True)):
        ref_cfg = segmentation_config(cfg, [{"name": "reference", "data": reference}],
                                      train={"scanner_augmentation": augment})
        folder = out_dir / f"{prefix}-segmentation"
        what = f"({'with' if augment else 'without'} scanner augmentation)"
        if finished_run(folder, ref_cfg) is None:
            print(f"[study] training the reference-domain segmentation model {what}",
                  flush=True)
            run_pooled(ref_cfg, folder)
        else:
            print(f"[study] reusing the reference-domain segmentation model {what} in "
                  f"{folder}", flush=True)
        _, state, _ = load_model(folder / "final_model.pt")
        task = build_task(ref_cfg)
        model = task.build_model().to(resolve_device(cfg.device))
        model.load_state_dict(state)
        for name, cases in raw.items():
            moved = [{**c, "image": harmonised[name][case_id(c)]} for c in cases]
            sites[name][f"{prefix}_raw"] = task.evaluate(model, cases).metrics["dice"]
            sites[name][f"{prefix}_harmonised"] = task.evaluate(model, moved).metrics["dice"]
            print(f"[study] {name}: Dice {sites[name][f'{prefix}_raw']:.4f} raw, "
                  f"{sites[name][f'{prefix}_harmonised']:.4f} harmonised first", flush=True)

    fedbn_cfg = segmentation_config(cfg, [{"name": s.name, "data": s.data} for s in cfg.sites],
                                    local_norm=True)
    fedbn = finished_run(out_dir / "fedbn", fedbn_cfg)
    if fedbn is None:
        print("[study] training FedBN on the same hospitals", flush=True)
        fedbn = run_federated(fedbn_cfg, out_dir / "fedbn")
    per_site = fedbn["final"]["per_site"]
    for name, row in sites.items():
        row.update(fedbn_validation=per_site.get(name, {}).get("dice"),
                   fedbn_validation_cases=per_site.get(name, {}).get("num_examples"))
    most = min(sites, key=lambda name: sites[name]["reference_raw"])
    return {"sites": sites, "most_shifted": most}


def _middle_slice(image: str | Path | nib.Nifti1Image, normalise: bool = True) -> np.ndarray:
    """The middle axial slice of an image in RAS display orientation, normalised to [0, 1]
    (``normalise``; else as stored, for a mask)."""
    img = nib.as_closest_canonical(image if isinstance(image, nib.Nifti1Image)
                                   else nib.load(image))
    data = img.get_fdata(dtype=np.float32)
    data = data[..., 0] if data.ndim == 4 else data  # the first channel of a 4D image
    if not normalise:
        return np.rot90(data[:, :, data.shape[2] // 2])
    # Reorienting leaves negative strides, which torch (inside the scaling) refuses.
    data = normalise_intensity(np.ascontiguousarray(data))
    return np.rot90(data[:, :, data.shape[2] // 2])


def plot_panels(path: Path, cfg: Config, sites: dict[str, dict[str, Any]],
                truths: dict[str, TruthLoader]) -> Path:
    """Before/after panels: per site, its first case raw, harmonised and the truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sites), 3, figsize=(9, 3 * len(sites)), squeeze=False)
    for row, site in enumerate(cfg.sites):
        cid = sorted(sites[site.name]["harmonised"])[0]
        raw_path = next(c["image"] for c in _all_cases(cfg, site) if case_id(c) == cid)
        truth, affine = truths[site.name](cid)
        m = sites[site.name]
        images = [(_middle_slice(raw_path), f"{site.name} raw\nPSNR {m['grid_psnr_raw']:.1f} dB, "
                   f"SSIM {m['grid_ssim_raw']:.3f}"),
                  (_middle_slice(sites[site.name]["harmonised"][cid]),
                   f"harmonised\nPSNR {m['grid_psnr_harmonised']:.1f} dB, "
                   f"SSIM {m['grid_ssim_harmonised']:.3f}"),
                  (_middle_slice(nib.Nifti1Image(truth, affine)),
                   f"reference-domain truth, head outlined\nnative ceiling "
                   f"{m['native_psnr_ceiling']:.1f} dB, SSIM {m['native_ssim_ceiling']:.3f}")]
        for col, (image, title) in enumerate(images):
            axes[row][col].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row][col].set_title(title, fontsize=9)
            axes[row][col].axis("off")
        mask = head_mask(channels_first(truth)).astype(np.float32)
        axes[row][2].contour(_middle_slice(nib.Nifti1Image(mask, affine), normalise=False),
                             levels=[0.5], colors="tab:orange", linewidths=0.8)
    fig.suptitle("Harmonisation, site means on the model grid over the scored cases (first "
                 "case shown)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _dice(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def format_study(study: dict[str, Any]) -> str:
    """The study's two tables as Markdown."""
    rows = []
    for name, m in study["sites"].items():
        for grid, label in _GRID_NAMES.items():
            pr, ph, sr, sh = (m[f"{grid}_{k}"] for k in ("psnr_raw", "psnr_harmonised",
                                                          "ssim_raw", "ssim_harmonised"))
            pc, sc = (m.get(f"{grid}_{k}_ceiling") for k in ("psnr", "ssim"))
            rows.append([f"`{name}`", label, str(m["cases"]), f"{pr:.2f}", f"{ph:.2f}",
                         f"{ph - pr:+.2f}", "—" if pc is None else f"{pc:.2f}", f"{sr:.3f}",
                         f"{sh:.3f}", f"{sh - sr:+.3f}", "—" if sc is None else f"{sc:.3f}"])
    lines = ["## Harmonised vs raw, against the paired reference-domain truth", "",
             _table(["Site", "Grid", "Cases", "PSNR raw (dB)", "PSNR harmonised", "Gain",
                     "PSNR ceiling", "SSIM raw", "SSIM harmonised", "Gain", "SSIM ceiling"],
                    rows), "",
             "Model grid: raw, harmonised and truth all through the pipeline's preprocessing "
             "(what the generator changes). Native grid: the harmonised file as written, in the "
             "scan's own grid (the intensity curve applied there, only the correction mapped "
             "back from the model grid, so the scan's detail is never resampled); inside the "
             "head: the same, scored only inside a head mask of the truth (the air around the "
             "head left out). Ceiling: the truth itself sent through the model's grid and back, "
             "what a generator whose whole output went through the model grid would score at "
             "best on the native grid; the gap between it and a perfect score is the grid's "
             "(raw and harmonised scans, which keep their detail, can score above it).", ""]
    d = study.get("downstream")
    if d:
        most = d["most_shifted"]
        rows = []
        for name, m in d["sites"].items():
            rows.append([f"`{name}`" + (" (most shifted)" if name == most else ""),
                         str(m["cases"]), f"{m['reference_raw']:.4f}",
                         f"{m['reference_harmonised']:.4f}",
                         f"{m['reference_harmonised'] - m['reference_raw']:+.4f}",
                         f"{m['augmented_raw']:.4f}", f"{m['augmented_harmonised']:.4f}",
                         f"{m['augmented_harmonised'] - m['augmented_raw']:+.4f}",
                         "—" if m["fedbn_validation"] is None else
                         f"{m['fedbn_validation']:.4f} ({m['fedbn_validation_cases']})"])
        m = d["sites"][most]
        lines += ["## Downstream segmentation: raw vs harmonised first, and FedBN", "",
                  _table(["Site", "Cases", "Reference scanner: raw", "harmonised first",
                          "Change", "Scanner augmentation: raw", "harmonised first", "Change",
                          "FedBN (validation cases)"], rows), "",
                  "Reference scanner: a segmentation model trained on the labelled reference "
                  "set alone; scanner augmentation: the same with scanner-imitating intensity "
                  "augmentation. Each is applied to the scored cases raw and harmonised first. "
                  "FedBN is federated segmentation over these hospitals with each site's own "
                  "normalisation layers, evaluated on the site's validation cases (it saw its "
                  "training cases with labels).", "",
                  f"At the most-shifted site, `{most}` (where the reference-scanner model's Dice "
                  f"on raw scans is lowest), harmonising first changes Dice by "
                  f"**{m['reference_harmonised'] - m['reference_raw']:+.4f}** for the model of "
                  f"the reference scanner alone and by "
                  f"**{m['augmented_harmonised'] - m['augmented_raw']:+.4f}** for the model "
                  f"trained with scanner augmentation; FedBN reaches "
                  f"{_dice(m['fedbn_validation'])}.", ""]
    lines += ["![before/after](panels.png)", ""]
    return "\n".join(lines)


def run_study(cfg: Config, run_dir: Path, *, downstream: bool = True) -> dict[str, Any] | None:
    """The whole study for a finished harmonisation run; None if a site has no paired truth
    (neither a ``truth:`` folder nor a phantom hospital).

    Writes ``run_dir/study/`` (study.json, study.md, panels.png, harmonised images, the
    segmentation runs) and returns the study.
    """
    found = site_truths(cfg)
    lacking = [name for name, truth in found.items() if truth is None]
    if lacking:
        print(f"[study] no paired truth for {', '.join(lacking)} (give each site a `truth:` "
              "folder, or run on phantom hospitals): study skipped")
        return None
    truths = {name: loader for name, (loader, _) in found.items()}
    out = run_dir / "study"
    out.mkdir(parents=True, exist_ok=True)
    sites = harmonise_sites(cfg, run_dir, out, truths)
    for name, (_, source) in found.items():
        sites[name]["truth"] = source
    study: dict[str, Any] = {"sites": sites}
    if downstream:
        study["downstream"] = downstream_dice(
            cfg, {name: m["harmonised"] for name, m in sites.items()},
            str(cfg.harmonisation.reference), out)
    (out / "study.json").write_text(json.dumps(study, indent=2))
    plot_panels(out / "panels.png", cfg, sites, truths)
    text = format_study(study)
    (out / "study.md").write_text("# Harmonisation study\n\n" + text)
    print(text, flush=True)
    return study
