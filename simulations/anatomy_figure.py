"""The figure and timings of docs/anatomy.md: both anatomy generators across scanners.

``python -m fedscan.simulations.anatomy_figure OUT.png`` renders one folded-cortex phantom
under the phantom sites' scanners and one real-anatomy patient under the real-anatomy sites'
scanners (T1, T2 and the parcellation, all reoriented to RAS for display), and prints the
CPU seconds per case of each generator on each scanner.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from fedscan.simulations import anatomy as A
from fedscan.simulations import phantoms as P
from fedscan.simulations import realanatomy as R
from fedscan.simulations.scanners import MRProfile

#: The phantom's own 1 mm rendering (tissue classes and clean T1) beside the sites' scans.
ONE_MM = MRProfile("1 mm", "RAS", (1.0, 1.0, 1.0))


def _ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    img = nib.as_closest_canonical(nib.Nifti1Image(array.astype(np.float32), affine))
    return np.asanyarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms()[:3])


def _coronal(volume: np.ndarray, zooms: tuple[float, ...], offset: float = 0.0) -> tuple:
    """A coronal slice (x across, z up) at ``offset`` mm anterior of the middle, with the
    aspect ratio of its voxels."""
    y = int(volume.shape[1] // 2 + offset / zooms[1])
    return volume[:, y].T, zooms[2] / zooms[0]


def _seconds(render: object, *args: object, **kwargs: object) -> float:
    start = time.process_time()
    render(*args, **kwargs)  # type: ignore[operator]
    return time.process_time() - start


def main(out: Path) -> None:
    """Write the panel to ``out`` and print per-case CPU seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R.load_template()  # once per process; not part of a case
    phantom_profiles = [P.SITE_PROFILES[s] for s in ("site-a", "site-b", "site-c")]
    real_profiles = [*R.SITE_PROFILES.values(), R.HELDOUT_PROFILE]
    head = A.sample_anatomy(np.random.default_rng(0))
    patient = R.sample_patient(np.random.default_rng(0))

    fig, axes = plt.subplots(3, 5, figsize=(12.5, 7.8))
    for ax in axes.ravel():
        ax.axis("off")
    classes, zooms = _ras(*A.render_tissues(head, ONE_MM))
    image, _, affine = A.render_clean(head, ONE_MM)
    t1, zooms = _ras(image, affine)
    axes[0, 0].imshow(_coronal(t1, zooms)[0], cmap="gray", origin="lower")
    axes[0, 0].set_title("phantom, 1 mm truth", fontsize=9)
    for j, profile in enumerate(phantom_profiles, start=1):
        image, _, affine = A.render(head, profile, np.random.default_rng(1))
        volume, zooms = _ras(image, affine)
        slice_, aspect = _coronal(volume, zooms)
        axes[0, j].imshow(slice_, cmap="gray", origin="lower", aspect=aspect)
        axes[0, j].set_title(f"phantom {profile.name} {profile.orientation} "
                             f"{'x'.join(f'{s:g}' for s in profile.spacing)}", fontsize=9)
    axes[0, 4].imshow(_coronal(classes, zooms)[0], cmap="viridis", origin="lower",
                      interpolation="nearest")
    axes[0, 4].set_title("phantom CSF / GM / WM", fontsize=9)

    for j, profile in enumerate(real_profiles):
        image, label, affine = R.render(patient, profile, np.random.default_rng(1), channels=2,
                                        label_set="parcellation")
        volume, zooms = _ras(image, affine)
        for row, channel in ((1, 0), (2, 1)):
            slice_, aspect = _coronal(volume[..., channel], zooms, offset=10.0)
            axes[row, j].imshow(slice_, cmap="gray", origin="lower", aspect=aspect)
        axes[1, j].set_title(f"real {profile.name} {profile.orientation} "
                             f"{'x'.join(f'{s:g}' for s in profile.spacing)}", fontsize=9)
        if j == 0:
            labels, lzooms = _ras(label, affine)
            axes[1, 4].imshow(_coronal(labels, lzooms, offset=10.0)[0], cmap="tab10",
                              vmin=0, vmax=9, origin="lower", interpolation="nearest")
            axes[1, 4].set_title("L GM / R GM / WM / ventricles", fontsize=9)
            truth, taffine = R.render_truth(patient, profile, R.REFERENCE_PROFILE, channels=1)
            tvol, tzooms = _ras(truth, taffine)
            axes[2, 4].imshow(_coronal(tvol, tzooms, offset=10.0)[0], cmap="gray",
                              origin="lower")
            axes[2, 4].set_title("paired truth (site-a grid)", fontsize=9)
    axes[2, 0].set_title("T2 channel (row above: T1)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=64)
    plt.close(fig)

    print("CPU seconds per case (one core):")
    for profile in phantom_profiles + [P.HELDOUT_PROFILE]:
        times = [_seconds(A.render, A.sample_anatomy(np.random.default_rng(i)), profile,
                          np.random.default_rng(i)) for i in range(3)]
        print(f"  phantom {profile.name:8s} {np.mean(times):.2f} s")
    for profile in real_profiles:
        times = [_seconds(R.render, R.sample_patient(np.random.default_rng(i)), profile,
                          np.random.default_rng(i), channels=2, label_set="parcellation")
                 for i in range(3)]
        print(f"  real    {profile.name:8s} {np.mean(times):.2f} s")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "anatomy.png"))
