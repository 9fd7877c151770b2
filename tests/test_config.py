"""Run-config validation: every bad input fails before training, naming key and range."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

import strategies
from fl_app.config import RunConfig, load_sweep


def test_pyproject_defaults_are_exactly_the_dataclass_fields(defaults):
    assert sorted(defaults) == sorted(RunConfig.keys())
    cfg = RunConfig.from_mapping(defaults)  # the defaults themselves are valid
    assert cfg.dataset == "digits"  # the offline quick-start default


def test_round_trip_through_json(make_config):
    cfg = make_config(strategy="fedyogi", alpha=0.1, partitioner="dirichlet")
    assert RunConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("key, value, message", [
    ("strategy", "fedsgd", r"'strategy' must be one of \['fedavg'"),
    ("partitioner", "label-skew", r"'partitioner' must be one of \['iid', 'dirichlet'"),
    ("dataset", "imagenet-21k", r"'dataset' must be one of"),
    ("dataset", "/data/missing-mnist", r"'dataset': no such file"),
    ("alpha", 0.0, r"'alpha' must be a number > 0"),
    ("alpha", -0.5, r"'alpha' must be a number > 0"),
    ("lr", 0.0, r"'lr' must be a number > 0"),
    ("lr", -1e-3, r"'lr' must be a number > 0"),
    ("fraction-train", 0.0, r"'fraction-train' must be a number in \(0, 1\]"),
    ("fraction-train", 1.5, r"'fraction-train' must be a number in \(0, 1\]"),
    ("fraction-evaluate", -0.1, r"'fraction-evaluate' must be a number in \[0, 1\]"),
    ("num-server-rounds", 0, r"'num-server-rounds' must be an integer >= 1"),
    ("num-server-rounds", 2.5, r"'num-server-rounds' must be an integer >= 1"),
    ("local-epochs", True, r"'local-epochs' must be an integer >= 1"),
    ("batch-size", 0, r"'batch-size' must be an integer >= 1"),
    ("momentum", 1.0, r"'momentum' must be a number in \[0, 1\)"),
    ("classes-per-partition", 0, r"'classes-per-partition' must be an integer >= 1"),
    ("validation-fraction", 1.0, r"'validation-fraction' must be a number in \(0, 1\)"),
    ("proximal-mu", -0.01, r"'proximal-mu' must be a number >= 0"),
    ("scaffold-control-variate", "option-i", r"'scaffold-control-variate' must be one of \['gradient-mean', 'displacement'\]"),
    ("server-lr", 0.0, r"'server-lr' must be a number > 0 or the string \"auto\""),
    ("server-lr", "fast", r"'server-lr' must be a number > 0"),
    ("beta-2", 1.0, r"'beta-2' must be a number in \[0, 1\)"),
    ("tau", 0.0, r"'tau' must be a number > 0"),
    ("trim-fraction", 0.5, r"'trim-fraction' must be in \[0, 0.5\)"),
    ("seed", -1, r"'seed' must be an integer >= 0"),
    ("lr", "0.1", r"'lr' must be a number > 0"),
    ("lr", float("nan"), r"'lr' must be a number > 0"),
    ("run-name", "../escape", r"'run-name' must be empty"),
    ("sweep-file", "/no/such/sweep.json", r"'sweep-file': no such file"),
])
def test_bad_values_are_refused_with_key_and_range(defaults, key, value, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_mapping({**defaults, key: value})


def test_unknown_and_missing_keys_are_refused(defaults):
    with pytest.raises(ValueError, match=r"Unknown run-config key\(s\) \['learning-rate'\]"):
        RunConfig.from_mapping({**defaults, "learning-rate": 0.1})
    partial = dict(defaults)
    del partial["alpha"]
    with pytest.raises(ValueError, match=r"Missing run-config key\(s\) \['alpha'\]"):
        RunConfig.from_mapping(partial)


def test_int_is_accepted_where_a_float_is_expected(make_config):
    assert make_config(lr=1, alpha=2).lr == 1


def test_auto_server_lr_resolves_per_strategy(make_config):
    assert make_config(strategy="fedavgm").effective_server_lr == 1.0
    assert make_config(strategy="fedyogi").effective_server_lr == 0.01
    assert make_config(strategy="fedyogi", **{"server-lr": 0.3}).effective_server_lr == 0.3
    assert make_config(strategy="fedyogi").resolved()["server-lr"] == 0.01


def test_every_registered_strategy_builds(make_config):
    for name in strategies.NAMES:
        strategy = strategies.build(make_config(strategy=name, **{"min-train-nodes": 3}), 10,
                                    total_examples=1000)
        assert strategy.fraction_train == 1.0


def test_sweep_entries_are_all_validated_up_front(tmp_path, make_config):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([
        {"run-name": "a", "strategy": "fedavg"},
        {"run-name": "b", "alpha": -1.0},
    ]))
    base = make_config(**{"sweep-file": str(sweep)})
    with pytest.raises(ValueError, match=r"sweep-file entry 1 \(b\): Run config 'alpha'"):
        load_sweep(base)
    sweep.write_text(json.dumps([{"strategy": "fedavg"}]))
    with pytest.raises(ValueError, match="must set a non-empty 'run-name'"):
        load_sweep(base)
    sweep.write_text(json.dumps([{"run-name": "a"}, {"run-name": "a", "seed": 1}]))
    with pytest.raises(ValueError, match="duplicate run-name"):
        load_sweep(base)
    sweep.write_text(json.dumps([{"run-name": "a", "seed": 1}, {"run-name": "b", "seed": 2}]))
    runs = load_sweep(base)
    assert [r.seed for r in runs] == [1, 2] and all(r.sweep_file == "" for r in runs)


def test_config_is_frozen_and_every_key_is_in_exactly_one_section(make_config):
    from fl_app.config import SECTIONS

    cfg = make_config()
    with pytest.raises(Exception):
        cfg.lr = 1.0  # type: ignore[misc]
    with pytest.raises(Exception):
        cfg.sections["training"].lr = 1.0  # type: ignore[misc]
    keys = [k for section in SECTIONS.values() for k in section.keys()]
    assert sorted(keys) == sorted(set(keys)) == sorted(RunConfig.keys())
    assert sum(len(fields(section)) for section in cfg.sections.values()) == len(RunConfig.keys())
    assert cfg.lr == cfg.sections["training"].lr == 0.05  # read flat, kept in its section
    with pytest.raises(AttributeError, match="no key 'learning_rate'"):
        cfg.learning_rate  # noqa: B018


def test_a_section_validates_itself_with_the_config_s_messages(defaults):
    """Each section checks its own keys (no RunConfig needed): the same messages."""
    from fl_app.config import DPSection, SecAggSection, TrainingSection, _key

    def build(section, **overrides):
        values = {f.name: defaults[_key(f.name)] for f in fields(section)}
        return section(**{**values, **overrides})

    with pytest.raises(ValueError, match="'lr' must be a number > 0"):
        build(TrainingSection, lr=-1.0)
    with pytest.raises(ValueError, match=r"\['dp-delta'\] only take effect with dp = true"):
        build(DPSection, dp_delta=1e-3)
    with pytest.raises(ValueError, match="'secagg-num-shares' must be an integer >= 3"):
        build(SecAggSection, secagg=True, secagg_num_shares=1)
    assert build(DPSection, dp=True, dp_noise_multiplier=0.5).dp_noise_multiplier == 0.5


@pytest.mark.parametrize("key, value, message", [
    ("model", "resnet", "'model' must be one of ['cnn', 'mlp', 'logreg']"),
    ("scaffold-weighting", "median", "'scaffold-weighting' must be one of"),
    ("max-num-examples", 0, "'max-num-examples' must be an integer >= 1"),
    ("max-num-examples", 2**40, "'max-num-examples' must be an integer in [1, 2147483647]"),
    ("max-num-examples", 10.5, "'max-num-examples' must be an integer >= 1"),
])
def test_new_keys_are_validated(make_config, key, value, message):
    with pytest.raises(ValueError) as err:
        make_config(**{key: value})
    assert message in str(err.value)
