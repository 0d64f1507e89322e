"""ClientApp: a hospital trains and evaluates the global model on its own data only.

Only weights and aggregate metrics leave the site: never images, labels, file names or
per-case values, on failure neither (:mod:`fedscan.client.error_replies`). The server's task
config is accepted only within the site's policy and names no site path
(:mod:`fedscan.client.task_policy`). With a ``privacy`` block in the site's own config,
training is DP-SGD (:mod:`fedscan.client.privacy`) and the site enforces its ε budget itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedscan.client.data_stats_reply import answer_data_query
from fedscan.client.error_replies import make_error_mod
from fedscan.client.privacy import (
    load_ledger,
    privacy_off_record,
    save_ledger,
    train_private,
)
from fedscan.client.sent_log import make_sent_log_mod
from fedscan.client.site_log import say
from fedscan.client.task_policy import PolicyRefused, accept_task
from fedscan.shared.checkpoint import SITE_MODEL, save_model
from fedscan.shared.config import Config, SiteConfig, effective_privacy
from fedscan.shared.console import configure_console
from fedscan.shared.data import SiteData, read_site, site_data_config
from fedscan.shared.errors import FedscanError
from fedscan.shared.messages import (
    ARRAYS,
    ASK,
    CONFIG,
    CROSS_SITE_ACTION,
    CROSS_SITE_TRAIN,
    DATA_STATS,
    EVALUATION,
    METRICS,
    MODEL_PREFIX,
    NUM_EXAMPLES,
    PRIVACY,
    SAMPLES,
    SITE,
    site_record,
    to_arrays,
)
from fedscan.shared.tasks import build_task
from fedscan.shared.tasks.base import EvalResult, Task, resolve_device
from fedscan.shared.tasks.loop import train_steps

#: How a ClientApp finds out which hospital it is (simulation: partition id; deployment: its
#: own site config file).
SiteResolver = Callable[[Context], SiteConfig]


def _site_data(cfg: Config, site: SiteConfig) -> tuple[Config, SiteData]:
    """The site's data and the config it trains with (its dataset.json's left/right
    declaration where the server's config has none)."""
    # The data contract was checked in full before the run; here only dataset.json is read.
    data = read_site(site, cfg.data, check=False)
    return dataclasses.replace(cfg, data=site_data_config(cfg.data, data)), data


#: ``context.state`` key of the weights that never leave the site (``Task.shared_keys``'
#: complement: a CycleGAN's discriminators, FedBN's normalisation layers).
LOCAL_WEIGHTS = "local-weights"


#: Folder of ``state_dir`` holding each run's local weights, one file per run id, so that a
#: restarted site (or a resumed simulation) continues with them.
LOCAL_WEIGHTS_DIR = "local-weights"


def _local_file(site: SiteConfig, run_uid: str) -> Path | None:
    """Where the site keeps this run's local weights across restarts (its own state folder;
    a resumed run has the same id, another run never reads them), or None without either.
    ``run_uid`` was checked to be 32 hex digits when the message was decoded."""
    if site.state_dir is None or not run_uid:
        return None
    return Path(site.state_dir) / LOCAL_WEIGHTS_DIR / f"{run_uid}.pt"


def _load_global(cfg: Config, msg: Message, context: Context, allow_task_import: bool = False,
                 local_file: Path | None = None) -> tuple[torch.nn.Module, Task]:
    """The task and its model: the received global weights plus this site's local ones.

    Raises:
        FedscanError: the received arrays are not exactly the weights the task shares, or
            the task is not a built-in one (unless ``allow_task_import``: simulation only).
    """
    return _load_model(cfg, msg.content[ARRAYS], context, allow_task_import, local_file)


def _load_model(cfg: Config, arrays: ArrayRecord, context: Context,
                allow_task_import: bool = False, local_file: Path | None = None
                ) -> tuple[torch.nn.Module, Task]:
    """The task and its model: ``arrays`` (the weights the task shares) plus this site's
    local ones, from the context state, else from ``local_file`` after a restart (see
    :func:`_load_global`)."""
    task = build_task(cfg, allow_import=allow_task_import)
    model = task.build_model()
    received = arrays.to_torch_state_dict()
    shared = set(task.shared_keys(model))
    if set(received) != shared:
        odd = sorted(set(received) ^ shared)
        raise FedscanError(f"received {len(received)} arrays but the {task.name} task shares "
                           f"{len(shared)}; mismatched keys: {', '.join(odd[:3])}"
                           f"{' ...' if len(odd) > 3 else ''}")
    state = model.state_dict()
    state.update(received)
    if LOCAL_WEIGHTS in context.state.array_records:  # kept from this site's earlier rounds
        state.update(context.state.array_records[LOCAL_WEIGHTS].to_torch_state_dict())
    elif local_file is not None and local_file.is_file():  # a restart: this run's, on disk
        local = _read_local(local_file, set(state) - shared)
        context.state[LOCAL_WEIGHTS] = to_arrays(local)  # read once per process
        state.update(local)
    model.load_state_dict(state)
    return model.to(resolve_device(cfg.device)), task


def _read_local(path: Path, keys: set[str]) -> dict[str, torch.Tensor]:
    try:
        local = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one error line
        raise FedscanError(f"{path}: this run's local weights are unreadable "
                           f"({type(exc).__name__})") from None
    if not isinstance(local, dict) or set(local) != keys:
        raise FedscanError(f"{path}: this run's local weights do not fit its model")
    return local


def _keep_local(context: Context, weights: dict[str, torch.Tensor], shared: set[str],
                local_file: Path | None = None) -> None:
    local = {k: v for k, v in weights.items() if k not in shared}
    if not local:
        return
    context.state[LOCAL_WEIGHTS] = to_arrays(local)
    if local_file is not None:
        local_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_file.with_suffix(".tmp")
        torch.save({k: v.detach().cpu() for k, v in local.items()}, tmp)
        tmp.replace(local_file)  # atomic: a crash leaves the previous round's file


def site_round_seed(seed: int, site: str, server_round: int) -> int:
    """The seed of one site's training in one round: its own per site (two sites never draw
    the same patches and augmentations) and the same in every process and after a resume
    (SHA-256, not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}/{site}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


def train(msg: Message, context: Context, site: SiteConfig,
          allow_task_import: bool = False, echo: bool = True,
          replayable: bool = False) -> Message:
    """Train the received global model for the configured local steps (DP-SGD if the site
    has a privacy setting); progress goes to the site's log and, with ``echo``, its console.

    Without DP, a site-round's training is a function of the received model and
    :func:`site_round_seed`. With DP, sampling and noise come from OS entropy unless
    ``replayable`` (simulations only: see :mod:`fedscan.client.privacy`)."""
    # No server paths, within the site's policy, audited; the message config decoded once.
    cfg, instruction = accept_task(msg, site)
    server_round = instruction.server_round
    cfg, data = _site_data(cfg, site)
    local_file = _local_file(site, instruction.run_uid)
    model, task = _load_global(cfg, msg, context, allow_task_import, local_file)
    evaluation = None
    if instruction.evaluate_received:
        # The previous round's model, evaluated here instead of in an evaluate message that
        # would download the same weights a second time.
        evaluation = _evaluation_record(task.evaluate(model, data.validation))
    seed = site_round_seed(cfg.seed, site.name, server_round)
    torch.manual_seed(seed)
    mu = instruction.proximal_mu
    steps = cfg.steps_per_round(len(data.train))
    every = max(1, steps // 4)

    fine_tune = msg.metadata.message_type == CROSS_SITE_TRAIN
    what = "cross-site fine-tuning" if fine_tune else f"round {server_round}"

    def on_step(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            say(site, f"[{site.name}] {what} step {step}/{total} loss {loss:.4f}", echo)

    privacy = effective_privacy(site.privacy)
    if privacy is None:
        loader = task.make_train_loader(data.train, seed=seed)
        optimizer = task.make_optimizer(model.parameters())
        result = train_steps(task, model, optimizer, loader, steps, proximal_mu=mu,
                             on_step=on_step)
        weights = model.state_dict()
        loss, taken, examples = result.loss, result.steps, result.num_examples
        privacy_record = privacy_off_record()
    else:
        ledger = load_ledger(privacy, context.state, site.state_dir)
        try:
            done = train_private(task, cfg, model, data.train, ledger, proximal_mu=mu,
                                 on_step=on_step, replay_seed=seed if replayable else None)
        finally:
            # Saved even if training failed half-way: steps taken count, released or not.
            save_ledger(ledger, context.state, site.state_dir)
        privacy_record = ledger.record(done.status, done.result.steps if done.result else 0)
        say(site, f"[{site.name}] {what} privacy {done.status}: "
                  f"epsilon {privacy_record['epsilon']:.4f} of {privacy.epsilon:g} after "
                  f"{ledger.steps} steps (sigma {ledger.noise_multiplier:.4f}, "
                  f"q {ledger.sample_rate:.4f})", echo)
        if done.result is None:  # declined: the global model back, weight 0 in aggregation
            weights = msg.content[ARRAYS].to_torch_state_dict()
            loss, taken, examples = float("nan"), 0, 0
        else:
            weights = done.weights
            # The training loss is a function of the private cases that no DP mechanism
            # covers: it stays on the site's console and is not sent.
            loss, taken, examples = float("nan"), done.result.steps, done.result.num_examples
    shared = set(task.shared_keys(model))
    # Cross-site fine-tuning keeps the run's local weights as they were (its caller restores
    # the context state): the file is not rewritten.
    _keep_local(context, weights, shared, None if fine_tune else local_file)
    weights = {k: v for k, v in weights.items() if k in shared}
    metrics = MetricRecord({"loss": float(loss), "steps": int(taken),
                            NUM_EXAMPLES: int(examples),
                            SAMPLES: int(taken) * cfg.train.batch_size})
    content = RecordDict({ARRAYS: to_arrays(weights), METRICS: metrics,
                          SITE: site_record(site.name), PRIVACY: privacy_record})
    if evaluation is not None:
        content[EVALUATION] = evaluation
    return Message(content=content, reply_to=msg)


def _metric_values(result: EvalResult) -> dict[str, float | int]:
    values: dict[str, float | int] = {k: float(v) for k, v in result.metrics.items()}
    values[NUM_EXAMPLES] = int(result.num_examples)
    return values


def _evaluation_record(result: EvalResult) -> ConfigRecord:
    return ConfigRecord(_metric_values(result))


def evaluate(msg: Message, context: Context, site: SiteConfig,
             allow_task_import: bool = False, echo: bool = True) -> Message:
    """Evaluate the received global model on the site's validation cases."""
    cfg, instruction = accept_task(msg, site)
    cfg, data = _site_data(cfg, site)
    model, task = _load_global(cfg, msg, context, allow_task_import,
                               _local_file(site, instruction.run_uid))
    _save_site_model(cfg, site, model, task, instruction.server_round, echo)
    result = task.evaluate(model, data.validation)
    content = RecordDict({METRICS: MetricRecord(_metric_values(result)),
                          SITE: site_record(site.name)})
    return Message(content=content, reply_to=msg)


def fine_tune(msg: Message, context: Context, site: SiteConfig,
              allow_task_import: bool = False, echo: bool = True,
              replayable: bool = False) -> Message:
    """Cross-site evaluation, step 1: fine-tune the final global model on this site's data
    (the server's task config sets the steps) and send it back: this site's "local model".

    It is training like any round's: a DP site spends ε on it through its ledger, or
    declines when its budget cannot cover it. Weights the task keeps at the site (FedBN's
    norms) stay those of the federated model: the fine-tuned ones are not kept.

    Raises:
        PolicyRefused: the site's ``policy.share_local_model`` is false; it neither trains
            nor sends anything (the error mod replies ``policy-refused`` only).
    """
    if not site.policy.share_local_model:
        raise PolicyRefused("cross-site evaluation: this site does not share its local model "
                            "(policy.share_local_model: false)")
    kept = context.state.array_records.get(LOCAL_WEIGHTS)
    try:
        return train(msg, context, site, allow_task_import, echo, replayable)
    finally:
        if kept is not None:
            context.state[LOCAL_WEIGHTS] = kept
        elif LOCAL_WEIGHTS in context.state.array_records:
            del context.state[LOCAL_WEIGHTS]


def evaluate_models(msg: Message, context: Context, site: SiteConfig,
                    allow_task_import: bool = False) -> Message:
    """Cross-site evaluation, step 2: evaluate every model the message carries (ArrayRecords
    named ``model:<name>``) on this site's validation cases.

    The reply holds one MetricRecord per model, under the same name: the task's aggregate
    metrics and the case count, nothing per case.
    """
    cfg, instruction = accept_task(msg, site)
    cfg, data = _site_data(cfg, site)
    local_file = _local_file(site, instruction.run_uid)
    content = RecordDict({SITE: site_record(site.name)})
    for name, arrays in msg.content.array_records.items():
        if not name.startswith(MODEL_PREFIX):
            raise FedscanError(f"cross-site evaluation: unexpected record {name[:40]!r}")
        model, task = _load_model(cfg, arrays, context, allow_task_import, local_file)
        content[name] = MetricRecord(_metric_values(task.evaluate(model, data.validation)))
    return Message(content=content, reply_to=msg)


def _save_site_model(cfg: Config, site: SiteConfig, model: torch.nn.Module, task: Task,
                     server_round: int, echo: bool = True) -> None:
    """Write ``<state_dir>/site_model.pt``: the received model with this site's own weights.

    Only for tasks that keep weights at the site (a CycleGAN's curves and discriminators,
    FedBN's normalisation layers): the global ``final_model.pt`` lacks them, and the site
    needs them to apply the model to its own scans. The file never leaves the site.
    """
    state = model.state_dict()
    if site.state_dir is None or set(state) == set(task.shared_keys(model)):
        return
    path = save_model(Path(site.state_dir) / SITE_MODEL, config=cfg, state_dict=state,
                      meta={"site": site.name, "round": server_round})
    say(site, f"[{site.name}] saved this site's model to {path}", echo)


def make_client_app(resolve_site: SiteResolver, allow_task_import: bool = False,
                    echo: bool = True, replayable: bool = False,
                    outer_mods: tuple = ()) -> ClientApp:
    """A ClientApp whose handlers act for the site ``resolve_site`` names.

    Every handler runs inside the error mod: a failure reaches the server as a generic code
    only, the full error stays in the site's log; every reply is listed in the site's
    ``sent.log`` (:mod:`fedscan.client.sent_log`). ``allow_task_import`` lets it build a task
    the config names by import path: simulation only, where the researcher's code is on both
    sides; a deployed hospital runs built-in tasks only. ``echo``: progress lines on the
    console too (a simulation shows them only when verbose); they are in site.log anyway.
    ``replayable``: DP sampling and noise from the site-round seed instead of OS entropy
    (simulation only, for an exact resume; never in deployment). ``outer_mods``: Flower
    mods around all of it (a benchmark's timer).
    """
    # Outermost first: every reply, an error reply too, is recorded in the site's sent.log.
    app = ClientApp(mods=[*outer_mods, make_sent_log_mod(resolve_site),
                          make_error_mod(resolve_site)])

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        configure_console()  # this process's (a Ray worker's) console too: each line once
        return train(msg, context, resolve_site(context), allow_task_import, echo, replayable)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        configure_console()
        return evaluate(msg, context, resolve_site(context), allow_task_import, echo)

    @app.train(CROSS_SITE_ACTION)
    def _fine_tune(msg: Message, context: Context) -> Message:
        configure_console()
        return fine_tune(msg, context, resolve_site(context), allow_task_import, echo,
                         replayable)

    @app.evaluate(CROSS_SITE_ACTION)
    def _evaluate_models(msg: Message, context: Context) -> Message:
        configure_console()
        return evaluate_models(msg, context, resolve_site(context), allow_task_import)

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        question = msg.content.config_records.get(CONFIG)
        if question is not None and question.get(ASK) == DATA_STATS:
            # The data check before round 1: aggregate statistics, if the site's policy
            # allows (client/data_stats_reply.py).
            configure_console()
            return answer_data_query(msg, resolve_site(context), echo)
        # The server asks which site a node is (to sample sites by name): the name only,
        # which every other reply carries too.
        return Message(RecordDict({SITE: site_record(resolve_site(context).name)}),
                       reply_to=msg)

    return app


def _deployed_site(context: Context) -> SiteConfig:
    from fedscan.client.site_config import site_from_context  # deployment only

    return site_from_context(context)


#: The deployment entry point (``[tool.flwr.app.components] clientapp``): each hospital's
#: SuperNode names its site.yaml with ``--node-config site-config=...``.
app = make_client_app(_deployed_site)
