"""The search space, the sweep's options and its storage: refused before any trial."""

from __future__ import annotations

import json
import sys

import pytest

from fowlflow.errors import ConfigError
from fowlflow.tune.space import DEFAULT_SPACE, parse_space, suggest
from fowlflow.tune.study import masked, open_storage


def test_default_space_is_the_samples():
    space = {d.name: d for d in parse_space("none")}
    assert set(space) == {"learning_rate", "momentum"}
    assert (space["learning_rate"].low, space["learning_rate"].high) == (0.0005, 0.005)
    assert (space["momentum"].low, space["momentum"].high) == (0.9, 0.99)
    assert parse_space("") == parse_space(json.dumps(DEFAULT_SPACE))


def test_every_kind_inline_and_from_a_file(tmp_path, monkeypatch):
    text = json.dumps({
        "learning_rate": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
        "batch_size": {"type": "int", "low": 8, "high": 32, "step": 8},
        "arch": {"type": "categorical", "choices": ["resnet18", "mobilenet_v3_small"]},
        "freeze_backbone": {"type": "categorical", "choices": [True, False]},
    })
    (tmp_path / "space.json").write_text(text)
    monkeypatch.chdir(tmp_path)
    inline, from_file = parse_space(text), parse_space("space.json")
    assert inline == from_file
    by_name = {d.name: d for d in inline}
    assert by_name["freeze_backbone"].choices == (True, False)  # parsed as the trainer does
    assert by_name["batch_size"].grid() == [8, 16, 24, 32]

    import optuna

    trial = optuna.create_study().ask()
    values = suggest(inline, trial)
    assert 1e-4 <= values["learning_rate"] <= 0.1 and values["batch_size"] in (8, 16, 24, 32)
    assert values["arch"] in ("resnet18", "mobilenet_v3_small")


@pytest.mark.parametrize("space, words", [
    ({"learnin_rate": {"type": "float", "low": 0.1, "high": 0.2}}, ["unknown parameter",
                                                                    "'learnin_rate'", "learning_rate"]),
    ({"output_dir": {"type": "categorical", "choices": ["a"]}}, ["output_dir can't be tuned"]),
    ({"learning_rate": {"type": "float", "low": 0.2, "high": 0.1}}, ["low (0.2) must be less"]),
    ({"learning_rate": {"type": "float", "low": 0.0, "high": 0.1}}, ["refused by the trainer",
                                                                   "greater than 0"]),
    ({"momentum": {"type": "float", "low": 0.5, "high": 1.5}}, ["1.5", "in [0, 1)"]),
    ({"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}, ["low > 0"]),
    ({"batch_size": {"type": "int", "low": 8, "high": 32.5}}, ["expected an integer"]),
    ({"arch": {"type": "float", "low": 1, "high": 2}}, ["not a float parameter", "categorical"]),
    ({"amp": {"type": "categorical", "choices": ["auto", "fp8"]}}, ["'fp8'", "choices"]),
    ({"learning_rate": {"type": "uniform", "low": 1, "high": 2}}, ["expected", "float, int"]),
    ({"learning_rate": {"type": "float", "low": 0.1, "high": 0.2, "max": 3}}, ["unknown key"]),
    ({}, ["non-empty JSON object"]),
])
def test_bad_spaces_are_refused_with_the_problem_named(space, words):
    with pytest.raises(ConfigError) as err:
        parse_space(json.dumps(space))
    for word in words:
        assert word in err.value.message


def test_not_json_and_a_missing_file_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_space('{"learning_rate": ')
    with pytest.raises(ConfigError, match="Search space file"):
        parse_space("nowhere.json")


def test_grid_needs_a_finite_list():
    (lr,) = parse_space('{"learning_rate": {"type": "float", "low": 0.1, "high": 0.2}}')
    with pytest.raises(ConfigError, match="grid sampler needs a finite list"):
        lr.grid()
    (lr,) = parse_space('{"learning_rate": {"type": "float", "low": 0.1, "high": 0.3, "step": 0.1}}')
    assert lr.grid() == pytest.approx([0.1, 0.2, 0.3])


def test_storage_password_is_masked_and_an_unreachable_one_refused(tmp_path):
    url = "postgresql+psycopg://bob:s3cret@127.0.0.1:1/optuna"
    assert masked(url) == "postgresql+psycopg://bob:***@127.0.0.1:1/optuna"
    with pytest.raises(ConfigError) as err:
        open_storage(url)
    assert "can't be used as the Optuna study storage" in err.value.message
    assert "s3cret" not in err.value.message and "bob:***@" in err.value.message
    with pytest.raises(ConfigError, match="does not exist"):
        open_storage(f"sqlite:///{tmp_path}/no/such/folder/optuna.db")


@pytest.mark.parametrize("args, words", [
    (["--n_trials", "2", "--parallel", "4"], ["parallel=4", "between 1 and n_trials (2)"]),
    (["--n_trials", "0"], ["n_trials=0"]),
    (["--search_space", '{"lr": {"type": "float", "low": 1, "high": 2}}'], ["unknown parameter 'lr'"]),
    (["--pruner", "bandit", "--slack_factor", "0"], ["slack_factor=0.0"]),
    (["--sampler", "grid"], ["grid sampler needs a finite list for learning_rate"]),
    (["--storage", "postgresql+psycopg://u:pw@127.0.0.1:1/x"], ["u:***@", "can't be used"]),
])
def test_the_sweep_refuses_bad_options_before_any_run(tracking_uri, client, args, words):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "fowlflow.tune", "--data", "synthetic", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr
    assert "pw@" not in proc.stderr
    assert client.search_runs(["0"]) == []  # no parent run, no trial
