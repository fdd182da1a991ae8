"""A corpus of bad inputs across the commands: each ends with exit status 2 and a message naming the file, row or flag
(no traceback), or with a correct result; and no input file is changed."""
import json, os, shutil, struct, zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def model(run_cli, dr_dataset, tiny_model, tmp_path_factory) -> Path:
    "A tiny trained model file."
    save_dir = tmp_path_factory.mktemp("corpus_model")/"run"
    result = run_cli("train", "--labels-csv", dr_dataset/"labels.csv", "--img-dir", dr_dataset, "--save-dir", save_dir, *tiny_model)
    assert result.returncode == 0, result.stderr
    return save_dir/"best_model.pth"


def state(folder:Path) -> dict:
    "Every file and link under `folder` with its content: equal states mean nothing was changed."
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink(): found[str(p)] = ("link", os.readlink(p))
        elif p.is_file(): found[str(p)] = p.read_bytes()
    return found


def png_header(width:int, height:int) -> bytes:
    "A PNG signature and IHDR chunk claiming `width` x `height` pixels, with no image data after it."
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))


def labels(data:Path) -> pd.DataFrame: return pd.read_csv(data/"labels.csv", dtype=str)
def first_photo(data:Path) -> Path: return data/"images"/f"{labels(data).id_code[0]}.jpg"
def train(data, out, *extra, table=None):
    return ["train", "--labels-csv", table or data/"labels.csv", "--img-dir", data, "--save-dir", out/"run",
            "--model-name", "test_efficientnet", "--no-pretrained", "--image-size", "64", "--epochs", "1", "--device", "cpu", *extra]
def evaluate(data, out, model, *extra, table=None):
    return ["evaluate", "--labels-csv", table or data/"labels.csv", "--img-dir", data, "--model-path", model,
            "--output-dir", out/"report", "--device", "cpu", *extra]


def empty_csv(data, out, model):
    (data/"labels.csv").write_text("")
    return train(data, out), ["labels.csv", "cannot be read"]

def header_only_csv(data, out, model):
    (data/"labels.csv").write_text("id_code,diagnosis\n")
    return train(data, out), ["no rows"]

def semicolon_csv(data, out, model):
    labels(data).to_csv(data/"labels.csv", sep=";", index=False)
    return train(data, out), ["id_code;diagnosis"]

def text_label(data, out, model):
    t = labels(data); t.loc[2, "diagnosis"] = "severe"; t.to_csv(data/"labels.csv", index=False)
    return train(data, out), ["'severe'"]

def duplicate_ids(data, out, model):
    t = labels(data); pd.concat([t, t.iloc[:1]]).to_csv(data/"labels.csv", index=False)
    return train(data, out), [f"image id {t.id_code[0]} is used by rows"]

def folder_named_like_an_image(data, out, model):
    photo = first_photo(data); photo.unlink(); photo.mkdir()
    return train(data, out), [photo.name]

def zero_byte_photo(data, out, model):
    first_photo(data).write_bytes(b"")
    return train(data, out), [first_photo(data).name, "empty (0 bytes)"]

def one_pixel_photo(data, out, model):
    cv2.imwrite(str(first_photo(data)), np.full((1, 1, 3), 100, np.uint8))
    return train(data, out), [first_photo(data).name, "too small"]

def huge_png_header(data, out, model):
    photo = first_photo(data); photo.unlink()
    (photo.with_suffix(".png")).write_bytes(png_header(100_000, 100_000))
    return train(data, out), [photo.with_suffix(".png").name]

def symlink_loop(data, out, model):
    photo = first_photo(data); photo.unlink(); os.symlink(photo.name, photo)
    return train(data, out), [photo.name]

def text_file_named_png(data, out, model):
    photo = first_photo(data); photo.write_text("scanned by the clinic's archive system")
    return train(data, out), [photo.name, "not an image"]

def white_photo(data, out, model):
    cv2.imwrite(str(first_photo(data)), np.full((96, 128, 3), 255, np.uint8))
    return train(data, out), [first_photo(data).name, "white"]

def labels_table_is_a_folder(data, out, model):
    (data/"folder.csv").mkdir()
    return train(data, out, table=data/"folder.csv"), ["folder.csv"]

def damaged_spreadsheet(data, out, model):
    pytest.importorskip("openpyxl")
    labels(data).to_excel(data/"labels.xlsx", index=False)
    raw = (data/"labels.xlsx").read_bytes(); (data/"labels.xlsx").write_bytes(raw[: len(raw) // 2])
    return train(data, out, table=data/"labels.xlsx"), ["labels.xlsx"]

def yaml_config_is_a_list(data, out, model):
    (data/"recipe.yaml").write_text("- epochs: 3\n- lr: 0.1\n")
    return train(data, out, "--config", data/"recipe.yaml"), ["recipe.yaml", "mapping"]

def missing_config(data, out, model):
    return train(data, out, "--config", data/"nowhere.yaml"), ["nowhere.yaml"]

def negative_epochs(data, out, model): return train(data, out, "--epochs", "-3"), ["--epochs"]
def zero_batch_size(data, out, model): return train(data, out, "--batch-size", "0"), ["--batch-size"]
def val_split_above_one(data, out, model): return train(data, out, "--val-split", "1.5"), ["--val-split"]
def image_size_one(data, out, model): return train(data, out, "--image-size", "1"), ["--image-size"]
def loss_params_not_json(data, out, model): return train(data, out, "--loss-params", "alpha=1"), ["--loss-params"]
def unknown_loss_param(data, out, model):
    return train(data, out, "--loss", "focal", "--loss-params", '{"alhpa": 0.5}'), ["'alhpa'", "alpha"]
def absent_device(data, out, model): return train(data, out, "--device", "cuda:7"), ["--device"]

def save_dir_is_a_file(data, out, model):
    out.mkdir(exist_ok=True); (out/"run").write_text("my notes")
    return train(data, out), [str(out/"run"), "not a folder"]

def model_is_a_zip_of_junk(data, out, model):
    import zipfile
    with zipfile.ZipFile(data/"junk.pth", "w") as z: z.writestr("data.txt", "not a model")
    return evaluate(data, out, data/"junk.pth"), ["junk.pth"]

def model_is_a_text_file(data, out, model):
    (data/"notes.pth").write_text("weights: see the shared drive")
    return ["predict", "--model-path", data/"notes.pth", first_photo(data)], ["notes.pth"]

def opset_one(data, out, model):
    return ["export", "--model-path", model, "--onnx", out/"m.onnx", "--opset", "1"], ["--opset 1"]

def opset_ninety_nine(data, out, model):
    return ["export", "--model-path", model, "--onnx", out/"m.onnx", "--opset", "99"], ["--opset 99"]

def export_to_a_text_file(data, out, model):
    return ["export", "--model-path", model, "--onnx", out/"m.txt"], ["m.txt"]

def predict_folder_without_images(data, out, model):
    (data/"empty").mkdir()
    return ["predict", "--model-path", model, data/"empty"], ["empty"]

def predict_missing_path(data, out, model):
    return ["predict", "--model-path", model, data/"nowhere.jpg"], ["nowhere.jpg"]

def predict_output_over_a_photo(data, out, model):
    return ["predict", "--model-path", model, first_photo(data), "--output", first_photo(data)], [first_photo(data).name]

def evaluate_report_into_the_image_folder(data, out, model):
    return ["evaluate", "--labels-csv", data/"labels.csv", "--img-dir", data, "--model-path", model,
            "--output-dir", data/"images"/"report", "--device", "cpu"], ["--output-dir", "input folder"]

def evaluate_over_the_labels_table(data, out, model):
    shutil.copy(data/"labels.csv", out/"predictions.csv")
    return evaluate(data, out, model, table=out/"predictions.csv")[:-4] + ["--output-dir", out, "--device", "cpu"], ["predictions.csv"]


ERRORS = [empty_csv, header_only_csv, semicolon_csv, text_label, duplicate_ids, folder_named_like_an_image, zero_byte_photo,
          one_pixel_photo, huge_png_header, symlink_loop, text_file_named_png, white_photo, labels_table_is_a_folder,
          damaged_spreadsheet, yaml_config_is_a_list, missing_config, negative_epochs, zero_batch_size, val_split_above_one,
          image_size_one, loss_params_not_json, unknown_loss_param, absent_device, save_dir_is_a_file, model_is_a_zip_of_junk,
          model_is_a_text_file, opset_one, opset_ninety_nine, export_to_a_text_file, predict_folder_without_images,
          predict_missing_path, predict_output_over_a_photo, evaluate_report_into_the_image_folder, evaluate_over_the_labels_table]


@pytest.mark.parametrize("case", ERRORS, ids=[c.__name__ for c in ERRORS])
def test_bad_input_ends_in_a_clear_message(case, run_cli, dr_dataset, model, tmp_path):
    data, out = Path(shutil.copytree(dr_dataset, tmp_path/"in"/"data")), tmp_path/"out"
    out.mkdir()
    args, phrases = case(data, out, model)
    before = state(tmp_path/"in")
    before_out = state(out)
    result = run_cli(*args)
    assert result.returncode == 2, (result.returncode, result.stdout[-1500:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for phrase in phrases: assert phrase in result.stderr, (phrase, result.stderr[-3000:])
    assert len(result.stderr) < 10_000, len(result.stderr)
    assert state(tmp_path/"in") == before and state(out) == before_out


def test_bom_and_unicode_paths_give_a_correct_result(run_cli, dr_dataset, model, tmp_path):
    data = Path(shutil.copytree(dr_dataset, tmp_path/"données patient"/"fond d'œil"))
    (data/"labels.csv").write_bytes("\ufeff".encode() + (data/"labels.csv").read_bytes())
    result = run_cli("evaluate", "--labels-csv", data/"labels.csv", "--img-dir", data, "--model-path", model,
                     "--output-dir", tmp_path/"rapport", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = pd.read_csv(tmp_path/"rapport"/"predictions.csv")
    assert len(predictions) == len(pd.read_csv(dr_dataset/"labels.csv"))
    assert 0 <= json.loads((tmp_path/"rapport"/"metrics.json").read_text())["accuracy"] <= 1


def test_white_photo_in_predict_is_flagged_not_graded(run_cli, dr_dataset, model, tmp_path):
    cv2.imwrite(str(tmp_path/"white.png"), np.full((96, 128, 3), 255, np.uint8))
    result = run_cli("predict", "--model-path", model, tmp_path/"white.png", first_photo(dr_dataset), "--output", tmp_path/"p.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(tmp_path/"p.csv")
    assert table.predicted[0] == "ungradable" and "white" in table.ungradable_reason[0]
    assert table.predicted[1] != "ungradable"
