"Evaluation: metrics equal scikit-learn's, referable-DR operating point, bootstrap, calibration, QWK thresholds, ensembles and the `evaluate` command."
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import (accuracy_score, average_precision_score, cohen_kappa_score, f1_score, roc_auc_score)
from sklearn.preprocessing import label_binarize

from fundus_lab.calibration import (apply_temperature, apply_thresholds, expected_calibration_error, fit_temperature,
                                    optimise_qwk_thresholds, quadratic_kappa)
from fundus_lab.cli import main
from fundus_lab.core import IMAGENET_MEAN, IMAGENET_STD
from fundus_lab.data import DR_GRADES, read_dataset
from fundus_lab.evaluate import (evaluate_model, load_models, ensemble_probs, metric_intervals, operating_point,
                                 referable_metrics, task_metrics)
from fundus_lab.models import DRClassifier, save_model
from fundus_lab.train import PREPROCESSING


@pytest.fixture(scope="module")
def predictions():
    "60 images, all five grades present, probabilities of a model that is right more often than not."
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 12)
    probs = torch.tensor(rng.normal(0, 1, (60, 5)) + 1.5 * np.eye(5)[y]).softmax(1).numpy()
    return y, probs


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    "A randomly initialised tiny DR model saved like a trained one, with recorded validation metrics."
    torch.manual_seed(0)
    model = DRClassifier("test_efficientnet", 5, pretrained=False)
    config = {"model_name": "test_efficientnet", "num_classes": 5, "class_names": list(DR_GRADES), "task": "dr",
              "label_columns": ["dr"], "image_size": 64, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
              "preprocessing": dict(PREPROCESSING), "dropout": 0.2,
              "valid_metrics": {"accuracy": 0.9, "qwk": 0.8, "macro_f1": 0.7}}
    return save_model(tmp_path_factory.mktemp("model")/"best_model.pth", model, config)


def test_metrics_equal_scikit_learn(predictions):
    y, probs = predictions
    ours, predicted = task_metrics(y, probs, DR_GRADES), probs.argmax(1)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    assert ours["qwk"] == pytest.approx(cohen_kappa_score(y, predicted, weights="quadratic"), abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro"), abs=1e-12)
    assert ours["auc_macro"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"), abs=1e-12)
    assert ours["aupr_macro"] == pytest.approx(
        average_precision_score(label_binarize(y, classes=range(5)), probs, average="macro"), abs=1e-12)
    for c, per_class in enumerate(ours["per_class"].values()):
        assert per_class["recall"] == pytest.approx(np.mean(predicted[y == c] == c))
        assert per_class["accuracy"] == pytest.approx(accuracy_score(y == c, predicted == c))
    assert quadratic_kappa(y, predicted) == pytest.approx(cohen_kappa_score(y, predicted, weights="quadratic"), abs=1e-12)


def test_referable_operating_point(predictions):
    y, probs = predictions
    result = referable_metrics(y, probs, target_specificity=0.907)
    scores, referable = probs[:, 2:].sum(1), y >= 2
    assert result["auc"] == pytest.approx(roc_auc_score(referable, scores))
    assert result["specificity"] >= 0.907
    assert result["sensitivity"] == pytest.approx(np.mean(scores[referable] >= result["threshold"]))
    lower = scores[scores < result["threshold"]].max()  # the next threshold down misses the target
    assert np.mean(scores[~referable] < lower) < 0.907
    fixed = referable_metrics(y, probs, threshold=0.5)
    assert (fixed["threshold"], fixed["specificity"]) == (0.5, pytest.approx(np.mean(scores[~referable] < 0.5)))
    assert operating_point([0, 0, 1, 1], [.1, .2, .3, .4], 0.9)["threshold"] == 0.3
    with pytest.raises(ValueError, match="both positive and negative"): operating_point([1, 1], [.2, .3])


def test_bootstrap_is_seeded_and_resamples_patients(predictions):
    y, probs = predictions
    patients = np.repeat(np.arange(30), 2)
    first = metric_intervals(y, probs, n_boot=100, seed=3, groups=patients)
    assert first == metric_intervals(y, probs, n_boot=100, seed=3, groups=patients)
    assert first != metric_intervals(y, probs, n_boot=100, seed=4, groups=patients)
    value = task_metrics(y, probs)["qwk"]
    assert first["qwk"]["low"] <= value <= first["qwk"]["high"] and first["qwk"]["n"] == 100


def test_expected_calibration_error_by_hand():
    probs = [[.9, .05, .05], [.7, .2, .1], [.2, .6, .2], [.3, .3, .4]]
    assert expected_calibration_error([0, 1, 1, 0], probs, n_bins=2) == pytest.approx(0.15)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4000, 5))
    labels = np.array([rng.choice(5, p=p) for p in torch.tensor(logits).softmax(1).numpy()])
    temperature = fit_temperature(logits * 3.0, labels)
    assert temperature == pytest.approx(3.0, abs=0.2)
    assert (expected_calibration_error(labels, apply_temperature(logits * 3.0, temperature))
            < expected_calibration_error(labels, apply_temperature(logits * 3.0, 1.0)) / 3)


def test_qwk_thresholds_known_answer_and_never_worse():
    rng = np.random.default_rng(1)
    grades = np.repeat(np.arange(5), 20)
    squeezed = 0.6 * grades + 0.1 + rng.uniform(-0.1, 0.1, len(grades))
    tuned = optimise_qwk_thresholds(squeezed, grades)
    assert (apply_thresholds(squeezed, tuned) == grades).all()
    assert quadratic_kappa(grades, apply_thresholds(squeezed)) < 0.8
    noisy = rng.normal(2, 1.5, len(grades))
    assert (quadratic_kappa(grades, apply_thresholds(noisy, optimise_qwk_thresholds(noisy, grades)))
            >= quadratic_kappa(grades, apply_thresholds(noisy)))


def test_ensemble_of_two_identical_models_equals_one(model_file, dr_dataset, tmp_path):
    df = read_dataset(dr_dataset/"labels.csv", img_dir=dr_dataset)
    one = ensemble_probs(load_models(model_file), df, batch_size=8, device="cpu")["dr"]
    two = ensemble_probs(load_models([model_file, model_file]), df, batch_size=8, device="cpu")["dr"]
    np.testing.assert_allclose(two, one, atol=1e-6)
    single = evaluate_model(model_file, df, tmp_path/"one", batch_size=8, device="cpu")
    double = evaluate_model([model_file, model_file], df, tmp_path/"two", batch_size=8, device="cpu")
    assert single["confusion_matrix"] == double["confusion_matrix"]
    assert single["auc_macro"] == pytest.approx(double["auc_macro"], abs=1e-9)


def test_evaluate_command_writes_every_report(model_file, dr_dataset, tmp_path, capsys):
    out_dir = tmp_path/"report"
    assert main(["evaluate", "--labels-csv", str(dr_dataset/"labels.csv"), "--img-dir", str(dr_dataset),
                 "--model-path", str(model_file), "--output-dir", str(out_dir), "--batch-size", "8", "--device", "cpu",
                 "--tta", "flips", "--bootstrap", "20", "--seed", "1", "--target-specificity", "0.8"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["classification_report.txt", "confusion_matrix.png",
                                                          "metrics.json", "model_card.md", "predictions.csv", "roc_curves.png"]
    metrics = json.loads((out_dir/"metrics.json").read_text())
    assert {"accuracy", "qwk", "macro_f1", "auc_macro", "aupr_macro", "ece", "referable", "ci"} <= set(metrics)
    assert metrics["referable"]["target_specificity"] == 0.8 and metrics["tta"] == "flips"
    assert metrics["generalisation_gap"]["gap"]["accuracy"] == pytest.approx(0.9 - metrics["accuracy"])
    table = pd.read_csv(out_dir/"predictions.csv")
    assert len(table) == 20 and {"image_id", "path", "dr", "predicted_dr", "prob_dr_4", "referable_score"} <= set(table.columns)
    np.testing.assert_allclose(table[[f"prob_dr_{k}" for k in range(5)]].sum(axis=1), 1, atol=1e-4)
    assert "generalisation gap" in capsys.readouterr().out


@pytest.mark.parametrize("option, value, phrase", [
    ("--target-specificity", "1", "argument --target-specificity: 1 is not between 0 and 1"),
    ("--tta", "spin", "argument --tta: invalid choice: 'spin'"),
    ("--bootstrap", "-1", "argument --bootstrap: -1 is negative"),
])
def test_evaluate_command_rejects_bad_options(model_file, dr_dataset, capsys, option, value, phrase):
    assert main(["evaluate", "--labels-csv", str(dr_dataset/"labels.csv"), "--model-path", str(model_file), option, value]) == 2
    assert phrase in capsys.readouterr().err


def test_disease_task_from_class_folders_end_to_end(tmp_path, tiny_model):
    "Class folders of single diagnoses -> `train --task disease` -> `evaluate`: metrics equal scikit-learn's on predictions.csv."
    from PIL import Image
    from fundus_lab.synth import synth_fundus
    findings = {"normal": {}, "glaucoma": {"glaucoma": 1}, "cataract": {"cataract": 1}}
    for part, seeds in (("train", range(8)), ("test", range(100, 104))):
        for folder, finding in findings.items():
            (tmp_path/part/folder).mkdir(parents=True)
            for i in seeds: Image.fromarray(synth_fundus(seed=i, size=64, **finding)).save(tmp_path/part/folder/f"{i}_left.jpg")
    assert main(["train", "--task", "disease", "--img-dir", str(tmp_path/"train"), "--save-dir", str(tmp_path/"model"),
                 *tiny_model]) == 0
    assert main(["evaluate", "--img-dir", str(tmp_path/"test"), "--model-path", str(tmp_path/"model/best_model.pth"),
                 "--output-dir", str(tmp_path/"evaluation")]) == 0
    metrics = json.loads((tmp_path/"evaluation/metrics.json").read_text())
    table = pd.read_csv(tmp_path/"evaluation/predictions.csv")
    assert metrics["task"] == "disease" and metrics["n"] == 12 and len(table) == 12
    assert list(metrics["per_class"]) == ["Normal", "Glaucoma", "Cataract"]
    truth = [{"normal": 0, "glaucoma": 1, "cataract": 2}[p.split("/")[-2]] for p in table.path]
    probs = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    assert metrics["accuracy"] == pytest.approx(accuracy_score(truth, probs.argmax(1)))
    assert metrics["macro_f1"] == pytest.approx(f1_score(truth, probs.argmax(1), average="macro", zero_division=0))
