"""Turn a run's ``summary.json`` into PNG plots and a Markdown report.

Every run (federated, local, pooled, later the deployed server) writes the same summary
layout through :class:`~fedscan.shared.history.RunHistory`; this module reads only that dict,
so it works on a finished run, on a run that crashed half-way (the summary is rewritten every
round) and on an old output folder.

The metrics come from the summary's ``metrics`` list (the task's
:class:`~fedscan.shared.tasks.base.MetricSpec` list): one plot per metric (``<name>.png``), one
column per metric and per-class key (``<name>/<class>``, next to its metric) in the tables, the
headline metric in the overview and the comparison. Nothing here names a task's metric; an
older summary without ``metrics`` gets one spec per numeric evaluation key.

Summaries are treated as untrusted: any key may be missing, ``None`` (JSON has no NaN, so the
history writes non-finite numbers as ``null``) or of an unexpected type. Missing values show
as "—" in tables and as gaps in plots, never as a crash.

Plots use matplotlib's object API (:class:`~matplotlib.figure.Figure` with the Agg canvas)
instead of pyplot: no global backend switch, no display needed, and no figures left open in a
long-running server.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedscan.shared.cross_site import cell as cross_site_cell
from fedscan.shared.cross_site import home_site as cross_site_home
from fedscan.shared.cross_site import plot_heatmaps
from fedscan.shared.cross_site import row_label as cross_site_row
from fedscan.shared.report_html import write_html_report
from fedscan.shared.tasks.base import MetricSpec, headline, metric_keys, metric_spec

#: Shown in tables wherever a value is missing (site failed, metric not computed, ...).
MISSING = "—"

#: Order modes appear in comparisons; pooled (the centralised upper bound) comes last.
MODE_ORDER = ("federated", "local", "pooled")

#: Train fields with a fixed place in the per-round tables; any other scalar is appended.
_KNOWN_TRAIN_FIELDS = ("loss", "num_examples", "samples", "steps")
_FIELD_LABELS = {"loss": "Train loss", "num_examples": "Examples", "samples": "Samples",
                 "steps": "Steps", "update_norm": "Update norm", "clip_scale": "Clip factor"}

_MODE_COLORS = {"federated": "tab:blue", "local": "tab:orange", "pooled": "tab:green"}

_FILE_NOTES = {
    "summary.json": "every number in this report, machine-readable (per round, per site, "
    "final results and the full run config).",
    "report.md": "this report.",
    "report.html": "this report as one self-contained web page (plots embedded; opens from a "
    "file share or an e-mail without a server).",
    "loss.png": "training loss per site after each round.",
    "epsilon.png": "differential privacy spent (ε) per site after each round; dashed: the "
    "budget (in the site's colour when sites differ).",
    "site-state/": "each simulated hospital's own state, such as its privacy ledger "
    "(`privacy_ledger.json`); a run into this folder again continues those ledgers, so ε never "
    "resets. In a deployment this state stays at the hospital.",
    "checkpoints/": "the model after each round (`round_NNN.pt`), to inspect or resume a run; "
    "safe to delete once the run is finished.",
}


# --------------------------------------------------------------------------- value helpers


def _num(value: Any) -> float | None:
    """``value`` as a float, or None if it is missing, not a number or NaN.

    Infinity is kept: an HD95 of inf (empty prediction) is a real, if bad, result.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _fmt(value: Any, digits: int = 4) -> str:
    """Format a table cell: numbers to ``digits`` decimals, tiny ones in scientific notation.

    Args:
        value: number, string, bool or anything missing.
        digits: decimals for floats.

    Returns:
        The cell text; :data:`MISSING` for None/NaN.
    """
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        # A DP delta of 1e-5 would print as 0.0000 and read as "no privacy guarantee".
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return _md(str(value))


def _md(text: str) -> str:
    """Escape a string for a Markdown table cell (a ``|`` would split the cell)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _mean(values: Iterable[float | None]) -> float | None:
    """Unweighted mean of the values that are present, or None if none are."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else an empty dict (tolerates ``null`` in the JSON)."""
    return dict(value) if isinstance(value, Mapping) else {}


def _rounds(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The summary's rounds, sorted by round number, each with an int ``round``.

    A round without a number gets its position (1-based), so hand-written summaries work.
    """
    rounds = summary.get("rounds")
    if not isinstance(rounds, list):
        return []
    out = []
    for i, entry in enumerate(rounds, start=1):
        if not isinstance(entry, Mapping):
            continue
        entry = dict(entry)
        rnd = _num(entry.get("round"))
        entry["round"] = int(rnd) if rnd is not None and math.isfinite(rnd) else i
        out.append(entry)
    return sorted(out, key=lambda e: e["round"])


def _ordered_keys(declared: Any, *mappings: Mapping[str, Any]) -> list[str]:
    """Declared names first (in config order), then any other key the mappings hold.

    The summary's ``sites`` list fixes the order; keys that only appear in the data (e.g.
    ``pooled``) are appended so nothing recorded is silently dropped.
    """
    keys = [str(s) for s in declared] if isinstance(declared, list) else []
    for mapping in mappings:
        for key in mapping:
            if key not in keys:
                keys.append(key)
    return keys


def _eval_sites(summary: Mapping[str, Any]) -> list[str]:
    """Sites that have (or should have) validation results, in config order."""
    rounds = _rounds(summary)
    final = _dict(summary.get("final"))
    return _ordered_keys(
        summary.get("sites"), *(_dict(r.get("evaluate")) for r in rounds),
        _dict(final.get("per_site")),
    )


def _train_keys(summary: Mapping[str, Any]) -> list[str]:
    """Keys of ``rounds[i].train``: sites, or the single ``pooled`` key in pooled mode."""
    rounds = _rounds(summary)
    recorded = [_dict(r.get("train")) for r in rounds]
    seen = {k for t in recorded for k in t}
    # Pooled runs train one model on everyone's data: listing every site with empty loss
    # columns would suggest that the sites failed.
    declared = summary.get("sites") if summary.get("mode") != "pooled" or not seen else None
    return _ordered_keys(declared, *recorded)


def _site_color(index: int) -> Any:
    """Stable colour per site so a site looks the same in every plot of a run."""
    return f"C{index % 10}"


def _mode_title(summary: Mapping[str, Any]) -> str:
    """``federated (fedavg)``, ``local``, ... for titles and headings."""
    mode = str(summary.get("mode") or "unknown mode")
    strategy = summary.get("strategy")
    return f"{mode} ({strategy})" if strategy else mode


def _duration(seconds: float | None) -> str:
    """Wall time for people: ``130.2 s (2 min 10 s)``."""
    if seconds is None or math.isinf(seconds):
        return "unknown time"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    human = f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"
    return f"{seconds:.1f} s ({human})"


def metric_specs(summary: Mapping[str, Any]) -> list[MetricSpec]:
    """The run's metrics: its ``metrics`` list, else one spec per numeric evaluation key
    (summaries written before tasks declared their metrics; direction then unknown)."""
    declared = summary.get("metrics")
    if isinstance(declared, list):
        specs = []
        for entry in declared:
            try:
                specs.append(MetricSpec.from_dict(entry))
            except (TypeError, ValueError):  # a hand-edited or foreign entry: skip it
                continue
        return specs
    keys: list[str] = []
    final = _dict(summary.get("final"))
    for values in [*(_dict(r.get("evaluate")).values() for r in _rounds(summary)),
                   _dict(final.get("per_site")).values()]:
        for metrics in values:
            for key, value in _dict(metrics).items():
                name = key.split("/", 1)[0]
                if key != "num_examples" and name not in keys and (
                        value is None or _num(value) is not None):
                    keys.append(name)
    return [MetricSpec(k, higher_is_better=True, per_class=True, headline=i == 0)
            for i, k in enumerate(keys)]


def headline_spec(summary: Mapping[str, Any]) -> MetricSpec | None:
    """The run's main metric (``final.headline``, else the spec marked headline)."""
    specs = metric_specs(summary)
    name = _dict(summary.get("final")).get("headline")
    return next((s for s in specs if s.name == name), None) or headline(specs)


def site_mean(summary: Mapping[str, Any], metric: str | None = None) -> float | None:
    """A final metric (default: the headline) averaged over sites, each site counting once.

    Unweighted on purpose: comparisons ask "how well does each hospital do", and a large
    site should not hide a small one. Falls back to the run's own ``final.<metric>`` when
    the summary has no per-site results.

    Args:
        summary: a run summary.
        metric: the metric key; None for the headline.

    Returns:
        The mean, or None if the run has no final value.
    """
    if metric is None:
        spec = headline_spec(summary)
        if spec is None:
            return None
        metric = spec.name
    final = _dict(summary.get("final"))
    per_site = _dict(final.get("per_site"))
    mean = _mean(_num(_dict(m).get(metric)) for m in per_site.values())
    return mean if mean is not None else _num(final.get(metric))


def _present_keys(specs: list[MetricSpec], *mappings: Mapping[str, Any]) -> list[str]:
    """Metric keys (and per-class keys) holding a value in any of ``mappings``, spec order."""
    keys = {k for m in mappings for k, v in _dict(m).items() if _num(v) is not None}
    return metric_keys(specs, keys)


def _spec_of(specs: list[MetricSpec], key: str) -> MetricSpec:
    return next(s for s in specs if s.name == key.split("/", 1)[0])


def _key_label(specs: list[MetricSpec], key: str) -> str:
    """``hd95 (mm)``, ``dice/brain``: a column header."""
    spec = _spec_of(specs, key)
    return f"{key} ({spec.unit})" if spec.unit else key


def plot_name(spec: MetricSpec) -> str:
    """The PNG a metric is plotted to: its name, made safe for a file name."""
    return re.sub(r"[^\w.-]", "_", spec.name) + ".png"


# --------------------------------------------------------------------------- plots


def _new_figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(8, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _series(rounds: list[dict[str, Any]], part: str, key: str | None, metric: str,
            xs: list[int]) -> list[float]:
    """Values of ``rounds[*][part][key][metric]`` at rounds ``xs``; NaN where missing.

    Args:
        rounds: from :func:`_rounds`.
        part: ``train``, ``evaluate`` or ``aggregate``.
        key: the site (or ``pooled``); None reads ``metric`` from ``part`` itself.
        metric: e.g. ``dice`` or ``loss``.
        xs: round numbers to read.

    Returns:
        One float per round. NaN (not a dropped point) makes matplotlib break the line, so
        a site that missed a round shows a gap instead of a line drawn across that round.
    """
    by_round = {r["round"]: r for r in rounds}
    out = []
    for x in xs:
        values = _dict(by_round.get(x, {}).get(part))
        if key is not None:
            values = _dict(values.get(key))
        value = _num(values.get(metric))
        out.append(math.nan if value is None else value)
    return out


def _round_axis(rounds: list[dict[str, Any]]) -> list[int]:
    """Every round number from first to last, so a missing round is a gap on the x axis."""
    if not rounds:
        return []
    return list(range(rounds[0]["round"], rounds[-1]["round"] + 1))


def _bridge_gaps(ax: Axes, xs: list[int], ys: list[float], color: Any) -> None:
    """Join points across missed rounds with a faint dotted line in the series' colour.

    The solid line stays broken (so the gap is visible), but isolated points still read as
    one site's trend instead of stray dots.
    """
    present = [i for i, y in enumerate(ys) if math.isfinite(y)]
    if len(present) < 2 or present[-1] - present[0] + 1 == len(present):
        return  # no missing round between the first and last point: nothing to bridge
    gx = [xs[i] for i in present]
    gy = [ys[i] for i in present]
    ax.plot(gx, gy, linestyle=":", linewidth=1.2, color=color, alpha=0.6, zorder=1.5,
            clip_on=False)


def _finish_axes(ax: Axes, xs: list[int], empty_text: str) -> None:
    """Integer round ticks, a legend outside the data, or a note when there is nothing."""
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)
    if not xs:
        ax.set_xticks([])  # ticks 0..1 would suggest rounds that never ran
    else:
        # Only real round numbers: a lone round would otherwise get ticks "0" and "2".
        if len(xs) <= 20:
            ax.set_xticks(xs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(xs[0] - 0.5, xs[-1] + 0.5)
    if ax.lines:
        # Outside the axes: curves rise to the top-right, exactly where "best" puts it.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  frameon=False)
    else:
        ax.text(0.5, 0.5, empty_text, ha="center", va="center", transform=ax.transAxes,
                color="0.4")


def _site_line(ax: Any, xs: list[int], ys: list[float], key: str, sites: list[str]) -> None:
    """One site's series: its colour (``pooled`` gets the next free one), gaps bridged."""
    color = _site_color(sites.index(key) if key in sites else len(sites))
    # clip_on=False: a value on the axis limit (Dice 1.0) would otherwise show half a marker.
    ax.plot(xs, ys, marker="o", markersize=5, linewidth=1.5, label=key, color=color,
            clip_on=False)
    _bridge_gaps(ax, xs, ys, color)


def plot_metric(path: Path, summary: Mapping[str, Any], spec: MetricSpec) -> Path:
    """Write one metric's per-round plot: a line per site, the aggregate thick and dashed,
    and for a per-class metric each class's aggregate thin and dotted.

    Args:
        path: the PNG to write.
        summary: a run summary.
        spec: the metric.

    Returns:
        ``path``.
    """
    rounds = _rounds(summary)
    xs = _round_axis(rounds)
    fig, ax = _new_figure()
    values: list[float] = []
    if xs:
        sites = _eval_sites(summary)
        for site in sites:
            ys = _series(rounds, "evaluate", site, spec.name, xs)
            if all(math.isnan(y) for y in ys):
                continue
            values += ys
            _site_line(ax, xs, ys, site, sites)
        agg_ys = _series(rounds, "aggregate", None, spec.name, xs)
        if not all(math.isnan(y) for y in agg_ys):
            values += agg_ys
            # Under the site lines and translucent: a site that tracks the aggregate closely
            # (common: the aggregate is their mean) would otherwise vanish beneath it.
            ax.plot(xs, agg_ys, linestyle="--", linewidth=3.5, color="black", alpha=0.55,
                    marker="D", markersize=5, label="aggregate", clip_on=False, zorder=1.9)
        per_class = sorted({k for r in rounds for k in _dict(r.get("aggregate"))
                            if spec.per_class and k.startswith(f"{spec.name}/")})
        for i, key in enumerate(per_class):
            ys = _series(rounds, "aggregate", None, key, xs)
            values += ys
            ax.plot(xs, ys, linestyle=":", linewidth=1.5, color=f"C{(i + 5) % 10}",
                    label=f"aggregate {key.split('/', 1)[1]}", clip_on=False)
    finite = [v for v in values if math.isfinite(v)]
    if spec.low == 0:  # a metric that starts at 0 (Dice, distances, dB): show it from there
        top = spec.high if spec.high is not None else max(finite, default=0.0) * 1.08
        if top > 0:
            ax.set_ylim(0, top)
    direction = "higher" if spec.higher_is_better else "lower"
    ax.set_ylabel(f"validation {spec.label} ({direction} is better)")
    ax.set_title(f"{spec.name} per round — {_mode_title(summary)}")
    _finish_axes(ax, xs, "no rounds recorded yet")
    fig.savefig(path)
    return path


def plot_loss(path: Path, summary: Mapping[str, Any]) -> Path:
    """Write the train-loss-per-round plot (one line per train key: site or ``pooled``).

    Args:
        path: the PNG to write.
        summary: a run summary.

    Returns:
        ``path``.
    """
    rounds = _rounds(summary)
    xs = _round_axis(rounds)
    sites = _eval_sites(summary)
    fig, ax = _new_figure()
    top = 0.0
    if xs:
        for key in _train_keys(summary):
            ys = _series(rounds, "train", key, "loss", xs)
            finite = [y for y in ys if math.isfinite(y)]
            if not finite:
                continue
            top = max(top, *finite)
            _site_line(ax, xs, ys, key, sites)  # same colour as the site's metric lines
        if ax.lines and top > 0:
            # From 0 so sites compare at a glance; explicit head-room because autoscale's
            # margin is relative to the data's spread and clips markers when it is small.
            ax.set_ylim(0, top * 1.08)
    ax.set_ylabel("training loss")
    ax.set_title(f"Training loss per round — {_mode_title(summary)}")
    _finish_axes(ax, xs, "no rounds recorded yet")
    fig.savefig(path)
    return path


def _privacy_sites(summary: Mapping[str, Any]) -> list[str]:
    """Train keys that reported a DP ledger (a numeric ``epsilon``) in any round."""
    rounds = _rounds(summary)
    return [k for k in _train_keys(summary)
            if any(_num(_dict(_dict(r.get("train")).get(k)).get("epsilon")) is not None
                   for r in rounds)]


def _last_privacy(summary: Mapping[str, Any], site: str) -> dict[str, Any]:
    """The site's privacy fields from the last round it reported any."""
    for r in reversed(_rounds(summary)):
        entry = _dict(_dict(r.get("train")).get(site))
        if entry.get("status") is not None or _num(entry.get("epsilon")) is not None:
            return entry
    return {}


def plot_epsilon(path: Path, summary: Mapping[str, Any]) -> Path:
    """Write the ε-per-round plot: each DP site's cumulative ε, its budget dashed.

    Args:
        path: the PNG to write.
        summary: a run summary.

    Returns:
        ``path``.
    """
    rounds = _rounds(summary)
    xs = _round_axis(rounds)
    sites = _eval_sites(summary)
    fig, ax = _new_figure()
    top = 0.0
    budgets: dict[str, float] = {}
    for key in _privacy_sites(summary):
        ys = _series(rounds, "train", key, "epsilon", xs)
        top = max(top, *(y for y in ys if math.isfinite(y)))
        _site_line(ax, xs, ys, key, sites)
        budget = _num(_last_privacy(summary, key).get("epsilon_budget"))
        if budget is not None and math.isfinite(budget):
            budgets[key] = budget
    if len(set(budgets.values())) == 1:  # one shared budget: one line, named in the legend
        (budget,) = set(budgets.values())
        ax.axhline(budget, linestyle="--", linewidth=1.2, color="0.4", label=f"budget {budget:g}")
    else:  # per-site budgets, each in its site's colour
        for key, budget in budgets.items():
            idx = sites.index(key) if key in sites else len(sites)
            ax.axhline(budget, linestyle="--", linewidth=1.2, color=_site_color(idx), alpha=0.7)
    top = max([top, *budgets.values()])
    if top > 0:
        ax.set_ylim(0, top * 1.08)
    ax.set_ylabel("ε spent (cumulative, at the site's δ)")
    ax.set_title(f"Privacy spent per round — {_mode_title(summary)}")
    _finish_axes(ax, xs, "no site reported differential privacy")
    fig.savefig(path)
    return path


def _plotted_specs(summary: Mapping[str, Any]) -> list[MetricSpec]:
    """Metrics with a value in any round, the headline always (an empty plot says "no rounds
    yet"), so a task never gets a plot of a metric it does not report."""
    specs = metric_specs(summary)
    main = headline_spec(summary)
    seen = {k.split("/", 1)[0] for r in _rounds(summary)
            for part in (_dict(r.get("evaluate")).values(), [_dict(r.get("aggregate"))])
            for m in part for k, v in _dict(m).items() if _num(v) is not None}
    first = main.name if main is not None else None
    chosen = [s for s in specs if s.name in seen or s.name == first]
    return sorted(chosen, key=lambda s: s.name != first)  # the headline first


def write_plots(out_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """Write ``<metric>.png`` for each of the run's metrics, ``loss.png`` (and ``epsilon.png``
    for DP runs) into ``out_dir``.

    Args:
        out_dir: the run's output folder (created if needed).
        summary: the run summary (the content of ``summary.json``).

    Returns:
        The paths written, the headline metric's plot first.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_metric(out_dir / plot_name(spec), summary, spec)
             for spec in _plotted_specs(summary)]
    paths.append(plot_loss(out_dir / "loss.png", summary))
    if _privacy_sites(summary):
        paths.append(plot_epsilon(out_dir / "epsilon.png", summary))
    return paths


# --------------------------------------------------------------------------- Markdown


def _is_numeric_cell(cell: str) -> bool:
    try:
        float(cell.strip("*"))
    except ValueError:
        return cell in (MISSING, "∞", "-∞")
    return True


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the first column (names) and text columns left, numbers right.

    Args:
        header: column titles (escaped here).
        rows: cells, already formatted and escaped.

    Returns:
        The table, without a trailing newline.
    """
    head = "| " + " | ".join(_md(h) for h in header) + " |"
    aligns = [
        "---:" if i > 0 and all(_is_numeric_cell(r[i]) for r in rows) else ":---"
        for i in range(len(header))
    ]
    sep = "| " + " | ".join(aligns) + " |"
    body = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def _overview(summary: Mapping[str, Any]) -> str:
    mode = summary.get("mode") or "unknown"
    sites = _eval_sites(summary)
    rounds = _rounds(summary)
    what = {
        "federated": "a **federated** run: the sites trained one shared model without "
        "exchanging images, sending only model updates to the server",
        "local": "a **local** baseline: each site trained its own model on its own data only",
        "pooled": "a **pooled** baseline: one model trained on all sites' data in one place "
        "(the centralised upper bound federated learning aims to match)",
    }.get(str(mode), f"a **{_md(str(mode))}** run")
    parts = [f"This is {what}."]
    task = summary.get("task")
    strategy = summary.get("strategy")
    details = f"Task: **{_md(str(task))}**" if task else "Task: unknown"
    if strategy:
        details += f"; aggregation strategy: **{_md(str(strategy))}**"
    parts.append(details + ".")
    site_list = ", ".join(f"`{_md(s)}`" for s in sites) or "none recorded"
    n_rounds = len(rounds)
    parts.append(
        f"{len(sites)} site{'s' if len(sites) != 1 else ''} ({site_list}), "
        f"{n_rounds} round{'s' if n_rounds != 1 else ''} recorded, "
        f"wall time {_duration(_num(summary.get('seconds')))}."
    )
    main = headline_spec(summary)
    mean = site_mean(summary)
    if main is not None and mean is not None:
        about = f" ({_md(main.description)})" if main.description else ""
        parts.append(f"Final {_md(main.label)}, mean over sites: **{_fmt(mean)}**{about}.")
    return " ".join(parts)


def _metric_notes(specs: list[MetricSpec]) -> list[str]:
    """One sentence per declared metric: what it measures and its direction."""
    notes = [f"{s.label}: {s.description} ({'higher' if s.higher_is_better else 'lower'} is "
             "better)." for s in specs if s.description]
    return [" ".join(notes), ""] if notes else []


def _final_section(summary: Mapping[str, Any]) -> list[str]:
    final = _dict(summary.get("final"))
    per_site = _dict(final.get("per_site"))
    specs = metric_specs(summary)
    keys = _present_keys(specs, *per_site.values())
    lines = ["## Final results per site", ""]
    if not keys and all(_num(final.get(s.name)) is None for s in specs):
        return [*lines, "No final results recorded (the run may not have finished).", ""]
    rows = []
    columns: dict[str, list[float | None]] = {k: [] for k in keys}
    for site in _eval_sites(summary):
        metrics = _dict(per_site.get(site))
        cells = []
        for key in keys:
            value = _num(metrics.get(key))
            columns[key].append(value)
            cells.append(_fmt(value))
        rows.append([f"`{_md(site)}`", *cells, _fmt(metrics.get("num_examples"))])
    rows.append(["**mean over sites**", *(f"**{_fmt(_mean(columns[k]))}**" for k in keys),
                 MISSING])
    lines.append(_table(["Site", *(_key_label(specs, k) for k in keys), "Validation cases"],
                        rows))
    lines.append("")
    weighted = [f"{k} {_fmt(_num(final.get(k)))}" for k in _present_keys(specs, final)]
    if weighted:
        lines.append("As reported by the run (sites weighted by validation cases): "
                     + "; ".join(weighted) + ".")
        median = _dict(final.get("median"))
        medians = [f"{k} {_fmt(_num(median.get(k)))}" for k in _present_keys(specs, median)]
        if medians:
            lines[-1] += (" Median over sites (one vote per site, whatever its case count): "
                          + "; ".join(medians) + ".")
        lines.append("")
    lines += _metric_notes(specs)
    lines.append("Each site's results are on its own validation cases, evaluated inside that "
                 "hospital.")
    lines.append("")
    return lines


def _test_set_section(summary: Mapping[str, Any]) -> list[str]:
    final = _dict(summary.get("final"))
    results = _dict(final.get("test_sets"))
    names = _ordered_keys(summary.get("test_sets"), results)
    if not names:
        return []
    specs = metric_specs(summary)
    keys = _present_keys(specs, *results.values())
    labels = [_key_label(specs, k) for k in keys]
    lines = ["## Held-out test sets", ""]
    rows = []
    for name in names:
        m = _dict(results.get(name))
        rows.append([f"`{_md(name)}`", _fmt(m.get("num_examples")),
                     *(_fmt(_num(m.get(k))) for k in keys)])
    lines += [_table(["Test set", "Cases", *labels], rows), ""]
    for name in names:
        cases = _dict(_dict(results.get(name)).get("cases"))
        if not cases:
            continue
        case_keys = _present_keys(specs, *cases.values())
        case_rows = [[f"`{_md(str(cid))}`", *(_fmt(_num(_dict(m).get(k))) for k in case_keys)]
                     for cid, m in sorted(cases.items())]
        lines += [f"### Cases in `{_md(name)}`", "",
                  _table(["Case", *(_key_label(specs, k) for k in case_keys)], case_rows), ""]
    return lines


_STATUS_NOTES = {
    "trained": "trained every step asked for",
    "budget-limited": "trained only the steps its budget still allowed",
    "declined": "budget spent: sends no update",
    "off": "no differential privacy",
}


def _privacy_section(summary: Mapping[str, Any]) -> list[str]:
    """Final privacy per site: ε spent against its budget, and the mechanism behind it."""
    keys = [k for k in _train_keys(summary) if _last_privacy(summary, k)]
    if not _privacy_sites(summary):
        return []
    lines = ["## Privacy", ""]
    rows = []
    for key in keys:
        p = _last_privacy(summary, key)
        dp = _num(p.get("epsilon")) is not None
        rows.append([f"`{_md(key)}`", _fmt(_num(p.get("epsilon"))) if dp else "∞",
                     _fmt(_num(p.get("epsilon_budget"))) if dp else "∞",
                     _fmt(_num(p.get("delta"))), _fmt(_num(p.get("noise_multiplier"))),
                     _fmt(_num(p.get("sample_rate"))), _fmt(p.get("steps") if dp else None),
                     _fmt(p.get("accountant")), _fmt(p.get("status"))])
    lines.append(_table(["Site", "ε spent", "ε budget", "δ", "σ (noise multiplier)",
                         "q (sample rate)", "Steps", "Accountant", "Status"], rows))
    lines.append("")
    statuses = sorted({str(_last_privacy(summary, k).get("status")) for k in keys}
                      & set(_STATUS_NOTES))
    lines.append("Each site trains with DP-SGD (Opacus): every training case's gradient is "
                 "scaled down to norm at most `max_grad_norm`, Gaussian noise of σ × that "
                 "norm is added, and cases are Poisson-sampled at rate q. ε is the site's own "
                 "accountant over every step of every round, at its δ; each site enforces its "
                 "budget itself. A DP site does not send its training loss (no DP "
                 "mechanism covers it): its loss shows as — below. "
                 "Status: " + "; ".join(f"{s} = {_STATUS_NOTES[s]}" for s in statuses) + ".")
    lines.append("")
    return lines


def _train_fields(rounds: list[dict[str, Any]]) -> list[str]:
    """Scalar train fields present in any round, known ones first, then in first-seen order.

    Privacy fields (``epsilon``, ``delta``, ``status``) are added by later features; listing
    whatever is there means they show up without this module having to know them.
    """
    seen: list[str] = []
    for r in rounds:
        for metrics in _dict(r.get("train")).values():
            for key, value in _dict(metrics).items():
                scalar = value is None or isinstance(value, (str, int, float, bool))
                if scalar and key not in seen:
                    seen.append(key)
    known = [f for f in _KNOWN_TRAIN_FIELDS if f in seen]
    return known + [f for f in seen if f not in _KNOWN_TRAIN_FIELDS]


def _rounds_section(summary: Mapping[str, Any]) -> list[str]:
    rounds = _rounds(summary)
    lines = ["## Per round", ""]
    if not rounds:
        return [*lines, "No rounds recorded yet.", ""]
    train_keys = _train_keys(summary)
    sites = _eval_sites(summary)
    specs = metric_specs(summary)
    main = headline_spec(summary)
    # Each site's headline metric, then the aggregate of every metric (per-class ones too).
    aggregates = _present_keys(specs, *(_dict(r.get("aggregate")) for r in rounds))
    if main is not None and main.name not in aggregates:
        aggregates.insert(0, main.name)
    header = ["Round", "Seconds"]
    header += [f"{k} loss" for k in train_keys]
    header += [f"{s} {main.name}" for s in sites] if main is not None else []
    header += [f"Aggregate {_key_label(specs, k)}" for k in aggregates]
    header += [f"Median {_key_label(specs, main.name)}"] if main is not None else []
    rows = []
    for r in rounds:
        train, evaluate = _dict(r.get("train")), _dict(r.get("evaluate"))
        row = [str(r["round"]), _fmt(_num(r.get("seconds")), 1)]
        row += [_fmt(_num(_dict(train.get(k)).get("loss"))) for k in train_keys]
        if main is not None:
            row += [_fmt(_num(_dict(evaluate.get(s)).get(main.name))) for s in sites]
        row += [_fmt(_num(_dict(r.get("aggregate")).get(k))) for k in aggregates]
        if main is not None:
            row.append(_fmt(_num(_dict(r.get("median")).get(main.name))))
        rows.append(row)
    lines += [_table(header, rows), "",
              f"{MISSING} means the site sent no result that round (it failed, timed out or "
              "declined), or the value was not computed.", ""]

    # Long format: one row per round and site keeps the table readable however many fields
    # (privacy budget, status, ...) later features add.
    fields = _train_fields(rounds)
    if fields:
        lines += ["### Training details per site", ""]
        detail_rows = []
        for r in rounds:
            train = _dict(r.get("train"))
            for key in train_keys:
                metrics = _dict(train.get(key))
                cells = [_fmt(_num(metrics.get(f)) if f == "loss" else metrics.get(f))
                         for f in fields]
                detail_rows.append([str(r["round"]), f"`{_md(key)}`", *cells])
        header = ["Round", "Site", *(_FIELD_LABELS.get(f, f) for f in fields)]
        lines += [_table(header, detail_rows), ""]
    return lines


def _model_lines(summary: Mapping[str, Any]) -> list[str]:
    model = summary.get("model")
    lines = ["## Model", ""]
    if isinstance(model, Mapping) and model:
        lines.append("One model per site (local baseline; each was trained on that site's "
                     "data only):")
        lines.append("")
        lines += [f"- `{_md(str(site))}`: `{_md(str(path))}`" for site, path in model.items()]
    elif model:
        lines.append(f"Final model: `{_md(str(model))}`. It carries its config (task, model, "
                     "preprocessing), so applying it needs nothing else.")
    else:
        lines.append("No final model recorded (the run may not have finished).")
    lines.append("")
    return lines


def _files_lines(out_dir: Path, summary: Mapping[str, Any]) -> list[str]:
    lines = ["## Files in this folder", ""]
    for name in ("summary.json", "report.md", "report.html"):
        lines.append(f"- `{name}`: {_FILE_NOTES[name]}")
    for spec in _plotted_specs(summary):
        lines.append(f"- `{plot_name(spec)}`: validation {_md(spec.label)} per site after each "
                     "round; the thick dashed grey line is the aggregate over sites.")
    lines.append(f"- `loss.png`: {_FILE_NOTES['loss.png']}")
    if _privacy_sites(summary):
        lines.append(f"- `epsilon.png`: {_FILE_NOTES['epsilon.png']}")
    if (out_dir / "site-state").is_dir():
        lines.append(f"- `site-state/`: {_FILE_NOTES['site-state/']}")
    if (out_dir / "checkpoints").is_dir() or summary.get("mode") == "federated":
        lines.append(f"- `checkpoints/`: {_FILE_NOTES['checkpoints/']}")
    model = summary.get("model")
    paths = list(model.values()) if isinstance(model, Mapping) else [model] if model else []
    for path in paths:
        lines.append(f"- `{_md(str(path))}`: trained model weights with their config (task, "
                     "model, preprocessing).")
    if not paths:
        lines.append("- `final_model.pt`: the trained model with its config (written when the "
                     "run finishes).")
    lines.append("")
    return lines


def _network_section(summary: Mapping[str, Any]) -> list[str]:
    """Bytes per round (largest site) against the model's fp32 size, rejections, errors."""
    rounds = _rounds(summary)
    model = _num(summary.get("model_fp32_bytes"))
    if not model or not any(r.get("bytes") or r.get("rejected") or r.get("adjusted")
                            or r.get("errors") for r in rounds):
        return []
    rows = []
    for r in rounds:
        traffic = _dict(r.get("bytes")).values()

        def most(key: str, traffic=traffic) -> str:
            values = [_num(_dict(t).get(key)) for t in traffic]
            values = [v for v in values if v is not None]
            return f"{max(values) / model:.3f}" if values else MISSING

        rejected, adjusted = ("; ".join(f"{_md(str(x.get('site')))} ({_md(str(x.get('phase')))})"
                                        f": {_md(str(x.get('reason')))}" for x in r.get(kind) or [])
                              for kind in ("rejected", "adjusted"))
        errors = "; ".join(f"{_md(str(x.get('site')))} ({_md(str(x.get('phase')))}): "
                           f"{_md(str(x.get('reason'))[:120])}" for x in r.get("errors") or [])
        rows.append([str(r.get("round")), most("train_down"), most("train_up"),
                     rejected or "none", adjusted or "none", errors or "none"])
    return ["## Network and faults", "",
            f"Bytes per site and round as a multiple of the model's fp32 size "
            f"({int(model):,} bytes; largest site shown). The final model's evaluation adds "
            f"one more download per site once per run.", "",
            _table(["Round", "Down ÷ model", "Up ÷ model", "Rejected updates",
                    "Adjusted updates (weight capped, clipped)", "Errors"], rows),
            ""]


def _names(sites: Iterable[str], most: int = 6) -> str:
    sites = list(sites)
    shown = ", ".join(_md(s) for s in sites[:most])
    return (shown + f" (+{len(sites) - most})" if len(sites) > most else shown) or "none"


def _participation_section(summary: Mapping[str, Any]) -> list[str]:
    """Who was sampled, dropped out or cut each round, and what that cost on the simulated
    clock (rounds with a ``sampled`` or ``consortium`` entry only)."""
    rounds = [r for r in _rounds(summary) if r.get("sampled") is not None
              or r.get("consortium") is not None]
    if not rounds:
        return []
    rows, total, wasted = [], 0.0, 0
    for r in rounds:
        c = _dict(r.get("consortium"))
        cut = _dict(c.get("cut"))
        seconds = _num(c.get("sim_seconds"))
        total += seconds or 0.0
        wasted += int(_num(c.get("wasted_steps")) or 0)
        arrived = [v for v in (_num(x) for x in _dict(c.get("arrived")).values()) if v]
        rows.append([str(r.get("round")),
                     str(len(r["sampled"])) if r.get("sampled") is not None else "all",
                     _names(c.get("dropped") or []),
                     _names(f"{k} ({_fmt(v, 0)} s)" for k, v in cut.items()),
                     _fmt(max(arrived), 0) if arrived else MISSING,
                     _fmt(seconds, 0) if seconds is not None else MISSING,
                     str(int(_num(c.get("wasted_steps")) or 0))])
    lines = ["## Participation", "",
             "Sites sampled to train each round; with a simulated consortium also those that "
             "dropped out (never answered: the server waits to the round timeout), those cut "
             "because their reply would arrive after the timeout (they trained, spending steps "
             "and ε, for nothing), the last reply that counted and the round's duration on "
             "the simulated clock.", "",
             _table(["Round", "Sampled", "Dropped out", "Cut (arrival)", "Last kept reply (s)",
                     "Round (simulated s)", "Wasted steps"], rows), ""]
    if any(r.get("consortium") is not None for r in rounds):
        lines += [f"Simulated time of these rounds: {_duration(total)}; local steps wasted "
                  f"on cut replies: {wasted}.", ""]
    return lines


def _data_check_section(summary: Mapping[str, Any]) -> list[str]:
    """The data check before round 1: the flags, and each site's headline statistics."""
    check = _dict(summary.get("data_check"))
    if not check:
        return []
    flags = check.get("flags") or []
    lines = ["## Data check before round 1", ""]
    compared = ", ".join(f"`{_md(s)}`" for s in check.get("compared") or []) or "none"
    lines.append(f"Sites compared: {compared}; each against the others' statistics "
                 f"(`data_check.on_flag: {_md(str(check.get('on_flag')))}`).")
    for site, why in _dict(check.get("withheld")).items():
        lines.append(f"\n`{_md(site)}` sent no statistics ({_md(str(why))}).")
    lines.append("")
    if flags:
        lines += [f"- **{_md(str(f.get('reason')))}**" for f in flags]
        if check.get("stopped"):
            lines.append("\nRound 1 was not started (`data_check.on_flag: stop`).")
    else:
        lines.append("No site was flagged.")
    lines.append("")
    sites = _dict(check.get("sites"))
    if sites:
        rows = []
        for site, st in sites.items():
            st = _dict(st)
            fractions = st.get("class_fractions") or []
            empty = st.get("empty_cases")
            rows.append([_md(site), str(st.get("cases")), str(st.get("sampled")),
                         ", ".join(f"{_md(str(c))} {n}" for c, n in
                                   _dict(st.get("orientation")).items()) or "suppressed",
                         " x ".join(f"{v:g}" for v in st.get("spacing") or []),
                         ", ".join(f"{100 * f:.2f} %" for f in fractions[1:]),
                         "<" + str(st.get("min_cases")) if empty == -1 else str(empty)])
        lines.append(_table(["Site", "Cases", "Analysed", "Orientation", "Spacing (mm)",
                             "Foreground classes", "Empty labels"], rows))
        lines.append("")
    return lines


def _cross_site_section(out_dir: Path, summary: Mapping[str, Any]) -> list[str]:
    """The cross-site matrix (models x sites) of each metric, its heatmaps and comparison."""
    cs = summary.get("cross_site")
    if not isinstance(cs, Mapping):
        return []
    lines = ["## Cross-site evaluation", ""]
    if cs.get("error"):
        return [*lines, f"Cross-site evaluation failed: {_md(str(cs['error']))}", ""]
    specs = metric_specs(summary)
    sites, models = list(cs.get("sites", [])), list(cs.get("models", []))
    lines += [f"Each site fine-tuned the final global model for {cs.get('fine_tune_steps')} "
              "local steps (its local model); every site evaluated the global model and each "
              "shared local model on its own validation cases and sent only aggregate "
              "metrics. Rows: models; columns: the sites whose data evaluated them.", ""]
    keys = list(cs.get("metrics", []))
    for key in keys:
        base = key.split("/", 1)[0]
        if "/" in key and sum(k.startswith(f"{base}/") for k in keys) == 1:
            continue  # one foreground class: its table would repeat the metric's own
        rows = [[_md(cross_site_row(m)),
                 *(_fmt(cross_site_cell(cs, m, s, key)) for s in sites)] for m in models]
        label = _key_label(specs, key) if metric_spec(specs, key) else key
        lines += [f"**{_md(label)}**", "", _table(["model", *sites], rows), ""]
    for model, c in (cs.get("comparison") or {}).items():
        if c.get("global_better") is None:
            continue
        where = "every site" if cross_site_home(model) is None else "the other sites"
        lines.append(f"- {_md(cross_site_row(model))} on {where}: "
                     f"{_fmt(c['local_off_diagonal'])}; the global model there: "
                     f"{_fmt(c['global_same_sites'])} "
                     f"({'global' if c['global_better'] else _md(cross_site_row(model))} "
                     "better)")
    for site, reason in (cs.get("not_shared") or {}).items():
        lines.append(f"- {_md(site)}: no local model ({_md(str(reason))})")
    for entry in cs.get("dropped") or []:
        lines.append(f"- dropped {_md(entry.get('phase', ''))} reply of "
                     f"{_md(entry.get('site', ''))}: {_md(entry.get('reason', ''))}")
    lines.append("")
    for path in plot_heatmaps(out_dir, cs, specs):
        lines += [f"![cross-site {path.stem[len('cross_site_'):]}]({path.name})", ""]
    return lines


def write_report(out_dir: Path, summary: dict[str, Any]) -> Path:
    """Write the plots and ``report.md`` for one run into ``out_dir``.

    Args:
        out_dir: the run's output folder (created if needed).
        summary: the run summary (the content of ``summary.json``).

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    plots = write_plots(out_dir, summary)
    lines = [f"# fedscan run report — {_md(_mode_title(summary))}", "", _overview(summary), ""]
    lines += _data_check_section(summary)
    lines += _final_section(summary)
    lines += _test_set_section(summary)
    lines += _privacy_section(summary)
    lines += _cross_site_section(out_dir, summary)
    lines += ["## Plots", ""]
    captions = {"loss.png": "Training loss per round", "epsilon.png": "Privacy spent (ε) per round",
                **{plot_name(s): f"Validation {s.label} per round" for s in metric_specs(summary)}}
    # Relative links, so the folder can be moved, zipped or viewed on another machine.
    lines += [f"![{captions.get(p.name, p.stem)}]({p.name})\n" for p in plots]
    lines += _rounds_section(summary)
    lines += _participation_section(summary)
    lines += _network_section(summary)
    lines += _model_lines(summary)
    lines += _files_lines(out_dir, summary)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    write_html_report(out_dir)  # report.html: the same, self-contained (plots embedded)
    return path


# --------------------------------------------------------------------------- comparison


def _comparison_data(
    summaries: Mapping[str, Mapping[str, Any]],
) -> tuple[str, list[str], list[str], dict[str, dict[str, float | None]], dict[str, float]]:
    """The headline metric's name, modes (ordered), sites, its final value per mode and site
    (plus ``mean``), and ratios."""
    metric = next((spec.name for spec in map(headline_spec, summaries.values()) if spec),
                  "metric")
    modes = [m for m in MODE_ORDER if m in summaries]
    modes += [m for m in summaries if m not in modes]
    sites: list[str] = []
    for mode in modes:
        for site in _eval_sites(summaries[mode]):
            if site not in sites:
                sites.append(site)
    table: dict[str, dict[str, float | None]] = {}
    for mode in modes:
        per_site = _dict(_dict(summaries[mode].get("final")).get("per_site"))
        row = {s: _num(_dict(per_site.get(s)).get(metric)) for s in sites}
        row["mean"] = site_mean(summaries[mode], metric)
        table[mode] = row
    ratios: dict[str, float] = {}
    pooled = table.get("pooled", {}).get("mean")
    if pooled:  # None or 0: no meaningful ratio
        for mode in ("federated", "local"):
            value = table.get(mode, {}).get("mean")
            if value is not None:
                ratios[f"{mode}/pooled"] = value / pooled
    return metric, modes, sites, table, ratios


def _coverage_notes(metric: str, modes: list[str], sites: list[str],
                    table: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """One line per mode that lacks some site's final value (its mean covers fewer sites)."""
    notes = []
    for mode in modes:
        missing = [s for s in sites if table[mode][s] is None]
        if missing and table[mode]["mean"] is not None:
            notes.append(f"note: {mode} has no final {metric} for {', '.join(missing)}; "
                         "its mean covers the other sites only.")
    return notes


def _ratio_note(metric: str) -> str:
    return (f"ratio of mean final {metric} (each site counting once) to the pooled baseline; "
            "1.0 means as good as training on all data in one place.")


def format_class_table(metrics: Mapping[str, Any], classes: Sequence[str] | None = None
                       ) -> str:
    """A console table of per-class metrics: one row per foreground class, one column per
    metric that has per-class keys (``dice/<class>``, ``hd95/<class>``), and the mean over
    foreground classes (the headline) last.

    Args:
        metrics: flat metrics holding ``name`` and ``name/<class>`` keys.
        classes: the foreground classes in order; None: as they appear in ``metrics``.

    Returns:
        Aligned plain-text lines (empty when there are no per-class keys).
    """
    pairs = [k.split("/", 1) for k in metrics if "/" in k]
    names = list(dict.fromkeys(name for name, _ in pairs))
    if classes is None:
        classes = list(dict.fromkeys(c for _, c in pairs))
    if not names or not classes:
        return ""
    units = {"hd95": "hd95 (mm)"}
    rows = [["class", *(units.get(n, n) for n in names)]]
    rows += [[c, *(_fmt(_num(metrics.get(f"{n}/{c}"))) for n in names)] for c in classes]
    rows.append(["mean (foreground)", *(_fmt(_num(metrics.get(n))) for n in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
                     for row in rows)


def format_comparison(summaries: dict[str, dict[str, Any]]) -> str:
    """The comparison table as aligned plain text, for the terminal.

    Args:
        summaries: run summaries keyed by mode (``federated``, ``local``, ``pooled``).

    Returns:
        The table and the ratios, several lines without a trailing newline.
    """
    metric, modes, sites, table, ratios = _comparison_data(summaries)
    if not modes:
        return "no runs to compare"
    header = ["mode", *sites, "mean"]
    rows = [[m, *(_fmt(table[m][s]) for s in [*sites, "mean"])] for m in modes]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    out = [f"Final {metric} per site", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out += _coverage_notes(metric, modes, sites, table)
    for name, value in ratios.items():
        out.append(f"{name}: {value:.4f}")
    return "\n".join(out)


def plot_comparison(path: Path, summaries: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write grouped bars: the final headline metric per site (and the mean), one bar per mode.

    Args:
        path: the PNG to write.
        summaries: run summaries keyed by mode.

    Returns:
        ``path``.
    """
    metric, modes, sites, table, _ = _comparison_data(summaries)
    groups = [*sites, "mean"]
    # Grow with the number of bars, within what fits a report page.
    width_in = min(14.0, max(7.0, 2.5 + 0.35 * len(groups) * max(1, len(modes))))
    fig = Figure(figsize=(width_in, 4.8), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs = [g + (i - (len(modes) - 1) / 2) * width for g in range(len(groups))]
        ys = [table[mode][g] for g in groups]
        heights = [0.0 if y is None else y for y in ys]
        color = _MODE_COLORS.get(mode, f"C{(i + 3) % 10}")
        bars = ax.bar(xs, heights, width=width * 0.95, label=mode, color=color)
        # Write the value on each bar: the differences that matter are often in the 2nd
        # decimal, below what a bar's height shows; a missing value is labelled, not hidden.
        labels = ["n/a" if y is None else f"{y:.3f}" for y in ys]  # a dash rotated reads "|"
        ax.bar_label(bars, labels=labels, padding=2, fontsize=7, rotation=90)
    ax.set_xticks(range(len(groups)), [*sites, "mean over sites"])
    if len(groups) > 5:
        # Hospital names are long; side by side they run into each other.
        ax.tick_params(axis="x", labelrotation=30)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    # The mean is a summary, not another hospital: set it apart.
    ax.axvline(len(groups) - 1.5, color="0.6", linewidth=1, linestyle=":")
    top = max([v for row in table.values() for v in row.values() if v is not None],
              default=1.0)
    if 0 < top <= 1:  # a score in [0, 1] (Dice, SSIM): the whole scale
        ax.set_ylim(0, 1.15)  # head-room for the value labels
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    elif top > 0:
        ax.set_ylim(0, top * 1.15)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"Final {metric} per site and mode")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if modes:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  frameon=False)
    fig.savefig(path)
    return path


def write_comparison(out_dir: Path, summaries: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Write ``comparison.md`` and ``comparison.png`` for runs of several modes.

    Args:
        out_dir: folder to write into (created if needed).
        summaries: run summaries keyed by mode (``federated``, ``local``, ``pooled``).

    Returns:
        ``{"federated/pooled": r, "local/pooled": r}``, only the ratios that can be computed
        (both runs present with a final headline value, pooled value above zero).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric, modes, sites, table, ratios = _comparison_data(summaries)
    plot = plot_comparison(out_dir / "comparison.png", summaries)
    rows = [[f"**{_md(m)}**", *(_fmt(table[m][s]) for s in sites), f"**{_fmt(table[m]['mean'])}**"]
            for m in modes]
    lines = ["# fedscan comparison: federated vs local vs pooled", "",
             f"Final validation {metric} per site for each training mode. Each site's value "
             "is measured on its own validation cases.", "",
             _table(["Mode", *(f"`{_md(s)}`" for s in sites), "Mean"], rows), ""]
    notes = _coverage_notes(metric, modes, sites, table)
    if notes:
        lines += [f"- {_md(n[0].upper() + n[1:])}" for n in notes] + [""]
    if ratios:
        lines += ["| Ratio | Value |", "| :--- | ---: |"]
        lines += [f"| {name} | {_fmt(value)} |" for name, value in ratios.items()]
        lines += ["", f"Ratio: {_ratio_note(metric)}", ""]
    else:
        lines += ["No ratio to the pooled baseline could be computed (a pooled run with a "
                  f"final {metric} is needed).", ""]
    lines += [f"![Final {metric} per site and mode]({plot.name})", ""]
    (out_dir / "comparison.md").write_text("\n".join(lines), encoding="utf-8")
    return ratios
