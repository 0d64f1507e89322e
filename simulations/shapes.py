"""Shapes the head generators share: rotations and approximate signed distances (mm)."""

from __future__ import annotations

import numpy as np


def rotation_matrix(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles (radians) about x, y and z, applied in that order."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def ellipsoid_sdf(x: np.ndarray, y: np.ndarray, z: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid.

    Uses ``k0 (k0 - 1) / k1`` (exact on the axes, close elsewhere), which keeps offset
    level sets smooth and nested, unlike ``|p / r| - 1`` scaled by one radius.
    """
    return _ellipse_sdf((x, y, z), r)


def cylinder_sdf(x: np.ndarray, y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Approximate signed distance to a vertical elliptic cylinder (2D ellipse in x, y)."""
    return _ellipse_sdf((x, y), r)


def _ellipse_sdf(coords: tuple[np.ndarray, ...], r: np.ndarray) -> np.ndarray:
    """``k0 (k0 - 1) / k1`` of an axis-aligned ellipse or ellipsoid with radii ``r``."""
    k0 = np.sqrt(sum((c / r[i]) ** 2 for i, c in enumerate(coords)))
    k1 = np.sqrt(sum((c / r[i] ** 2) ** 2 for i, c in enumerate(coords)))
    safe = np.maximum(k1, 1e-12)
    return np.where(k1 > 1e-12, k0 * (k0 - 1.0) / safe, -float(np.min(r)))
