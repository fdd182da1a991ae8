"A task added by a reader: a `Task` subclass registered by name trains, evaluates and predicts like the built-in ones."
import numpy as np
import pandas as pd
import pytest

from fundus_lab.data import read_dataset
from fundus_lab.evaluate import evaluate_model
from fundus_lab.metrics import classification_metrics
from fundus_lab.train import TASK_REGISTRY, Task, get_task, register_task, train_model


class ReferableTask(Task):
    "Referable DR (grade 2 or more) against the rest, from the DR grade."
    name, monitor, selection, headline = "referable_test", "macro_f1", "validation macro_f1", "macro_f1"
    def prepare(self, df, valid_df):
        with_label = lambda frame: None if frame is None else frame.assign(referable=(frame.dr >= 2).astype(int))
        return with_label(df), with_label(valid_df), {}
    def classes(self, num_classes, facts): return {"referable": 2}
    def class_names(self, classes, facts): return {"referable": ["not referable", "referable"]}
    def evaluation_table(self, df, config): return self.prepare(df, None)[0]


@pytest.fixture
def referable_task():
    task = register_task(ReferableTask())
    yield task
    del TASK_REGISTRY[task.name]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from fundus_lab.synth import write_dataset
    out = tmp_path_factory.mktemp("tasks_data")
    write_dataset("dr", out, n=16, size=48, seed=1)
    return read_dataset(out/"labels.csv", img_dir=out)


def test_a_registered_task_trains_and_evaluates_end_to_end(referable_task, table, tmp_path):
    result = train_model(table, tmp_path/"run", task="referable_test", model_name="test_efficientnet", pretrained=False,
                         image_size=32, batch_size=8, epochs=1, device="cpu")
    assert set(result["best_metrics"]) >= {"macro_f1", "accuracy", "valid_loss"}
    metrics = evaluate_model(result["best_model_path"], table, tmp_path/"eval", device="cpu")
    predictions = pd.read_csv(tmp_path/"eval"/"predictions.csv")
    assert predictions["referable"].tolist() == (table.dr >= 2).astype(int).tolist()
    reference = classification_metrics(predictions["referable"].to_numpy(),
                                       predictions[["prob_referable_0", "prob_referable_1"]].to_numpy())
    assert metrics["task"] == "referable_test" and metrics["n"] == len(table)
    assert np.asarray(metrics["confusion_matrix"]).tolist() == np.asarray(reference["confusion_matrix"]).tolist()
    assert metrics["macro_f1"] == pytest.approx(reference["macro_f1"])
    assert (tmp_path/"eval"/"confusion_matrix.png").is_file()


def test_unknown_and_evaluation_only_tasks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="Unknown task 'grading'"): train_model(None, tmp_path, task="grading")
    with pytest.raises(NotImplementedError, match="not supported yet"): get_task("dme", training=True)
