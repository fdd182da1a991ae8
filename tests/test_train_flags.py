"""Every option of `fundus-lab train`, exercised at tiny size: each run checks what the options changed in
config.json, the history, the files written and the recorded train_options.yaml, not just the exit status.
Options are grouped into a few runs of a tiny network on 24 synthetic 64-pixel photos to keep the suite quick."""
import importlib.util, json, math, shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fundus_lab.cli import RUN_DEFAULTS, _train_parser, main
from fundus_lab.data import DR_GRADES, read_dataset
from fundus_lab.train import config_fields

TINY = ["--model-name", "test_efficientnet", "--no-pretrained", "--image-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    "24 APTOS-style synthetic photos of 64 pixels, written by `fundus-lab synth`."
    out = tmp_path_factory.mktemp("flags")/"data"
    assert main(["synth", "--task", "dr", "--n", "24", "--size", "64", "--seed", "3", "--out", str(out)]) == 0
    return out


def read_json(path): return json.loads(Path(path).read_text())


def train(capsys, *argv) -> str:
    "Run `fundus-lab train ARGV` in this process; assert success and return what it printed."
    status = main(["train", *map(str, argv)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured.out


def test_help_lists_every_flag_and_this_file_uses_them(run_cli):
    flags = [s for a in _train_parser()._actions for s in a.option_strings]
    result = run_cli("train", "--help")
    assert result.returncode == 0, result.stderr
    source = Path(__file__).read_text()
    for flag in flags:
        assert flag in result.stdout, f"train --help lacks {flag}"
        if flag in ("--no-advanced-aug", "--no-medical-preprocess", "--no-two-stage", "--pretrained"): continue
        key = flag[2:]
        used = [f'"{flag}"', f"\\n{key}:", f"\\n{key.replace('-', '_')}:", f'"{key}:', f'"{key.replace("-", "_")}:']
        assert any(u in source for u in used), f"no test uses {flag} (on the command line or in a config file)"


def test_every_flag_is_a_config_field_or_a_run_option():
    dests = {a.dest for a in _train_parser()._actions if a.option_strings and a.dest != "config"}
    assert dests == set(config_fields()) | set(RUN_DEFAULTS) | {"labels_csv", "img_dir", "format", "keep_ungradable"}
    defaults = _train_parser().parse_args([])
    assert all(getattr(defaults, name) is None for name in config_fields())  # typed options only; TrainConfig's defaults apply


def test_two_stage_loss_augmentation_cache_checkpoints(data, tmp_path, capsys):
    save_dir = tmp_path/"run"
    out = train(capsys, "--labels-csv", data/"labels.csv", "--img-dir", data, "--format", "aptos", "--save-dir", save_dir,
                *TINY, "--num-classes", "5", "--batch-size", "6", "--num-workers", "0", "--val-split", "0.25",
                "--random-seed", "7", "--dropout", "0.1", "--two-stage", "--epochs-stage1", "1", "--epochs-stage2", "1",
                "--lr-stage1", "0.003", "--lr-stage2", "0.0003", "--weight-decay", "0.001", "--loss", "cb_focal",
                "--focal-gamma", "1.5", "--loss-params", '{"beta": 0.9}', "--advanced-aug", "--medical-preprocess",
                "--cache-dir", tmp_path/"cache", "--mixed-precision", "no", "--patience", "5", "--save-freq", "1",
                "--tracker", "csv")
    config = read_json(save_dir/"config.json")
    arguments = config["arguments"]
    expected = {"two_stage": True, "epochs_stage1": 1, "epochs_stage2": 1, "lr_stage1": 0.003, "lr_stage2": 0.0003,
                "weight_decay": 0.001, "loss": "cb_focal", "focal_gamma": 1.5, "loss_params": {"beta": 0.9},
                "batch_size": 6, "val_split": 0.25, "random_seed": 7, "dropout": 0.1, "num_classes": 5,
                "pretrained": False, "image_size": 64, "mixed_precision": "no", "patience": 5, "save_freq": 1,
                "model_name": "test_efficientnet", "num_workers": 0, "device": "cpu"}
    assert {k: arguments[k] for k in expected} == expected
    assert (config["augmentation"], config["preprocessing"].get("clahe_lightness"), config["precision"]) == ("heavy", True, "no")
    assert (config["cache"]["prepared"], config["cache"]["reused"]) == (0, 24) and (tmp_path/"cache/manifest.json").is_file()
    assert config["n_valid"] + config["n_train"] == 24 and config["total_epochs"] == 2
    history = read_json(save_dir/"training_history.json")
    assert [(r["epoch"], r["stage"]) for r in history] == [(1, 1), (2, 2)]
    for name in ["best_model.pth", "best_stage1.pth", "checkpoint_epoch_1.pth", "checkpoint_epoch_2.pth", "last_checkpoint.pth"]:
        assert (save_dir/name).is_file(), name
    log = pd.read_csv(save_dir/"history.csv")
    assert list(log.fit) == [1, 2] and list(log.columns[:3]) == ["fit", "epoch", "train_loss"]
    for recorded, logged in zip(history, log.valid_loss): assert math.isclose(recorded["valid_loss"], logged, rel_tol=1e-4)
    options = yaml.safe_load((save_dir/"train_options.yaml").read_text())
    assert options["labels_csv"] == str((data/"labels.csv").absolute()) and options["format"] == "aptos"
    assert (options["loss_params"], options["epochs_stage2"], options["tracker"]) == ({"beta": 0.9}, 1, "csv")
    assert "Stage 1: training the head" in out and "Stage 2: fine-tuning" in out

    resumed = tmp_path/"resumed"
    out = train(capsys, "--config", save_dir/"train_options.yaml", "--save-dir", resumed, "--cache-dir", tmp_path/"cache",
                "--resume", save_dir/"checkpoint_epoch_1.pth")
    assert "Resuming from" in out
    again = read_json(resumed/"training_history.json")
    assert [r["epoch"] for r in again] == [1, 2] and again[0] == history[0]
    assert read_json(resumed/"config.json")["arguments"]["resume"] == str(save_dir/"checkpoint_epoch_1.pth")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside MLflow's SQLAlchemy store
def test_config_file_cosine_schedule_gradual_unfreeze_and_mlflow(data, tmp_path, capsys):
    from mlflow import MlflowClient
    recipe = tmp_path/"recipe.yaml"
    recipe.write_text("model-name: test_efficientnet\npretrained: false\nimage_size: 64\ndevice: cpu\nbatch-size: 8\n"
                      "epochs: 3\nlr: 1e-2\nschedule: one_cycle\nwarmup-epochs: 0.5\neta_min: 1e-5\n"
                      "unfreeze: gradual\nloss: weighted_ce\n")
    save_dir, store = tmp_path/"run", tmp_path/"store"
    train(capsys, "--labels-csv", data/"labels.csv", "--config", recipe, "--save-dir", save_dir, "--epochs", "2", "--lr", "0.005",
          "--schedule", "cosine", "--grad-clip", "1.0",
          "--tracker", "mlflow", "--tracking-uri", store, "--experiment", "flags")
    arguments = read_json(save_dir/"config.json")["arguments"]
    from_file = {"batch_size": 8, "schedule": "cosine", "warmup_epochs": 0.5, "eta_min": 1e-5, "grad_clip": 1.0,
                 "unfreeze": "gradual", "loss": "weighted_ce", "pretrained": False}
    assert {k: arguments[k] for k in from_file} == from_file
    assert (arguments["epochs"], arguments["lr"], arguments["schedule"]) == (2, 0.005, "cosine")  # the command line wins
    history = read_json(save_dir/"training_history.json")
    assert len(history) == 2 and history[1]["lr"] < history[0]["lr"]

    client = MlflowClient(f"sqlite:///{store/'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("flags").experiment_id])
    assert (run.data.params["schedule"], run.data.params["epochs"], run.info.status) == ("cosine", "2", "FINISHED")
    for name in ["valid_loss", "qwk", "macro_f1", "train_loss"]:
        logged = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in logged] == [1, 2]
        for m, record in zip(logged, history): assert math.isclose(m.value, record[name], rel_tol=1e-6, abs_tol=1e-9)
    artefacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"best_model.pth", "training_history.json", "training_curves.png", "history.csv", "config.json"} <= artefacts


def test_multilabel_lora(tmp_path, capsys):
    assert main(["synth", "--task", "multilabel", "--n", "24", "--size", "64", "--seed", "0", "--out", str(tmp_path/"odir")]) == 0
    save_dir = tmp_path/"run"
    train(capsys, "--task", "multilabel", "--labels-csv", tmp_path/"odir/labels.csv", "--save-dir", save_dir,
          "--model-name", "test_vit", "--no-pretrained", "--image-size", "64", "--device", "cpu", "--epochs", "1",
          "--loss", "asymmetric", "--lora-r", "2", "--lora-alpha", "4", "--lora-dropout", "0.1")
    config = read_json(save_dir/"config.json")
    assert (config["task"], config["num_classes"], config["arguments"]["loss"]) == ("multilabel", 7, "asymmetric")
    assert {k: config["arguments"][k] for k in ("lora_r", "lora_alpha", "lora_dropout")} == {"lora_r": 2, "lora_alpha": 4.0, "lora_dropout": 0.1}
    history = read_json(save_dir/"training_history.json")
    assert {"macro_f1", "micro_f1", "auc_macro", "odir_score"} <= set(history[0])


def test_retfound_recipe_options(data, tmp_path, capsys):
    from fundus_lab.multitask import load_any_model
    from fundus_lab.retfound import random_retfound_checkpoint
    checkpoint = random_retfound_checkpoint(tmp_path/"retfound.pth", img_size=64, decoder_dim=32, embed_dim=64, depth=6,
                                            num_heads=2, mlp_ratio=3)  # the layout of timm's test_vit
    save_dir = tmp_path/"run"
    out = train(capsys, "--labels-csv", data/"labels.csv", "--img-dir", data, "--format", "aptos", "--save-dir", save_dir,
                "--model-name", "test_vit", "--image-size", "32", "--device", "cpu", "--epochs", "1", "--batch-size", "8",
                "--retfound-weights", checkpoint, "--label-smoothing", "0.1", "--drop-path", "0.2", "--layer-decay", "0.65")
    assert "pos_embed interpolated (bicubic) from 4x4 to 2x2 patches" in out
    arguments = read_json(save_dir/"config.json")["arguments"]
    assert {k: arguments[k] for k in ("retfound_weights", "label_smoothing", "drop_path", "layer_decay")} == \
        {"retfound_weights": str(checkpoint), "label_smoothing": 0.1, "drop_path": 0.2, "layer_decay": 0.65}
    model, config = load_any_model(save_dir/"best_model.pth")
    assert config["timm_kwargs"] == {"img_size": 32, "drop_path_rate": 0.2, "global_pool": "avg"}
    assert model.backbone.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


def test_folds_on_class_folders(data, tmp_path, capsys):
    df = read_dataset(data/"labels.csv", img_dir=data)
    folders = tmp_path/"folders"
    for path, grade in zip(df.path, df.dr):
        (folders/DR_GRADES[grade].replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folders/DR_GRADES[grade].replace(" ", "_"))
    save_dir = tmp_path/"cv"
    out = train(capsys, "--img-dir", folders, "--save-dir", save_dir, *TINY, "--epochs", "1", "--batch-size", "8", "--folds", "2")
    summary = read_json(save_dir/"cv_summary.json")
    assert summary["folds"] == 2 and [r["fold"] for r in summary["runs"]] == [0, 1]
    first, second = (set(r["valid_patients"]) for r in summary["runs"])
    patients = set(read_dataset(None, img_dir=folders).patient_id.astype(str))  # one folder per class: a patient per photo
    assert not first & second and first | second == patients
    for r in summary["runs"]:
        assert Path(r["best_model_path"]) == save_dir/f"fold_{r['fold']}"/"best_model.pth" and Path(r["best_model_path"]).is_file()
        assert read_json(save_dir/f"fold_{r['fold']}"/"config.json")["n_valid"] == r["n_valid"]
    qwks = [r["best_metrics"]["qwk"] for r in summary["runs"]]
    assert math.isclose(summary["mean"]["qwk"], sum(qwks) / 2)
    assert math.isclose(summary["std"]["qwk"], abs(qwks[0] - qwks[1]) / math.sqrt(2))
    assert "cv_summary.json" in out and yaml.safe_load((save_dir/"train_options.yaml").read_text())["folds"] == 2


@pytest.mark.parametrize("content, phrase", [
    ("epoch: 3\n", "unknown option 'epoch'"),
    ("epochs: three\n", "epochs = 'three' is a str; expected int"),
    ("epochs: 0\n", "--epochs: 0 is not a positive whole number"),
    ("schedule: linear\n", "--schedule: invalid choice 'linear'"),
    ("mixed-precision: fp8\n", "--mixed-precision: 'fp8' is not one of"),
])
def test_bad_config_files(data, tmp_path, capsys, content, phrase):
    (tmp_path/"bad.yaml").write_text(content)
    assert main(["train", "--labels-csv", str(data/"labels.csv"), "--config", str(tmp_path/"bad.yaml"),
                 "--save-dir", str(tmp_path/"m")]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err, err
    assert not (tmp_path/"m").exists()


@pytest.mark.parametrize("argv, phrase", [
    (["--folds", "1"], "argument --folds: 1 is less than 2"),
    (["--loss-params", "[1]"], "is not a JSON object"),
    (["--config", "no_such_recipe"], "packaged recipes: "),
    (["--tracker", "wandb"], "pip install wandb"),
    (["--lora-r", "2", "--two-stage"], "leave two_stage and unfreeze off"),
    (["--label-smoothing", "0.1", "--loss", "focal"], "label_smoothing=0.1 applies to the single-label losses"),
    (["--label-smoothing", "1"], "--label-smoothing: 1 is not in [0, 1)"),
    (["--layer-decay", "0.65"], "layer_decay needs a ViT backbone"),
    (["--drop-path", "0.2", "--model-name", "vgg11"], "'vgg11' has no drop-path"),
    (["--retfound-weights", "missing.pth", "--model-name", "test_vit"], "missing.pth"),
    (["--mixup", "0.4", "--cutmix", "1"], "set one of them to 0"),
    (["--ema", "1"], "--ema: 1 is not between 0 and 1"),
    (["--grad-accum", "0"], "--grad-accum: 0 is not a positive whole number"),
    (["--lr", "fast"], "--lr: fast is not a positive number or 'auto'"),
    (["--progressive-resize", "32,64"], "every size must be below image_size=64"),
    (["--adaptation", "lp", "--unfreeze", "gradual"], "adaptation='lp' trains no epochs"),
    (["--adaptation", "probe"], "--adaptation: invalid choice: 'probe'"),
])
def test_bad_flag_values(data, tmp_path, capsys, argv, phrase):
    if "wandb" in argv and importlib.util.find_spec("wandb") is not None: pytest.skip("wandb is installed here")
    status = main(["train", "--labels-csv", str(data/"labels.csv"), "--save-dir", str(tmp_path/"m"), *TINY, *argv])
    err = capsys.readouterr().err
    assert status == 2 and phrase in err and "Traceback" not in err, err
    assert not (tmp_path/"m"/"best_model.pth").exists()


def test_linear_probe_and_memory_layout(data, tmp_path, capsys):
    "--adaptation lp fits the head on features kept in the cache and trains no epoch; lp_ft from YAML reuses them."
    out = train(capsys, "--labels-csv", data/"labels.csv", "--save-dir", tmp_path/"lp", *TINY, "--batch-size", "8",
                "--adaptation", "lp", "--cache-dir", tmp_path/"cache", "--no-channels-last")
    assert [(r["epoch"], r["stage"]) for r in read_json(tmp_path/"lp"/"training_history.json")] == [(0, 0)]
    arguments = read_json(tmp_path/"lp"/"config.json")["arguments"]
    assert (arguments["adaptation"], arguments["channels_last"]) == ("lp", False)
    assert "Linear probe: features of" in out and len(list((tmp_path/"cache"/"features").glob("*.npy"))) == 1
    recipe = tmp_path/"probe.yaml"
    recipe.write_text("adaptation: lp_ft\nchannels_last: true\nepochs: 1\n")
    out = train(capsys, "--labels-csv", data/"labels.csv", "--config", recipe, "--save-dir", tmp_path/"lp_ft", *TINY,
                "--batch-size", "8", "--cache-dir", tmp_path/"cache")
    assert "features of" in out and "read from" in out
    assert [(r["epoch"], r["stage"]) for r in read_json(tmp_path/"lp_ft"/"training_history.json")] == [(0, 0), (1, 1)]
    assert read_json(tmp_path/"lp_ft"/"config.json")["arguments"]["channels_last"] is True


def test_packaged_cpu_recipe_parses():
    from fundus_lab.cli import build_parser, train_options
    options = train_options(build_parser("train").parse_args(["train", "--config", "aptos_cpu", "--epochs-stage2", "3"]))
    assert (options["model_name"], options["image_size"], options["batch_size"], options["two_stage"]) == \
        ("tf_efficientnet_lite0", 224, 16, True)
    assert options["epochs_stage2"] == 3 and options["pretrained"] is True and "cache_dir" not in options  # the default cache


def test_keep_ungradable(data, tmp_path, capsys):
    grades = pd.read_csv(data/"labels.csv")
    messidor = pd.DataFrame({"image_id": grades.id_code + ".jpg", "adjudicated_dr_grade": grades.diagnosis,
                             "adjudicated_gradable": 1})
    messidor.to_csv(tmp_path/"gradable.csv", index=False)
    save_dir = tmp_path/"kept"
    train(capsys, "--labels-csv", tmp_path/"gradable.csv", "--img-dir", data, "--save-dir", save_dir, *TINY,
          "--epochs", "1", "--batch-size", "8", "--keep-ungradable")
    assert yaml.safe_load((save_dir/"train_options.yaml").read_text())["keep_ungradable"] is True
    messidor.assign(adjudicated_dr_grade=[None] + messidor.adjudicated_dr_grade.tolist()[1:],
                    adjudicated_gradable=[0] + [1] * (len(messidor) - 1)).to_csv(tmp_path/"one_ungradable.csv", index=False)
    assert main(["train", "--labels-csv", str(tmp_path/"one_ungradable.csv"), "--img-dir", str(data), "--keep-ungradable",
                 "--save-dir", str(tmp_path/"refused"), *TINY]) == 2
    assert "dr label is missing" in capsys.readouterr().err and not (tmp_path/"refused").exists()
    with pytest.warns(UserWarning, match="dropped 1 of 24 images judged ungradable.*--keep-ungradable"):
        assert len(read_dataset(tmp_path/"one_ungradable.csv", img_dir=data)) == 23
