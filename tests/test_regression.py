"DR grading as regression end to end: train `dr_regression`, tune and save the grade thresholds, then evaluate, predict, export to ONNX and predict with the ONNX file, all grading alike."
import numpy as np
import pandas as pd
import pytest
import torch

from fundus_lab.calibration import DEFAULT_THRESHOLDS
from fundus_lab.core import IMAGENET_MEAN, IMAGENET_STD
from fundus_lab.data import DR_GRADES, read_dataset
from fundus_lab.evaluate import evaluate_model
from fundus_lab.export import export_onnx, load_classifier, predict_images
from fundus_lab.models import DRClassifier, load_model, save_model
from fundus_lab.train import PREPROCESSING, train_model, tune_thresholds

TINY = dict(model_name="test_efficientnet", pretrained=False, image_size=32, batch_size=8, epochs=2, lr=1e-2, device="cpu")


@pytest.fixture(scope="module")
def trained(dr_dataset, tmp_path_factory):
    "A tiny dr_regression run (MSE) on the shared synthetic dataset: (result, table)."
    df = read_dataset(dr_dataset/"labels.csv", img_dir=dr_dataset/"images")
    return train_model(df, tmp_path_factory.mktemp("regression")/"run", task="dr_regression", loss="mse", **TINY), df


def test_training_saves_sorted_thresholds(trained):
    result, _ = trained
    _, config = load_model(result["best_model_path"])
    thresholds, tuning = config["thresholds"], config["threshold_tuning"]
    assert (config["task"], config["num_classes"], config["class_names"]) == ("dr_regression", 1, list(DR_GRADES))
    assert len(thresholds) == 4 and thresholds == sorted(thresholds)
    assert tuning["initial"] == list(DEFAULT_THRESHOLDS) and tuning["qwk_tuned"] >= tuning["qwk_initial"]
    assert result["finished"]["thresholds"] == thresholds
    assert "high_sensitivity" in config["operating_points"] and "regression score" in config["operating_points"]["rule"]


def test_tuning_moves_the_thresholds_where_that_helps(tmp_path):
    "Scores on a squeezed scale: the initial cuts give every image grade 0, tuned ones recover the order."
    torch.manual_seed(0)
    model = DRClassifier("test_efficientnet", num_classes=1, pretrained=False).eval()
    config = {"model_name": "test_efficientnet", "num_classes": 1, "class_names": list(DR_GRADES), "task": "dr_regression",
              "label_columns": ["dr"], "image_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
              "preprocessing": dict(PREPROCESSING), "dropout": 0.2, "thresholds": list(DEFAULT_THRESHOLDS)}
    path = save_model(tmp_path/"best_model.pth", model, config)
    images = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(): scores = model(images)[:, 0].numpy()
    grades = torch.as_tensor(np.searchsorted(np.quantile(scores, [0.2, 0.4, 0.6, 0.8]), scores))  # ordered by the score
    loader = [(images[i:i + 8], grades[i:i + 8]) for i in range(0, 40, 8)]
    tuned = tune_thresholds(path, loader)
    assert tuned["qwk_tuned"] > tuned["qwk_initial"] and tuned["qwk_tuned"] > 0.8
    assert tuned["thresholds"] != list(DEFAULT_THRESHOLDS) and tuned["thresholds"] == sorted(tuned["thresholds"])
    assert load_model(path)[1]["thresholds"] == tuned["thresholds"]


def test_evaluate_predict_and_onnx_grade_alike(trained, tmp_path):
    result, df = trained
    model_path = result["best_model_path"]
    thresholds = load_model(model_path)[1]["thresholds"]
    metrics = evaluate_model(model_path, df, tmp_path/"evaluation", device="cpu", bootstrap=5, per_patient=True)
    for key in ("accuracy", "qwk", "macro_f1", "confusion_matrix", "per_class", "referable", "operating_points", "ci"):
        assert key in metrics, key
    assert "ece" not in metrics and metrics["thresholds"] == thresholds
    assert np.isfinite(metrics["referable"]["auc"]) and metrics["operating_points"]["points"]
    table = pd.read_csv(tmp_path/"evaluation"/"predictions.csv")
    assert {"score_dr", "predicted_dr", "referable_score"} <= set(table.columns)
    np.testing.assert_array_equal(table.predicted_dr, np.searchsorted(thresholds, table.score_dr, side="right"))
    onnx_path = tmp_path/"model.onnx"
    report = export_onnx(model_path, onnx_path)
    assert report["max_abs_diff"] < 1e-4 and report["thresholds"] == thresholds
    assert load_classifier(onnx_path).config["thresholds"] == thresholds
    by_torch, by_onnx = predict_images(model_path, list(df.path)), predict_images(onnx_path, list(df.path))
    names = list(DR_GRADES)
    assert list(by_torch.predicted) == [names[g] for g in table.predicted_dr]
    assert list(by_onnx.predicted) == list(by_torch.predicted)
    np.testing.assert_allclose(by_onnx.score, by_torch.score, atol=1e-4)
    assert set(by_torch.referable) <= {"refer", "no referral"}


def test_train_command_reads_a_regression_recipe(dr_dataset, tiny_model, tmp_path, capsys):
    from fundus_lab.cli import main
    recipe = tmp_path/"regression.yaml"
    recipe.write_text("task: dr_regression\nloss: mse\n")
    assert main(["train", "--config", str(recipe), "--labels-csv", str(dr_dataset/"labels.csv"), "--save-dir", str(tmp_path/"run"),
                 *tiny_model, "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "dr_regression, loss mse" in out and "Grade thresholds tuned on the validation split" in out
    _, config = load_model(tmp_path/"run"/"best_model.pth")
    assert config["task"] == "dr_regression" and config["thresholds"] == sorted(config["thresholds"])
    assert main(["train", "--task", "dr_regression", "--loss", "ce_regression", "--save-dir", str(tmp_path/"x")]) == 2
    assert "invalid choice: 'ce_regression'" in capsys.readouterr().err
