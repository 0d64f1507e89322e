"""``fedscan bench attacks``: one dishonest hospital among four, against the default strategy.

Four phantom hospitals (the default three and a fourth scanner, ``site-d``) train the default
federation; in each run but the honest one, ``site-d`` runs the fedscan ClientApp behind an
adversary — a Flower ClientApp mod that rewrites its honest replies:

- ``claims-1e9-examples``: every train reply claims 10^9 training cases (``num-examples``);
- ``nan-samples``: every train reply sends NaN ``samples``;
- ``flip-5x``: every update is sign-flipped and scaled to 5x its honest norm
  (``sent - 5 * (trained - sent)``);
- ``dice-1e9``: every evaluation it reports says Dice 1e9.

The product config has no attack keys: the adversary is chosen here, and only here. Each row
of the table: the global model's final Dice (on the server's held-out scanner, which the
adversary cannot touch, and the mean over the three honest sites' own validation), its
difference from the honest run, and what the server recorded about ``site-d``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, Context, Message, MessageType

from fedscan.shared.config import Config
from fedscan.shared.messages import (
    ARRAYS,
    EVALUATION,
    METRICS,
    NUM_EXAMPLES,
    SAMPLES,
)
from fedscan.simulations.phantoms import ScannerProfile

#: The attacks, in table order (see the module docstring).
ATTACKS = ("claims-1e9-examples", "nan-samples", "flip-5x", "dice-1e9")
#: The dishonest hospital: a fourth scanner (LIA orientation, anisotropic voxels, its own
#: contrast, bias field, noise and int16 range), generated next to the default phantoms.
ADVERSARY = "site-d"
ADVERSARY_PROFILE = ScannerProfile("site-d", "LIA", (4.5, 4.0, 3.5), gamma=0.8,
                                   bias_strength=0.3, noise_std=0.05, scale=2000.0,
                                   dtype="int16")
ADVERSARY_CASES, ADVERSARY_VALIDATION = 100, 8
#: Rounds of each run: the whole benchmark (five runs) in about 15 minutes on 2 cores.
ROUNDS = 4
#: How far the attacked runs' final Dice may fall from the honest run's.
TOLERANCE = 0.02

#: (server round, train message?) -> the attack on that reply, or None (honest).
Schedule = Callable[[int, bool], str | None]


def _flip(sent: ArrayRecord, trained: ArrayRecord, factor: float) -> ArrayRecord:
    out = {}
    for key, array in trained.items():
        values = array.numpy()
        if values.dtype.kind == "f":
            base = sent[key].numpy()
            values = (base - factor * (values - base)).astype(values.dtype)
        out[key] = torch.from_numpy(np.ascontiguousarray(values))
    return ArrayRecord(out)


def tamper(attack: str, msg: Message, reply: Message) -> None:
    """Rewrite an honest ``reply`` to ``msg`` as ``attack`` says (in place)."""
    content = reply.content
    train = msg.metadata.message_type == MessageType.TRAIN
    if attack == "claims-1e9-examples" and train:
        content[METRICS][NUM_EXAMPLES] = 10**9
    elif attack == "nan-samples" and train:
        content[METRICS][SAMPLES] = float("nan")
    elif attack == "flip-5x" and train:
        content[ARRAYS] = _flip(msg.content[ARRAYS], content[ARRAYS], 5.0)
    elif attack == "dice-1e9":
        if train and EVALUATION in content:
            content[EVALUATION]["dice"] = 1e9
        elif not train:
            content[METRICS]["dice"] = 1e9


def adversary(schedule: Schedule, partition: int):
    """A ClientApp mod: the virtual hospital ``partition`` tampers with its replies.

    Args:
        schedule: (server round, train message?) -> the attack on that reply (None: an
            honest reply); the final evaluation's round is the last round.
        partition: Flower's ``partition-id`` of the dishonest hospital.
    """

    def mod(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
        reply = call_next(msg, context)
        if int(context.node_config["partition-id"]) != partition or reply.has_error():
            return reply
        train = msg.metadata.message_type == MessageType.TRAIN
        attack = schedule(int(msg.content["config"].get("server-round", 0)), train)
        if attack is not None:
            tamper(attack, msg, reply)
        return reply

    return mod


# -- the benchmark ---------------------------------------------------------------------------


def bench_config(rounds: int = ROUNDS) -> Config:
    """The default federation plus ``site-d`` (generated on first use), its held-out scanner
    as the server's test set, default strategy settings."""
    from fedscan.shared.config import parse_config
    from fedscan.simulations.phantoms import default_federation_root, generate_site
    from fedscan.simulations.run import with_phantom_sites

    data = with_phantom_sites({"rounds": rounds})
    folder = default_federation_root().parent / f"{ADVERSARY}-{default_federation_root().name}"
    generate_site(folder, ADVERSARY, ADVERSARY_PROFILE, ADVERSARY_CASES, ADVERSARY_VALIDATION)
    data["sites"].append({"name": ADVERSARY, "data": str(folder)})
    return parse_config(data)


def _row(attack: str, summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    final = summary["final"]
    per_site = final.get("per_site") or {}
    honest = [m.get("dice") for s, m in per_site.items() if s != ADVERSARY]
    honest = [d for d in honest if isinstance(d, (int, float))]
    heldout = (final.get("test_sets") or {}).get("heldout", {}).get("dice")
    recorded = []
    for r in summary["rounds"]:
        for kind in ("rejected", "adjusted"):
            for entry in r.get(kind) or []:
                if entry.get("site") == ADVERSARY:
                    recorded.append({"round": r["round"], "kind": kind, "phase": entry["phase"],
                                     "reason": entry["reason"]})
    norms = [[t.get("update_norm") for s, t in r["train"].items()
              if attack == "honest" or s != ADVERSARY] for r in summary["rounds"]]
    ratios = [max(n) / min(n) for n in norms if n and all(isinstance(x, float) for x in n)
              and min(n) > 0]
    return {"attack": attack, "heldout_dice": heldout,
            "honest_sites_dice": float(np.mean(honest)) if honest else None,
            "final_dice": final.get("dice"), "recorded": recorded,
            "rounds_recorded": sorted({e["round"] for e in recorded}),
            "honest_norm_spread": max(ratios) if ratios else None,
            "seconds": round(seconds, 1)}


def attack_bench(out: Path, rounds: int = ROUNDS, attacks: Sequence[str] = ATTACKS
                 ) -> list[dict[str, Any]]:
    """Run the honest federation and one run per attack into ``out/<attack>/``.

    Returns:
        One row per run (see :func:`format_attacks`); also written to ``out/attacks.yaml``.
    """
    from fedscan.simulations.federated import run_federated
    from fedscan.simulations.run import check_data, quiet_flower

    quiet_flower()
    cfg = bench_config(rounds)
    check_data(cfg)
    partition = [s.name for s in cfg.sites].index(ADVERSARY)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for attack in ("honest", *attacks):
        target = out / attack
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        mods = [] if attack == "honest" else [adversary(lambda _r, _t, a=attack: a, partition)]
        print(f"== {attack}: {len(cfg.sites)} sites ({ADVERSARY} "
              f"{'honest' if attack == 'honest' else 'dishonest'}), {rounds} rounds -> "
              f"{target}", flush=True)
        started = time.time()
        summary = run_federated(cfg, target, client_mods=mods)
        rows.append(_row(attack, summary, time.time() - started))
    reference = rows[0]
    for row in rows:
        for key in ("heldout_dice", "honest_sites_dice"):
            a, b = row[key], reference[key]
            row[f"{key}_delta"] = a - b if a is not None and b is not None else None
        deltas = [abs(row[k]) for k in ("heldout_dice_delta", "honest_sites_dice_delta")
                  if row[k] is not None]
        row["within_tolerance"] = bool(deltas) and max(deltas) <= TOLERANCE
    (out / "attacks.yaml").write_text(yaml.safe_dump(rows, sort_keys=False))
    (out / "attacks.md").write_text(format_attacks(rows, markdown=True) + "\n")
    return rows


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _what(row: dict[str, Any]) -> str:
    if row["attack"] == "honest":
        return "nothing recorded against site-d" if not row["recorded"] else \
            f"{len(row['recorded'])} entries against site-d (honest run!)"
    if not row["recorded"]:
        return "NOTHING RECORDED"
    first = row["recorded"][0]
    kinds = sorted({e["kind"] for e in row["recorded"]})
    return (f"{'/'.join(kinds)} in rounds {row['rounds_recorded']}: "
            f"{first['phase']}: {first['reason']}")


def format_attacks(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The attack table as plain text (or Markdown)."""
    header = ["attack", "held-out Dice", "Δ", "honest sites' Dice", "Δ", "within 0.02",
              "seconds", "what summary.json records about site-d"]
    body = [[r["attack"], _cell(r["heldout_dice"]), _cell(r["heldout_dice_delta"], True),
             _cell(r["honest_sites_dice"]), _cell(r["honest_sites_dice_delta"], True),
             "yes" if r["within_tolerance"] else "NO", f"{r['seconds']:.0f}", _what(r)]
            for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    else:
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in
                  enumerate(header[:-1])]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header[:-1], widths, strict=True))
                 + "  " + header[-1]]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True))
                  + "  " + row[-1] for row in body]
    spreads = [r["honest_norm_spread"] for r in rows if r["honest_norm_spread"]]
    if spreads:
        lines += ["", f"largest ratio between two honest sites' update norms in any round: "
                      f"{max(spreads):.2f} (strategy.max_norm_ratio rejects above 3x the "
                      "others' median)"]
    return "\n".join(lines)
