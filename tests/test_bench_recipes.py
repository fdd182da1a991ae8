"`fundus-lab bench recipes`: one patient split, every recipe trained and scored on it, one table; the task follows the folders."
import json, shutil
from pathlib import Path

import pandas as pd
import pytest

from fundus_lab.cli import main
from fundus_lab.data import read_dataset

TINY = ["model_name=test_efficientnet", "pretrained=false", "image_size=32", "batch_size=8", "epochs=1", "device=cpu"]


@pytest.fixture(scope="module")
def diagnosis_folders(tmp_path_factory) -> Path:
    "Class folders named by diagnoses (normal/, cataract/) holding synthetic photos."
    from fundus_lab.synth import write_dataset
    root = tmp_path_factory.mktemp("bench")
    labels = write_dataset("dr", root/"generated", n=32, size=64, seed=0)
    df = read_dataset(labels, img_dir=labels.parent)
    for path, grade in zip(df.path, df.dr):
        folder = root/"folders"/("normal" if grade < 2 else "cataract")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder)
    return root/"folders"


def test_bench_recipes_table(diagnosis_folders, tmp_path, capsys):
    recipe = tmp_path/"mine.yaml"
    recipe.write_text("adaptation: full\nlr: 1.0e-3\n")
    lora = tmp_path/"lora.yaml"
    lora.write_text("lora_r: 2\nlr: 1.0e-3\n")
    status = main(["bench", "recipes", "--img-dir", str(diagnosis_folders), "--save-dir", str(tmp_path/"bench"),
                   "--recipes", "linear_probe", "default", str(recipe), str(lora), "--set", *TINY, f"cache_dir={tmp_path/'cache'}"])
    out = capsys.readouterr().out
    assert status == 0
    assert "name diagnoses, not DR grades: task 'disease'" in out and "Recipes on 32 photos" in out
    table = pd.read_csv(tmp_path/"bench"/"recipes.csv")
    assert table.recipe.tolist() == ["linear_probe", "default", str(recipe), str(lora)]
    assert list(table.columns) == ["recipe", "cache_min", "train_min", "epochs", "trainable_m", "peak_memory_gib",
                                   "valid_accuracy", "valid_macro_f1"]
    assert table.epochs.tolist() == [0, 1, 1, 1] and table.valid_accuracy.between(0, 1).all()
    full_model, adapters = table.trainable_m.iloc[1], table.trainable_m.iloc[3]
    assert 0 < adapters < full_model / 2 and table.trainable_m.iloc[2] == full_model  # LoRA trains adapters and head only
    assert (table.peak_memory_gib > 0.05).all()
    record = json.loads((tmp_path/"bench"/"recipes.json").read_text())
    assert (record["task"], record["n_train"] + record["n_valid"], record["cpu_cores"] > 0) == ("disease", 32, True)
    splits = [set(pd.read_csv(tmp_path/"bench"/name/"valid_evaluation"/"predictions.csv").image_id)
              for name in ("linear_probe", "default", "mine", "lora")]
    assert splits[0] == splits[1] == splits[2] == splits[3]


@pytest.mark.parametrize("argv, phrase", [
    (["--recipes", "no_such_recipe"], "packaged recipes"),
    (["--set", "epoch=1"], "Did you mean 'epochs'?"),
    (["--set", "epochs"], "write OPTION=VALUE"),
])
def test_bench_recipes_bad_requests(diagnosis_folders, tmp_path, capsys, argv, phrase):
    status = main(["bench", "recipes", "--img-dir", str(diagnosis_folders), "--save-dir", str(tmp_path/"bench"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and phrase in err and "Traceback" not in err, err
    assert not (tmp_path/"bench"/"recipes.csv").exists()


def test_flagship_recipes_differ_only_by_lora():
    "The real-photos chapter compares full fine-tuning with LoRA: the two recipes must differ in nothing else."
    from fundus_lab.experiments import recipe_options
    full, lora = recipe_options("unified_cpu"), recipe_options("unified_lora_cpu")
    assert {k: v for k, v in lora.items() if full.get(k) != v} == {"lora_r": 8, "lora_alpha": 16.0, "lr": 1e-3}
    assert set(full) <= set(lora) and full["task"] == "multilabel"
