"""The data contract: a site's MSD-layout folder in, MONAI-style case dicts out.

A site's data is a folder holding ``dataset.json`` (Medical Segmentation Decathlon layout) with
a ``training`` list of ``{"image": ..., "label": ...}`` paths relative to the folder and an
optional ``validation`` list of the same form. Without one, validation cases are chosen by a
deterministic per-site split. Its optional ``labels`` (class index -> name, or nnU-Net's name
-> index), ``modality``/``channel_names`` (channel index -> name), ``mirror_pairs`` (class
pairs a left-right flip swaps) and ``symmetric_labels`` (no class is lateralised) are read
into :class:`SiteData`, and must agree with ``data.num_classes`` / ``data.in_channels``
and, by name, with the consortium's ``data.labels`` / ``data.channel_names`` /
``data.mirror_pairs`` when the run config declares them (a site whose classes are numbered
differently would otherwise train the federation's model on wrong labels without any error).

This is the only module that parses dataset.json or checks a case's files; everything else
receives :data:`Case` dicts with absolute paths and reads files through :func:`load_nifti`
and :func:`read_label`.

NIfTI files may be in any orientation, spacing and dtype: downstream MONAI transforms
resample. Here files are only read and checked, so that a bad case fails once, up front, with
one line naming the file, instead of deep inside a worker process mid-training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedscan.shared.config import DataConfig, SiteConfig, mirror_pairs_problem
from fedscan.shared.errors import DataError

#: A case as the data contract hands it out: ``{"image", "label", "case"}`` with absolute
#: paths and the case id (MONAI dict style).
Case = dict[str, str]

DATASET_JSON = "dataset.json"
#: Image and label files must be NIfTI; the case id is the image name without this suffix.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
#: Largest image/label affine difference (mm, or mm per voxel for the linear part) accepted:
#: files written by different tools round the affine differently, real mismatches are larger.
AFFINE_ATOL = 1e-2


@dataclass(frozen=True)
class SiteData:
    """One site's cases, split into training and validation, and what dataset.json says.

    Attributes:
        name: the site's name (the folder name unless given).
        root: absolute path of the data folder.
        train: training cases, sorted by case id.
        validation: validation cases, sorted by case id (empty for a one-case site).
        class_names: the name of each label class by index (``labels``), or empty.
        channel_names: the name of each image channel (``channel_names``/``modality``), or
            empty.
        description: dataset.json's ``description``, or empty.
        mirror_pairs: class pairs a left-right flip swaps (``mirror_pairs``), or empty.
        symmetric_labels: dataset.json declares no class lateralised (``symmetric_labels``):
            a left-right flip needs no relabelling.
    """

    name: str
    root: Path
    train: list[Case]
    validation: list[Case]
    class_names: tuple[str, ...] = ()
    channel_names: tuple[str, ...] = ()
    description: str = ""
    mirror_pairs: tuple[tuple[int, int], ...] = ()
    symmetric_labels: bool = False

    @property
    def cases(self) -> list[Case]:
        """All cases: training then validation."""
        return [*self.train, *self.validation]


def describe(site: SiteData) -> str:
    """``"; classes background, brain; channels T1"`` from dataset.json (empty if it names
    neither), for preflight and check-data lines."""
    parts = [f"{what} {', '.join(names)}" for what, names in
             (("classes", site.class_names), ("channels", site.channel_names)) if names]
    return "".join(f"; {p}" for p in parts)


def _one_line(text: str, limit: int = 160) -> str:
    """First line of ``text``, shortened, so a DataError message stays on one line."""
    lines = str(text).strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _fmt_value(value: Any) -> str:
    """A label value as a user reads it: ``3`` rather than ``3.0``, ``0.5``, ``nan``."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def case_id(case: Mapping[str, str] | str | Path) -> str:
    """The id of a case (its ``case`` entry) or of an image path.

    Args:
        case: a :data:`Case`, or an image path.

    Returns:
        The id: the image's file name without ``.nii.gz`` / ``.nii``, e.g.
        ``"hippocampus_001"`` for ``./imagesTr/hippocampus_001.nii.gz``.
    """
    if isinstance(case, Mapping):
        if case.get("case"):
            return str(case["case"])
        case = case["image"]
    name = Path(case).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_nifti(path: str | Path, what: str = "image", *,
               header_only: bool = False) -> nib.Nifti1Image:
    """Load a NIfTI file, by default reading all of its data.

    The full read matters: a truncated ``.nii.gz`` loads its header fine and only fails when
    the voxels are decompressed. The returned image then holds its data in memory, so
    ``np.asanyarray(img.dataobj)`` on it does not read the file again. ``header_only`` skips
    that read (a quick check before a pipeline that reads the file itself).

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        what: what the file is (``image``, ``label``), for the message.
        header_only: read only the header.

    Returns:
        The image, with its (scaled) voxel array in memory unless ``header_only``.

    Raises:
        DataError: the file is missing or not a readable NIfTI; the message names it.
    """
    if not os.path.isfile(path):
        raise DataError(f"{what} file not found: {path}")
    try:
        # mmap=False forces a real read of an uncompressed .nii, so truncation shows here.
        img = nib.load(path, mmap=False)
        if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass
            raise ValueError(f"{type(img).__name__}, not NIfTI")
        if header_only:
            return img
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel, gzip and zlib raise many types for a bad file
        # nibabel often repeats the full path in its message; the file name is enough there.
        reason = _one_line(str(exc).replace(str(path), Path(path).name)) or type(exc).__name__
        raise DataError(f"{path}: not a readable NIfTI {what} ({reason})") from None
    if data.dtype.kind not in "biuf":
        raise DataError(f"{path}: not a readable NIfTI {what} (unsupported voxel type "
                        f"{data.dtype})")
    # Re-wrap so the image carries the array read above instead of a proxy onto the file.
    return type(img)(data, img.affine, img.header)


def _label_spatial_shape(path: str | Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Spatial shape of a label: its shape less trailing singleton (channel) axes beyond 3D."""
    spatial = tuple(shape)
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial = spatial[:-1]
    if len(spatial) not in (2, 3):
        raise DataError(f"{path}: a label must be a single-channel 2D or 3D volume, "
                        f"found shape {tuple(shape)}")
    return spatial


def check_label_values(path: str | Path, data: Any, num_classes: int | None) -> None:
    """Labels must hold integer values (any dtype) in ``[0, num_classes)``.

    Args:
        path: the label file (named in the message).
        data: its voxels (a numpy array, or a tensor after preprocessing).
        num_classes: classes including background; None checks only for non-negative ints.

    Raises:
        DataError: the first bad value found, naming the file.
    """
    data = np.asarray(data)
    if num_classes is not None:
        message = f"{path}: label values must be integers in [0, {num_classes}), found"
    else:
        message = f"{path}: label values must be non-negative integers, found"
    if data.size == 0:
        return
    # min/max are two passes without a temporary and NaN propagates through both.
    lo, hi = data.min(), data.max()
    if data.dtype.kind == "f":
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = lo if not np.isfinite(lo) else hi
            raise DataError(f"{message} {_fmt_value(bad)}")
        fractional = data != np.round(data)
        if fractional.any():
            raise DataError(f"{message} {_fmt_value(data[fractional].flat[0])}")
    if lo < 0:
        raise DataError(f"{message} {_fmt_value(lo)}")
    if num_classes is not None and hi >= num_classes:
        raise DataError(f"{message} {_fmt_value(hi)}")


def read_label(path: str | Path, num_classes: int | None,
               shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A label map as integer classes, checked like :func:`check_case` checks it.

    Args:
        path: the label NIfTI.
        num_classes: classes including background (None: any non-negative integers).
        shape: its image's spatial shape, which the label's must equal; None skips.

    Returns:
        ``int64`` classes of the label's spatial shape (trailing singleton axes dropped).

    Raises:
        DataError: unreadable, wrong shape, or values outside ``0 .. num_classes - 1``.
    """
    arr = np.asanyarray(load_nifti(path, "label").dataobj)
    spatial = _label_spatial_shape(path, arr.shape)
    arr = arr.reshape(spatial)
    if shape is not None and spatial != tuple(shape):
        raise DataError(f"{path}: shape {spatial} differs from its image's {tuple(shape)}")
    check_label_values(path, arr, num_classes)
    return arr.astype(np.int64)


def check_case(case: Case, *, num_classes: int | None = None, in_channels: int = 1) -> None:
    """Fully validate one case: readable files, matching grids, sane values.

    Checks that image and label exist and are readable NIfTI (full data read); that their
    spatial shapes and affines agree; that the image has ``in_channels`` channels (a 4D image
    carries them last, as nibabel gives it) and no NaN/Inf; and that label values are
    integers (any dtype) in ``[0, num_classes)``, or non-negative when ``num_classes`` is None.

    Args:
        case: a case dict with ``image`` and ``label`` paths.
        num_classes: number of label classes, background included; None skips the upper bound.
        in_channels: image channels expected.

    Raises:
        DataError: the first problem found, on one line naming the file(s) at fault.
    """
    image_path, label_path = case["image"], case["label"]

    label = load_nifti(label_path, "label")
    label_shape = tuple(label.shape)
    spatial = _label_spatial_shape(label_path, label_shape)
    check_label_values(label_path, np.asanyarray(label.dataobj), num_classes)
    label_affine = label.affine
    del label  # one volume in memory at a time

    image = load_nifti(image_path)
    image_shape = tuple(image.shape)
    if image_shape == spatial:
        channels = 1
    elif len(image_shape) == len(spatial) + 1 and image_shape[: len(spatial)] == spatial:
        channels = image_shape[-1]
    else:
        raise DataError(f"image/label shape mismatch: {image_path} {image_shape} "
                        f"vs {label_path} {label_shape}")
    if channels != in_channels:
        raise DataError(f"{image_path}: expected {in_channels} image channel(s) (in_channels), "
                        f"found {channels} (shape {image_shape})")
    if not np.allclose(image.affine, label_affine, rtol=0.0, atol=AFFINE_ATOL):
        diff = float(np.abs(image.affine - label_affine).max())
        raise DataError(f"image/label affine mismatch: {image_path} vs {label_path} "
                        f"(largest difference {diff:.4g})")
    data = np.asanyarray(image.dataobj)
    if data.dtype.kind == "f" and data.size:
        lo, hi = data.min(), data.max()  # NaN propagates, Inf shows as an extreme
        if not (np.isfinite(lo) and np.isfinite(hi)):
            found = "NaN" if np.isnan(lo) or np.isnan(hi) else "Inf"
            raise DataError(f"{image_path}: image contains {found} values")


def _read_json(json_path: Path) -> dict[str, Any]:
    """Parse dataset.json; every failure names the file."""
    if not json_path.is_file():
        raise DataError(f"{json_path}: missing")
    try:
        spec = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{json_path}: not valid JSON ({_one_line(str(exc))})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{json_path}: unreadable ({_one_line(str(exc))})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{json_path}: top level must be a JSON object")
    return spec


def _parse_entries(json_path: Path, root: Path, key: str, entries: Any,
                   labelled: bool = True) -> list[Case]:
    """Turn one dataset.json list into cases with absolute paths that exist (``labelled``:
    each with a label; otherwise only images are read, a label entry is ignored)."""
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{json_path}: '{key}' must be a non-empty list")
    keys = ("image", "label") if labelled else ("image",)
    cases = []
    for i, entry in enumerate(entries):
        where = f"{json_path}: '{key}'[{i}]"
        if not (isinstance(entry, dict) and all(
            isinstance(entry.get(k), str) and entry[k].strip() for k in keys
        )):
            raise DataError(f"{where} must be an object with "
                            f"{' and '.join(repr(k) for k in keys)} path strings")
        paths = {}
        for k in keys:
            rel = entry[k]
            if not rel.endswith(NIFTI_SUFFIXES):
                raise DataError(f"{where}.{k}: expected a .nii or .nii.gz file, got {rel!r}")
            # normpath, not resolve(): keep the user's (possibly symlinked) folder in messages.
            path = os.path.normpath(os.path.join(root, rel))
            if not os.path.isfile(path):
                raise DataError(f"{path}: missing (referenced by '{key}'[{i}].{k} "
                                f"in {json_path})")
            paths[k] = path
        cases.append({**paths, "case": case_id(paths["image"])})
    return cases


def _indexed_names(json_path: Path, key: str, value: Any) -> tuple[str, ...]:
    """Names by index from ``{"0": "background", "1": "brain"}`` (MSD) or, for ``labels``,
    nnU-Net's ``{"background": 0, "brain": 1}``; indices must run 0..n-1."""
    if not isinstance(value, dict) or not value:
        raise DataError(f"{json_path}: '{key}' must be a non-empty object of index: name")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        pairs = [(v, str(k)) for k, v in value.items()]  # nnU-Net: name -> index
    elif all(isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in value.items()):
        pairs = [(int(k), v) for k, v in value.items()]  # MSD: "index" -> name
    else:
        raise DataError(f"{json_path}: '{key}' must map indices to names ({{\"0\": "
                        f"\"background\"}}) or names to integer indices (region-based "
                        "labels are not supported)")
    pairs.sort()
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise DataError(f"{json_path}: '{key}' must number its entries 0..{len(pairs) - 1} "
                        f"without gaps, found {[i for i, _ in pairs]}")
    return tuple(name for _, name in pairs)


@dataclass(frozen=True)
class LabelContract:
    """What the run config declares about classes and channels (all optional).

    Attributes:
        class_names: ``data.labels`` (background first), or empty.
        channel_names: ``data.channel_names``, or empty.
        mirror_pairs: ``data.mirror_pairs`` (None: not declared).
        symmetric: ``data.symmetric_labels``.
    """

    class_names: tuple[str, ...] = ()
    channel_names: tuple[str, ...] = ()
    mirror_pairs: tuple[tuple[int, int], ...] | None = None
    symmetric: bool = False

    @classmethod
    def of(cls, data: DataConfig) -> LabelContract:
        pairs = (None if data.mirror_pairs is None
                 else tuple(tuple(p) for p in data.mirror_pairs))
        return cls(tuple(data.labels), tuple(data.channel_names), pairs,  # type: ignore[arg-type]
                   data.symmetric_labels)


def _same_names(json_path: Path, key: str, found: tuple[str, ...], declared: tuple[str, ...],
                config_key: str) -> None:
    """Names a site's dataset.json gives must be the consortium's, in the same order."""
    if declared and found and found != declared:
        raise DataError(f"{json_path}: '{key}' ({', '.join(found)}) differ from the "
                        f"consortium's {config_key} ({', '.join(declared)}): renumber this "
                        "site's labels or fix dataset.json")


def _pair_set(pairs: tuple[tuple[int, int], ...]) -> set[frozenset[int]]:
    return {frozenset(p) for p in pairs}


def _mirror_pairs(json_path: Path, spec: dict[str, Any], num_classes: int | None,
                  contract: LabelContract) -> tuple[tuple[tuple[int, int], ...], bool]:
    """dataset.json's ``mirror_pairs`` and ``symmetric_labels``, checked, and checked
    against the run config's."""
    symmetric = spec.get("symmetric_labels", False)
    if not isinstance(symmetric, bool):
        raise DataError(f"{json_path}: 'symmetric_labels' must be true or false")
    value = spec.get("mirror_pairs")
    if value is None:
        value = []
    if not (isinstance(value, list) and all(isinstance(p, list) for p in value)):
        raise DataError(f"{json_path}: 'mirror_pairs' must be a list of class pairs such as "
                        "[[1, 2]]")
    why = mirror_pairs_problem(value, num_classes if num_classes is not None else 2**31)
    if why:
        raise DataError(f"{json_path}: 'mirror_pairs': {why}")
    pairs = tuple((int(a), int(b)) for a, b in value)
    if pairs and symmetric:
        raise DataError(f"{json_path}: 'mirror_pairs' {value} contradict 'symmetric_labels' "
                        "(a label set with left/right pairs is not symmetric)")
    if pairs and contract.symmetric:
        raise DataError(f"{json_path}: 'mirror_pairs' {value} contradict "
                        "data.symmetric_labels (the run config says no class is lateralised)")
    if symmetric and contract.mirror_pairs:
        raise DataError(f"{json_path}: 'symmetric_labels' contradicts the consortium's "
                        f"data.mirror_pairs {[list(p) for p in contract.mirror_pairs]}")
    if (pairs and contract.mirror_pairs is not None
            and _pair_set(pairs) != _pair_set(contract.mirror_pairs)):
        raise DataError(f"{json_path}: 'mirror_pairs' {value} differ from the consortium's "
                        f"data.mirror_pairs {[list(p) for p in contract.mirror_pairs]}")
    return pairs, symmetric


def _metadata(json_path: Path, spec: dict[str, Any], num_classes: int | None,
              in_channels: int | None, contract: LabelContract
              ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[int, int], ...], bool]:
    """Class names, channel names, mirror pairs and whether the label set is declared
    symmetric, from dataset.json, checked against the run's data config."""
    classes: tuple[str, ...] = ()
    if spec.get("labels") is not None:
        classes = _indexed_names(json_path, "labels", spec["labels"])
        if num_classes is not None and len(classes) != num_classes:
            raise DataError(f"{json_path}: 'labels' names {len(classes)} classes "
                            f"({', '.join(classes)}), data.num_classes is {num_classes}")
        _same_names(json_path, "labels", classes, contract.class_names, "data.labels")
    key = "channel_names" if spec.get("channel_names") is not None else "modality"
    channels: tuple[str, ...] = ()
    if spec.get(key) is not None:
        channels = _indexed_names(json_path, key, spec[key])
        if in_channels is not None and len(channels) != in_channels:
            raise DataError(f"{json_path}: '{key}' names {len(channels)} image channel(s), "
                            f"data.in_channels is {in_channels}")
        _same_names(json_path, key, channels, contract.channel_names, "data.channel_names")
    count = num_classes if num_classes is not None else (len(classes) or None)
    return (classes, channels, *_mirror_pairs(json_path, spec, count, contract))


def site_data_config(data: DataConfig, site: SiteData) -> DataConfig:
    """The data config a site trains with: the run's, with what the site's dataset.json
    declares about left and right (``mirror_pairs`` or ``symmetric_labels``) where the run
    config declares neither (agreement was checked when the site was read)."""
    if data.mirror_pairs or data.symmetric_labels:
        return data
    if site.mirror_pairs:
        return dataclasses.replace(data, mirror_pairs=[list(p) for p in site.mirror_pairs])
    if site.symmetric_labels:
        return dataclasses.replace(data, symmetric_labels=True)
    return data


def consortium_data_config(data: DataConfig, sites: list[SiteData]) -> DataConfig:
    """``data`` completed from what every site's dataset.json says, where ``data`` is silent.

    A simulation (or a pooled baseline) sees all sites at once: class names
    (``data.labels``) and channel names come from the sites when all that name them agree;
    left/right (``mirror_pairs``, else ``symmetric_labels``) when every site declares the
    same. A site that declares something else keeps its own declaration through
    :func:`site_data_config`; a site that declares nothing gets no left-right flip.

    Args:
        data: the run's data config.
        sites: every site's data, read with that config (names already checked against it).

    Returns:
        A copy of ``data`` with the agreed names and left/right declaration filled in.
    """
    def agreed(values: list[Any]) -> Any:
        return values[0] if values and all(v == values[0] for v in values) else None

    changes: dict[str, Any] = {}
    classes = agreed([s.class_names for s in sites if s.class_names])
    if not data.labels and classes:
        changes["labels"] = list(classes)
    channels = agreed([s.channel_names for s in sites if s.channel_names])
    if not data.channel_names and channels:
        changes["channel_names"] = list(channels)
    if not data.mirror_pairs and not data.symmetric_labels and sites:
        pairs = agreed([_pair_set(s.mirror_pairs) for s in sites])
        if pairs:
            changes["mirror_pairs"] = [list(p) for p in sites[0].mirror_pairs]
        elif all(s.symmetric_labels for s in sites):
            changes["symmetric_labels"] = True
    return dataclasses.replace(data, **changes) if changes else data


def _split(
    cases: list[Case], val_fraction: float, split_seed: int
) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split that ignores the order of ``cases``.

    Cases are ranked by ``sha1(f"{split_seed}:{case_id}")``; the first ``n_val`` go to
    validation. Hashing ids (not positions) keeps a case on the same side when cases are
    reordered, and mostly when cases are added.
    """
    n = len(cases)
    if n < 2:
        return list(cases), []
    n_val = min(n - 1, max(1, round(val_fraction * n)))  # always keep a training case

    def rank(case: Case) -> str:
        return hashlib.sha1(f"{split_seed}:{case['case']}".encode()).hexdigest()

    ranked = sorted(cases, key=rank)
    return ranked[n_val:], ranked[:n_val]


def read_dataset(
    root: str | Path,
    *,
    name: str | None = None,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    num_classes: int | None = None,
    in_channels: int = 1,
    check: bool = True,
    contract: LabelContract = LabelContract(),
    labelled: bool = True,
) -> SiteData:
    """Read a site's MSD-layout folder into training and validation cases.

    Uses the ``validation`` list when dataset.json has a non-empty one; otherwise (missing,
    null or empty) splits ``training`` deterministically (see :func:`_split`). Case ids must be
    unique across both lists. Structure and file existence are always checked.

    Args:
        root: the data folder (holding dataset.json).
        name: site name; defaults to the folder name.
        val_fraction: fraction of cases held out when there is no validation list.
        split_seed: seed of the deterministic split.
        num_classes: label classes (background included) that label values must fall in.
        in_channels: image channels expected.
        check: also read every file fully and validate it (:func:`check_case`).
        contract: the run config's class and channel names and mirror pairs, which
            dataset.json must agree with where it declares its own.
        labelled: every case has a label. False: an image-only folder (a paired truth);
            its cases have no ``label`` and ``check`` must be False.

    Returns:
        The site's cases, each list sorted by case id.

    Raises:
        DataError: the folder, dataset.json or a case violates the contract.
        ValueError: ``val_fraction`` is not in (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if check and not labelled:
        raise ValueError("check needs labelled cases")
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.exists():
        raise DataError(f"{root}: data folder not found")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected a data folder with {DATASET_JSON})")
    json_path = root / DATASET_JSON
    spec = _read_json(json_path)

    if "training" not in spec:
        raise DataError(f"{json_path}: 'training' must be a non-empty list")
    class_names, channel_names, mirror_pairs, symmetric = _metadata(
        json_path, spec, num_classes, in_channels, contract)
    train = _parse_entries(json_path, root, "training", spec["training"], labelled)
    explicit = spec.get("validation")
    validation = (_parse_entries(json_path, root, "validation", explicit, labelled)
                  if explicit not in (None, []) else [])

    seen: dict[str, str] = {}
    for case in [*train, *validation]:
        if case["case"] in seen:
            raise DataError(f"{json_path}: duplicate case id '{case['case']}' "
                            f"({seen[case['case']]} and {case['image']})")
        seen[case["case"]] = case["image"]

    if not validation:
        train, validation = _split(train, val_fraction, split_seed)
    if check:
        for case in [*train, *validation]:
            check_case(case, num_classes=num_classes, in_channels=in_channels)

    def by_id(cases: list[Case]) -> list[Case]:
        return sorted(cases, key=lambda c: c["case"])

    return SiteData(name=name or root.name, root=root, train=by_id(train),
                    validation=by_id(validation), class_names=class_names,
                    channel_names=channel_names, description=str(spec.get("description") or ""),
                    mirror_pairs=mirror_pairs, symmetric_labels=symmetric)


def read_test_set(
    root: str | Path,
    *,
    name: str | None = None,
    num_classes: int | None = None,
    in_channels: int = 1,
    check: bool = True,
    contract: LabelContract = LabelContract(),
) -> list[Case]:
    """All cases (training and validation lists) of a held-out test folder.

    Args:
        root: the test folder, in the same MSD layout as a site's.
        name: the test set's name (accepted for symmetry with :func:`read_dataset`).
        num_classes: label classes that label values must fall in.
        in_channels: image channels expected.
        check: read and validate every file fully.

    Returns:
        Every labelled case, sorted by case id.

    Raises:
        DataError: the folder, dataset.json or a case violates the contract.
    """
    site = read_dataset(root, name=name, num_classes=num_classes, in_channels=in_channels,
                        check=check, contract=contract)
    return sorted(site.cases, key=lambda c: c["case"])


def read_site(site: SiteConfig, data: DataConfig, *, check: bool) -> SiteData:
    """A configured site's data, split and checked with the run's ``data`` settings."""
    return read_dataset(site.data, name=site.name, val_fraction=data.val_fraction,
                        split_seed=data.split_seed, num_classes=data.num_classes,
                        in_channels=data.in_channels, check=check,
                        contract=LabelContract.of(data))


def read_site_test_set(test_set: SiteConfig, data: DataConfig, *, check: bool) -> list[Case]:
    """A configured held-out folder's cases, checked with the run's ``data`` settings."""
    return read_test_set(test_set.data, name=test_set.name, num_classes=data.num_classes,
                         in_channels=data.in_channels, check=check,
                         contract=LabelContract.of(data))


def data_fingerprint(site: SiteData) -> str:
    """An opaque sha256 of a site's data: over the sorted sha256s of each case's file
    contents (image, then label), so it changes when any case is added, removed or altered
    and never depends on file names, paths or order. It reveals nothing but equality."""
    digests = []
    for case in [*site.train, *site.validation]:
        h = hashlib.sha256()
        for key in ("image", "label"):
            if case.get(key):
                with open(case[key], "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(block)
        digests.append(h.hexdigest())
    return hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
