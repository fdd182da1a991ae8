"Clinical decisions end to end: synth -> train (operating points saved) -> `evaluate --per-patient --min-quality` -> `predict`."
import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fundus_lab.cli import main
from fundus_lab.data import read_rgb
from fundus_lab.preprocess import image_quality


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    "A tiny DR model trained on generated photos, and a held-out set of 20 photos of 10 patients plus one black photo."
    root = tmp_path_factory.mktemp("clinical")
    assert main(["synth", "--task", "dr", "--n", "40", "--size", "96", "--seed", "0", "--out", str(root/"train")]) == 0
    assert main(["synth", "--task", "dr", "--n", "20", "--size", "96", "--seed", "1", "--out", str(root/"test")]) == 0
    cv2.imwrite(str(root/"test"/"images"/"black.jpg"), np.full((96, 96, 3), 3, np.uint8))  # synth writes JPEG files
    labels = pd.read_csv(root/"test"/"labels.csv")
    black_row = pd.DataFrame([{"id_code": "black", "diagnosis": 0, "patient_id": "black_patient", "eye": "left"}])
    pd.concat([labels, black_row], ignore_index=True).to_csv(root/"test"/"labels.csv", index=False)
    assert main(["train", "--labels-csv", str(root/"train"/"labels.csv"), "--img-dir", str(root/"train"),
                 "--save-dir", str(root/"model"), *tiny_model]) == 0
    return root


def test_training_saves_both_operating_points(trained):
    config = torch.load(trained/"model"/"best_model.pth", map_location="cpu", weights_only=True)["config"]
    points = config["operating_points"]
    assert points["chosen_on"] == "validation split" and "unavailable" not in points
    assert points["high_sensitivity"]["sensitivity"] >= 0.9 and points["high_specificity"]["specificity"] >= 0.907
    assert points["high_sensitivity"]["threshold"] <= points["high_specificity"]["threshold"]


def test_evaluate_per_patient_with_quality_gate(trained, capsys):
    scores = [image_quality(read_rgb(p)).sharpness for p in sorted((trained/"test"/"images").glob("*.jpg")) if p.stem != "black"]
    min_quality = float(np.percentile(scores, 25))
    out = trained/"evaluation"
    assert main(["evaluate", "--labels-csv", str(trained/"test"/"labels.csv"), "--img-dir", str(trained/"test"),
                 "--model-path", str(trained/"model"/"best_model.pth"), "--output-dir", str(out), "--device", "cpu",
                 "--batch-size", "8", "--per-patient", "--min-quality", str(min_quality), "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out/"metrics.json").read_text())
    rows = pd.read_csv(out/"predictions.csv")
    # gradability: the black photo and the photos below the threshold get no grade and are left out of the metrics
    gate = metrics["gradability"]
    n_below = sum(s < min_quality for s in scores)
    assert (gate["n_photos"], gate["n_ungradable"], metrics["n"]) == (21, n_below + 1, 20 - n_below)
    assert gate["imageability"] == pytest.approx((20 - n_below) / 21)
    black = rows[rows.image_id.astype(str) == "black"].iloc[0]
    assert not black.gradable and black.ungradable_reason.startswith("the photo is black") and pd.isna(black.predicted_dr)
    scored = rows[rows.gradable.astype(bool)]
    assert len(scored) == metrics["n"] and scored.predicted_dr.notna().all()
    # both operating points, from the model, per photo: a count by hand
    saved = torch.load(trained/"model"/"best_model.pth", map_location="cpu", weights_only=True)["config"]["operating_points"]
    points = metrics["operating_points"]
    assert points["source"].startswith("model") and set(points["points"]) == {"high_sensitivity", "high_specificity"}
    referable = scored.dr >= 2
    for name, point in points["points"].items():
        assert point["threshold"] == saved[name]["threshold"]
        assert point["sensitivity"] == pytest.approx((scored.referable_score[referable] >= point["threshold"]).mean(), abs=1e-5)
        assert point["specificity"] == pytest.approx((scored.referable_score[~referable] < point["threshold"]).mean(), abs=1e-5)
        assert {f"{name}_sensitivity", f"{name}_specificity"} <= set(points["ci"])
    # per patient: either eye referable; AUROC equal to scikit-learn's on the patient table, sensitivity/specificity by hand
    patients = scored.groupby(scored.patient_id.astype(str)).agg(dr=("dr", "max"), score=("referable_score", "max"))
    per_patient = metrics["per_patient"]
    assert (per_patient["rule"], per_patient["n_patients"]) == ("max", len(patients))
    assert per_patient["auc"] == pytest.approx(roc_auc_score(patients.dr >= 2, patients.score), abs=1e-9)
    for name, point in per_patient["operating_points"].items():
        refer, sick = patients.score >= point["threshold"], patients.dr >= 2
        assert point["sensitivity"] == pytest.approx((refer & sick).sum() / sick.sum(), abs=1e-9)
        assert point["specificity"] == pytest.approx((~refer & ~sick).sum() / (~sick).sum(), abs=1e-9)
    assert {"auc", "high_sensitivity_sensitivity", "high_specificity_specificity"} <= set(per_patient["ci"])
    assert per_patient["ci"]["auc"]["n"] > 0
    # the report and the model card carry the same numbers
    assert "high-sensitivity" in printed and "high-specificity" in printed and "per patient (rule 'max'" in printed
    card = (out/"model_card.md").read_text()
    assert f"| AUROC | {per_patient['auc']:.4f} |" in card
    assert f"imageability {gate['imageability']:.4f}" in card
    assert f"| high_specificity | {points['points']['high_specificity']['threshold']:.4f} |" in card


def test_predict_marks_ungradable_and_names_the_operating_point(trained, capsys):
    photo = sorted((trained/"test"/"images").glob("*.jpg"))[0]
    out = trained/"predictions.csv"
    assert main(["predict", "--model-path", str(trained/"model"/"best_model.pth"), str(photo),
                 str(trained/"test"/"images"/"black.jpg"), "--min-quality", "0", "--operating-point", "high_specificity",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out)
    assert table.gradable.tolist() == [True, False]
    assert table.predicted.tolist()[1] == "ungradable" and table.referable.tolist()[1] == "ungradable"
    assert table.operating_point.tolist()[0] == "high_specificity" and table.referable.tolist()[0] in ("refer", "no referral")
    assert "the high-specificity operating point" in printed and "1 of 2 photos ungradable" in printed
