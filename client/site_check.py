"""``fedscan client check --data-stats``: a site's data statistics, computed and shown locally.

The same :class:`~fedscan.shared.data_stats.SiteStats` the data check before round 1 would
send, with the site's own policy (``share_data_stats``, ``data_stats_min_cases``) applied,
and the exact record that would travel. Nothing is sent.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedscan.client.data_stats_reply import shares_data_stats
from fedscan.client.site_config import load_site_settings
from fedscan.shared.checkpoint import load_model
from fedscan.shared.config import DataConfig
from fedscan.shared.data import read_dataset
from fedscan.shared.data_stats import format_stats, site_stats
from fedscan.shared.errors import FedscanError


def print_site_stats(config: str | Path, model: str | Path | None = None) -> int:
    """Compute and print the site's statistics; returns the exit code (0).

    Args:
        config: site.yaml.
        model: a model file whose preprocessing (grid, intensity scaling) is applied; None:
            the data defaults with classes and channels from dataset.json.

    Raises:
        FedscanError: unreadable config or data, or too few cases for any statistics.
    """
    site = load_site_settings(config).site
    if model is not None:
        data = load_model(model)[0].data
    else:
        found = read_dataset(site.data, name=site.name, check=False)
        data = DataConfig(num_classes=max(2, len(found.class_names)),
                          in_channels=max(1, len(found.channel_names)),
                          labels=list(found.class_names))
    own = read_dataset(site.data, name=site.name, num_classes=data.num_classes,
                       in_channels=data.in_channels, check=False)
    k = site.policy.data_stats_min_cases
    try:
        stats = site_stats(own.cases, data, min_cases=k)
    except ValueError as exc:
        raise FedscanError(f"{site.data}: {exc}") from None
    names = list(data.labels) or list(own.class_names)
    print("\n".join(format_stats(site.name, stats, names)), flush=True)
    if shares_data_stats(site):
        record = {key: value for key, value in stats.to_record().items()}
        print(f"sent to the server before round 1 (policy.share_data_stats allows it):\n"
              f"{json.dumps(record)}", flush=True)
    else:
        print("not sent: this site's policy keeps its statistics (policy.share_data_stats; "
              "unset it is false for a site with a privacy budget)", flush=True)
    return 0
