"""The real-photos chapter reruns with FUNDUS_DATA set: its benchmarks, on a generated stand-in of both real sets'
layouts (class folders; ODIR-5K's Kaggle `full_df.csv`) with a tiny network, write a results file holding everything
the chapter reads."""
import math, shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fundus_lab.data import UNIFIED_LABELS
from fundus_lab.real_photos import (FLAGSHIP_RECIPES, HEADLINE, REAL_SETS, TARGETS, recipe_table, run_flagship_benchmark,
                                    run_real_benchmarks, target_table)
from fundus_lab.synth import write_dataset
from test_odir import KAGGLE_COLUMNS

TINY = dict(model_name="test_efficientnet", pretrained=False, image_size=32, batch_size=8, epochs=1, device="cpu", num_workers=0)
EYE4_FOLDERS = {0: "normal", 1: "cataract", 2: "glaucoma", 3: "diabetic_retinopathy", 4: "diabetic_retinopathy"}  # DR grade -> folder


@pytest.fixture(scope="module")
def fundus_data(tmp_path_factory) -> Path:
    "A FUNDUS_DATA folder of generated photos: eye4_dev/ in class folders and odir_dev/ as the Kaggle copy ships."
    root = tmp_path_factory.mktemp("fundus_data")
    labels = write_dataset("dr", root/"generated_dr", n=40, size=48, seed=3)
    for row in pd.read_csv(labels).itertuples():
        folder = root/"eye4_dev"/EYE4_FOLDERS[row.diagnosis]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(labels.parent/"images"/f"{row.id_code}.jpg", folder)
    sheet_csv = write_dataset("multilabel", root/"generated_odir", n=64, size=48, seed=4)
    sheet = pd.read_csv(sheet_csv, dtype=str)
    photos = [{**row.to_dict(), "filepath": f"ODIR-5K/Training Images/{name}", "labels": "[]", "target": "[]", "filename": name}
              for _, row in sheet.iterrows() for name in (row["Left-Fundus"], row["Right-Fundus"])]
    (root/"odir_dev").mkdir()
    pd.DataFrame(photos)[KAGGLE_COLUMNS].to_csv(root/"odir_dev"/"full_df.csv", index=False)
    shutil.copytree(sheet_csv.parent/"images", root/"odir_dev"/"preprocessed_images")
    return root


@pytest.fixture(scope="module")
def rerun(fundus_data, tmp_path_factory) -> dict:
    "The results file the chapter's rerun writes: the three benchmarks, then the flagship run."
    out = tmp_path_factory.mktemp("runs")
    run_real_benchmarks(fundus_data, out/"real_photos", results_file=out/"real_photos.json", **TINY)
    return run_flagship_benchmark(fundus_data, out/"flagship", results_file=out/"real_photos.json", **TINY)


def test_every_set_has_its_recipes_and_a_cold_cache(rerun):
    assert set(rerun["sets"]) == set(REAL_SETS)
    for name, spec in REAL_SETS.items():
        table, bench = recipe_table(rerun, name), rerun["sets"][name]
        assert list(table.index) == list(spec["recipes"]) and table.index[0] == "linear_probe"
        assert table[HEADLINE[spec["task"]]].between(0, 1).all()
        cold = bench["cold_cache"]
        assert cold["photos"] == bench["n_train"] + bench["n_valid"] and cold["size"] == TINY["image_size"] and cold["seconds"] > 0
        assert math.isclose(cold["seconds"], 60 * table.cache_min.sum(), abs_tol=0.1)  # the first recipe built it


def test_regression_cut_points_and_targets_are_recorded(rerun):
    tuning = rerun["sets"]["odir_dr"]["threshold_tuning"]["dr_regression"]
    assert tuning["chosen_on"] == "validation split" and tuning["qwk_tuned"] >= tuning["qwk_initial"]
    targets = target_table(rerun)
    assert len(targets) == len(TARGETS) and targets.default_minutes.gt(0).all()


def test_flagship_reports_every_flag_of_both_recipes(rerun):
    flagship = recipe_table({"sets": {"flagship": rerun["flagship"]}}, "flagship")
    assert list(flagship.index) == list(FLAGSHIP_RECIPES)
    assert flagship.loc["unified_lora_cpu", "trainable_m"] < flagship.loc["unified_cpu", "trainable_m"]
    assert {r: len(m) for r, m in rerun["flagship"]["epoch_min"].items()} == {r: TINY["epochs"] for r in FLAGSHIP_RECIPES}
    for recipe in FLAGSHIP_RECIPES:
        report = pd.DataFrame(rerun["flagship"]["flags"][recipe]).T
        assert list(report.index) == list(UNIFIED_LABELS)
        assert np.allclose(report.prevalence * rerun["flagship"]["n_valid"], report.positive_photos)


def test_dr_referral_is_decided_per_photo_and_per_patient(rerun):
    decisions = rerun["sets"]["odir_dr"]["referral_decisions"]
    assert decisions["recipe"] == REAL_SETS["odir_dr"]["decisions"] and decisions["n_photos"] == rerun["sets"]["odir_dr"]["n_valid"]
    assert set(decisions["operating_points"]["points"]) == {"high_sensitivity", "high_specificity"}
    patients = decisions["per_patient"]
    assert 0 < patients["n_patients"] < decisions["n_photos"] and patients["rule"] == "max"
    assert not {k for k, s in rerun["sets"].items() if "referral_decisions" in s} - {"odir_dr"}
