"""Config schema: typed dataclasses loaded from YAML, with errors that name the key path.

Every key a config may hold is declared here, with its default. Unknown keys and wrong types
raise :class:`ConfigError` naming the path (for example ``train.batch_size``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from fedscan.shared.errors import ConfigError
from fedscan.shared.tasks import check_task_name

MODES = ("federated", "local", "pooled")


@dataclass
class PrivacyConfig:
    """A hospital's DP-SGD guarantee: (ε, δ)-DP per training case over the whole run.

    ``epsilon: .inf`` in YAML means "no DP" (useful to exempt one site from a top-level block,
    and as the ε=∞ point of a benchmark). Without ``noise_multiplier`` the site calibrates σ
    with Opacus once, for ``rounds x steps per round x updates per step`` (a task phase, such
    as the CycleGAN's generator or discriminator update, is one update), and keeps it for
    the run. ``max_grad_norm`` 1.0 is Opacus' example value; the DP benchmark uses 0.5.
    """

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"
    noise_multiplier: float | None = None


@dataclass
class SitePolicy:
    """Limits a hospital puts on the task configs it accepts (``policy`` in site.yaml).

    The server cannot loosen them: a task config below a floor, or above a cap that cannot be
    met by doing less, is refused (``policy-refused``); local steps above the cap are clamped
    (the site trains fewer steps and reports how many). None: no limit.
    """

    #: Floor on ``train.batch_size``: an update averages at least this many cases per step.
    min_batch_size: int | None = None
    #: Floor on local steps per round: an update is never one or two cases' gradient.
    min_local_steps: int | None = None
    #: Cap on local steps per round (compute); more are clamped to it.
    max_local_steps: int | None = None
    #: Cap on the run's ``rounds`` and on any round number the server sends.
    max_rounds: int | None = None
    #: Cap on the voxels of one training patch (memory and compute per step).
    max_patch_voxels: int | None = None
    #: Answer the server's data check with aggregate statistics (docs/data_quality.md says
    #: what they reveal). None: yes without DP, no when the site trains with DP.
    share_data_stats: bool | None = None
    #: Smallest group of cases a shared count, histogram bin or category may describe.
    data_stats_min_cases: int = 5
    #: Cross-site evaluation: send this site's locally fine-tuned model (weights) to the
    #: server, which passes it to the other sites to evaluate. False: the site neither
    #: fine-tunes nor sends it (it still evaluates the others' models on its own data).
    share_local_model: bool = True


@dataclass
class SiteConfig:
    """One hospital: its name, its data folder (MSD layout, dataset.json inside), and
    optionally its own privacy setting, a state folder for what must outlive a process
    (the ε ledger, the audit log), its task policy and the site-side paths a task reads."""

    name: str
    data: str
    privacy: PrivacyConfig | None = None
    state_dir: str | None = None
    #: The site's limits on task configs (see :class:`SitePolicy`).
    policy: SitePolicy = field(default_factory=SitePolicy)
    #: The public reference-domain folder the harmonisation task reads here. A site path comes
    #: from the site's own config, never from the server's task config.
    harmonisation_reference: str | None = None
    #: Server side: the most cases (training or validation) this site may report, as the
    #: operator admitted it; a reply claiming more is rejected. None: not declared (the
    #: site's aggregation weight is then capped by ``strategy.max_weight_ratio``).
    max_examples: int | None = None
    #: Simulation only: the harmonisation study's paired truth, an MSD folder with the same
    #: case ids as ``data``, each image the case's anatomy through the reference scanner on
    #: the case's own grid. No training or evaluation a site runs reads it, and it never
    #: travels (the study scores against it on the researcher's machine).
    truth: str | None = None


@dataclass
class DataConfig:
    """Preprocessing every site applies, so all sites feed the model the same grid."""

    orientation: str = "RAS"
    spacing: list[float] = field(default_factory=lambda: [4.0, 4.0, 4.0])
    in_channels: int = 1
    num_classes: int = 2
    #: The consortium's class names by index, background first (``num_classes`` of them).
    #: Per-class metrics are named from them, and every site's dataset.json ``labels`` must
    #: name the same classes in the same order. Empty: ``class_1``, ``class_2``, ... (a
    #: simulation takes them from its sites' dataset.json when all agree).
    labels: list[str] = field(default_factory=list)
    #: The image channels by index (``in_channels`` of them); each site's dataset.json
    #: ``channel_names``/``modality`` must match. Empty: not checked.
    channel_names: list[str] = field(default_factory=list)
    #: Class pairs a left-right flip swaps (``[[1, 2]]``: left and right of one structure).
    #: None: not declared here (a site's dataset.json ``mirror_pairs`` may declare them).
    #: Nothing declared and not ``symmetric_labels``: no left-right flip in training.
    mirror_pairs: list[list[int]] | None = None
    #: The label set is left-right symmetric (no lateralised classes): flip without swapping.
    symmetric_labels: bool = False
    #: Intensity percentiles mapped to [0, 1] (robust to scanner gain and bright outliers).
    intensity_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    #: Fraction of cases held out for validation when dataset.json has no validation list.
    val_fraction: float = 0.2
    split_seed: int = 0


def class_names(data: DataConfig) -> list[str]:
    """Every class's name, background first: ``data.labels``, else ``background``,
    ``class_1``, ``class_2``, ..."""
    if data.labels:
        return list(data.labels)
    return ["background", *(f"class_{i}" for i in range(1, data.num_classes))]


@dataclass
class ModelConfig:
    """MONAI UNet; ``norm`` must be one Opacus accepts (instance or group)."""

    spatial_dims: int = 3
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 1
    norm: Literal["instance", "group"] = "instance"
    dropout: float = 0.0
    #: FedBN: the normalisation layers' weights stay at each site (in Flower's context
    #: state) and only the rest is federated, a cheap answer to scanner shift.
    local_norm: bool = False


@dataclass
class TrainConfig:
    """Local training: patch sampling, optimiser and how many steps per round."""

    patch_size: list[int] = field(default_factory=lambda: [32, 32, 32])
    batch_size: int = 2
    #: Optimiser steps each site runs per round (the federation's unit of work).
    local_steps: int = 50
    #: If set, overrides local_steps with this many passes over the site's training cases.
    local_epochs: int | None = None
    lr: float = 2e-3
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 0.0
    #: Fraction of patches centred on foreground (label > 0).
    pos_fraction: float = 0.5
    #: Split the foreground patches equally over the foreground classes (each class gets
    #: ``pos_fraction / (num_classes - 1)`` of the patch centres), so that small structures
    #: are seen as often as large ones. None: on when there is more than one foreground class.
    class_balanced: bool | None = None
    #: Segmentation: random contrast, bias field, gain, offset, blur and noise that imitate
    #: other scanners. Off trains a model of one scanner's images (the harmonisation study
    #: measures both).
    scanner_augmentation: bool = True
    #: Segmentation: put what unseen scanners put around the head into the training patches
    #: (a Rician noise floor, ghosts and hot spots in the background, never in the labels),
    #: so that background is not segmented as anatomy without post-processing.
    background_augmentation: bool = False
    num_workers: int = 0


@dataclass
class StrategyConfig:
    """Flower server strategy and its hyper-parameters."""

    name: Literal["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "multikrum",
                  "bulyan"] = "fedavg"
    #: Aggregation weight of a site's update: its training cases (``examples``, FedAvg's
    #: choice) or the cases it drew this round, local steps x batch size (``samples``), which
    #: is the same at every site that trains the same steps: each site then counts equally.
    weighted_by: Literal["examples", "samples"] = "examples"
    proximal_mu: float = 0.01
    eta: float = 1e-2
    eta_l: float = 1e-2
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    #: Sites a round waits for (Flower samples at least this many) and valid updates it needs
    #: to count. None: waits for all sites (the sampled ones, with sampling) and counts with
    #: valid updates from a majority of them.
    min_sites: int | None = None
    round_timeout: float = 3600.0
    #: fedtrimmedavg: fraction of values cut at each end, per coordinate.
    trim_beta: float = 0.2
    #: multikrum / bulyan: sites assumed dishonest (Bulyan needs 4 x this + 3 sites).
    num_malicious: int = 1
    #: multikrum: updates averaged (1 is Krum); None: the sites minus ``num_malicious``.
    num_selected: int | None = None
    #: A site's aggregation weight (``weighted_by``) is capped at this multiple of the round's
    #: median weight, unless the operator declared its ``max_examples`` (``.inf``: no cap).
    max_weight_ratio: float = 3.0
    #: An update whose distance to the global model exceeds this multiple of the median
    #: distance of the other sites' updates is rejected (``.inf``: never).
    max_norm_ratio: float = 3.0
    #: Every update is clipped to this distance from the global model before aggregation:
    #: ``median`` (the round's median update norm), a number (a fixed norm), or null (off).
    clip_norm: float | Literal["median"] | None = "median"
    #: Fraction of the online sites that train each round (Flower's ``fraction_train``):
    #: ``max(int(sites x fraction), min_sites)`` sites, drawn from ``seed`` and the round
    #: (server/sampling.py), so a rerun or a resumed run samples the same sites.
    fraction_train: float = 1.0
    #: Fraction of the sites that evaluate the final model (Flower's ``fraction_evaluate``).
    fraction_evaluate: float = 1.0


@dataclass
class EvaluateConfig:
    """Evaluation in each case's native grid (the grid a radiologist reads)."""

    hd95: bool = True
    sw_overlap: float = 0.25
    sw_batch_size: int = 4
    largest_component: bool = False


@dataclass
class TrackingConfig:
    """Experiment tracking of a run (the server's or researcher's side only; never sent).

    TensorBoard event files are written into ``RUN_DIR/tensorboard`` unless ``tensorboard``
    is false. With ``mlflow`` set (a tracking URI, e.g. ``sqlite:///runs/mlflow.db``), the
    run is also logged to MLflow: parameters, per-round metrics, the report and plots as
    artifacts, and the final model as a version of the registered model ``model_name``.
    """

    tensorboard: bool = True
    #: MLflow tracking (and registry) URI; None: no MLflow. Needs ``pip install fedscan[tracking]``.
    mlflow: str | None = None
    #: MLflow experiment the run is logged under.
    experiment: str = "fedscan"
    #: Registered model the final model becomes a version of (default: ``fedscan-<task>``).
    model_name: str | None = None


@dataclass
class HarmonisationConfig:
    """CycleGAN scanner harmonisation (``task: harmonisation``): site domain -> reference domain.

    The training-loop keys are shared with segmentation rather than repeated here, because the
    federation, DP and inference code read them for every task: ``model.spatial_dims`` (2D or
    3D networks), ``train.patch_size`` (training patches and inference windows),
    ``train.batch_size`` (and so the DP sampling rate), ``train.local_steps`` and
    ``train.num_workers``. The networks' own keys are below; the other ``model`` keys and
    ``train.lr``/``optimizer`` describe the segmentation UNet only.
    """

    #: Public reference-domain dataset (MSD folder; labels unused). Required to train, not to
    #: build, aggregate or apply a model. Relative to the config file like site folders.
    reference: str | None = None
    #: Generator UNet (both directions): channels per level and strides between levels.
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    strides: list[int] = field(default_factory=lambda: [2, 2])
    num_res_units: int = 1
    #: Generators predict a correction added to their input (identity at initialisation).
    residual: bool = True
    #: Segments of the generators' monotone intensity curve, kept at each site (0: none;
    #: needs residual).
    curve_knots: int = 32
    #: Normalisation in the generators and discriminators ("none" is Opacus-safe too).
    norm: Literal["instance", "group", "none"] = "instance"
    disc_norm: Literal["instance", "group", "none"] = "instance"
    #: PatchGAN discriminators: first-layer channels (doubled per layer) and conv layers.
    disc_channels: int = 16
    disc_layers: int = 2
    #: Adam learning rate (betas 0.5, 0.999 as in CycleGAN); the intensity curves learn
    #: ``CURVE_GAIN`` times faster (see ``IntensityCurve``).
    lr: float = 1e-3
    #: Weights of the cycle-consistency and identity L1 terms (adversarial weight is 1).
    #: Lower than CycleGAN's 10 and 5: a scanner's noise floor cannot be reconstructed once
    #: harmonised away, and an identity term on reference images holds the contrast curve at
    #: the identity, which is exactly what must change (measured in docs/harmonisation.md).
    lambda_cycle: float = 1.0
    lambda_identity: float = 0.0
    #: Decay of the moving average of the site-to-reference generator's weights that a site
    #: harmonises with (updated after every generator update; 0: use the last weights).
    average_decay: float = 0.99


@dataclass
class DataCheckConfig:
    """The federated data check before round 1 (docs/data_quality.md)."""

    enabled: bool = True
    #: ``warn``: print and record the flags, then train; ``stop``: refuse to start round 1.
    on_flag: Literal["warn", "stop"] = "warn"
    #: Most cases a site preprocesses for its statistics.
    max_cases: int = 24
    #: Jensen-Shannon distance of a site's intensity histogram to the others' above which
    #: it is flagged.
    max_js: float = 0.6
    #: Largest ratio of a site's median voxel size (geometric mean of the spacing) to the
    #: others'.
    max_spacing_ratio: float = 2.0
    #: Largest fraction of a site's cases with an empty label.
    max_empty_fraction: float = 0.2
    #: Largest ratio of a class's voxel fraction at a site to the others' (either way).
    max_class_ratio: float = 3.0


@dataclass
class SimulationConfig:
    """Where a simulation's virtual hospitals run (``fedscan simulate`` only).

    Without ``ray_address`` (and no ``RAY_ADDRESS`` in the environment) Ray starts on this
    machine and runs one virtual hospital at a time on all its cores (and its GPU, if any).
    With one, the simulation joins that Ray cluster and runs as many hospitals at once as the
    cluster's nodes have room for, ``cpus_per_site`` and ``gpus_per_site`` each.
    """

    #: An existing Ray cluster (``HOST:PORT`` of its head, or ``auto``); None: RAY_ADDRESS,
    #: else a local Ray.
    ray_address: str | None = None
    #: CPUs each virtual hospital's actor reserves (default: all cores locally, 1 on a cluster).
    cpus_per_site: float | None = None
    #: GPU fraction each virtual hospital reserves, e.g. 0.25 (default: 1 locally when
    #: ``device`` uses a GPU, 0 on a cluster).
    gpus_per_site: float | None = None


@dataclass
class ConsortiumConfig:
    """A simulated consortium's behaviour (``fedscan simulate`` only; see docs/scale.md).

    With ``sites`` set and no ``sites`` list in the config, that many virtual hospitals are
    generated with long-tailed sizes: the site of size rank r holds
    ``max(min_cases, round(max_cases / r ** size_alpha))`` cases (one for validation), drawn
    from a pool of ``max_cases`` phantom cases rendered once and linked, not copied. Every
    site gets a compute speed (simulated seconds per local step, log-normal around
    ``seconds_per_step``) and in each round drops out with probability ``dropout``. A site's
    round takes ``steps x its seconds per step`` on the simulated clock (nothing sleeps);
    ``round_timeout`` cuts the replies that would arrive later. All drawn from ``seed``.
    """

    #: Virtual hospitals to generate (0: use the config's ``sites``).
    sites: int = 0
    min_cases: int = 2
    max_cases: int = 40
    #: Zipf exponent of the site sizes (0: every site has ``max_cases``).
    size_alpha: float = 1.0
    #: Median simulated seconds per local step, and the log-normal spread between sites.
    seconds_per_step: float = 1.0
    speed_sigma: float = 0.5
    #: Probability that a sampled site does not answer a round.
    dropout: float = 0.0
    #: Simulated seconds after which a round's late replies are cut (None: never).
    round_timeout: float | None = None
    #: Voxel spacing (mm) of the generated phantom cases.
    spacing: float = 8.0


@dataclass
class CrossSiteConfig:
    """Cross-site evaluation at the end of a federated run (see docs/cross_site.md).

    Every site fine-tunes the final global model for ``fine_tune_steps`` local steps (its
    "local model"; a site whose ``policy.share_local_model`` is false keeps it to itself),
    then every site evaluates the global model and each shared local model on its own
    validation cases; only aggregate metrics come back.
    """

    enabled: bool = False
    #: Local steps each site fine-tunes the final global model for.
    fine_tune_steps: int = 50


@dataclass
class Config:
    """A fedscan run: who takes part, what is trained, for how long."""

    sites: list[SiteConfig]
    test_sets: list[SiteConfig] = field(default_factory=list)
    rounds: int = 5
    #: A built-in task (``shared/tasks/__init__.py``'s ``TASKS``) or, in a simulation, a
    #: researcher's own ``"package.module:Class"``.
    task: str = "segmentation"
    #: What ``fedscan simulate`` runs when no ``--mode`` is given.
    mode: Literal["federated", "local", "pooled"] = "federated"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    harmonisation: HarmonisationConfig = field(default_factory=HarmonisationConfig)
    #: DP-SGD for every site without its own ``privacy`` block; None: no DP.
    privacy: PrivacyConfig | None = None
    #: TensorBoard / MLflow (the server's side only: not part of what sites receive).
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    #: A simulated consortium's sizes, speeds, dropouts and round timeout (simulation only).
    consortium: ConsortiumConfig | None = None
    #: Where a simulation runs: a Ray cluster, resources per virtual hospital.
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    #: The federated data check before round 1.
    data_check: DataCheckConfig = field(default_factory=DataCheckConfig)
    #: The cross-site matrix after the last round (the server's side only; never sent).
    cross_site: CrossSiteConfig = field(default_factory=CrossSiteConfig)

    def site_privacy(self, site: SiteConfig) -> PrivacyConfig | None:
        """The privacy a site trains under: its own block, else the top-level one.

        Returns None (no DP) when neither is set or the winning block has ``epsilon: .inf``.
        """
        return effective_privacy(site.privacy if site.privacy is not None else self.privacy)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def steps_per_round(self, num_train_cases: int) -> int:
        """Local optimiser steps a site runs per round.

        ``train.local_epochs`` passes over the site's cases when set, else ``train.local_steps``.
        """
        if self.train.local_epochs:
            batches = -(-num_train_cases // self.train.batch_size)  # ceil
            return self.train.local_epochs * max(1, batches)
        return self.train.local_steps


def effective_privacy(privacy: PrivacyConfig | None) -> PrivacyConfig | None:
    """``privacy`` unless it is absent or says ``epsilon: .inf`` (no DP)."""
    if privacy is None or math.isinf(privacy.epsilon):
        return None
    return privacy


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, base: Path | None) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it; raise naming ``path``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, path, base)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"config key '{path}': {value!r} is not one of {allowed}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}': expected a list, got {type(value).__name__}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]", base) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, base)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    got = type(value).__name__
    raise ConfigError(f"config key '{path}': expected {_type_name(tp)}, got {got} ({value!r})")


def from_dict(cls: type, data: Any, path: str, base: Path | None) -> Any:
    where = f"'{path}'" if path else "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"config key {where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{path + '.' if path else ''}{key}' "
                              f"(known here: {known})")
    kwargs = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key_path, base)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{key_path}' is required")
    obj = cls(**kwargs)
    # Data folders are relative to the config file, so a config travels with its data.
    if isinstance(obj, SiteConfig) and base is not None:
        if not Path(obj.data).is_absolute():
            obj.data = str((base / obj.data).resolve())
        if obj.state_dir is not None and not Path(obj.state_dir).is_absolute():
            obj.state_dir = str((base / obj.state_dir).resolve())
        if (obj.harmonisation_reference is not None
                and not Path(obj.harmonisation_reference).is_absolute()):
            obj.harmonisation_reference = str((base / obj.harmonisation_reference).resolve())
        if obj.truth is not None and not Path(obj.truth).is_absolute():
            obj.truth = str((base / obj.truth).resolve())
    if (isinstance(obj, HarmonisationConfig) and base is not None and obj.reference is not None
            and not Path(obj.reference).is_absolute()):
        obj.reference = str((base / obj.reference).resolve())
    if isinstance(obj, TrackingConfig) and base is not None and obj.mlflow:
        # sqlite:///relative.db is relative to the config file too (sqlite:////abs.db is not).
        prefix = "sqlite:///"
        if obj.mlflow.startswith(prefix) and not Path(obj.mlflow[len(prefix):]).is_absolute():
            obj.mlflow = prefix + str((base / obj.mlflow[len(prefix):]).resolve())
    return obj


def _check_values(cfg: Config) -> None:
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"config key '{key}': {why}")

    if not cfg.sites:
        raise bad("sites", "at least one site is required")
    why = check_task_name(cfg.task)
    if why:
        raise bad("task", why)
    names = [s.name for s in cfg.sites] + [t.name for t in cfg.test_sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise bad("sites", f"site and test-set names must be unique, repeated: {', '.join(dup)}")
    if cfg.rounds < 1:
        raise bad("rounds", "must be >= 1")
    dims = cfg.model.spatial_dims
    if dims not in (2, 3):
        raise bad("model.spatial_dims", "must be 2 or 3")
    if len(cfg.data.spacing) != 3 or any(s <= 0 for s in cfg.data.spacing):
        raise bad("data.spacing", "must be three positive numbers (mm)")
    codes = cfg.data.orientation.upper()
    if len(codes) != 3 or sorted(next((i for i, pair in enumerate(("LR", "AP", "SI"))
                                       if c in pair), 9) for c in codes) != [0, 1, 2]:
        raise bad("data.orientation", "must be three axis codes, one of L/R, A/P and S/I each, "
                  "such as RAS, LPS or PIL")
    if len(cfg.train.patch_size) != 3 or any(p < 1 for p in cfg.train.patch_size):
        raise bad("train.patch_size", "must be three positive ints (use 1 as the last for 2D)")
    if dims == 2 and cfg.train.patch_size[2] != 1:
        raise bad("train.patch_size", "with model.spatial_dims 2 the last entry must be 1")
    if len(cfg.model.strides) != len(cfg.model.channels) - 1:
        raise bad("model.strides", "needs one entry fewer than model.channels")
    if cfg.data.num_classes < 2:
        raise bad("data.num_classes", "must be >= 2 (background plus at least one class)")
    check_label_keys(cfg.data, bad)
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise bad("data.val_fraction", "must be between 0 and 1")
    if cfg.train.batch_size < 1 or cfg.train.local_steps < 1:
        raise bad("train", "batch_size and local_steps must be >= 1")
    check_strategy(cfg, bad)
    for key in ("fraction_train", "fraction_evaluate"):
        if not 0.0 < getattr(cfg.strategy, key) <= 1.0:
            raise bad(f"strategy.{key}", "must be in (0, 1]")
    if cfg.strategy.min_sites is not None and not 1 <= cfg.strategy.min_sites <= len(cfg.sites):
        raise bad("strategy.min_sites", f"must be between 1 and the {len(cfg.sites)} sites")
    check_consortium(cfg.consortium, bad)
    check_data_check(cfg.data_check, bad)
    if cfg.cross_site.fine_tune_steps < 1:
        raise bad("cross_site.fine_tune_steps", "must be >= 1")
    sim = cfg.simulation
    if sim.cpus_per_site is not None and not sim.cpus_per_site > 0:
        raise bad("simulation.cpus_per_site", "must be > 0")
    if sim.gpus_per_site is not None and not sim.gpus_per_site >= 0:
        raise bad("simulation.gpus_per_site", "must be >= 0 (a fraction such as 0.25)")
    check_privacy(cfg.privacy, "privacy", bad)
    for i, site in enumerate(cfg.sites):
        check_privacy(site.privacy, f"sites[{i}].privacy", bad)
        check_policy(site.policy, f"sites[{i}].policy", bad)
        if site.truth is not None and cfg.task != "harmonisation":
            raise bad(f"sites[{i}].truth", "only the harmonisation study reads a paired truth "
                      "(task: harmonisation)")
    for i, test_set in enumerate(cfg.test_sets):
        if (test_set.privacy is not None or test_set.state_dir is not None
                or test_set.policy != SitePolicy() or test_set.harmonisation_reference
                or test_set.max_examples is not None or test_set.truth is not None):
            raise bad(f"test_sets[{i}]", "a test set is evaluated on the server: no privacy, "
                      "state_dir, policy, harmonisation_reference, max_examples or truth")
    if cfg.model.norm == "group":
        bad_ch = [c for c in cfg.model.channels if c % 2]
        if bad_ch:
            raise bad("model.channels", "group norm (2 groups) needs even channel counts")


#: Longest class or channel name (it becomes part of metric keys such as ``dice/<class>``).
MAX_NAME_LENGTH = 64


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a class or channel (None when it can): printable text, at
    most :data:`MAX_NAME_LENGTH` characters, no ``/`` (metric keys split on it)."""
    if not isinstance(name, str) or not name.strip():
        return "names must be non-empty text"
    if len(name) > MAX_NAME_LENGTH or not name.isprintable() or "/" in name:
        return (f"{name[:MAX_NAME_LENGTH]!r}: names must be printable, at most "
                f"{MAX_NAME_LENGTH} characters, without '/'")
    return None


def mirror_pairs_problem(pairs: list[list[int]], num_classes: int) -> str | None:
    """Why ``pairs`` cannot be mirror pairs (None when they can): pairs of two different
    foreground classes below ``num_classes``, each class in at most one pair."""
    seen: set[int] = set()
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            return f"{pair} is not a pair of two different classes"
        for c in pair:
            if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c < num_classes:
                return f"{pair}: classes must be foreground indices 1..{num_classes - 1}"
            if c in seen:
                return f"class {c} appears in more than one pair"
            seen.add(c)
    return None


def check_label_keys(data: DataConfig, bad: Any) -> None:
    """``data.labels``, ``channel_names``, ``mirror_pairs`` and ``symmetric_labels`` agree
    with the class and channel counts and with each other."""
    for key, names, count, what in (("labels", data.labels, data.num_classes, "num_classes"),
                                    ("channel_names", data.channel_names, data.in_channels,
                                     "in_channels")):
        if not names:
            continue
        if len(names) != count:
            raise bad(f"data.{key}", f"names {len(names)} ({', '.join(names)}), data.{what} "
                      f"is {count}")
        why = next((w for w in map(name_problem, names) if w), None)
        if why:
            raise bad(f"data.{key}", why)
        if len(set(names)) != len(names):
            raise bad(f"data.{key}", "names must be unique")
    if data.mirror_pairs is not None:
        why = mirror_pairs_problem(data.mirror_pairs, data.num_classes)
        if why:
            raise bad("data.mirror_pairs", why)
        if data.mirror_pairs and data.symmetric_labels:
            raise bad("data.symmetric_labels", "a label set with mirror pairs is not "
                      "symmetric (set one of mirror_pairs and symmetric_labels)")


def check_strategy(cfg: Config, bad: Any) -> None:
    """Robust-aggregation keys: ranges, and enough sites for Bulyan and MultiKrum."""
    s = cfg.strategy
    if not (s.max_weight_ratio >= 1.0):  # also rejects NaN; .inf means no cap
        raise bad("strategy.max_weight_ratio", "must be >= 1 (.inf for no cap)")
    if not (s.max_norm_ratio > 1.0):
        raise bad("strategy.max_norm_ratio", "must be > 1 (.inf to never reject by norm)")
    if isinstance(s.clip_norm, float) and not (0.0 < s.clip_norm < math.inf):
        raise bad("strategy.clip_norm", "must be a positive number, 'median' or null")
    if not 0.0 <= s.trim_beta < 0.5:
        raise bad("strategy.trim_beta", "must be in [0, 0.5)")
    if s.num_malicious < 0:
        raise bad("strategy.num_malicious", "must be >= 0")
    sites = s.min_sites or len(cfg.sites)
    if s.name == "bulyan" and sites < 4 * s.num_malicious + 3:
        raise bad("strategy.num_malicious", f"bulyan needs at least 4 x num_malicious + 3 = "
                  f"{4 * s.num_malicious + 3} sites per round, this federation has {sites}")
    if s.num_selected is not None and not 1 <= s.num_selected <= len(cfg.sites):
        raise bad("strategy.num_selected", f"must be between 1 and the {len(cfg.sites)} sites")
    for i, site in enumerate(cfg.sites):
        if site.max_examples is not None and site.max_examples < 1:
            raise bad(f"sites[{i}].max_examples", "must be >= 1")


def check_consortium(c: ConsortiumConfig | None, bad: Any) -> None:
    if c is None:
        return
    if c.sites < 0:
        raise bad("consortium.sites", "must be >= 0")
    if not 2 <= c.min_cases <= c.max_cases:
        raise bad("consortium.min_cases", "must be >= 2 and <= consortium.max_cases")
    if c.size_alpha < 0 or c.speed_sigma < 0 or c.seconds_per_step <= 0 or c.spacing <= 0:
        raise bad("consortium", "size_alpha, speed_sigma >= 0; seconds_per_step, spacing > 0")
    if not 0.0 <= c.dropout < 1.0:
        raise bad("consortium.dropout", "must be in [0, 1)")
    if c.round_timeout is not None and not c.round_timeout > 0:
        raise bad("consortium.round_timeout", "must be > 0 (or null: no cut)")


def check_privacy(p: PrivacyConfig | None, path: str, bad: Any) -> None:
    if p is None:
        return
    if not p.epsilon > 0:  # also rejects NaN; .inf means "no DP"
        raise bad(f"{path}.epsilon", "must be > 0 (.inf for no DP)")
    if not 0.0 < p.delta < 1.0:
        raise bad(f"{path}.delta", "must be between 0 and 1 (typically below 1/cases)")
    if not (p.max_grad_norm > 0 and math.isfinite(p.max_grad_norm)):
        raise bad(f"{path}.max_grad_norm", "must be a positive number")
    if p.noise_multiplier is not None and not (
            p.noise_multiplier > 0 and math.isfinite(p.noise_multiplier)):
        raise bad(f"{path}.noise_multiplier", "must be a positive number (omit it to calibrate)")


def check_data_check(c: DataCheckConfig, bad: Any) -> None:
    """Thresholds of the data check are in range."""
    if c.max_cases < 2:
        raise bad("data_check.max_cases", "must be >= 2")
    if not 0.0 < c.max_js <= 1.0:
        raise bad("data_check.max_js", "must be in (0, 1]")
    if not 0.0 < c.max_empty_fraction <= 1.0:
        raise bad("data_check.max_empty_fraction", "must be in (0, 1]")
    for key in ("max_spacing_ratio", "max_class_ratio"):
        if getattr(c, key) <= 1.0:
            raise bad(f"data_check.{key}", "must be > 1")


def check_policy(policy: SitePolicy, path: str, bad: Any) -> None:
    """Every limit set is >= 1, and the local-steps floor is not above the cap."""
    for f in dataclasses.fields(policy):
        value = getattr(policy, f.name)
        if value is not None and not isinstance(value, bool) and value < 1:
            raise bad(f"{path}.{f.name}", "must be >= 1 (or omitted: no limit)")
    if policy.data_stats_min_cases < 2:
        raise bad(f"{path}.data_stats_min_cases", "must be >= 2 (one case's values would show)")
    low, high = policy.min_local_steps, policy.max_local_steps
    if low is not None and high is not None and low > high:
        raise bad(f"{path}.min_local_steps", f"{low} is above max_local_steps {high}")


def parse_config(data: Any, base: Path | None = None) -> Config:
    """Validate a config mapping and build a :class:`Config`.

    Args:
        data: the parsed YAML mapping.
        base: folder that relative ``data`` paths are resolved against (the config's folder).

    Returns:
        The validated config.
    """
    cfg = from_dict(Config, data, "", base)
    _check_values(cfg)
    return cfg


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML file; a missing file or bad YAML is a one-line ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    return parse_config(read_yaml(path), base=path.parent.resolve())
