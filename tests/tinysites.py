"""Tiny phantom hospitals for runtime tests (coarse 8-9 mm grids, a few cases each)."""

from pathlib import Path

import numpy as np

from fedscan.simulations.phantoms import ScannerProfile, render, sample_anatomy, write_dataset


def parse_with(base: dict, overrides: dict):
    """``base`` config data with each override section merged into it (dict sections are
    updated, other values replaced), parsed."""
    from fedscan.shared.config import parse_config

    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in overrides.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(values)
        else:
            data[section] = values
    return parse_config(data)


PROFILES = [
    ScannerProfile("site-a", "RAS", (8.0, 8.0, 8.0), noise_std=0.02),
    ScannerProfile("site-b", "LPS", (7.0, 8.0, 9.0), gamma=0.7, bias_strength=0.2,
                   noise_std=0.03, scale=1000.0, dtype="int16"),
    ScannerProfile("site-c", "PIL", (9.0, 7.0, 8.0), gamma=1.2, noise_std=0.02),
]

#: A fourth scanner, for runs with four sites (one of them dishonest).
EXTRA_PROFILE = ScannerProfile("site-d", "LIA", (8.0, 9.0, 7.0), gamma=0.8, bias_strength=0.2,
                               noise_std=0.03, scale=2000.0, dtype="int16")

#: A run config small enough for a few seconds per round, with the default model's channels
#: (so the wire overhead per tensor is measured on a realistically sized model).
TINY_RUN = (
    "data: {spacing: [8, 8, 8]}\n"
    "model: {channels: [8, 16, 32, 64], strides: [2, 2, 2], num_res_units: 1}\n"
    "train: {patch_size: [16, 16, 16], batch_size: 2, local_steps: 2}\n"
    "evaluate: {hd95: false}\n"
)


def make_sites(root: Path, n_cases: int = 3, profiles=tuple(PROFILES)) -> dict[str, Path]:
    """Write the tiny sites (by default the three of :data:`PROFILES`) under ``root``; one
    validation case each."""
    out = {}
    for seed, profile in enumerate(profiles):
        rng = np.random.default_rng(seed)
        cases = []
        for i in range(n_cases):
            image, label, affine = render(sample_anatomy(rng), profile, rng)
            cases.append((f"{profile.name}_{i:03d}", image, label, affine))
        write_dataset(root / profile.name, cases, [cases[-1][0]], description="tiny test site")
        out[profile.name] = root / profile.name
    return out


def train_message(cfg, arrays, rnd: int, *, evaluate: bool = False, **fields):
    """A train (or, with ``evaluate``, an evaluate) message as the server sends it to node 42
    in round ``rnd``; ``fields`` set :class:`RoundConfig` fields (``evaluate_received``,
    ``proximal_mu``)."""
    import dataclasses
    import time

    from flwr.app import Message, MessageType, Metadata, RecordDict

    from fedscan.shared.messages import RoundConfig

    md = Metadata(run_id=1, message_id=f"m{rnd}", src_node_id=1, dst_node_id=42,
                  reply_to_message_id="", group_id=str(rnd), created_at=time.time(), ttl=3600,
                  message_type=MessageType.EVALUATE if evaluate else MessageType.TRAIN)
    record = dataclasses.replace(RoundConfig.for_run(cfg), server_round=rnd,
                                 **fields).to_record()
    return Message(content=RecordDict({"arrays": arrays, "config": record}), metadata=md)


def client_context():
    """A ClientApp context for node 42 with empty state (a fresh process)."""
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=42, node_config={"partition-id": 0}, state=RecordDict(),
                   run_config={})
