"""What a hospital accepts from the server: a task config within its own policy, no paths.

Every train and evaluate message carries the server's task config (JSON). Before the
ClientApp acts on it, :func:`accept_task`

1. refuses a task config that names a site-side path (``sites``, ``test_sets``,
   ``harmonisation.reference``): the server may not choose what a hospital reads. Such paths
   come from the site's own config (site.yaml; in simulation each virtual site's entry);
2. rebuilds the run config with this site as its only site and the site's own paths and
   privacy (:meth:`~fedscan.shared.messages.RoundConfig.site_config`);
3. enforces the site's :class:`~fedscan.shared.config.SitePolicy`: floors (batch size,
   local steps) and caps (rounds, patch voxels) are refused, local steps above the cap are
   clamped (doing less work is always safe; the reply's ``steps`` says what was done);
4. appends the decision to ``STATE_DIR/audit.log`` with the sha256 of the canonical task
   config JSON, once per message (so per round and phase).

A refusal raises :class:`PolicyRefused`; the ClientApp's error mod
(``client/error_replies.py``) then sends the server ``policy-refused`` and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from flwr.app import Message, MessageType

from fedscan.client.audit import audit
from fedscan.shared.config import Config, SiteConfig, SitePolicy
from fedscan.shared.data import read_site
from fedscan.shared.errors import ConfigError, FedscanError
from fedscan.shared.messages import CONFIG, SITE_ONLY_KEYS, RoundConfig

#: Task-config keys the server never sends: the site's own data, test sets, privacy and paths.
PATH_KEYS = (*SITE_ONLY_KEYS, "harmonisation.reference")


class PolicyRefused(FedscanError):
    """The server's task config is outside this site's policy (or names a site path)."""


def task_config_hash(task_json: str) -> str:
    """sha256 of the canonical task config (keys sorted, no whitespace); of the raw text if it
    is not JSON."""
    try:
        canonical = json.dumps(json.loads(task_json), sort_keys=True, separators=(",", ":"))
    except ValueError:
        canonical = task_json
    return hashlib.sha256(canonical.encode()).hexdigest()


def _server_paths(data: dict[str, Any]) -> list[str]:
    """The keys of a received task config that only the site sets (should be none)."""
    found = [key for key in SITE_ONLY_KEYS if key in data]
    harmonisation = data.get("harmonisation")
    if isinstance(harmonisation, dict) and harmonisation.get("reference") is not None:
        found.append("harmonisation.reference")
    return found


def enforce_policy(cfg: Config, policy: SitePolicy, server_round: int,
                   num_train_cases: Callable[[], int]) -> dict[str, list[int]]:
    """Check ``cfg`` against ``policy``; clamp local steps to the cap in place.

    Args:
        cfg: the run config as this site will run it (changed in place when clamped).
        policy: the site's limits.
        server_round: the round the server says this is.
        num_train_cases: the site's training cases (read only when ``train.local_epochs``
            decides the steps).

    Returns:
        What was clamped: ``{"local_steps": [asked, used]}`` or empty.

    Raises:
        PolicyRefused: every limit the config breaks, in one line.
    """
    refused = []
    if policy.max_rounds is not None:
        if cfg.rounds > policy.max_rounds:
            refused.append(f"rounds {cfg.rounds} > policy.max_rounds {policy.max_rounds}")
        if server_round > policy.max_rounds:
            refused.append(f"server round {server_round} > policy.max_rounds "
                           f"{policy.max_rounds}")
    if policy.min_batch_size is not None and cfg.train.batch_size < policy.min_batch_size:
        refused.append(f"train.batch_size {cfg.train.batch_size} < policy.min_batch_size "
                       f"{policy.min_batch_size}")
    voxels = math.prod(cfg.train.patch_size)
    if policy.max_patch_voxels is not None and voxels > policy.max_patch_voxels:
        refused.append(f"train.patch_size {cfg.train.patch_size} ({voxels} voxels) > "
                       f"policy.max_patch_voxels {policy.max_patch_voxels}")
    needs_cases = cfg.train.local_epochs and (policy.min_local_steps or policy.max_local_steps)
    steps = cfg.steps_per_round(num_train_cases() if needs_cases else 0)
    if policy.min_local_steps is not None and steps < policy.min_local_steps:
        refused.append(f"{steps} local steps per round < policy.min_local_steps "
                       f"{policy.min_local_steps}")
    if refused:
        raise PolicyRefused("; ".join(refused))
    if policy.max_local_steps is not None and steps > policy.max_local_steps:
        cfg.train.local_steps, cfg.train.local_epochs = policy.max_local_steps, None
        return {"local_steps": [steps, policy.max_local_steps]}
    return {}


def accept_task(msg: Message, site: SiteConfig) -> tuple[Config, RoundConfig]:
    """The run config this site trains or evaluates with, from a train/evaluate message.

    Returns:
        The run config (this site its only site) and the decoded message config.

    Raises:
        PolicyRefused: the task config names a site path or breaks the site's policy.
        FedscanError: another message schema version, or a malformed message config.
        ConfigError: the task config is not a valid fedscan run config.
        DataError: the site's dataset.json is unreadable (only read for ``local_epochs``).
    """
    instruction = RoundConfig.from_record(msg.content[CONFIG])
    task_json = instruction.task_config
    server_round = instruction.server_round
    where = {"sha256": task_config_hash(task_json), "run_id": msg.metadata.run_id,
             "round": server_round, "phase": msg.metadata.message_type}
    try:
        try:
            data = json.loads(task_json)
        except ValueError:
            raise ConfigError("the server's task config is not JSON") from None
        if not isinstance(data, dict):
            raise ConfigError("the server's task config is not a JSON object")
        paths = _server_paths(data)
        if paths:
            raise PolicyRefused(f"the server's task config names what only this site sets "
                                f"({', '.join(paths)}); this site reads only what its own "
                                "config names")
        if isinstance(data.get("harmonisation"), dict):
            data["harmonisation"]["reference"] = site.harmonisation_reference
        cfg = dataclasses.replace(instruction, task_config=json.dumps(data)).site_config(site)
        if (cfg.task == "harmonisation" and site.harmonisation_reference is None
                and msg.metadata.message_type == MessageType.TRAIN):
            raise ConfigError("the harmonisation task trains against a public reference "
                              "folder: set harmonisation_reference in this site's config "
                              "(site.yaml; in simulation harmonisation.reference)")
        clamped = enforce_policy(cfg, site.policy, server_round,
                                 lambda: len(read_site(site, cfg.data, check=False).train))
    except FedscanError as exc:
        # The console line and site.log entry come from the error mod, which also replies.
        audit(site.state_dir, "task-refused", echo=False, reason=str(exc), **where)
        raise
    audit(site.state_dir, "task-accepted", echo=False, clamped=clamped, **where)
    if clamped:
        asked, used = clamped["local_steps"]
        print(f"[{site.name}] round {server_round}: {asked} local steps asked, {used} run "
              "(policy.max_local_steps)", flush=True)
    return cfg, instruction
