"Adding a training option is one field of `TrainConfig`: it becomes a `fundus-lab train` flag, a YAML key and an entry of config.json."
import dataclasses, json
from pathlib import Path

import pytest

import fundus_lab.train
from fundus_lab.cli import main
from fundus_lab.experiments import load_training_config
from fundus_lab.train import TrainConfig, option, train_model

TINY = ["--model-name", "test_efficientnet", "--no-pretrained", "--image-size", "32", "--batch-size", "8", "--epochs", "1",
        "--device", "cpu"]


@pytest.fixture
def extended_config(monkeypatch):
    "TrainConfig with one more field, `label_note`, declared the way every option is."
    extended = dataclasses.make_dataclass("TrainConfig", [
        ("label_note", str, option("none", "a note on how the labels were made, kept with the run", "data and run"))],
        bases=(TrainConfig,))
    monkeypatch.setattr(fundus_lab.train, "TrainConfig", extended)
    return extended


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from fundus_lab.synth import write_dataset
    out = tmp_path_factory.mktemp("config_data")
    write_dataset("dr", out, n=16, size=48, seed=0)
    return out


def test_a_new_field_is_a_flag_a_yaml_key_and_lands_in_config_json(extended_config, data, tmp_path, capsys):
    assert main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--label-note LABEL_NOTE a note on how the labels were made, kept with the run (default: none)" in help_text
    recipe = tmp_path/"recipe.yaml"
    recipe.write_text("label-note: graded twice\nepochs: 1\n")
    assert load_training_config(recipe) == {"label_note": "graded twice", "epochs": 1}
    status = main(["train", "--labels-csv", data/"labels.csv", "--img-dir", data, "--save-dir", tmp_path/"run",
                   "--config", recipe, *TINY])
    assert status == 0, capsys.readouterr().err
    config = json.loads((tmp_path/"run"/"config.json").read_text())
    assert config["arguments"]["label_note"] == config["label_note"] == "graded twice"
    typed = main(["train", "--labels-csv", data/"labels.csv", "--img-dir", data, "--save-dir", tmp_path/"typed",
                  "--label-note", "typed", *TINY])
    assert typed == 0 and json.loads((tmp_path/"typed"/"config.json").read_text())["label_note"] == "typed"


def test_misspelt_option_names_the_closest(tmp_path, capsys):
    recipe = tmp_path/"recipe.yaml"
    recipe.write_text("pateince: 3\n")
    assert main(["train", "--img-dir", tmp_path, "--config", recipe]) == 2
    assert "unknown option 'pateince'. Did you mean 'patience'?" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown option 'epoch'. Did you mean 'epochs'"): train_model(None, tmp_path, epoch=3)


def test_config_object_and_keyword_options_are_the_same_run():
    from fundus_lab.train import _with_options
    assert _with_options(TrainConfig(epochs=3), {"lr": 0.01}) == TrainConfig(epochs=3, lr=0.01)
    assert _with_options({"epochs": "3"}, {}) == TrainConfig(epochs=3)
    assert _with_options(None, {}) == TrainConfig()
