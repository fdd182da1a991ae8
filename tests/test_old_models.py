"Models and checkpoints written by fundus-lab 0.x before the training refactor still load, evaluate to the same metrics and resume."
import json, math
from pathlib import Path

import pytest

from fundus_lab.data import read_dataset
from fundus_lab.evaluate import evaluate_model

FIXTURES = Path(__file__).parent/"fixtures"/"v0_runs"  # written by the code of commit e90da9d (tiny test_efficientnet, 32 px)
NOT_REPRODUCIBLE = ("epoch_time_s", "peak_memory_mb")


def numbers(value):
    "The numeric leaves of a metrics record (paths and run details left out), NaN as None."
    if isinstance(value, dict): return {k: numbers(v) for k, v in value.items() if k not in ("model_path", "bootstrap", "tta")}
    if isinstance(value, list): return [numbers(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def assert_close(got, expected, where="metrics"):
    "Every entry of `expected` in `got` (which may report more, as later versions add metrics), numbers equal to 1e-6."
    if isinstance(expected, dict):
        assert set(expected) <= set(got), where
        for k in expected: assert_close(got[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)): assert_close(g, e, f"{where}[{i}]")
    elif isinstance(expected, float): assert got == pytest.approx(expected, abs=1e-6), where
    else: assert got == expected, where


@pytest.fixture(scope="module")
def table():
    return read_dataset(FIXTURES/"data"/"labels.csv", img_dir=FIXTURES/"data")


@pytest.mark.parametrize("task", ["dr", "multitask"])
def test_old_model_evaluates_to_the_recorded_metrics(table, task, tmp_path):
    expected = json.loads((FIXTURES/"metrics.json").read_text())[task]
    metrics = evaluate_model(FIXTURES/task/"best_model.pth", table, tmp_path, batch_size=8, device="cpu")
    got = json.loads((tmp_path/"metrics.json").read_text())
    assert_close(numbers(got), numbers(expected))
    assert metrics["task"] == task


def test_resume_from_old_checkpoint_ends_like_the_old_run(table, tmp_path):
    from fundus_lab.train import train_model
    result = train_model(table, tmp_path, task="dr", model_name="test_efficientnet", pretrained=False, image_size=32,
                         batch_size=4, epochs=2, lr=1e-2, device="cpu", random_seed=3, save_freq=1,
                         channels_last=False,  # the memory layout of the old run: another one rounds differently
                         resume=FIXTURES/"dr"/"checkpoint_epoch_1.pth")
    strip = lambda records: [{k: v for k, v in r.items() if k not in NOT_REPRODUCIBLE} for r in records]
    expected = strip(json.loads((FIXTURES/"dr"/"training_history.json").read_text()))
    got = strip(json.loads(Path(result["history_path"]).read_text()))
    assert len(got) == len(expected)
    for record, old in zip(got, expected):  # equal up to float32 rounding, which differs between library builds
        assert record == pytest.approx(old, rel=1e-5, abs=1e-7), record["epoch"]
    assert result["epochs_run"] == 2
