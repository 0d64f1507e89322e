"""Config validation: unknown keys and wrong types name the key path."""

from pathlib import Path

import pytest

from fedscan.shared.config import load_config, parse_config
from fedscan.shared.errors import ConfigError

SITES = {"sites": [{"name": "site-a", "data": "/data/a"}]}


def test_defaults_and_overrides():
    cfg = parse_config({**SITES, "rounds": 3, "train": {"batch_size": 4, "lr": 1}})
    assert cfg.rounds == 3
    assert cfg.train.batch_size == 4
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.strategy.name == "fedavg"
    assert cfg.model.spatial_dims == 3


@pytest.mark.parametrize(
    "data, key",
    [
        ({**SITES, "round": 3}, "'round'"),
        ({**SITES, "train": {"batchsize": 2}}, "'train.batchsize'"),
        ({**SITES, "train": {"batch_size": "2"}}, "'train.batch_size'"),
        ({**SITES, "train": {"batch_size": 2.5}}, "'train.batch_size'"),
        ({**SITES, "rounds": True}, "'rounds'"),
        ({"sites": [{"name": "a", "data": 3}]}, "'sites[0].data'"),
        ({"sites": [{"name": "a", "data": "/x", "extra": 1}]}, "'sites[0].extra'"),
        ({**SITES, "strategy": {"name": "krum"}}, "'strategy.name'"),
        ({**SITES, "data": {"spacing": [1, 1]}}, "'data.spacing'"),
        ({**SITES, "model": {"spatial_dims": 4}}, "'model.spatial_dims'"),
        ({**SITES, "model": {"spatial_dims": 2}}, "'train.patch_size'"),
        ({**SITES, "test_sets": [{"name": "site-a", "data": "/t"}]}, "'sites'"),
        ({"rounds": 2}, "'sites'"),
    ],
)
def test_bad_configs_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    message = str(err.value)
    assert key in message
    assert "\n" not in message


def test_relative_data_paths_resolve_against_config_folder(tmp_path: Path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "fed.yaml"
    path.write_text("sites:\n  - {name: a, data: ../site-a}\ntest_sets:\n"
                    "  - {name: t, data: /abs/t}\nrounds: 2\n")
    cfg = load_config(path)
    assert cfg.sites[0].data == str((tmp_path / "site-a").resolve())
    assert cfg.test_sets[0].data == "/abs/t"


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sites: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_steps_per_round_from_epochs():
    cfg = parse_config({**SITES, "train": {"local_epochs": 2, "batch_size": 4}})
    assert cfg.steps_per_round(10) == 2 * 3
    assert parse_config(SITES).steps_per_round(10) == cfg.train.local_steps


def test_the_configs_mode_is_what_simulate_runs_without_a_mode(tmp_path: Path):
    from fedscan.simulations.run import simulate
    from tests.tinysites import make_sites

    make_sites(tmp_path / "data", n_cases=2)
    path = tmp_path / "local.yaml"
    path.write_text(
        "mode: local\nrounds: 1\nsites:\n  - {name: site-a, data: data/site-a}\n"
        "data: {spacing: [8, 8, 8]}\n"
        "model: {channels: [4, 8], strides: [2], num_res_units: 0}\n"
        "train: {patch_size: [16, 16, 16], local_steps: 1}\nevaluate: {hd95: false}\n")
    summaries = simulate(path, None, tmp_path / "out")
    assert list(summaries) == ["local"] and summaries["local"]["mode"] == "local"
    assert load_config(tmp_path / "out" / "config.yaml").mode == "local"


def test_every_shipped_config_reads_as_simulate_reads_it():
    from fedscan.simulations.run import read_simulation_config

    shipped = sorted((Path(__file__).parents[1] / "simulations" / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        cfg = read_simulation_config(path)
        assert cfg.sites and cfg.rounds >= 1, path.name
        if path.name == "harmonize.yaml":
            assert cfg.task == "harmonisation" and cfg.harmonisation.reference is not None
