"""A simulated consortium: long-tailed site sizes, per-site compute speed, dropouts and a
round timeout on a simulated clock (the ``consortium`` config block; docs/scale.md).

Everything is drawn from the run's seed with ``random.Random("<seed>/...")`` streams keyed by
site name (and round), so a rerun, or a resumed run, behaves the same:

* sizes: the site of size rank r (a seeded permutation) holds
  ``max(min_cases, round(max_cases / r ** size_alpha))`` cases; a few large, many small;
* speed: simulated seconds per local step, ``seconds_per_step x lognormal(0, speed_sigma)``;
* dropout: a sampled site does not answer round r with probability ``dropout`` (its message
  is never sent: it costs the round the full timeout, nothing else);
* the simulated clock: a site's reply arrives ``steps x seconds per step`` after the round
  starts (nothing sleeps); one arriving after ``round_timeout`` (else ``strategy.
  round_timeout``, the real server's) is cut as a real server would: its update and its
  evaluation are not used, though the site trained (steps and ε spent for nothing).

Each round's ``consortium`` entry in summary.json lists who dropped out, who was cut and when
each reply arrived, the round's simulated duration and the local steps wasted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedscan.server.sampling import learn_site_names
from fedscan.shared.config import Config, ConsortiumConfig
from fedscan.shared.history import RunHistory
from fedscan.shared.messages import METRICS, reply_site

log = logging.getLogger("fedscan.simulations")

POOL = "pool"


def site_sizes(c: ConsortiumConfig, seed: int) -> list[int]:
    """Cases per generated site (site i is ``hospital-<i>``), long-tailed, from the seed."""
    ranks = list(range(1, c.sites + 1))
    random.Random(f"{seed}/consortium/sizes").shuffle(ranks)
    return [max(c.min_cases, round(c.max_cases / r ** c.size_alpha)) for r in ranks]


def seconds_per_step(c: ConsortiumConfig, seed: int, site: str) -> float:
    """A site's simulated compute speed (seconds per local step)."""
    return c.seconds_per_step * random.Random(f"{seed}/{site}/speed").lognormvariate(
        0.0, c.speed_sigma)


def drops_out(c: ConsortiumConfig, seed: int, site: str, server_round: int) -> bool:
    """Whether ``site`` does not answer ``server_round``."""
    return random.Random(f"{seed}/{server_round}/{site}/dropout").random() < c.dropout


def site_name(index: int, width: int) -> str:
    return f"hospital-{index:0{width}d}"


def consortium_root(c: ConsortiumConfig, seed: int) -> Path:
    """Cache folder of a generated consortium (keyed by its layout and seed)."""
    key = json.dumps({**dataclasses.asdict(c), "seed": seed, "v": 1}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    base = os.environ.get("FEDSCAN_CACHE_DIR")
    cache = Path(base).expanduser() if base else Path.home() / ".cache" / "fedscan"
    return cache / f"consortium-{c.sites}-{digest}"


def write_consortium(root: Path, c: ConsortiumConfig, seed: int) -> list[tuple[str, Path]]:
    """Write the pool of ``max_cases`` phantom cases once and one folder per site whose
    images are links into it (a thousand sites take little disk); atomically.

    Returns:
        (site name, dataset folder) per site.
    """
    from fedscan.simulations.phantoms import (
        SITE_PROFILES,
        _publish,
        write_phantom_site,
    )

    sizes = site_sizes(c, seed)
    width = len(str(max(1, c.sites - 1)))
    names = [site_name(i, width) for i in range(c.sites)]

    def write(folder: Path) -> None:
        profiles = list(SITE_PROFILES.values())
        # Pool cases come from the phantom scanners in turn, on the consortium's grid.
        per_profile = -(-c.max_cases // len(profiles))
        pool_ids = []
        for p, profile in enumerate(profiles):
            coarse = dataclasses.replace(profile, spacing=(c.spacing,) * 3)
            write_phantom_site(folder / POOL / profile.name, profile.name, coarse,
                               per_profile, None, seed + p)
            pool_ids += [(profile.name, f"{profile.name}_{i:03d}") for i in range(per_profile)]
        template = json.loads((folder / POOL / profiles[0].name / "dataset.json").read_text())
        rng = random.Random(f"{seed}/consortium/cases")
        for name, n in zip(names, sizes, strict=True):
            site = folder / name
            (site / "imagesTr").mkdir(parents=True)
            (site / "labelsTr").mkdir(parents=True)
            entries = []
            for profile, case in rng.sample(pool_ids, n):
                for sub in ("imagesTr", "labelsTr"):
                    (site / sub / f"{case}.nii.gz").symlink_to(
                        Path("..", "..", POOL, profile, sub, f"{case}.nii.gz"))
                entries.append({"image": f"./imagesTr/{case}.nii.gz",
                                "label": f"./labelsTr/{case}.nii.gz"})
            meta = {**template, "name": name, "numTraining": n - 1,
                    "description": f"consortium site of {n} phantom cases (linked)",
                    "training": entries[:-1], "validation": entries[-1:]}
            (site / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")

    _publish(root, f"consortium v1 {json.dumps(dataclasses.asdict(c), sort_keys=True)} "
                   f"seed={seed}\n", "consortium dataset", write)
    return [(name, root / name) for name in names]


def with_consortium_sites(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with generated consortium sites when it has a ``consortium`` block with
    ``sites`` and no ``sites`` list (returned unchanged otherwise)."""
    block = data.get("consortium")
    if "sites" in data or not isinstance(block, dict) or not block.get("sites"):
        return data
    from fedscan.shared.config import from_dict

    c = from_dict(ConsortiumConfig, block, "consortium", None)
    seed = data.get("seed", 0)
    seed = seed if isinstance(seed, int) else 0
    if c.sites < 1 or not 2 <= c.min_cases <= c.max_cases:
        return data  # the config check names the key
    folders = write_consortium(consortium_root(c, seed), c, seed)
    spacing = [c.spacing] * 3
    out = {**data, "sites": [{"name": n, "data": str(p)} for n, p in folders]}
    out.setdefault("data", {})
    if isinstance(out["data"], dict):
        out["data"] = {"spacing": spacing, **out["data"]}
    return out


class ConsortiumStrategy(Strategy):
    """Wraps a run's strategy with the consortium's dropouts and simulated clock (see the
    module docstring); the rounds it runs may lose every site without stopping the run."""

    empty_rounds_ok = True

    def __init__(self, inner: Strategy, cfg: Config, history: RunHistory) -> None:
        assert cfg.consortium is not None
        self.inner = inner
        self.c = cfg.consortium
        self.seed = cfg.seed
        self.timeout = self.c.round_timeout or cfg.strategy.round_timeout
        self.history = history
        # The sampling layer's names when there is one: each node is asked once.
        self.names: dict[int, str] = getattr(inner, "names", {})
        self._dropped: dict[int, list[str]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        learn_site_names(grid, self.names, timeout=60.0)
        kept, dropped = [], []
        for msg in messages:
            site = self.names.get(msg.metadata.dst_node_id)
            if site is not None and drops_out(self.c, self.seed, site, server_round):
                dropped.append(site)
            else:
                kept.append(msg)
        self._dropped[server_round] = sorted(dropped)
        return kept

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, arrived, cut, wasted = [], {}, {}, 0
        for msg in replies:
            if msg.has_error() or METRICS not in msg.content.metric_records:
                kept.append(msg)
                continue
            site = reply_site(msg)
            steps = int(msg.content.metric_records[METRICS].get("steps", 0))
            seconds = round(steps * seconds_per_step(self.c, self.seed, site), 3)
            if seconds > self.timeout:
                cut[site] = seconds
                wasted += steps
            else:
                arrived[site] = seconds
                kept.append(msg)
        dropped = self._dropped.pop(server_round, [])
        waited = bool(dropped or cut)  # the server waits to the deadline for them
        duration = self.timeout if waited else max(arrived.values(), default=0.0)
        self.history.record_round_fact(server_round, "consortium", {
            "dropped": dropped, "cut": cut, "arrived": arrived,
            "sim_seconds": duration, "wasted_steps": wasted})
        if cut:
            log.info("round %d: cut %d late sites (after %.0f simulated s)", server_round,
                     len(cut), self.timeout)
        return self.inner.aggregate_train(server_round, kept)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
