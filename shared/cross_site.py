"""The cross-site matrix (models x sites, every metric): summary entry, console table, heatmaps.

Rows are models: ``global`` (the federated model) and each site's *local model* (the global
model fine-tuned on that site; named by the site). Columns are the sites whose validation
cases evaluated them. A local model's *off-diagonal* cells are the other sites' data: how
well a model tuned to one hospital carries to the rest. The comparison puts the global
model's mean over the same columns beside it (each site counts once).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedscan.shared.tasks.base import MetricSpec, headline, metric_keys

#: Row name of the federated model.
GLOBAL = "global"
#: ``--mode all`` rows: the pooled model, and each site's own model trained alone
#: (``alone:<site>``), evaluated in the simulation (which holds every site's data).
POOLED = "pooled"
ALONE = "alone:"


def home_site(model: str) -> str | None:
    """The site a model was trained or fine-tuned on (None: the global and pooled models)."""
    if model in (GLOBAL, POOLED):
        return None
    return model[len(ALONE):] if model.startswith(ALONE) else model


def row_label(model: str) -> str:
    """How a model's row is titled: ``global``, ``site-a (local)``, ``site-a (alone)``."""
    if model in (GLOBAL, POOLED):
        return model
    return f"{home_site(model)} ({'alone' if model.startswith(ALONE) else 'local'})"


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def cell(cs: Mapping[str, Any], model: str, site: str, key: str) -> float | None:
    """One value of the matrix (None when absent, dropped or undefined)."""
    value = ((cs.get("matrix") or {}).get(model) or {}).get(site, {}).get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def compare(cs: Mapping[str, Any], key: str, higher_is_better: bool
            ) -> dict[str, dict[str, Any]]:
    """Per model other than the global one: its mean of ``key`` off its home site's diagonal
    (a pooled model: over every site) and the global model's mean over the same sites, and
    whether the global model is better there."""
    out = {}
    for model in cs.get("models", []):
        if model == GLOBAL:
            continue
        others = [s for s in cs.get("sites", []) if s != home_site(model)
                  and cell(cs, model, s, key) is not None and cell(cs, GLOBAL, s, key) is not None]
        local = _mean([cell(cs, model, s, key) for s in others])
        glob = _mean([cell(cs, GLOBAL, s, key) for s in others])
        better = None
        if local is not None and glob is not None:
            better = glob > local if higher_is_better else glob < local
        out[model] = {"sites": others, "local_off_diagonal": local, "global_same_sites": glob,
                      "global_better": better}
    return out


def summarise(matrix: Mapping[str, Mapping[str, Mapping[str, float]]], sites: list[str],
              specs: Sequence[MetricSpec], *, fine_tune_steps: int,
              not_shared: Mapping[str, str], dropped: list[dict[str, str]]) -> dict[str, Any]:
    """summary.json's ``cross_site`` entry.

    Args:
        matrix: ``{model: {site: metrics}}`` (the validated records).
        sites: the evaluating sites (columns).
        specs: the task's metrics.
        fine_tune_steps: local steps of each local model.
        not_shared: site -> why it has no local model (refused by policy, declined, ...).
        dropped: replies or records dropped, with site, phase and reason.
    """
    main = headline(specs)
    keys = sorted({k for row in matrix.values() for m in row.values() for k in m})
    cs: dict[str, Any] = {
        "fine_tune_steps": fine_tune_steps,
        "models": list(matrix),
        "sites": sites,
        "metrics": metric_keys(specs, keys),
        "headline": main.name if main else None,
        "matrix": {model: {site: dict(row[site]) for site in sites if site in row}
                   for model, row in matrix.items()},
        "not_shared": dict(not_shared),
        "dropped": list(dropped),
    }
    if main is not None:
        cs["comparison"] = compare(cs, main.name, main.higher_is_better)
    return cs


def format_matrix(cs: Mapping[str, Any], key: str | None = None,
                  rows: Sequence[str] | None = None) -> str:
    """The matrix of one metric (default: the headline) as a console table, then the
    comparison lines; ``rows``: only these models (the rows added to a printed matrix)."""
    key = key or cs.get("headline")
    sites, models = cs.get("sites", []), [m for m in cs.get("models", [])
                                          if rows is None or m in rows]
    if not key or not sites or not models:
        return "cross-site: no results"
    width = max(10, *(len(s) + 2 for s in sites))
    label = max(12, *(len(row_label(m)) + 2 for m in models))
    title = (f"cross-site {key} (rows: models, columns: sites' validation data; local models "
             f"fine-tuned {cs.get('fine_tune_steps')} steps)" if rows is None else
             f"cross-site {key}, more rows (models trained alone, pooled)")
    lines = [title,
             ("model" if rows is None else "more models").ljust(label)
             + "".join(s.rjust(width) for s in sites)]
    for model in models:
        name = row_label(model)
        row = [cell(cs, model, s, key) for s in sites]
        lines.append(name.ljust(label) + "".join(
            ("-" if v is None else f"{v:.4f}").rjust(width) for v in row))
    for site, reason in (cs.get("not_shared") or {}).items() if rows is None else ():
        lines.append(f"{site}: no local model ({reason})")
    if key == cs.get("headline"):
        for model, c in (cs.get("comparison") or {}).items():
            if c["global_better"] is None or model not in models:
                continue
            verdict = "global better" if c["global_better"] else f"{row_label(model)} better"
            where = "every site" if home_site(model) is None else "the other sites"
            lines.append(f"{row_label(model)} on {where}: {key} "
                         f"{c['local_off_diagonal']:.4f}; global there "
                         f"{c['global_same_sites']:.4f} ({verdict})")
    return "\n".join(lines)


def heatmap_name(metric: str) -> str:
    return f"cross_site_{metric.replace('/', '_')}.png"


def plot_heatmaps(out_dir: Path, cs: Mapping[str, Any], specs: Sequence[MetricSpec]
                  ) -> list[Path]:
    """``cross_site_<metric>.png`` for each metric the task declares (not per class): the
    models x sites matrix, each cell annotated (greener is better)."""
    sites, models = cs.get("sites", []), cs.get("models", [])
    paths = []
    for spec in specs:
        values = [[cell(cs, m, s, spec.name) for s in sites] for m in models]
        if not sites or all(v is None for row in values for v in row):
            continue
        fig = Figure(figsize=(1.6 + 1.3 * len(sites), 1.2 + 0.6 * len(models)), dpi=120,
                     layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        data = [[math.nan if v is None else v for v in row] for row in values]
        finite = [v for row in values for v in row if v is not None]
        low = spec.low if spec.low is not None else min(finite)
        high = spec.high if spec.high is not None else max(finite)
        image = ax.imshow(data, cmap="RdYlGn" if spec.higher_is_better else "RdYlGn_r",
                          vmin=low, vmax=high if high > low else low + 1, aspect="auto")
        ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right")
        ax.set_yticks(range(len(models)), [row_label(m) for m in models])
        ax.set_xlabel("validation data of site")
        ax.set_title(f"cross-site {spec.label}")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v is None else f"{v:.3f}", ha="center", va="center",
                        fontsize=9)
        fig.colorbar(image, ax=ax, label=spec.label)
        path = Path(out_dir) / heatmap_name(spec.name)
        fig.savefig(path)
        paths.append(path)
    return paths
