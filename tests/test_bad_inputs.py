"Bad datasets and bad options: `fundus-lab` stops before any training with a message naming what to fix, exit status 2."
import pandas as pd
import pytest
import torch

from fundus_lab.cli import main


def train_args(data, save_dir, *extra):
    return ["train", "--labels-csv", data/"labels.csv", "--img-dir", data, "--save-dir", save_dir, *extra]


def assert_user_error(result, *phrases):
    "A clean failure: status 2, every phrase in the message, no traceback."
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    for phrase in phrases: assert phrase in result.stderr, (phrase, result.stderr)
    assert "Traceback" not in result.stderr


def test_broken_dataset_is_refused_before_training(run_cli, dataset_copy, tiny_model, tmp_path):
    labels = pd.read_csv(dataset_copy/"labels.csv", dtype=str)
    truncated, not_an_image = (dataset_copy/"images"/f"{i}.jpg" for i in labels.id_code[:2])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    not_an_image.write_text("<html><body>404 Not Found</body></html>")
    missing_row = pd.DataFrame([{"id_code": "no_such_photo", "diagnosis": "1", "patient_id": "p_missing", "eye": "left"}])
    pd.concat([labels, missing_row]).to_csv(dataset_copy/"labels.csv", index=False)

    save_dir = tmp_path/"model"
    result = run_cli(*train_args(dataset_copy, save_dir, *tiny_model))
    assert_user_error(result, truncated.name, not_an_image.name, "no_such_photo", "Nothing was trained")
    assert "Training" not in result.stdout
    assert not (save_dir/"best_model.pth").exists()
    assert not save_dir.exists()


def test_unknown_format_name(run_cli, dr_dataset, tmp_path):
    assert_user_error(run_cli(*train_args(dr_dataset, tmp_path/"m", "--format", "kaggle")),
                      "argument --format: invalid choice: 'kaggle'", "aptos")


def test_unrecognised_table_columns(run_cli, dataset_copy, tmp_path):
    table = pd.read_csv(dataset_copy/"labels.csv").rename(columns={"id_code": "filename", "diagnosis": "grade"})
    table.to_csv(dataset_copy/"labels.csv", index=False)
    assert_user_error(run_cli(*train_args(dataset_copy, tmp_path/"m")), "Unrecognised labels table", "filename")
    assert not (tmp_path/"m").exists()


def test_label_out_of_range(run_cli, dataset_copy, tmp_path):
    table = pd.read_csv(dataset_copy/"labels.csv", dtype=str)
    table.loc[3, "diagnosis"] = "7"
    table.to_csv(dataset_copy/"labels.csv", index=False)
    assert_user_error(run_cli(*train_args(dataset_copy, tmp_path/"m")), f"image {table.id_code[3]}", "dr = 7 is outside 0-4")
    assert not (tmp_path/"m").exists()


def test_missing_labels_table(run_cli, dr_dataset, tmp_path):
    result = run_cli("train", "--labels-csv", tmp_path/"nowhere.csv", "--img-dir", dr_dataset, "--save-dir", tmp_path/"m")
    assert_user_error(result, f"{tmp_path/'nowhere.csv'} not found")


def test_evaluate_missing_model(run_cli, dr_dataset, tmp_path):
    result = run_cli("evaluate", "--labels-csv", dr_dataset/"labels.csv", "--img-dir", dr_dataset,
                     "--model-path", tmp_path/"none.pth", "--output-dir", tmp_path/"evaluation")
    assert_user_error(result, f"No model file at {tmp_path/'none.pth'}")
    assert not (tmp_path/"evaluation").exists()


def test_pretrained_weights_unavailable(run_cli, dr_dataset, tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path/"empty_hf_cache")}
    result = run_cli(*train_args(dr_dataset, tmp_path/"m", "--model-name", "test_efficientnet", "--pretrained",
                                 "--image-size", "64", "--epochs", "1", "--device", "cpu"), **offline)
    assert_user_error(result, "Could not get the ImageNet weights of 'test_efficientnet'", "--no-pretrained")
    assert not (tmp_path/"m"/"best_model.pth").exists()


def test_evaluate_file_that_is_not_a_model(dr_dataset, tmp_path, capsys):
    (tmp_path/"notes.pth").write_text("not a model")
    assert main(["evaluate", "--labels-csv", str(dr_dataset/"labels.csv"), "--model-path", str(tmp_path/"notes.pth")]) == 2
    assert "is not a fundus-lab model" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, phrase", [
    ("--epochs", "0", "argument --epochs: 0 is not a positive whole number"),
    ("--batch-size", "-4", "argument --batch-size: -4 is not a positive whole number"),
    ("--image-size", "big", "argument --image-size: invalid positive_int value: 'big'"),
    ("--val-split", "1.5", "argument --val-split: 1.5 is not between 0 and 1"),
    ("--lr", "0", "argument --lr: 0 is not a positive number"),
    ("--dropout", "1", "argument --dropout: 1 is not in [0, 1)"),
    ("--num-workers", "-1", "argument --num-workers: -1 is negative"),
    ("--task", "grading", "argument --task: invalid choice: 'grading'"),
    ("--model-name", "efficientnet_b99", "unknown architecture 'efficientnet_b99'"),
    ("--num-classes", "3", "5 grades"),
    ("--image-size", "8", "below the smallest network input, 32 pixels"),
])
def test_bad_option_values(dr_dataset, tmp_path, capsys, option, value, phrase):
    argv = [str(a) for a in train_args(dr_dataset, tmp_path/"m", "--image-size", "64", option, value)]  # the photos are 96 pixels high
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err, err
    assert not (tmp_path/"m"/"best_model.pth").exists()


def test_no_dataset_given(capsys):
    assert main(["train"]) == 2
    assert "pass --labels-csv" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_unavailable_device(dr_dataset, tmp_path, capsys):
    assert main([str(a) for a in train_args(dr_dataset, tmp_path/"m", "--device", "cuda")]) == 2
    assert "--device: Device 'cuda' is not available" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="No model file"):
        main(["--debug", "evaluate", "--img-dir", str(tmp_path), "--model-path", str(tmp_path/"none.pth")])
