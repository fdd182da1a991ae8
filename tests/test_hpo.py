"Hyperparameter search: search-space checks, the pruning callback, shared and resumed studies, and tune + analyze-study end to end."
import contextlib, io, math

import optuna
import pytest
import torch
from torch import nn

from fundus_lab.cli import main
from fundus_lab.core import PACKAGE_DIR
from fundus_lab.experiments import load_training_config
from fundus_lab.hpo import (PruningCallback, create_study, default_storage, load_search_space, narrow_space, suggest,
                            training_arguments)

optuna.logging.set_verbosity(optuna.logging.WARNING)
SPACE = """
hyperparameters:
  lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
  weight_decay: {type: float, low: 1e-5, high: 1e-2, log: true}
  loss: {type: categorical, choices: [ce, focal]}
  focal_gamma: {type: float, low: 1.0, high: 3.0, when: {loss: focal}}
"""


def run_main(argv):
    "Exit status, standard output and standard error of `fundus-lab ARGV` run in this process."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): status = main(list(map(str, argv)))
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("text, message", [
    ("lr: {type: gaussian, low: 0, high: 1}", "parameter 'lr': unknown type 'gaussian'"),
    ("dropout: {type: float, low: 0.5, high: 0.5}", "parameter 'dropout': low (0.5) must be below high (0.5)"),
    ("lr: {type: float, low: 0.0, high: 0.1, log: true}", "parameter 'lr': log: true needs low > 0"),
    ("loss: {type: categorical, choices: []}", "parameter 'loss': a categorical parameter needs a non-empty list"),
    ("fusion: {type: categorical, choices: [msff]}", "parameter 'fusion': train_model has no argument 'fusion'"),
    ("lora_r: {type: int, low: 4.5, high: 16}", "parameter 'lora_r': low of an int parameter must be whole"),
    ("loss: {type: categorical, choices: [ce]}\ngamma: {type: float, low: 1, high: 3, when: {loss: focal}}",
     "parameter 'gamma': when: loss = ['focal'] is not among the choices"),
])
def test_search_space_errors_name_file_and_parameter(tmp_path, text, message):
    path = tmp_path/"space.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error: load_search_space(path)
    assert message in str(error.value) and str(path) in str(error.value)


def test_conditional_parameters_and_mapping(tmp_path):
    path = tmp_path/"space.yaml"
    path.write_text(SPACE + "  tau: {type: float, low: 0.3, high: 0.8}\n")
    space = load_search_space(path)
    assert space["weight_decay"]["low"] == 1e-5  # YAML reads 1e-5 as text; the loader makes it a number
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(12):
        params = suggest(study.ask(), space)
        assert ("focal_gamma" in params) == (params["loss"] == "focal")
        arguments = training_arguments(params)
        assert arguments["loss_params"] == {"tau": params["tau"]} and "tau" not in arguments


class PruneAtEpoch:
    "A stand-in trial that prunes from epoch `at` on."
    def __init__(self, at): self.at, self.reports = at, []
    def report(self, value, step): self.reports.append((step, value))
    def should_prune(self): return self.reports[-1][0] >= self.at


def test_pruning_callback_stops_the_fit_and_raises_trial_pruned():
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch.utils.data import TensorDataset
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    learn = Learner(DataLoaders.from_dsets(ds, ds, bs=8, device="cpu"), nn.Linear(3, 2), loss_func=nn.CrossEntropyLoss())
    callback = PruningCallback(PruneAtEpoch(1), monitor="valid_loss")
    with learn.no_bar(), learn.no_logging():
        learn.fit(3, 1e-2, cbs=[callback])
        first = list(learn.recorder.values)  # per epoch: train loss, valid loss
        learn.fit(2, 1e-2, cbs=[callback])  # a later stage of a pruned trial does not train
    assert len(first) == 1 and len(learn.recorder.values) == 0 and callback.pruned_at == 1
    assert callback.trial.reports == [(1, pytest.approx(first[0][1]))]
    with pytest.raises(optuna.TrialPruned, match="pruned after epoch 1"): callback.raise_if_pruned()
    with pytest.raises(ValueError, match="no validation metric 'qwk'"), learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=[PruningCallback(PruneAtEpoch(5), monitor="qwk")])


def test_workers_share_one_study_and_narrowing(tmp_path):
    path = tmp_path/"space.yaml"
    path.write_text(SPACE)
    space = load_search_space(path)
    def score(trial):
        params = suggest(trial, space)
        return -(math.log10(params["lr"]) + 3) ** 2 - 0.1 * (params["loss"] == "ce")
    for seed in (0, 1):  # two workers with their own seeds, one storage URL and study name
        create_study("shared", save_dir=tmp_path, seed=seed).optimize(score, n_trials=6)
    study = optuna.load_study(study_name="shared", storage=default_storage(tmp_path))
    assert len(study.trials) == 12
    narrowed = narrow_space(study, space, top=3)
    best = sorted(study.trials, key=lambda t: t.value, reverse=True)[:3]
    lrs = [t.params["lr"] for t in best]
    assert space["lr"]["low"] <= narrowed["lr"]["low"] <= min(lrs) <= max(lrs) <= narrowed["lr"]["high"] <= space["lr"]["high"]
    assert set(narrowed["loss"]["choices"]) == {t.params["loss"] for t in best}
    assert ("focal_gamma" in narrowed) == ("focal" in narrowed["loss"]["choices"])


def test_packaged_search_spaces_load():
    for name in ("search_dr", "search_lora"):
        assert len(load_search_space(PACKAGE_DIR/"configs"/f"{name}.yaml")) >= 3


def test_tune_resume_and_analyze_study(tmp_path):
    from fundus_lab.synth import write_dataset
    labels_csv = write_dataset("dr", tmp_path/"data", n=16, size=64, seed=0)
    space = tmp_path/"search.yaml"
    space.write_text(SPACE)
    save_dir = tmp_path/"hpo"
    tune = ["tune", "--hp-config", space, "--experiment", "tiny", "--labels-csv", labels_csv, "--save-dir", save_dir,
            "--epochs", "1", "--model-name", "test_efficientnet", "--no-pretrained", "--image-size", "64",
            "--batch-size", "8", "--device", "cpu", "--random-seed", "0", "--pruner", "halving"]
    status, out, err = run_main(tune + ["--n-trials", "2"])
    assert status == 0, err
    assert "0 trial(s) so far; running 2 more" in out and "the study has 2" in out
    status, out, err = run_main(tune + ["--n-trials", "1"])  # resumed: adds a trial to the stored study
    assert status == 0, err
    assert "the study has 3" in out
    study = optuna.load_study(study_name="tiny", storage=default_storage(save_dir))
    assert study.trials[2].params != study.trials[0].params  # the resumed search does not repeat its first trial
    assert sorted(p.name for p in (save_dir/"tiny").iterdir()) == ["trial_0000", "trial_0001", "trial_0002"]

    status, out, err = run_main(["analyze-study", "--experiment", "tiny", "--save-dir", save_dir, "--top", "2",
                                 "--save-configs", tmp_path/"best"])
    assert status == 0, err
    assert "Study 'tiny': 3 trial(s)" in out and "Best 2 trial(s)" in out
    assert "Parameter importances" in out
    saved = sorted((tmp_path/"best").glob("best_*.yaml"))
    assert len(saved) == 2 and (tmp_path/"best"/"study.png").is_file()
    config = load_training_config(saved[0])
    number = int(saved[0].stem.split("_")[-1])
    assert config["lr"] == study.trials[number].params["lr"]
    assert (config["epochs"], config["model_name"], config["image_size"], config["labels_csv"]) == (1, "test_efficientnet", 64, labels_csv)

    status, _, err = run_main(["analyze-study", "--experiment", "other", "--save-dir", save_dir])
    assert status == 2 and "no study 'other'" in err and "tiny" in err
    missing = tmp_path/"missing.yaml"
    status, _, err = run_main(["tune", "--hp-config", missing] + tune[3:] + ["--n-trials", "1"])
    assert status == 2 and str(missing) in err and "not found" in err
