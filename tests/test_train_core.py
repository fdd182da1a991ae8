"The training engine at tiny size: two-stage runs resumed at a stage boundary and inside stage 2, explicit validation tables."
import json
from pathlib import Path

import pytest

from fundus_lab.data import read_dataset
from fundus_lab.train import train_model

TINY = dict(model_name="test_efficientnet", pretrained=False, image_size=32, batch_size=6, device="cpu", random_seed=5)
TWO_STAGE = dict(two_stage=True, epochs_stage1=1, epochs_stage2=2, lr_stage1=1e-2, lr_stage2=3e-3, schedule="cosine",
                 warmup_epochs=0.5, save_freq=1)


def reproducible(save_dir) -> list[dict]:
    records = json.loads((Path(save_dir)/"training_history.json").read_text())
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "peak_memory_mb")} for r in records]


@pytest.fixture(scope="module")
def df(tmp_path_factory):
    from fundus_lab.synth import write_dataset
    out = tmp_path_factory.mktemp("core_data")
    return read_dataset(write_dataset("dr", out, n=24, size=48, seed=1), img_dir=out/"images")


@pytest.fixture(scope="module")
def reference(df, tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("reference")
    train_model(df, save_dir, **TINY, **TWO_STAGE)
    return save_dir


def test_two_stage_outputs(reference):
    assert [(r["epoch"], r["stage"]) for r in reproducible(reference)] == [(1, 1), (2, 2), (3, 2)]
    for name in ["best_model.pth", "best_stage1.pth", "last_checkpoint.pth", "training_curves.png", "config.json",
                 *(f"checkpoint_epoch_{e}.pth" for e in (1, 2, 3))]:
        assert (reference/name).is_file(), name


@pytest.mark.parametrize("epoch", [1, 2])  # 1: stage 1 finished, stage 2 not begun; 2: inside stage 2
def test_resumed_two_stage_run_equals_uninterrupted_run(df, reference, tmp_path, epoch):
    train_model(df, tmp_path, **TINY, **TWO_STAGE, resume=reference/f"checkpoint_epoch_{epoch}.pth")
    assert reproducible(tmp_path) == reproducible(reference)


def test_explicit_validation_table(df, tmp_path):
    patients = sorted(df.patient_id.unique())
    is_valid = df.patient_id.isin(patients[:3])
    result = train_model(df[~is_valid], tmp_path, **TINY, epochs=1, valid_df=df[is_valid])
    config = json.loads(Path(result["config_path"]).read_text())
    assert (config["n_train"], config["n_valid"], config["arguments"]["valid_df"]) == ((~is_valid).sum(), is_valid.sum(), is_valid.sum())
