"""The console: each Flower line once, no DEBUG or deprecation notice unless verbose; the rounds
bar shows each site's state; the closing block names every output. (A real simulation's whole
console is checked in test_simulation_e2e.py.)"""

from __future__ import annotations

import subprocess
import sys

from fedscan.shared.console import set_verbose, verbose

#: A process as a run has it: Opacus imported (its ``logging.basicConfig`` gives the root
#: logger a handler), then Flower, fedscan and Python warnings log one probe line per level.
PROBE = """
import logging, sys, warnings
import opacus
from flwr.common.logger import FLOWER_LOGGER, warn_deprecated_feature
from fedscan.shared.console import configure_console
if sys.argv[1] != "untouched":
    configure_console(sys.argv[1] == "verbose")
FLOWER_LOGGER.debug("probe-debug")
FLOWER_LOGGER.info("probe-info")
FLOWER_LOGGER.warning("probe-warning")
warn_deprecated_feature("probe-feature")
FLOWER_LOGGER.warning("Manually terminating %s", "ClientAppActor")
logging.getLogger("fedscan.server").info("probe-fedscan-info")
logging.getLogger("fedscan.server").warning("probe-fedscan-warning")
warnings.warn("probe-deprecation", DeprecationWarning, stacklevel=1)
"""


def console(mode: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "default", "-c", PROBE, mode],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_untouched_flower_prints_twice_with_debug():
    out = console("untouched")  # the cause, as Flower and Opacus leave it
    assert out.count("probe-warning") == 2 and ":DEBUG:probe-debug" in out


def test_default_prints_each_warning_once_and_nothing_else():
    out = console("quiet")
    assert out.count("probe-warning") == 1, out
    assert out.count("fedscan: probe-fedscan-warning") == 1
    for hidden in ("probe-debug", "probe-info", "probe-feature", "DEPRECATED",
                   "probe-fedscan-info", "probe-deprecation", "DEBUG", "Manually terminating"):
        assert hidden not in out, (hidden, out)


def test_verbose_brings_flowers_log_back_once():
    out = console("verbose")
    for shown in ("probe-debug", "probe-info", "probe-warning", "probe-fedscan-info",
                  "DEPRECATED FEATURE: probe-feature", "probe-deprecation"):
        assert out.count(shown) == 1, (shown, out)


def test_verbose_travels_in_the_environment(monkeypatch):
    monkeypatch.delenv("FEDSCAN_VERBOSE", raising=False)
    assert not verbose()
    set_verbose(True)
    assert verbose()  # Ray workers and Flower processes inherit it
    set_verbose(False)
    assert not verbose()


def test_rounds_bar_shows_each_sites_state(capsys):
    from fedscan.server.progress import RoundProgress

    bar = RoundProgress(3, 1, ["site-a", "site-b"])
    nodes = {"1": {"site": "site-b", "status": "replied"}, "2": {"site": None,
                                                              "status": "waiting"}}
    bar.sites_changed({"phase": "train", "round": 1, "nodes": nodes})
    assert bar.bar.postfix == "round 1: site-b done, 1 waiting"
    nodes["2"].update(site="site-a", status="error")
    bar.sites_changed({"phase": "train", "round": 1, "nodes": nodes})
    bar.metric("dice 0.500 (round 1 model)")
    assert bar.bar.postfix == "round 1: site-a error, site-b done | dice 0.500 (round 1 model)"
    bar.round_done()
    nodes["1"]["status"] = nodes["2"]["status"] = "waiting"
    bar.sites_changed({"phase": "final_evaluate", "round": 3, "nodes": nodes})
    assert bar.bar.postfix.startswith("final evaluation: site-a evaluating, site-b evaluating")
    assert bar.bar.n == 1
    bar.close()


def test_rounds_bar_counts_states_in_a_large_federation():
    from fedscan.server.progress import RoundProgress

    sites = [f"h{i:03d}" for i in range(200)]
    bar = RoundProgress(2, 1, sites)
    nodes = {str(i): {"site": s, "status": "replied" if i < 30 else "waiting"}
             for i, s in enumerate(sites)}
    nodes["7"]["status"] = "error"
    bar.sites_changed({"phase": "train", "round": 1, "nodes": nodes})
    assert bar.bar.postfix == "round 1: 29 done, 1 error, 170 training"
    bar.close()


def test_outputs_block_names_what_exists(tmp_path):
    from fedscan.simulations.run import format_outputs

    for name in ("report.html", "summary.json", "final_model.pt", "live.json", "dice.png"):
        (tmp_path / name).write_text("x")
    text = format_outputs(tmp_path, [tmp_path])
    assert f"{tmp_path / 'report.html'}" in text and "open in a browser" in text
    assert f"fedscan dashboard {tmp_path}" in text and "dice.png" in text
    assert "checkpoints" not in text  # not written, not listed


def test_ctrl_c_stops_a_simulation_and_keeps_its_rounds(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-run: the process
    ends promptly with 130, leaves no Ray process behind and keeps every completed round."""
    import json
    import os
    import signal
    import time

    from tinysites import TINY_RUN, make_sites

    sites = make_sites(tmp_path / "data", n_cases=2)
    config = tmp_path / "run.yaml"
    config.write_text("sites:\n" + "".join(f"  - {{name: {n}, data: {p}}}\n"
                                           for n, p in sites.items()) + "rounds: 50\n" + TINY_RUN)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fedscan", "simulate", "--config", str(config),
                             "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "summary.json").is_file() or not json.loads(
                (out / "summary.json").read_text() or "{}").get("rounds"):
            assert proc.poll() is None and time.monotonic() < deadline, "no round completed"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "fedscan: interrupted; outputs written so far are kept" in err
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert 1 <= len(rounds) < 50
    assert "Traceback" not in err, err[-2000:]  # dying Ray actors are not reported after Ctrl-C
    deadline = time.monotonic() + 10
    while left := _running_in_group(proc.pid):
        assert time.monotonic() < deadline, f"processes left in the run's group:\n{left}"
        time.sleep(0.5)


def _running_in_group(group: int) -> list[str]:
    """Processes of a process group still running. Zombies are already dead: reaping one that
    was orphaned is the job of PID 1, which in some containers never does it."""
    rows = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-g", str(group)],
                          capture_output=True, text=True).stdout.splitlines()
    return [row for row in rows if row.split()[1:2] != ["Z"]]
