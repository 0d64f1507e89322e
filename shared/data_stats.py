"""A site's data statistics: aggregates only, small groups suppressed.

Computed by a site on its own cases (the federated data check before round 1, ``fedscan
client check --data-stats``, ``fedscan client drift``) and compared by the server. Pure
functions on the data contract's cases after the task's preprocessing
(:func:`~fedscan.shared.preprocessing.preprocess_case`), so the intensities compared are the
ones the model sees.

What a site's :class:`SiteStats` holds, and nothing else: its case count; the median voxel
spacing (mm, along the world R, A, S axes) and image size over its cases; how many cases have
each orientation code (``RAS``, ``LPS``...); per image channel a histogram of the
preprocessed intensities (:data:`BINS` fixed bins over ``[0, 1]``, voxel fractions); per
label class the mean fraction of voxels of that class and the number of cases that contain
it; the number of cases whose label is empty. Every count, bin and category that fewer than
``min_cases`` cases contribute to is suppressed (a count below it is sent as
:data:`SUPPRESSED`, a histogram bin as 0), so no single case's values can be read off.
No per-case value, file name or case id is in it.

MONAI's ``DataAnalyzer`` computes richer per-case reports (it writes each case's statistics
to a YAML file, then summarises them); here only a few aggregates are needed, computed once
per case on the grid the task already preprocesses to, so numpy does it in one pass without a
second data pipeline.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from flwr.app import ConfigRecord

from fedscan.shared.config import DataConfig
from fedscan.shared.data import Case, load_nifti
from fedscan.shared.preprocessing import preprocess_case

#: Histogram bins over the preprocessed intensity range ``[0, 1]``.
BINS = 32
#: Default smallest group of cases a count, bin or category may describe.
MIN_CASES = 5
#: A count describing fewer than ``min_cases`` cases (but at least one).
SUPPRESSED = -1
#: Most cases a site preprocesses for its statistics (evenly spaced over its sorted cases).
MAX_CASES = 24


@dataclass
class CaseStats:
    """One case's statistics: they never leave the site (only :class:`SiteStats` does)."""

    orientation: str
    spacing: tuple[float, ...]  # mm along world R, A, S
    size: tuple[int, ...]
    histograms: list[np.ndarray]  # voxel counts per bin, one per channel
    class_voxels: np.ndarray  # voxels per class, background first

    def intensity(self) -> np.ndarray:
        """The case's intensity histogram as fractions (channels concatenated)."""
        return np.concatenate([h / max(1, h.sum()) for h in self.histograms])


@dataclass
class SiteStats:
    """A site's aggregates (see the module docstring for what they reveal)."""

    cases: int
    sampled: int
    min_cases: int
    orientation: dict[str, int] = field(default_factory=dict)
    spacing: list[float] = field(default_factory=list)
    size: list[float] = field(default_factory=list)
    histograms: list[list[float]] = field(default_factory=list)
    suppressed_bins: int = 0
    class_fractions: list[float] = field(default_factory=list)
    class_cases: list[int] = field(default_factory=list)
    empty_cases: int = 0

    def intensity(self) -> np.ndarray:
        """All channels' histograms concatenated (fractions)."""
        return np.concatenate([np.asarray(h, float) for h in self.histograms])

    def to_record(self) -> ConfigRecord:
        """The statistics as the flat record a query reply carries."""
        return ConfigRecord({
            "cases": self.cases, "sampled": self.sampled, "min-cases": self.min_cases,
            "orientation-codes": list(self.orientation), "orientation-cases":
                list(self.orientation.values()),
            "spacing": [float(v) for v in self.spacing], "size": [float(v) for v in self.size],
            "channels": len(self.histograms),
            "histogram": [float(v) for h in self.histograms for v in h],
            "suppressed-bins": self.suppressed_bins,
            "class-fractions": [float(v) for v in self.class_fractions],
            "class-cases": [int(v) for v in self.class_cases],
            "empty-cases": self.empty_cases,
        })

    @classmethod
    def from_record(cls, record: ConfigRecord, num_classes: int) -> SiteStats:
        """Decode and check a reply's statistics.

        Raises:
            ValueError: a field is missing, of the wrong type, not finite or out of range
                (the message names it).
        """
        def get(key: str, kind: type) -> object:
            if key not in record:
                raise ValueError(f"{key!r} missing")
            value = record[key]
            if kind is list:
                if not isinstance(value, list):
                    raise ValueError(f"{key!r} is not a list")
            elif isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{key!r} is not {kind.__name__}")
            return value

        def numbers(key: str, length: int | None = None, lo: float = 0.0,
                    hi: float = np.inf) -> list[float]:
            values = get(key, list)
            if length is not None and len(values) != length:
                raise ValueError(f"{key!r} has {len(values)} values, expected {length}")
            for v in values:
                if (isinstance(v, bool) or not isinstance(v, (int, float))
                        or not np.isfinite(v) or not lo <= v <= hi):
                    raise ValueError(f"{key!r} holds {v!r}, outside [{lo:g}, {hi:g}]")
            return [float(v) for v in values]

        cases, sampled, k = (get(key, int) for key in ("cases", "sampled", "min-cases"))
        if not 1 <= k <= sampled <= cases:
            raise ValueError("counts must satisfy 1 <= min-cases <= sampled <= cases")
        codes = get("orientation-codes", list)
        counts = numbers("orientation-cases", len(codes), k, sampled)
        if not all(isinstance(c, str) and len(c) <= 4 and c.isalpha() for c in codes):
            raise ValueError("'orientation-codes' must be axis codes such as 'RAS'")
        channels = get("channels", int)
        if not 1 <= channels <= 64:
            raise ValueError("'channels' out of range")
        hist = numbers("histogram", channels * BINS, 0.0, 1.0)
        class_cases = numbers("class-cases", num_classes, SUPPRESSED, sampled)
        spacing = numbers("spacing", None, 1e-6, 1e4)
        if len(spacing) not in (2, 3):
            raise ValueError("'spacing' must have 2 or 3 values")
        empty = get("empty-cases", int)
        if not (empty == SUPPRESSED or 0 <= empty <= sampled):
            raise ValueError("'empty-cases' out of range")
        return cls(
            cases=cases, sampled=sampled, min_cases=k,
            orientation={c: int(n) for c, n in zip(codes, counts, strict=True)},
            spacing=spacing, size=numbers("size", len(spacing), 1.0, 1e5),
            histograms=[hist[i * BINS:(i + 1) * BINS] for i in range(channels)],
            suppressed_bins=get("suppressed-bins", int),
            class_fractions=numbers("class-fractions", num_classes, 0.0, 1.0),
            class_cases=[int(v) for v in class_cases], empty_cases=empty)


def sample_cases(cases: Sequence[Case], max_cases: int = MAX_CASES) -> list[Case]:
    """At most ``max_cases`` cases, evenly spaced over the cases sorted by id (deterministic,
    the same every time for the same data)."""
    ordered = sorted(cases, key=lambda c: c["case"])
    if len(ordered) <= max_cases:
        return ordered
    picks = np.linspace(0, len(ordered) - 1, max_cases).round().astype(int)
    return [ordered[i] for i in picks]


def case_stats(case: Case, data: DataConfig, with_label: bool = True) -> CaseStats:
    """One case's statistics after the task's preprocessing.

    Raises:
        DataError: a file is unreadable or fails the data contract's checks.
    """
    header = load_nifti(case["image"], header_only=True)
    spatial = min(3, len(header.shape))
    codes = "".join(str(c) for c in nib.aff2axcodes(header.affine))[:spatial]
    zooms = [float(z) for z in header.header.get_zooms()[:spatial]]
    world = [0.0] * spatial
    for axis, (target, _) in enumerate(nib.io_orientation(header.affine)[:spatial]):
        world[min(int(target), spatial - 1)] = zooms[axis]
    keys = ("image", "label") if with_label and case.get("label") else ("image",)
    out, _ = preprocess_case(case, data, keys)
    image = np.asarray(out["image"].detach().cpu().numpy(), dtype=np.float32)
    histograms = [np.histogram(np.clip(ch, 0.0, 1.0), bins=BINS, range=(0.0, 1.0))[0]
                  for ch in image]
    class_voxels = np.zeros(data.num_classes, dtype=np.int64)
    if "label" in out:
        label = np.asarray(out["label"].detach().cpu().numpy()).ravel().astype(np.int64)
        class_voxels = np.bincount(label, minlength=data.num_classes)[: data.num_classes]
    return CaseStats(codes, tuple(world), tuple(int(s) for s in header.shape[:spatial]),
                     histograms, class_voxels)


def _count(n: int, k: int) -> int:
    """``n`` cases, or :data:`SUPPRESSED` when 0 < n < k."""
    return SUPPRESSED if 0 < n < k else int(n)


def aggregate(stats: Sequence[CaseStats], total_cases: int, min_cases: int) -> SiteStats:
    """A site's aggregates from its cases' statistics, small groups suppressed.

    Args:
        stats: the statistics of the cases sampled (at least ``min_cases`` of them).
        total_cases: the site's number of cases (sampled or not).
        min_cases: smallest group of cases a sent count, bin or category may describe.

    Raises:
        ValueError: fewer than ``min_cases`` cases.
    """
    if len(stats) < min_cases:
        raise ValueError(f"{len(stats)} case(s), fewer than the {min_cases} the statistics "
                         "need to keep any one case's values hidden")
    k = min_cases
    orientation = {code: n for code, n in Counter(s.orientation for s in stats).most_common()
                   if n >= k}
    histograms, suppressed = [], 0
    for channel in range(len(stats[0].histograms)):
        counts = np.stack([s.histograms[channel] for s in stats])
        contributing = (counts > 0).sum(axis=0)
        total = counts.sum(axis=0).astype(float)
        suppressed += int(((contributing < k) & (total > 0)).sum())
        total[contributing < k] = 0.0
        histograms.append((total / max(total.sum(), 1.0)).round(6).tolist())
    voxels = np.stack([s.class_voxels for s in stats]).astype(float)
    fractions = voxels / np.maximum(voxels.sum(axis=1, keepdims=True), 1.0)
    present = (voxels > 0).sum(axis=0)
    empty = int((voxels[:, 1:].sum(axis=1) == 0).sum())
    return SiteStats(
        cases=total_cases, sampled=len(stats), min_cases=k, orientation=orientation,
        spacing=np.median([s.spacing for s in stats], axis=0).round(3).tolist(),
        size=np.median([s.size for s in stats], axis=0).round(1).tolist(),
        histograms=histograms, suppressed_bins=suppressed,
        class_fractions=fractions.mean(axis=0).round(6).tolist(),
        class_cases=[_count(int(n), k) for n in present], empty_cases=_count(empty, k))


def site_stats(cases: Sequence[Case], data: DataConfig, min_cases: int = MIN_CASES,
               max_cases: int = MAX_CASES,
               on_case: Callable[[int, int], None] | None = None) -> SiteStats:
    """Preprocess up to ``max_cases`` of ``cases`` and aggregate their statistics.

    Raises:
        ValueError: fewer than ``min_cases`` cases.
        DataError: a case fails the data contract.
    """
    picked = sample_cases(cases, max_cases)
    if len(picked) < min_cases:
        raise ValueError(f"{len(picked)} case(s), fewer than the {min_cases} the statistics "
                         "need to keep any one case's values hidden")
    stats = []
    for i, case in enumerate(picked, 1):
        stats.append(case_stats(case, data))
        if on_case is not None:
            on_case(i, len(picked))
    return aggregate(stats, len(cases), min_cases)


def js_distance(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon distance (base 2: 0 identical, 1 disjoint) of two histograms."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    p, q = p / max(p.sum(), 1e-12), q / max(q.sum(), 1e-12)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / m[mask])).sum())

    return float(np.sqrt(max(0.0, (kl(p) + kl(q)) / 2)))


def format_stats(name: str, stats: SiteStats, class_names: Sequence[str]) -> list[str]:
    """Readable lines of a site's statistics (what ``fedscan client check`` prints)."""
    def count(n: int) -> str:
        return f"<{stats.min_cases}" if n == SUPPRESSED else str(n)

    peaks = [int(np.argmax(h)) for h in stats.histograms]
    codes = ", ".join(f"{c} {n}" for c, n in stats.orientation.items()) or "suppressed"
    lines = [f"{name}: {stats.cases} cases ({stats.sampled} preprocessed for the statistics; "
             f"groups under {stats.min_cases} cases suppressed)",
             f"  orientation   {codes}",
             f"  spacing       median {' x '.join(f'{v:g}' for v in stats.spacing)} mm (R, A, S)",
             f"  image size    median {' x '.join(f'{v:g}' for v in stats.size)} voxels",
             f"  intensity     {BINS} bins over [0, 1] per channel; fullest bin "
             f"{', '.join(str(p) for p in peaks)}; {stats.suppressed_bins} bin(s) suppressed"]
    for i, (fraction, n) in enumerate(zip(stats.class_fractions, stats.class_cases,
                                          strict=True)):
        label = class_names[i] if i < len(class_names) else f"class_{i}"
        lines.append(f"  class {i} {label:<12} {100 * fraction:6.2f} % of voxels, in "
                     f"{count(n)} cases")
    lines.append(f"  empty labels  {count(stats.empty_cases)} cases")
    return lines
