"""Benchmark: what the status page adds to a run's wall time.

The default demo federation (README command 1's phantom hospitals and training settings, for
``rounds`` rounds) runs with ``fedscan simulate`` as a user starts it, without and with
the status page (``--status-port 0``), in the order off, on, on, off (and again for more
repeats) so drift on a shared machine falls on both arms alike (two simulations at the same time
were tried for a true side by side: their Ray actors never started on this 2-core machine).
On a machine shared with other work the drift between runs can still dwarf a 2 % effect, so the
page's own cost is also measured directly. While the page is up, a client
loads it the way the page does (the page, its script and style, plotly.js once, then
``/api/status`` every 2 s) for the whole run. The browser's own drawing is not counted: it runs
wherever the operator looks from.

Also measured: the server's time per ``/api/status`` answer as the client sees it, and the
live-state writer's time per write (the writer runs in every federated run, page or not).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

#: The page's refresh interval (status.js REFRESH_MS).
POLL_SECONDS = 2.0


class _Poller:
    """Loads the page like a browser would until stopped; times each /api/status answer."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as client:
            for path in ("/", "/static/status.js", "/static/status.css",
                         "/static/plotly.min.js"):
                client.get(self.url + path)
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    client.get(self.url + "/api/status").raise_for_status()
                    self.seconds.append(time.perf_counter() - started)
                except httpx.HTTPError:
                    pass  # the page stops with the run
                self._stop.wait(POLL_SECONDS)

    def start(self) -> _Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


class _TreeCpu:
    """CPU seconds (user + system) of a process and all its descendants, sampled until
    stopped. A descendant that exits between two samples loses at most one interval's CPU.
    CPU time barely moves with other work on the machine, unlike wall time."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    self._seen[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> float:
        """Stop sampling; the tree's CPU seconds."""
        self._stop.set()
        self._thread.join(timeout=5)
        return sum(self._seen.values())


def _run_once(config: Path, out: Path, page: bool) -> tuple[float, float, list[float]]:
    """Wall time and process-tree CPU time of one ``fedscan simulate``, and the poller's
    answer times (page on)."""
    cmd = [sys.executable, "-m", "fedscan", "simulate", "--config", str(config), "--out",
           str(out)] + (["--status-port", "0"] if page else [])
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cpu = _TreeCpu(proc.pid)
    poller, tail = None, []
    for line in proc.stdout:
        tail = [*tail[-40:], line]
        if page and poller is None and "status page http" in line:
            poller = _Poller(line.split("status page ", 1)[1].strip()).start()
    # The tree is sampled up to the parent's exit; its final moments are within one interval.
    while proc.poll() is None:
        time.sleep(0.05)
    cpu_seconds = cpu.stop()
    code = proc.wait()
    wall = time.perf_counter() - started
    if poller is not None:
        poller.stop()
    if code != 0:
        raise RuntimeError(f"simulate exited with {code}:\n{''.join(tail)}")
    return wall, cpu_seconds, poller.seconds if poller else []


def _writer_seconds(sites: int) -> float:
    """Mean time of one live.json write for a run of ``sites`` sites (all nodes in flight)."""
    import tempfile

    from fedscan.shared.live import LiveStatus

    with tempfile.TemporaryDirectory() as tmp:
        live = LiveStatus(tmp, 100, [f"site-{i}" for i in range(sites)])
        live.exchange_started(1, "train", {i: f"site-{i}" for i in range(sites)})
        for i in range(sites):
            live.replied(i, f"site-{i}")
        live.write_seconds = 0.0
        for _ in range(200):
            live.write()
        return live.write_seconds / 200


def status_overhead(out: Path, rounds: int = 2, repeats: int = 3) -> dict[str, Any]:
    """Run the default federation in ``repeats`` blocks of off, on, on, off (ABBA).

    A run of the default demo, not a toy: the page's cost is a fixed start-up plus a little per
    second, so a run shorter than users' would overstate it.

    Returns:
        Per-run wall and process-tree CPU times per arm, their means, the ratios on/off (of
        the means, and per block: each block's own ratio, so drift between blocks cancels),
        the poll answer times and the live writer's time per write.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "bench.yaml"
    config.write_text(yaml.safe_dump({"rounds": rounds}))
    walls: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    blocks: list[dict[str, float]] = []
    polls: list[float] = []
    for block in range(repeats):
        mine: dict[str, dict[bool, list[float]]] = {"wall": {False: [], True: []},
                                                    "cpu": {False: [], True: []}}
        for page in (False, True, True, False):
            i = 4 * block + len(mine["wall"][False]) + len(mine["wall"][True])
            wall, cpu, answers = _run_once(
                config, out / f"run-{i}-{'on' if page else 'off'}", page)
            for store, value in ((walls, wall), (cpus, cpu)):
                store[page].append(value)
            mine["wall"][page].append(wall)
            mine["cpu"][page].append(cpu)
            polls += answers
            print(f"run {i + 1}/{4 * repeats}: status page {'on ' if page else 'off'} "
                  f"{wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
        blocks.append({k: sum(v[True]) / sum(v[False]) for k, v in mine.items()})
    off, on = statistics.mean(walls[False]), statistics.mean(walls[True])
    cpu_off, cpu_on = statistics.mean(cpus[False]), statistics.mean(cpus[True])
    return {"off": walls[False], "on": walls[True], "mean_off": off, "mean_on": on,
            "ratio": on / off,
            "block_median": {k: statistics.median(b[k] for b in blocks) for k in ("wall", "cpu")},
            "cpu_off": cpus[False], "cpu_on": cpus[True],
            "cpu_ratio": cpu_on / cpu_off, "blocks": blocks, "polls": len(polls),
            "poll_ms": 1000 * statistics.median(polls) if polls else None,
            "writer_ms_3": 1000 * _writer_seconds(3), "writer_ms_50": 1000 * _writer_seconds(50)}


def format_status_overhead(result: dict[str, Any]) -> str:
    """The benchmark's table as text."""
    lines = [
        "status page overhead (the default demo federation, fedscan simulate, page off/on "
        "alternately)",
        f"  page off: {', '.join(f'{w:.1f}' for w in result['off'])} s  mean "
        f"{result['mean_off']:.1f} s",
        f"  page on:  {', '.join(f'{w:.1f}' for w in result['on'])} s  mean "
        f"{result['mean_on']:.1f} s",
        f"  ratio on/off: {result['ratio']:.4f} ({100 * (result['ratio'] - 1):+.2f} %; "
        f"goal < +2 %)",
        f"  CPU time of the process tree, page off: "
        f"{', '.join(f'{c:.1f}' for c in result['cpu_off'])} s; on: "
        f"{', '.join(f'{c:.1f}' for c in result['cpu_on'])} s",
        f"  CPU ratio on/off: {result['cpu_ratio']:.4f} "
        f"({100 * (result['cpu_ratio'] - 1):+.2f} %)",
        "  per ABBA block on/off, wall: "
        + ", ".join(f"{b['wall']:.4f}" for b in result["blocks"])
        + "; CPU: " + ", ".join(f"{b['cpu']:.4f}" for b in result["blocks"]),
        f"  median of the blocks' ratios, wall: {result['block_median']['wall']:.4f} "
        f"({100 * (result['block_median']['wall'] - 1):+.2f} %), CPU: "
        f"{result['block_median']['cpu']:.4f} ({100 * (result['block_median']['cpu'] - 1):+.2f} %)",
    ]
    if result["poll_ms"] is not None:
        lines.append(f"  /api/status answers: {result['polls']}, median {result['poll_ms']:.1f} "
                     f"ms each, one every {POLL_SECONDS:.0f} s "
                     f"({100 * result['poll_ms'] / 1000 / POLL_SECONDS:.2f} % of the time)")
    lines.append(f"  live.json writer: {result['writer_ms_3']:.2f} ms per write with 3 sites, "
                 f"{result['writer_ms_50']:.2f} ms with 50 (a few writes per round, at most "
                 "one per second)")
    return "\n".join(lines)
