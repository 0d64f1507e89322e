"""The one progress display of a federated run: a rounds bar with each site's state inside.

The bar counts completed rounds; its text shows the round in flight, what each site is doing
in it (training, done, error; evaluating in the final evaluation) as the live status sees the
replies arrive, and the latest known value of the task's headline metric. Sites' own step
lines stay on their consoles and in their logs, so nothing else writes between the bar's
redraws.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

#: Sites named one by one on the bar; above this, counts per state.
MAX_NAMED = 8

#: What a site's live status means on the bar, per phase.
_WORDS = {"train": {"waiting": "training", "replied": "done", "error": "error"},
          "final_evaluate": {"waiting": "evaluating", "replied": "done", "error": "error"}}


class RoundProgress:
    """A tqdm bar over rounds; ``sites_changed`` redraws it from the live state.

    Args:
        total: rounds the run is configured for.
        first: the first round this process runs (after a resume, rounds before it are done).
        sites: site names in config order (the order they are shown in).
    """

    def __init__(self, total: int, first: int, sites: Sequence[str]) -> None:
        self.sites = list(sites)
        self.bar = tqdm(total=total, initial=first - 1, desc="federated rounds", unit="round",
                        dynamic_ncols=True)
        self._metric = ""
        self._round = ""

    def sites_changed(self, state: dict[str, Any]) -> None:
        """Show what each site does in the round in flight (a live.json state)."""
        phase, rnd = state.get("phase"), state.get("round")
        if phase not in _WORDS or rnd is None:
            self._round = ""
        else:
            words = _WORDS[phase]
            status = {e["site"]: e["status"] for e in state.get("nodes", {}).values()
                      if e.get("site") and e.get("status")}
            named = [f"{s} {words.get(status[s], status[s])}" for s in self.sites if s in status]
            unnamed = sum(1 for e in state.get("nodes", {}).values()
                          if e.get("status") == "waiting" and not e.get("site"))
            if len(named) > MAX_NAMED:  # a large federation: counts, not a line of names
                counts = Counter(words.get(st, st) for s, st in status.items()
                                 if s in set(self.sites))
                named = [f"{n} {word}" for word, n in sorted(counts.items())]
            if unnamed:  # simulation nodes are named by their first reply
                named.append(f"{unnamed} waiting")
            label = "final evaluation" if phase == "final_evaluate" else f"round {rnd}"
            self._round = f"{label}: {', '.join(named)}" if named else label
        self._draw()

    def metric(self, text: str) -> None:
        """Show the latest known headline value (e.g. ``dice 0.812 (round 2 model)``)."""
        self._metric = text
        self._draw()

    def round_done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self._round = ""
        self._draw()
        self.bar.close()

    def _draw(self) -> None:
        self.bar.set_postfix_str(" | ".join(p for p in (self._round, self._metric) if p))
