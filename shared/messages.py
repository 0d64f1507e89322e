"""What server and client put in Flower messages: the only place both sides agree on keys.

A train/evaluate message carries ``arrays`` (the global model) and ``config``: one versioned
:class:`RoundConfig` (the server's task config, model, preprocessing and training
hyper-parameters as JSON, never code; the round; FedProx's μ; whether to evaluate the received
model), encoded and decoded only here. A site that reads another schema version refuses the
message with a one-line error instead of guessing.

A reply carries ``arrays`` (train only), ``metrics`` (aggregates over the site's cases, never
per-case values), ``site`` (the site's declared name, for the per-site report) and, in a train
reply, ``privacy`` (the site's DP ledger after the round: ε, δ, σ, q, cumulative steps,
status).

The model crosses the network once per round each way: a train message with
``evaluate-received`` set asks the site to first evaluate the model it received (the previous
round's aggregate) and to put those metrics in the reply's ``evaluation`` record, instead of a
separate evaluate message re-sending the same weights. Only the run's final model gets an
evaluate message of its own.

Privacy settings never travel from server to site: they are each hospital's own (the server
leaves them out, a site refuses a config that carries them).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedscan.shared.config import Config, SiteConfig, parse_config
from fedscan.shared.errors import FedscanError

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
#: Query config key ``ask``: what the server asks a node (``site``: its name;
#: :data:`DATA_STATS`: its data statistics before round 1).
ASK = "ask"
#: ConfigRecord of a query reply with the site's aggregate data statistics
#: (:class:`~fedscan.shared.data_stats.SiteStats`).
DATA_STATS = "data-stats"
#: ConfigRecord of a query reply whose site keeps its statistics: ``reason`` is
#: ``policy`` (the site's policy) or ``few-cases`` (fewer cases than its smallest group).
DATA_STATS_WITHHELD = "data-stats-withheld"
#: Keys of a train reply's ``metrics`` record (the server rejects any other).
TRAIN_METRICS = ("loss", "steps", NUM_EXAMPLES, SAMPLES)
#: Records a reply may carry (the server rejects a reply with any other).
TRAIN_REPLY_RECORDS = (ARRAYS, METRICS, SITE, PRIVACY, EVALUATION)
EVALUATE_REPLY_RECORDS = (METRICS, SITE)
#: Cross-site evaluation's action: ``train.cross_site`` asks a site to fine-tune the final
#: global model and send it back (its local model; only if its policy shares it);
#: ``evaluate.cross_site`` carries several models, each an ArrayRecord named
#: ``model:<name>``, and the reply one MetricRecord of aggregate metrics under each name.
CROSS_SITE_ACTION = "cross_site"
CROSS_SITE_TRAIN = f"train.{CROSS_SITE_ACTION}"
CROSS_SITE_EVALUATE = f"evaluate.{CROSS_SITE_ACTION}"
MODEL_PREFIX = "model:"




def message_bytes(msg: Message) -> int:
    """Bytes of a message's serialized objects: what its receiver pulls over the network
    (apart from HTTP framing). The server counts each round with it, each site its replies."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


#: The version of :class:`RoundConfig`; bump it when its meaning changes.
SCHEMA_VERSION = 2
SCHEMA = "schema-version"
#: The run's id (32 hex digits, the same after a resume): where a site keeps the run's local
#: weights. Empty in messages outside a run's rounds (the data check).
RUN_UID = "run-uid"
_RUN_UID_PATTERN = re.compile(r"[0-9a-f]{32}")
#: Flower's FedAvg (and every strategy built on it) sets this key in the config it sends.
SERVER_ROUND = "server-round"
#: Flower's FedProx sets this key to its μ.
PROXIMAL_MU = "proximal-mu"
#: Run-config keys that never travel to a site: its data, the server's test sets, and
#: privacy, which is each hospital's own.
SITE_ONLY_KEYS = ("sites", "test_sets", "privacy")
#: Run-config keys for the server's side only: not sent to sites. ``strategy`` is how the
#: server samples and aggregates (FedProx's mu travels as its own field); its checks that
#: count the federation's sites would fail on a site, which sees itself as the only one.
SERVER_ONLY_KEYS = ("tracking", "consortium", "simulation", "strategy", "cross_site")


class SchemaMismatch(FedscanError):
    """A message config of another schema version than this fedscan reads."""


@dataclass(frozen=True)
class RoundConfig:
    """What the server sends a site with each train or evaluate message (the ``config``).

    Attributes:
        task_config: the run config without :data:`SITE_ONLY_KEYS`, as JSON.
        server_round: the round (Flower's strategies set it).
        proximal_mu: FedProx's μ (Flower's FedProx sets it; 0 otherwise).
        evaluate_received: train messages: evaluate the received model (the previous
            round's aggregate) on the site's validation cases before training it.
        run_uid: the run's id (:data:`RUN_UID`), "" when none.
        schema_version: :data:`SCHEMA_VERSION` of the sender.
    """

    task_config: str
    server_round: int = 0
    proximal_mu: float = 0.0
    evaluate_received: bool = False
    run_uid: str = ""
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def for_run(cls, cfg: Config, run_uid: str = "") -> RoundConfig:
        """The config of a run's messages: what stays at the sites (their data, privacy) is
        left out, and no path travels (``harmonisation.reference`` comes from each site's
        own config), so the server can neither loosen a guarantee nor choose what a site
        reads."""
        data = {k: v for k, v in cfg.to_dict().items()
                if k not in SITE_ONLY_KEYS and k not in SERVER_ONLY_KEYS}
        data["harmonisation"]["reference"] = None
        return cls(task_config=json.dumps(data), run_uid=run_uid)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({SCHEMA: self.schema_version, TASK_CONFIG: self.task_config,
                             SERVER_ROUND: self.server_round, PROXIMAL_MU: self.proximal_mu,
                             EVALUATE_RECEIVED: self.evaluate_received, RUN_UID: self.run_uid})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        """Decode a message's config (keys Flower's strategies add included).

        Raises:
            FedscanError: another schema version, or a field missing or of the wrong type.
        """
        version = record.get(SCHEMA)
        if version != SCHEMA_VERSION:
            raise SchemaMismatch(f"the server sent message schema {version!r}; this site's "
                               f"fedscan reads schema {SCHEMA_VERSION} (install the "
                               "consortium's fedscan version)")
        try:
            out = cls(task_config=_typed(record, TASK_CONFIG, str),
                      server_round=_typed(record, SERVER_ROUND, int, 0),
                      proximal_mu=float(_typed(record, PROXIMAL_MU, (int, float), 0.0)),
                      evaluate_received=_typed(record, EVALUATE_RECEIVED, bool, False),
                      run_uid=_typed(record, RUN_UID, str, ""))
        except (KeyError, TypeError) as exc:
            raise FedscanError(f"message config: {exc.args[0]}") from None
        # A site names a file after it: nothing but an id may pass.
        if out.run_uid and not _RUN_UID_PATTERN.fullmatch(out.run_uid):
            raise FedscanError(f"message config: {RUN_UID!r} is not 32 hex digits")
        return out

    def site_config(self, site: SiteConfig) -> Config:
        """The run config on a hospital, with that hospital as the only site.

        Raises:
            FedscanError: the task config is not a JSON object or carries a key that only
                the site sets (its data folder, privacy).
            ConfigError: a config key is invalid, named.
        """
        try:
            data = json.loads(self.task_config)
        except json.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise FedscanError("message config: the task config is not a JSON object")
        sent = [k for k in SITE_ONLY_KEYS if k in data]
        if sent:
            raise FedscanError(f"message config: the server sent {sent[0]!r}, which only the "
                               "site sets")
        return parse_config({**data, "sites": [dataclasses.asdict(site)]})


def _typed(record: ConfigRecord, key: str, kind: type | tuple[type, ...],
           default: object = KeyError) -> object:
    """``record[key]`` if it has type ``kind``; ``default`` when absent (KeyError if none)."""
    if key not in record:
        if default is KeyError:
            raise KeyError(f"{key!r} is missing")
        return default
    value = record[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise TypeError(f"{key!r} has type {type(value).__name__}")
    return value


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
