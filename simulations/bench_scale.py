"""``fedscan bench scale``: wall time per round and peak memory at 10, 100, 1,000 hospitals.

Each size runs the same federated simulation (the default 3D UNet, one local step, coarse
8 mm phantom cases) in a child process, as ``fedscan simulate`` would, while this process
samples the memory of the child and every process below it (Ray's GCS, raylet and workers)
every ``SAMPLE_SECONDS``: the sum of RSS (shared pages counted in every process that maps
them, an upper bound) and of PSS (shared pages split between their users: what the tree
really takes).

The sites' data are generated once: a pool of 3 phantom cases (one per scanner), and each
site a folder of links to 2 of them (one training, one validation case), so 1,000 sites
take a few MB of disk.

Framework overhead is separated from training compute by timing each virtual hospital's
ClientApp from the inside (a Flower mod around it: reading its data, building the model,
evaluating the received model, training): the simulation runs one ClientApp actor at a time
(:func:`~fedscan.simulations.federated.simulation_backend`), so a round's wall time minus
the sum of its ClientApp times is what Flower, Ray and the server (sampling, messages,
serialisation, aggregation, checks, checkpoint, summary) add; divided by the round's
site-rounds it is the overhead per site-round.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

SAMPLE_SECONDS = 0.5
TIMES_FILE = "client_times.jsonl"

RUN = {
    "rounds": 2,
    "data": {"spacing": [8.0, 8.0, 8.0]},
    "train": {"patch_size": [16, 16, 16], "batch_size": 2, "local_steps": 1},
    "evaluate": {"hd95": False},
    "tracking": {"tensorboard": False},
}


def write_sites(root: Path, n: int) -> list[dict[str, str]]:
    """``n`` sites of 2 linked phantom cases each (generated once under ``root``)."""
    from fedscan.shared.config import ConsortiumConfig
    from fedscan.simulations.consortium import write_consortium

    c = ConsortiumConfig(sites=n, min_cases=2, max_cases=2, size_alpha=0.0, spacing=8.0)
    return [{"name": name, "data": str(p)}
            for name, p in write_consortium(root / f"sites-{n}", c, seed=0)]


def timing_mod(path: Path):
    """A ClientApp mod appending each message's handling time to ``path`` (JSON lines)."""

    def mod(msg, context, call_next):
        started = time.perf_counter()
        reply = call_next(msg, context)
        seconds = time.perf_counter() - started
        try:
            rnd = int(msg.content.config_records["config"]["server-round"])
        except Exception:
            rnd = None
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"round": rnd, "type": str(msg.metadata.message_type),
                                "seconds": round(seconds, 5)}) + "\n")
        return reply

    return mod


def child(config: str, out: str) -> None:
    """The measured run (in its own process): check the data, run the federation."""
    from fedscan.shared.config import load_config
    from fedscan.simulations.federated import run_federated
    from fedscan.simulations.run import check_data, quiet_flower

    quiet_flower()
    cfg = load_config(config)
    check_data(cfg)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_federated(cfg, out_dir, client_mods=(timing_mod(out_dir / TIMES_FILE),))


def _tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS sum, PSS sum, processes) of ``pid`` and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0, 0
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
    return rss, pss, len(procs)


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()


def run_size(root: Path, n: int, timeout: float) -> dict[str, Any]:
    """One size: generate the sites, run the child while sampling its tree's memory."""
    sites = write_sites(root / "data", n)
    out = root / f"run-{n}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = root / f"scale-{n}.yaml"
    config.write_text(yaml.safe_dump({**RUN, "sites": sites}, sort_keys=False))
    peak = {"rss": 0, "pss": 0, "procs": 0}
    log = (root / f"run-{n}.log").open("w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from fedscan.simulations."
                             "bench_scale import child; child(sys.argv[1], sys.argv[2])",
                             str(config), str(out)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss, pss, count = _tree_memory(proc.pid)
            peak["rss"] = max(peak["rss"], rss)
            peak["pss"] = max(peak["pss"], pss)
            peak["procs"] = max(peak["procs"], count)
            stop.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)  # Ray's processes too, not only the child
        proc.wait()
        code = None
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    log.close()
    result: dict[str, Any] = {"sites": n, "exit": code, "wall_seconds": round(wall, 1),
                              "peak_rss_mb": peak["rss"] / 2**20,
                              "peak_pss_mb": peak["pss"] / 2**20, "peak_processes": peak["procs"]}
    summary_path = out / "summary.json"
    if code != 0 or not summary_path.is_file():
        why = f"stopped after {timeout:.0f} s" if code is None else f"exit {code}"
        result["error"] = (f"run failed ({why}); peak memory of the process tree until then "
                           f"{result['peak_pss_mb']:.0f} MB PSS ({result['peak_rss_mb']:.0f} MB "
                           f"RSS); see {root / f'run-{n}.log'}")
        return result
    summary = json.loads(summary_path.read_text())
    times = [json.loads(line) for line in (out / TIMES_FILE).read_text().splitlines()]
    rounds = []
    for r in summary["rounds"]:
        train = [t["seconds"] for t in times if t["type"] == "train" and t["round"] == r["round"]]
        client = sum(train)
        rounds.append({"round": r["round"], "seconds": r["seconds"], "site_rounds": len(train),
                       "client_seconds": round(client, 2),
                       "overhead_per_site_round": (r["seconds"] - client) / max(1, len(train))})
    result["rounds"] = rounds
    # Round 1 also starts Ray's actor and fills the caches: the last round is the steady one.
    last = rounds[-1]
    result["round_seconds"] = last["seconds"]
    result["client_seconds_per_site_round"] = last["client_seconds"] / max(1, last["site_rounds"])
    result["overhead_per_site_round"] = last["overhead_per_site_round"]
    return result


def scale(out: Path, sizes: list[int], timeout: float = 4 * 3600.0) -> list[dict[str, Any]]:
    """Run every size in turn (smallest first) and write ``scale.json`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sizes:
        print(f"== {n} virtual hospitals ...", flush=True)
        results.append(run_size(out, n, timeout))
        print(format_row(results[-1]), flush=True)
        (out / "scale.json").write_text(json.dumps(results, indent=1))
    return results


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['sites']:>6} sites: {r['error']}"
    return (f"{r['sites']:>6} sites: round {r['round_seconds']:7.1f} s, ClientApp "
            f"{r['client_seconds_per_site_round'] * 1000:6.0f} ms + framework "
            f"{r['overhead_per_site_round'] * 1000:5.0f} ms per site-round; peak memory of "
            f"the process tree {r['peak_pss_mb']:6.0f} MB PSS ({r['peak_rss_mb']:6.0f} MB "
            f"RSS, {r['peak_processes']} processes); whole run {r['wall_seconds']:.0f} s")


def format_scale(results: list[dict[str, Any]]) -> str:
    """The table, with memory growth against the smallest size."""
    lines = ["== fedscan bench scale (default 3D UNet, 1 local step, 2 rounds; last round)"]
    lines += [format_row(r) for r in results]
    ok = [r for r in results if "error" not in r]
    if len(ok) > 1:
        base = ok[0]
        for r in ok[1:]:
            grow = {k: r[k] / base[k] for k in ("sites", "peak_pss_mb", "round_seconds",
                                                 "overhead_per_site_round")}
            lines.append(f"  {base['sites']} -> {r['sites']} sites (x{grow['sites']:g}): "
                         f"memory x{grow['peak_pss_mb']:.2f} (PSS), round time "
                         f"x{grow['round_seconds']:.1f}, overhead per site-round "
                         f"x{grow['overhead_per_site_round']:.2f}")
    return "\n".join(lines)
