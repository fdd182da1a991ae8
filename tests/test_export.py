"ONNX export checked against PyTorch, prediction from a checkpoint or an ONNX file, Grad-CAM, and the `export` / `predict` commands."
import json

import cv2
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from torch import nn

from fundus_lab.cli import main
from fundus_lab.core import IMAGENET_MEAN, IMAGENET_STD
from fundus_lab.data import DME_GRADES, DR_GRADES
from fundus_lab.export import (CONFIG_METADATA, OnnxClassifier, TorchClassifier, export_onnx, gradcam, gradcam_target,
                               heat_on_lesions, load_classifier, predict_images)
from fundus_lab.models import DRClassifier, save_model
from fundus_lab.multitask import MultiTaskClassifier, save_any_model
from fundus_lab.synth import LESION_CODES, synth_fundus
from fundus_lab.train import PREPROCESSING

PROBS = [f"prob_{g}" for g in DR_GRADES]


def config_for(model, size, **changes) -> dict:
    "The config training would save for a DR model of `size` pixels."
    return {"model_name": model.model_name, "num_classes": model.num_classes, "class_names": list(DR_GRADES),
            "task": "dr", "label_columns": ["dr"], "image_size": size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "preprocessing": dict(PREPROCESSING), "dropout": model.dropout, **changes}


def write_photo(path, seed, size=96):
    cv2.imwrite(str(path), cv2.cvtColor(synth_fundus(seed, size, dr=seed % 5), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    "A saved random test_efficientnet DR model at 64 pixels and three photos in a folder."
    folder = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = DRClassifier("test_efficientnet", num_classes=5, pretrained=False).eval()
    path = save_model(folder/"best_model.pth", model, config_for(model, 64))
    (folder/"photos").mkdir()
    for seed in range(3): write_photo(folder/"photos"/f"eye_{seed}.jpg", seed)
    return path


@pytest.mark.parametrize("model_name,size", [("test_efficientnet", 64), ("test_convnext", 64), ("test_vit", 160)])
def test_onnx_matches_pytorch(tmp_path, model_name, size):
    torch.manual_seed(1)
    model = DRClassifier(model_name, num_classes=5, pretrained=False).eval()
    path = save_model(tmp_path/"m.pth", model, config_for(model, size))
    report = export_onnx(path, tmp_path/"m.onnx")
    assert report["max_abs_diff"] < 1e-4
    onnx_model, torch_model = OnnxClassifier(tmp_path/"m.onnx"), TorchClassifier(path)
    for batch in (1, 5):  # the batch axis is dynamic
        x = np.random.default_rng(batch).normal(size=(batch, 3, size, size)).astype(np.float32)
        np.testing.assert_allclose(onnx_model(x), torch_model(x), atol=1e-4, rtol=0)
        with torch.inference_mode(): np.testing.assert_allclose(onnx_model(x), model(torch.from_numpy(x)).numpy(), atol=1e-4, rtol=0)


def test_metadata_makes_the_onnx_file_self_describing(tmp_path, tiny_model):
    export_onnx(tiny_model, tmp_path/"m.onnx")
    props = {p.key: p.value for p in onnx.load(tmp_path/"m.onnx").metadata_props}
    assert json.loads(props["class_names"]) == list(DR_GRADES)
    assert json.loads(props["image_size"]) == 64
    assert json.loads(props["mean"]) == list(IMAGENET_MEAN) and json.loads(props["std"]) == list(IMAGENET_STD)
    assert json.loads(props["preprocessing"]) == PREPROCESSING and json.loads(props["task"]) == "dr"
    assert json.loads(props[CONFIG_METADATA]) == TorchClassifier(tiny_model).config


def test_failed_check_writes_nothing(tmp_path, tiny_model):
    diff = export_onnx(tiny_model, tmp_path/"ok.onnx")["max_abs_diff"]
    assert diff > 0
    with pytest.raises(ValueError, match="differs from PyTorch"):
        export_onnx(tiny_model, tmp_path/"strict.onnx", tolerance=diff/2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]


def test_predict_same_from_checkpoint_and_onnx(tmp_path, tiny_model):
    export_onnx(tiny_model, tmp_path/"m.onnx")
    photos = tiny_model.parent/"photos"
    for tta in (False, True):
        by_torch, by_onnx = predict_images(tiny_model, [photos], tta=tta), predict_images(tmp_path/"m.onnx", [photos], tta=tta)
        assert by_torch.image.tolist() == by_onnx.image.tolist() == [str(p) for p in sorted(photos.iterdir())]
        np.testing.assert_allclose(by_onnx[PROBS].to_numpy(), by_torch[PROBS].to_numpy(), atol=1e-5)
        np.testing.assert_allclose(by_onnx[PROBS].sum(axis=1), 1, atol=1e-5)
        assert by_onnx.predicted.tolist() == [DR_GRADES[k] for k in by_onnx[PROBS].to_numpy().argmax(1)]


def test_multitask_model_exports_and_predicts_per_task(tmp_path):
    torch.manual_seed(2)
    model = MultiTaskClassifier("test_efficientnet", pretrained=False).eval()
    config = {**config_for(DRClassifier("test_efficientnet", pretrained=False), 64), "task": "multitask", "num_classes": dict(model.task_classes),
              "class_names": {"dr": list(DR_GRADES), "dme": list(DME_GRADES)}, "label_columns": ["dr", "dme"],
              "timm_kwargs": {}, "uncertainty": {"kinds": model.uncertainty.kinds, "non_negative": model.uncertainty.non_negative}}
    path = save_any_model(tmp_path/"mt.pth", model, config)
    assert export_onnx(path, tmp_path/"mt.onnx")["max_abs_diff"] < 1e-4
    photo = write_photo(tmp_path/"eye.png", 3)
    by_torch, by_onnx = predict_images(path, [photo]), predict_images(tmp_path/"mt.onnx", [photo])
    dme_columns = [f"dme_prob_{g}" for g in DME_GRADES]
    assert {"dr_predicted", "dme_predicted", *dme_columns} <= set(by_onnx.columns)
    np.testing.assert_allclose(by_onnx[dme_columns].sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(by_onnx.drop(columns=["image", "dr_predicted", "dme_predicted"]).to_numpy(float),
                               by_torch.drop(columns=["image", "dr_predicted", "dme_predicted"]).to_numpy(float), atol=1e-5)


def test_export_and_predict_commands(tmp_path, tiny_model, capsys):
    onnx_path = tmp_path/"model.onnx"
    assert main(["export", "--model-path", tiny_model, "--onnx", onnx_path]) == 0
    assert "Max abs diff vs PyTorch" in capsys.readouterr().out
    photos = tiny_model.parent/"photos"
    assert main(["predict", "--model-path", onnx_path, photos, "--output", tmp_path/"onnx.csv"]) == 0
    assert main(["predict", "--model-path", tiny_model, *sorted(photos.iterdir()), "--output", tmp_path/"torch.csv"]) == 0
    by_onnx, by_torch = pd.read_csv(tmp_path/"onnx.csv"), pd.read_csv(tmp_path/"torch.csv")
    assert len(by_onnx) == 3 and by_onnx.predicted.tolist() == by_torch.predicted.tolist()
    np.testing.assert_allclose(by_onnx[PROBS].to_numpy(), by_torch[PROBS].to_numpy(), atol=1e-5)
    capsys.readouterr()
    assert main(["predict", "--model-path", onnx_path, photos/"eye_1.jpg", "--tta"]) == 0
    printed = capsys.readouterr().out
    assert "eye_1.jpg" in printed and "prob_No DR" in printed


def test_command_errors_name_the_file(tmp_path, tiny_model, capsys):
    broken = tmp_path/"broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    assert main(["predict", "--model-path", tiny_model, broken]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main(["predict", "--model-path", broken, tiny_model.parent/"photos"]) == 2
    assert "is neither a fundus-lab PyTorch checkpoint" in capsys.readouterr().err
    assert main(["predict", "--model-path", tiny_model, tmp_path/"nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["export", "--model-path", tmp_path/"missing.pth", "--onnx", tmp_path/"m.onnx"]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert not (tmp_path/"m.onnx").exists()


class DarkSpots(nn.Module):
    "A hand-made model: its DR logit is the mean of a fixed dark-spot (difference of Gaussians) detector on green."
    def __init__(self):
        super().__init__()
        r2 = (torch.arange(15) - 7).float().pow(2)
        r2 = r2[:, None] + r2[None, :]
        gauss = lambda s: torch.exp(-r2/(2*s*s))/torch.exp(-r2/(2*s*s)).sum()
        self.spots = nn.Conv2d(3, 1, 15, padding=7)
        weight = torch.zeros(1, 3, 15, 15)
        weight[0, 1] = 4 * (gauss(4.0) - gauss(1.2))
        self.spots.weight.data, self.spots.bias.data = weight, torch.tensor([-0.3])
        self.response, self.head = nn.ReLU(), nn.Linear(1, 2)
        self.head.weight.data, self.head.bias.data = torch.tensor([[-1.0], [1.0]]), torch.zeros(2)

    def forward(self, x): return self.head(self.response(self.spots(x)).mean((2, 3)))


def test_gradcam_heat_lies_on_known_evidence():
    model = DarkSpots().eval()
    red = [LESION_CODES[k] for k in ("microaneurysm", "haemorrhage", "preretinal_haemorrhage", "flame_haemorrhage")]
    for seed in (200, 201):
        image, mask = synth_fundus(seed, 128, dr=4, camera=False, return_mask=True)
        heat = gradcam(model, image, target_class=1, target_layer=model.response)
        assert heat.shape == mask.shape and 0 <= heat.min() and heat.max() <= 1 + 1e-6
        check = heat_on_lesions(heat, np.isin(mask, red), image.max(2) > 20)
        assert check["ratio"] > 5 and check["pointing_hit"], check


def test_gradcam_layers_per_architecture():
    for name, size in (("test_efficientnet", 64), ("test_convnext", 64), ("test_vit", 160)):
        model = DRClassifier(name, pretrained=False).eval()
        heat = gradcam(model, synth_fundus(5, size, camera=False))
        assert heat.shape == (size, size)
    model = DRClassifier("test_convnext", pretrained=False)
    assert gradcam_target(model)[0] is model.backbone.stages[-1]
    with pytest.raises(NotImplementedError, match="No Grad-CAM layer known"): gradcam_target(nn.Linear(2, 2))
