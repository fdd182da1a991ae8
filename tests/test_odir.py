"""ODIR-5K as users have it, end to end: the Kaggle copy (`full_df.csv`, one row per photo, with
`preprocessed_images/`) of a few generated photos trains with `--task multilabel` and `--task dr`; columns of
any table are recognised whatever their case and spacing."""
import json, shutil
from pathlib import Path

import pandas as pd
import pytest

from fundus_lab.cli import main
from fundus_lab.data import ODIR_LABELS, detect_format, odir_dr_grade, odir_keyword_flags, odir_patient_flags, read_dataset

TINY = ["--model-name", "test_efficientnet", "--no-pretrained", "--image-size", "32", "--batch-size", "8",
        "--epochs", "1", "--device", "cpu"]
KAGGLE_COLUMNS = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
                  "Right-Diagnostic Keywords", *ODIR_LABELS, "filepath", "labels", "target", "filename"]


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    """Kaggle's layout of 12 generated patients: one row per photo; the copy has no row for 0_left, the photo
    1_right it lists is missing from preprocessed_images/, and two eyes have DR without a grade."""
    out = tmp_path_factory.mktemp("odir")
    assert main(["synth", "--task", "multilabel", "--n", "24", "--size", "48", "--seed", "5", "--out", str(out/"sheet")]) == 0
    sheet = pd.read_csv(out/"sheet"/"labels.csv", dtype=str)
    sheet.loc[2, "Left-Diagnostic Keywords"] = "suspicious diabetic retinopathy"
    sheet.loc[3, "Right-Diagnostic Keywords"] = "diabetic retinopathy，glaucoma"
    published = [odir_patient_flags(left, right) for left, right in
                 zip(sheet["Left-Diagnostic Keywords"], sheet["Right-Diagnostic Keywords"])]
    sheet[ODIR_LABELS] = [[str(flags[c]) for c in ODIR_LABELS] for flags in published]
    photos = [(row, name) for _, row in sheet.iterrows() for name in (row["Left-Fundus"], row["Right-Fundus"])][1:]
    rows = [{**row.to_dict(), "filepath": f"../input/ocular-disease-recognition-odir5k/ODIR-5K/Training Images/{name}",
             "labels": "['N']", "target": "[1, 0, 0, 0, 0, 0, 0, 0]", "filename": name} for row, name in photos]
    pd.DataFrame(rows)[KAGGLE_COLUMNS].to_csv(out/"full_df.csv", index=False)
    shutil.copytree(out/"sheet"/"images", out/"preprocessed_images")
    (out/"preprocessed_images"/"1_right.jpg").unlink()
    return out


def train(capsys, *argv) -> tuple[str, str]:
    "Run `fundus-lab train ARGV` in this process; assert success and return what it printed (stdout, stderr)."
    status = main(["train", *map(str, argv)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out, captured.err


def expected_photos(kaggle) -> pd.DataFrame:
    "The photos of the table that are in the folder, with the flags and DR grade of their own eye's keywords."
    table = pd.read_csv(kaggle/"full_df.csv", dtype=str)
    table = table[[(kaggle/"preprocessed_images"/n).is_file() for n in table.filename]]
    side = ["Left" if n == left else "Right" for n, left in zip(table.filename, table["Left-Fundus"])]
    keywords = [row[f"{s}-Diagnostic Keywords"] for s, (_, row) in zip(side, table.iterrows())]
    return pd.DataFrame({"image_id": table.filename.str.replace(".jpg", "").tolist(),
                         **{c: [odir_keyword_flags(k)[c] for k in keywords] for c in ODIR_LABELS},
                         "dr": pd.array([odir_dr_grade(k) for k in keywords], dtype="Int64")})


def test_kaggle_table_is_read_one_row_per_photo(kaggle):
    with pytest.warns(UserWarning, match=r"left out 1 of 23 photos that are not in .*1_right"):
        df = read_dataset(kaggle/"full_df.csv", kaggle/"preprocessed_images", label_col="multilabel")
    expected = expected_photos(kaggle)
    assert df.image_id.tolist() == expected.image_id.tolist() and "0_left" not in set(df.image_id)
    assert df[ODIR_LABELS].astype(int).values.tolist() == expected[ODIR_LABELS].values.tolist()
    pd.testing.assert_series_equal(df.dr, expected.dr, check_names=False)


def test_train_multilabel_on_kaggle_table(kaggle, tmp_path, capsys):
    save_dir = tmp_path/"ml"
    with pytest.warns(UserWarning, match="left out 1 of 23 photos"):
        out, _ = train(capsys, "--task", "multilabel", "--labels-csv", kaggle/"full_df.csv", "--img-dir",
                       kaggle/"preprocessed_images", "--save-dir", save_dir, *TINY)
    assert "Checking 22 images" in out
    config = json.loads((save_dir/"config.json").read_text())
    assert (config["task"], config["num_classes"]) == ("multilabel", 7)


def test_train_dr_on_kaggle_table(kaggle, tmp_path, capsys):
    graded = expected_photos(kaggle).dr.notna()
    assert (~graded).sum() >= 2  # the two eyes with DR without a grade, perhaps a cataract alone
    save_dir = tmp_path/"dr"
    with pytest.warns(UserWarning, match=f"left out {(~graded).sum()} of 22 photos whose keywords give no DR grade"):
        out, _ = train(capsys, "--task", "dr", "--labels-csv", kaggle/"full_df.csv", "--img-dir",
                       kaggle/"preprocessed_images", "--save-dir", save_dir, *TINY)
    assert f"Checking {graded.sum()} images" in out
    assert json.loads((save_dir/"config.json").read_text())["task"] == "dr"


@pytest.mark.parametrize("header", ["Image,Level", " image , LEVEL "])
def test_column_names_ignore_case_and_spaces(tmp_path, header):
    (tmp_path/"10_left.jpeg").write_bytes(b"")
    (tmp_path/"labels.csv").write_text(f"{header}\n10_left,2\n10_right,0\n")
    assert detect_format(header.split(",")) == "eyepacs"
    df = read_dataset(tmp_path/"labels.csv")
    assert df.dr.tolist() == [2, 0] and df.patient_id.tolist() == ["10", "10"] and df.eye.tolist() == ["left", "right"]
