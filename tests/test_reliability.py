"Runs that cannot mix or clobber, one decoder for every photo, and a message (exit 2) instead of a traceback for every user error."
import errno, json, os, shutil, zipfile

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from fundus_lab.cli import main
from fundus_lab.core import LOCK_NAME, run_lock
from fundus_lab.synth import synth_fundus


def assert_user_error(code, err, *phrases):
    "A clean failure: status 2, every phrase in the message, no traceback."
    assert code == 2, (code, err)
    for phrase in phrases: assert phrase in err, (phrase, err)
    assert "Traceback" not in err


def train_args(data, save_dir, tiny_model, *extra):
    return ["train", "--labels-csv", data/"labels.csv", "--img-dir", data, "--save-dir", save_dir, *tiny_model, *extra]


def folder_state(folder):
    "Every file under `folder` with its bytes: two equal states are the same folder."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(dr_dataset, tiny_model, tmp_path_factory):
    "A save folder holding a finished tiny run (best_model.pth, histories, config)."
    save_dir = tmp_path_factory.mktemp("trained")/"run"
    assert main(train_args(dr_dataset, save_dir, tiny_model)) == 0
    return save_dir


# One decoder: a photo carrying an EXIF orientation tag is the same upright picture everywhere

@pytest.fixture
def tagged(tmp_path):
    "(a JPEG whose EXIF orientation 6 says 'turn me 90 degrees', the upright picture, the same picture as untagged PNG)."
    sensor = synth_fundus(3, 96)[:, 8:88]  # 96 x 80: not square, so a wrong turn changes the shape
    exif = Image.Exif(); exif[0x0112] = 6
    Image.fromarray(sensor).save(tmp_path/"tagged.jpg", quality=95, exif=exif)
    with Image.open(tmp_path/"tagged.jpg") as im: upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    Image.fromarray(upright).save(tmp_path/"upright.png")
    return tmp_path/"tagged.jpg", upright, tmp_path/"upright.png"


def test_exif_orientation_in_training_and_cache(tagged, tmp_path):
    from fundus_lab.cache import build_cache, load_fundus
    from fundus_lab.data import read_rgb
    from fundus_lab.train import FundusDataset
    path, upright, png = tagged
    assert read_rgb(path).shape == upright.shape == (80, 96, 3)
    assert np.array_equal(read_rgb(path), upright)
    table = pd.DataFrame({"path": [str(path), str(png)], "dr": [0, 0]})
    dataset = FundusDataset(table, "dr", size=64)
    assert torch.equal(dataset[0][0], dataset[1][0])
    cached = build_cache(table, tmp_path/"cache", size=64)
    assert np.array_equal(read_rgb(cached.path[0]), read_rgb(cached.path[1]))
    big = cv2.resize(synth_fundus(4, 400), (400, 320))  # large enough for a 1/4-size decode at 64 pixels
    exif = Image.Exif(); exif[0x0112] = 6
    Image.fromarray(big).save(tmp_path/"big.jpg", quality=95, exif=exif)
    reduced = load_fundus(tmp_path/"big.jpg", 64)
    with Image.open(tmp_path/"big.jpg") as im: reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    from fundus_lab.preprocess import prepare_fundus
    assert np.abs(reduced.astype(int) - prepare_fundus(reference, 64).astype(int)).mean() < 4


def test_exif_orientation_in_evaluate_and_predict(tagged, trained):
    from fundus_lab.evaluate import load_models, predict_probs
    from fundus_lab.export import predict_images
    path, _, png = tagged
    table = pd.DataFrame({"path": [str(path), str(png)]})
    [(model, config, _)] = load_models(trained/"best_model.pth")
    probs = predict_probs(model, table, config["image_size"], batch_size=2)
    np.testing.assert_allclose(probs[0], probs[1], atol=1e-6)
    predicted = predict_images(trained/"best_model.pth", [path, png])
    columns = [c for c in predicted.columns if c.startswith("prob_")]
    np.testing.assert_allclose(predicted[columns].to_numpy()[0], predicted[columns].to_numpy()[1], atol=1e-6)


# Save folders: one run at a time, never a mix, inputs never overwritten

def test_second_run_into_a_busy_folder_is_refused(run_cli, dr_dataset, tiny_model, tmp_path):
    with run_lock(tmp_path/"run"):
        result = run_cli(*train_args(dr_dataset, tmp_path/"run", tiny_model))
    assert_user_error(result.returncode, result.stderr, f"is in use by another run (pid {os.getpid()}")
    assert not (tmp_path/"run"/"config.json").exists()


def test_rerun_that_stops_before_training_leaves_the_folder_as_found(trained, dr_dataset, tiny_model, tmp_path, capsys,
                                                                    monkeypatch):
    from fundus_lab.checkpoints import StopOnNonFiniteLoss
    earlier = shutil.copytree(trained, tmp_path/"run")
    before = folder_state(earlier)
    checker = StopOnNonFiniteLoss.after_loss
    def diverging(self):
        self.learn.loss = self.learn.loss * float("nan")
        checker(self)
    monkeypatch.setattr(StopOnNonFiniteLoss, "after_loss", diverging)
    code = main(train_args(dr_dataset, earlier, tiny_model))
    assert_user_error(code, capsys.readouterr().err, "The training loss became nan", "Try a lower learning rate")
    assert folder_state(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_full_disk_is_a_message_with_path_and_free_space(dr_dataset, tiny_model, tmp_path, capsys, monkeypatch):
    def no_space(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(torch, "save", no_space)
    code = main(train_args(dr_dataset, tmp_path/"run", tiny_model))
    err = capsys.readouterr().err
    assert_user_error(code, err, f"Could not write {tmp_path/'run'}", "the disk is full", "MB free in")
    assert not (tmp_path/"run").exists()


def test_evaluate_never_writes_over_its_inputs(trained, dataset_copy, capsys):
    shutil.copy(dataset_copy/"labels.csv", dataset_copy/"predictions.csv")
    common = ["evaluate", "--model-path", trained/"best_model.pth", "--device", "cpu"]
    code = main([*common, "--labels-csv", dataset_copy/"predictions.csv", "--img-dir", dataset_copy, "--output-dir", dataset_copy/"report"])
    assert_user_error(code, capsys.readouterr().err, "inside the input folder")
    elsewhere = dataset_copy.parent/"tables"
    elsewhere.mkdir(); shutil.move(dataset_copy/"predictions.csv", elsewhere/"predictions.csv")
    code = main([*common, "--labels-csv", elsewhere/"predictions.csv", "--img-dir", dataset_copy, "--output-dir", elsewhere])
    assert_user_error(code, capsys.readouterr().err, "would overwrite the input file")
    assert (elsewhere/"predictions.csv").read_bytes() == (dataset_copy/"labels.csv").read_bytes()
    assert not (dataset_copy/"report").exists()


def test_predict_never_writes_over_an_input(trained, dr_dataset, capsys):
    photo = next((dr_dataset/"images").iterdir())
    before = photo.read_bytes()
    code = main(["predict", "--model-path", trained/"best_model.pth", photo, "--output", photo])
    assert_user_error(code, capsys.readouterr().err, "overwrite the input file")
    assert photo.read_bytes() == before


# Photos with nothing to grade

def test_near_empty_photos_are_refused_by_training_and_evaluate(trained, dataset_copy, tiny_model, tmp_path, capsys):
    labels = pd.read_csv(dataset_copy/"labels.csv", dtype=str)
    dot, white, black = (dataset_copy/"images"/f"{i}.jpg" for i in labels.id_code[:3])
    cv2.imwrite(str(dot), np.full((1, 1, 3), 120, np.uint8))
    cv2.imwrite(str(white), np.full((96, 128, 3), 255, np.uint8))
    cv2.imwrite(str(black), np.zeros((2000, 2000, 3), np.uint8))
    code = main(train_args(dataset_copy, tmp_path/"run", tiny_model))
    err = capsys.readouterr().err
    assert_user_error(code, err, f"{dot}: too small: 1x1 pixels", f"{white}: the photo is white", f"{black}: the photo is black",
                      "Nothing was trained")
    assert not (tmp_path/"run").exists()
    code = main(["evaluate", "--model-path", trained/"best_model.pth", "--labels-csv", dataset_copy/"labels.csv",
                 "--img-dir", dataset_copy, "--output-dir", tmp_path/"report", "--device", "cpu"])
    assert_user_error(code, capsys.readouterr().err, f"{dot}: too small", "Nothing was evaluated")


def test_predict_flags_a_one_pixel_photo(trained, dr_dataset, tmp_path, capsys):
    cv2.imwrite(str(tmp_path/"dot.png"), np.full((1, 1, 3), 120, np.uint8))
    photo = next((dr_dataset/"images").iterdir())
    assert main(["predict", "--model-path", trained/"best_model.pth", tmp_path/"dot.png", photo, "--output", tmp_path/"p.csv"]) == 0
    table = pd.read_csv(tmp_path/"p.csv", keep_default_na=False)
    assert table.predicted.tolist()[0] == "ungradable" and table.predicted.tolist()[1] != "ungradable"
    assert table.ungradable_reason[0].startswith("too small: 1x1 pixels") and table.ungradable_reason[1] == ""
    assert table.filter(like="prob_").iloc[0].eq("").all()
    assert "1 of 2 photos ungradable: not graded" in capsys.readouterr().out


# Messages instead of tracebacks

def test_unknown_loss_parameter_lists_the_valid_ones(dr_dataset, tiny_model, tmp_path, capsys):
    code = main(train_args(dr_dataset, tmp_path/"run", tiny_model, "--loss", "cb_focal", "--loss-params", '{"betta": 0.9}'))
    assert_user_error(code, capsys.readouterr().err, "unknown parameter(s) 'betta' for the loss 'cb_focal'", "beta, reduction")
    assert not (tmp_path/"run").exists()


def test_image_size_below_the_minimum(dr_dataset, tmp_path, capsys):
    code = main(["train", "--labels-csv", dr_dataset/"labels.csv", "--save-dir", tmp_path/"run", "--image-size", "1"])
    assert_user_error(code, capsys.readouterr().err, "--image-size: an image size of 1 pixels is below", "32")


@pytest.mark.parametrize("opset", ["1", "99"])
def test_unsupported_opset_gives_the_range(trained, tmp_path, capsys, opset):
    from fundus_lab.export import supported_opsets
    low, high = supported_opsets()
    code = main(["export", "--model-path", trained/"best_model.pth", "--onnx", tmp_path/"m.onnx", "--opset", opset])
    err = capsys.readouterr().err
    assert_user_error(code, err, f"--opset {opset}", f"opsets {low} to {high}")
    assert len(err) < 500 and not (tmp_path/"m.onnx").exists()


def test_damaged_spreadsheet_is_named(dr_dataset, tmp_path, capsys):
    pytest.importorskip("openpyxl")
    pd.read_csv(dr_dataset/"labels.csv").to_excel(tmp_path/"labels.xlsx", index=False)
    data = (tmp_path/"labels.xlsx").read_bytes()
    (tmp_path/"labels.xlsx").write_bytes(data[: len(data) // 2])
    code = main(["train", "--labels-csv", tmp_path/"labels.xlsx", "--img-dir", dr_dataset, "--save-dir", tmp_path/"run"])
    assert_user_error(code, capsys.readouterr().err, f"{tmp_path/'labels.xlsx'} is a damaged or incomplete spreadsheet")


def test_model_file_with_image_size_zero_is_blamed(trained, dr_dataset, tmp_path, capsys):
    checkpoint = torch.load(trained/"best_model.pth", weights_only=False)
    checkpoint["config"]["image_size"] = 0
    torch.save(checkpoint, tmp_path/"edited.pth")
    photo = next((dr_dataset/"images").iterdir())
    assert_user_error(main(["predict", "--model-path", tmp_path/"edited.pth", photo]), capsys.readouterr().err,
                      f"{tmp_path/'edited.pth'}: the model file records an image size of 0")
    code = main(["evaluate", "--model-path", tmp_path/"edited.pth", "--labels-csv", dr_dataset/"labels.csv",
                 "--output-dir", tmp_path/"report", "--device", "cpu"])
    assert_user_error(code, capsys.readouterr().err, f"{tmp_path/'edited.pth'}: the model file records an image size of 0")


# The run's record

def test_history_csv_after_resume_and_files_honour_the_umask(tmp_path):
    from fundus_lab.data import read_dataset
    from fundus_lab.experiments import train_experiment
    from fundus_lab.synth import write_dataset
    df = read_dataset(write_dataset("dr", tmp_path/"data", n=16, size=48, seed=2), img_dir=tmp_path/"data"/"images")
    options = dict(model_name="test_efficientnet", pretrained=False, image_size=32, batch_size=6, epochs=3, device="cpu",
                   random_seed=1, save_freq=1)
    old = os.umask(0o027)
    try:
        train_experiment(df, tmp_path/"run", **options)
        train_experiment(df, tmp_path/"run", resume=tmp_path/"run"/"checkpoint_epoch_1.pth", **options)
    finally: os.umask(old)
    log = pd.read_csv(tmp_path/"run"/"history.csv")
    history = json.loads((tmp_path/"run"/"training_history.json").read_text())
    assert log.epoch.tolist() == [0, 1, 2] and log.notna().all().all()
    np.testing.assert_allclose(log.valid_loss, [r["valid_loss"] for r in history], atol=1e-4)
    for name in ("best_model.pth", "config.json", "training_history.json", "last_checkpoint.pth"):
        assert (tmp_path/"run"/name).stat().st_mode & 0o777 == 0o640, name


def test_long_lists_of_rows_are_summarised(tmp_path):
    from fundus_lab.data import to_canonical, validate_dataset
    same = to_canonical(pd.DataFrame({"image_id": ["x"] * 5000, "patient_id": "p", "path": str(tmp_path/"x.png"), "dr": 0}))
    text = validate_dataset(same, check_images=False).summary()
    assert "(5000 rows)" in text and len(text) < 2000, len(text)
