"""What server and client put in Flower messages: the only place both sides agree on keys.

A train/evaluate message carries ``arrays`` (the global model) and ``config``: the server's
task config (model, preprocessing, training hyper-parameters) as JSON, never code. A reply
carries ``arrays`` (train only), ``metrics`` (aggregates over the site's cases, never per-case
values), ``site`` (the site's declared name, for the per-site report) and, in a train reply,
``privacy`` (the site's DP ledger after the round: ε, δ, σ, q, cumulative steps, status).

The model crosses the network once per round each way: a train message with
``evaluate-received`` set asks the site to first evaluate the model it received (the previous
round's aggregate) and to put those metrics in the reply's ``evaluation`` record, instead of a
separate evaluate message re-sending the same weights. Only the run's final model gets an
evaluate message of its own.

Privacy settings never travel from server to site: they are each hospital's own.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedscan.shared.config import Config, SiteConfig, parse_config

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
TASK_CONFIG = "task-config"
NUM_EXAMPLES = "num-examples"
#: Train metric: cases drawn this round (local steps taken x batch size).
SAMPLES = "samples"
#: ConfigRecord of a train reply with the site's privacy ledger (not a MetricRecord: its keys
#: differ between DP and non-DP sites, and Flower requires identical MetricRecord keys).
PRIVACY = "privacy"
#: Privacy ``status`` of a site that trained nothing this round (its budget is spent).
DECLINED = "declined"
#: Train config flag: evaluate the received model before training it.
EVALUATE_RECEIVED = "evaluate-received"
#: ConfigRecord of a train reply with the received model's validation metrics (a second
#: MetricRecord would break Flower's one-MetricRecord-per-reply aggregation).
EVALUATION = "evaluation"
#: Keys of a train reply's ``metrics`` record (the server rejects any other).
TRAIN_METRICS = ("loss", "steps", NUM_EXAMPLES, SAMPLES)
#: Records a reply may carry (the server rejects a reply with any other).
TRAIN_REPLY_RECORDS = (ARRAYS, METRICS, SITE, PRIVACY, EVALUATION)
EVALUATE_REPLY_RECORDS = (METRICS, SITE)


def task_config_json(cfg: Config) -> str:
    """The run config without sites, test sets and privacy: what every hospital needs to train.

    Privacy is stripped so the server can neither set nor loosen a hospital's guarantee.
    """
    data = cfg.to_dict()
    data["sites"], data["test_sets"] = [], []
    data["privacy"] = None
    return json.dumps(data)


def config_for_site(task_json: str, site: SiteConfig) -> Config:
    """Rebuild the run config on a hospital, with that hospital as the only site.

    Privacy comes only from the hospital's own ``site``; anything the server sent is dropped.
    """
    data = json.loads(task_json)
    data["sites"] = [dataclasses.asdict(site)]
    data["privacy"] = None
    return parse_config(data)


def site_record(name: str) -> ConfigRecord:
    return ConfigRecord({"name": name})


#: Longest site name a reply may declare (names are logged and recorded).
MAX_SITE_NAME = 128


def reply_site(msg: Message) -> str:
    """The site name a reply declares (``node-<id>`` when it declares none, or none that is
    short printable text)."""
    record = msg.content.config_records.get(SITE) if msg.has_content() else None
    name = record.get("name") if record is not None else None
    if isinstance(name, str) and 0 < len(name) <= MAX_SITE_NAME and name.isprintable():
        return name
    return f"node-{msg.metadata.src_node_id}"


def reply_privacy(msg: Message) -> dict[str, int | float | str]:
    """The privacy fields a train reply declares (empty when it declares none)."""
    if PRIVACY not in msg.content.config_records:
        return {}
    return {k: v for k, v in msg.content.config_records[PRIVACY].items()
            if isinstance(v, (int, float, str))}


def reply_evaluation(msg: Message) -> dict[str, float] | None:
    """The validation metrics a train reply carries for the model it received, if any."""
    if EVALUATION not in msg.content.config_records:
        return None
    return {k: v for k, v in msg.content.config_records[EVALUATION].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def to_arrays(state_dict: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state_dict.items()})
