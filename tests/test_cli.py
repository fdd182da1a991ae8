"The `fundus-lab` program: help texts, version, and a whole synth -> train -> evaluate run through the console script."
import json, math, os, subprocess, sys

import pytest

import fundus_lab
from fundus_lab.cli import COMMANDS, main

COMMAND_OPTIONS = {
    "synth": ["--task", "--n", "--size", "--seed", "--out"],
    "train": ["--labels-csv", "--img-dir", "--format", "--task", "--save-dir", "--model-name", "--num-classes",
              "--image-size", "--batch-size", "--epochs", "--lr", "--val-split", "--random-seed", "--num-workers",
              "--pretrained", "--no-pretrained", "--device", "--loss", "--focal-gamma", "multitask",
              "--advanced-aug", "--no-advanced-aug", "--medical-preprocess", "--no-medical-preprocess", "--cache-dir"],
    "evaluate": ["--labels-csv", "--img-dir", "--format", "--model-path", "--output-dir", "--batch-size",
                 "--num-workers", "--device"],
    "bench": ["data", "train", "--img-dir", "--size", "--n-images", "--epochs", "--model-name", "--steps", "--lora"],
    "tune": ["--hp-config", "--n-trials", "--experiment", "--storage", "--pruner", "--labels-csv", "--save-dir"],
    "analyze-study": ["--experiment", "--storage", "--save-dir", "--top", "--save-configs"],
    "export": ["--model-path", "--onnx", "--opset", "--tolerance"],
    "predict": ["--model-path", "--output", "--tta"],
}


def test_lazy_commands_register_with_their_listed_summary():
    from fundus_lab.cli import LAZY_COMMANDS, load_command
    for name, (module, summary) in LAZY_COMMANDS.items():
        command = load_command(name)
        assert command is not None, f"{module} does not register {name!r}"
        assert command.summary == summary, f"{name}: {command.summary!r} in {module} vs {summary!r} in LAZY_COMMANDS"
    assert set(COMMAND_OPTIONS) == {"synth", "train", *LAZY_COMMANDS}


def test_help_lists_every_command(run_cli):
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fundus-lab")
    listing = " ".join(result.stdout.split())  # argparse wraps long summaries
    for name, c in COMMANDS.items():
        assert name in listing and c.summary in listing


@pytest.mark.parametrize("name", sorted(COMMAND_OPTIONS))
def test_command_help(run_cli, name):
    result = run_cli(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: fundus-lab {name}")
    assert f"example:\n  fundus-lab {name} " in result.stdout
    for option in COMMAND_OPTIONS[name]: assert option in result.stdout, f"{name} --help lacks {option}"


def test_every_registered_command_has_help(capsys):
    for name, c in COMMANDS.items():
        assert c.summary and c.description, name
        assert main([name, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: fundus-lab {name}")


def test_version(run_cli):
    result = run_cli("--version")
    assert (result.returncode, result.stdout) == (0, f"fundus-lab {fundus_lab.__version__}\n")


def test_no_command_prints_help_and_fails(run_cli):
    result = run_cli()
    assert result.returncode == 2
    assert "usage: fundus-lab" in result.stderr and "train" in result.stderr


def test_python_dash_m_runs_the_same_program():
    result = subprocess.run([sys.executable, "-m", "fundus_lab.cli", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout == f"fundus-lab {fundus_lab.__version__}\n"


def test_help_does_not_load_torch():
    code = "import sys; from fundus_lab.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_synth_train_evaluate(run_cli, tiny_model, tmp_path):
    for name, n, seed in [("train_data", 20, 0), ("test_data", 10, 1)]:
        result = run_cli("synth", "--task", "dr", "--n", n, "--size", 96, "--seed", seed, "--out", tmp_path/name)
        assert result.returncode == 0, result.stderr
        assert str(tmp_path/name/"labels.csv") in result.stdout
        assert len(list((tmp_path/name/"images").iterdir())) == n

    model_dir = tmp_path/"model"
    result = run_cli("train", "--labels-csv", tmp_path/"train_data/labels.csv", "--img-dir", tmp_path/"train_data",
                        "--save-dir", model_dir, *tiny_model)
    assert result.returncode == 0, result.stderr
    assert (model_dir/"best_model.pth").is_file()
    assert f"Results in {model_dir}" in result.stdout and str(model_dir/"best_model.pth") in result.stdout
    history = json.loads((model_dir/"training_history.json").read_text())
    assert [record["epoch"] for record in history] == [1]
    assert {"train_loss", "valid_loss", "accuracy", "qwk", "macro_f1"} <= set(history[0])

    eval_dir = tmp_path/"evaluation"
    result = run_cli("evaluate", "--labels-csv", tmp_path/"test_data/labels.csv", "--img-dir", tmp_path/"test_data",
                        "--model-path", model_dir/"best_model.pth", "--output-dir", eval_dir, "--batch-size", 8)
    assert result.returncode == 0, result.stderr
    assert (eval_dir/"confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((eval_dir/"metrics.json").read_text())
    assert {"accuracy", "qwk", "macro_f1", "auc_macro"} <= set(metrics)
    for key, (low, high) in {"accuracy": (0, 1), "qwk": (-1, 1), "macro_f1": (0, 1), "auc_macro": (0, 1)}.items():
        assert isinstance(metrics[key], float) and not math.isnan(metrics[key]), (key, metrics[key])
        assert low <= metrics[key] <= high, (key, metrics[key])
        assert f"{metrics[key]:.4f}" in result.stdout
    assert metrics["n"] == 10 and sum(map(sum, metrics["confusion_matrix"])) == 10
    assert f"Results in {eval_dir}" in result.stdout


def test_train_with_focal_loss(dr_dataset, tiny_model, tmp_path, capsys):
    assert main(["train", "--labels-csv", str(dr_dataset/"labels.csv"), "--save-dir", str(tmp_path/"focal"),
                 "--loss", "focal", "--focal-gamma", "1.5", *tiny_model]) == 0
    assert "loss focal" in capsys.readouterr().out
    config = json.loads((tmp_path/"focal/config.json").read_text())
    assert (config["loss"], config["focal_gamma"]) == ("focal", 1.5)
    assert sum(config["train_class_counts"]["dr"]) == config["n_train"]
    history = json.loads((tmp_path/"focal/training_history.json").read_text())
    assert len(history) == 1 and math.isfinite(history[0]["valid_loss"])


def test_multitask_train_evaluate(tiny_model, tmp_path, capsys):
    from fundus_lab.multitask import MultiTaskClassifier, load_any_model
    for name, n, seed in [("train_data", 20, 0), ("test_data", 10, 1)]:
        assert main(["synth", "--task", "multitask", "--n", str(n), "--size", "96", "--seed", str(seed),
                     "--out", str(tmp_path/name)]) == 0
    model_dir = tmp_path/"model"
    assert main(["train", "--task", "multitask", "--loss", "weighted_ce", "--labels-csv", str(tmp_path/"train_data/labels.csv"),
                 "--save-dir", str(model_dir), *tiny_model]) == 0
    assert {"best_model.pth", "config.json", "training_history.json", "history.csv", "train_options.yaml"} <= {p.name for p in model_dir.iterdir()}
    history = json.loads((model_dir/"training_history.json").read_text())
    assert {"dr_qwk", "dme_accuracy", "joint_accuracy", "score", "weight_dr", "weight_dme"} <= set(history[0])
    assert history[0]["log_var_dr"] != 0 and history[0]["log_var_dme"] != 0
    model, config = load_any_model(model_dir/"best_model.pth")
    assert isinstance(model, MultiTaskClassifier) and config["num_classes"] == {"dr": 5, "dme": 3}
    capsys.readouterr()

    eval_dir = tmp_path/"evaluation"
    assert main(["evaluate", "--labels-csv", str(tmp_path/"test_data/labels.csv"), "--model-path", str(model_dir/"best_model.pth"),
                 "--output-dir", str(eval_dir), "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((eval_dir/"metrics.json").read_text())
    assert {"confusion_matrix_dme.png", "confusion_matrix_dr.png", "metrics.json"} <= {p.name for p in eval_dir.iterdir()}
    assert metrics["n"] == 10 and 0 <= metrics["joint_accuracy"] <= 1
    for task, k in {"dr": 5, "dme": 3}.items():
        task_metrics = metrics["tasks"][task]
        assert len(task_metrics["confusion_matrix"]) == k and sum(map(sum, task_metrics["confusion_matrix"])) == 10
        assert task_metrics["accuracy"] >= metrics["joint_accuracy"]
    assert "== DR ==" in out and "== DME ==" in out and f"{metrics['joint_accuracy']:.4f}" in out


def test_bench_data_help(run_cli):
    result = run_cli("bench", "data", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: fundus-lab bench")
    for option in ["--img-dir", "--size", "--n-images", "--epochs"]: assert option in result.stdout


def test_train_with_cache_heavy_augmentation_and_clahe(dr_dataset, tiny_model, tmp_path, capsys):
    from fundus_lab.models import load_model
    from fundus_lab.train import MEDICAL_PREPROCESSING
    cache_dir = tmp_path/"cache"
    argv = ["train", "--labels-csv", str(dr_dataset/"labels.csv"), "--save-dir", str(tmp_path/"model"),
            "--cache-dir", str(cache_dir), "--advanced-aug", "--medical-preprocess", *tiny_model]
    assert main(argv) == 0
    assert "20 image(s) prepared, 0 reused" in capsys.readouterr().out
    manifest = json.loads((cache_dir/"manifest.json").read_text())
    assert manifest["settings"]["size"] == 64 and len(manifest["entries"]) == 20
    config = json.loads((tmp_path/"model/config.json").read_text())
    assert (config["augmentation"], config["cache"]["prepared"], config["cache"]["reused"]) == ("heavy", 0, 20)
    assert load_model(tmp_path/"model/best_model.pth")[1]["preprocessing"] == MEDICAL_PREPROCESSING
    assert main(argv) == 0
    assert "0 image(s) prepared, 20 reused" in capsys.readouterr().out
    assert main(["evaluate", "--labels-csv", str(dr_dataset/"labels.csv"), "--model-path",
                 str(tmp_path/"model/best_model.pth"), "--output-dir", str(tmp_path/"evaluation")]) == 0
    metrics = json.loads((tmp_path/"evaluation/metrics.json").read_text())
    assert metrics["n"] == 20 and 0 <= metrics["accuracy"] <= 1
