"""Phantom hospitals with deliberately wrong data, for the data check and drift must-shows.

A *bad* site renders the same heads as an honest phantom site and then spoils them the way
real exports go wrong: ``inverted`` (an inverted contrast, as a mislabelled T2 export
among T1s would give, with labels shifted by a few voxels), ``empty`` (most labels empty:
an export that lost the segmentations) or ``flipped`` (the affine mirrored left-right, so
the image says RAS where the voxels are LAS).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedscan.simulations.phantoms import (
    SITE_PROFILES,
    ScannerProfile,
    case_rngs,
    render,
    sample_anatomy,
    write_dataset,
)

#: How a bad site's data is spoiled.
KINDS = ("inverted", "empty", "flipped")
#: Voxels the ``inverted`` site's labels are shifted by (along the first voxel axis).
LABEL_SHIFT = 3
#: Share of the ``empty`` site's labels that are emptied.
EMPTY_SHARE = 0.7


def spoil(kind: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, index: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One case spoiled the ``kind`` way (see the module docstring)."""
    if kind == "inverted":
        top = float(image.max())
        image = (top - image.astype(np.float32)).astype(image.dtype)
        label = np.roll(label, LABEL_SHIFT, axis=0)
    elif kind == "empty":
        if (index * 0.618034) % 1.0 < EMPTY_SHARE:  # evenly spread over the cases
            label = np.zeros_like(label)
    elif kind == "flipped":
        affine = affine.copy()
        affine[0, :] = -affine[0, :]
    else:
        raise ValueError(f"unknown bad-site kind {kind!r}; one of {', '.join(KINDS)}")
    return image, label, affine


def write_bad_site(folder: Path, kind: str, n_cases: int = 40, n_val: int = 8,
                   profile: ScannerProfile = SITE_PROFILES["site-a"], seed: int = 0,
                   name: str = "site-d") -> Path:
    """Write a phantom site whose data is spoiled the ``kind`` way.

    Returns:
        ``folder``.
    """
    cases = []
    for index in range(n_cases):
        anatomy_rng, scanner_rng = case_rngs(seed, name, index)
        image, label, affine = render(sample_anatomy(anatomy_rng), profile, scanner_rng)
        image, label, affine = spoil(kind, image, label, affine, index)
        cases.append((f"{name}_{index:03d}", image, label, affine))
    write_dataset(folder, cases, [c[0] for c in cases[n_cases - n_val:]],
                  description=f"phantom site with {kind} data (deliberately wrong)")
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--kind", choices=KINDS, default="inverted")
    parser.add_argument("--cases", type=int, default=40)
    args = parser.parse_args(argv)
    print(write_bad_site(args.folder, args.kind, args.cases))


if __name__ == "__main__":
    main()
