"RETFound's fine-tuning recipe as training options: label smoothing, drop path, layer-wise lr decay and RETFound weights."
import json, re
from pathlib import Path

import pytest
import torch
from fastai.callback.core import Callback
from timm.layers import DropPath
from torch.nn import functional as F

from fundus_lab.data import read_dataset
from fundus_lab.losses import inverse_frequency_weights
from fundus_lab.multitask import load_any_model
from fundus_lab.retfound import CheckpointError, random_retfound_checkpoint, read_checkpoint
from fundus_lab.synth import write_dataset
from fundus_lab.train import TrainConfig, build_model, get_task, train_model

TINY = dict(pretrained=False, image_size=32, batch_size=8, epochs=1, device="cpu", num_workers=0)
VIT = {**TINY, "model_name": "test_vit"}


@pytest.fixture(scope="module")
def df(tmp_path_factory):
    return read_dataset(write_dataset("dr", tmp_path_factory.mktemp("recipe_data"), n=16, size=48, seed=0))


class LossRecorder(Callback):
    "Keep the predictions, targets and loss of the first training batch."
    def before_fit(self): self.first = None
    def after_loss(self):
        if self.training and self.first is None:
            self.first = self.learn.pred.detach(), self.learn.yb[0], self.learn.loss.detach()


class LrRecorder(Callback):
    "Keep the learning rate of every optimizer parameter group at the first batch, and the groups' parameter names."
    def before_fit(self): self.lrs = None
    def before_step(self):
        if self.lrs is None:
            self.lrs = [h["lr"] for h in self.opt.hypers]
            self.wds = [h["wd"] for h in self.opt.hypers]
            names = {id(p): n for n, p in self.learn.model.named_parameters()}
            self.names = [[names[id(p)] for p in group] for group in self.opt.param_lists]


@pytest.mark.parametrize("loss", ["ce", "weighted_ce"])
def test_label_smoothing_is_torch_cross_entropy(df, tmp_path, loss):
    recorder = LossRecorder()
    result = train_model(df, tmp_path, model_name="test_efficientnet", **TINY, loss=loss, label_smoothing=0.1, callbacks=[recorder])
    config = json.loads(Path(result["config_path"]).read_text())
    assert config["arguments"]["label_smoothing"] == 0.1
    weight = (torch.tensor(inverse_frequency_weights(config["train_class_counts"]["dr"]), dtype=torch.float32)
              if loss == "weighted_ce" else None)
    pred, target, loss_value = recorder.first
    expected = F.cross_entropy(pred, target, weight=weight, label_smoothing=0.1)
    assert torch.allclose(loss_value, expected, atol=1e-6)
    assert not torch.allclose(loss_value, F.cross_entropy(pred, target, weight=weight))


@pytest.mark.parametrize("options, phrase", [
    (dict(loss="focal"), "loss 'focal'"), (dict(task="multilabel"), "task 'multilabel'")])
def test_label_smoothing_refused_where_it_does_not_apply(df, tmp_path, options, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)):
        train_model(df, tmp_path, model_name="test_efficientnet", **TINY, label_smoothing=0.1, **options)


@pytest.mark.parametrize("model_name", ["test_vit", "test_convnext"])
def test_drop_path_reaches_timm(model_name):
    c = TrainConfig(model_name=model_name, pretrained=False, image_size=32, drop_path=0.3)
    model, config = build_model(get_task("dr"), c, {"dr": 5}, {})
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.3) and config["timm_kwargs"]["drop_path_rate"] == 0.3
    plain, _ = build_model(get_task("dr"), TrainConfig(model_name=model_name, pretrained=False, image_size=32), {"dr": 5}, {})
    assert not any(isinstance(m, DropPath) for m in plain.modules())  # the default leaves timm's (none for these)


def test_drop_path_refused_by_a_backbone_without_it():
    c = TrainConfig(model_name="vgg11", pretrained=False, image_size=32, drop_path=0.2)
    with pytest.raises(ValueError, match="'vgg11' has no drop-path"): build_model(get_task("dr"), c, {"dr": 5}, {})


def _layer(name:str, depth:int) -> int:
    block = re.search(r"blocks\.(\d+)\.", name)
    if block: return int(block.group(1)) + 1
    return 0 if re.search(r"(cls_token|pos_embed|patch_embed)", name) else depth + 1


def test_layer_decay_rates(df, tmp_path):
    recorder = LrRecorder()
    result = train_model(df.iloc[:8], tmp_path, **VIT, lr=1e-3, weight_decay=0.05, schedule="cosine", layer_decay=0.5,
                         callbacks=[recorder])
    model, _ = load_any_model(result["best_model_path"])
    depth = len(model.backbone.blocks)
    assert len(recorder.lrs) == 2 * (depth + 2)  # (embeddings, each block, head) x (decayed, not decayed)
    head = max(recorder.lrs)
    for lr, names, wd in zip(recorder.lrs, recorder.names, recorder.wds):
        layers = {_layer(n, depth) for n in names}
        assert len(layers) == 1
        assert lr / head == pytest.approx(0.5 ** (depth + 1 - layers.pop()))
        assert wd == (0.0 if all(n.endswith(("bias", "pos_embed", "cls_token")) or "norm" in n for n in names) else 0.05)
    config = json.loads(Path(result["config_path"]).read_text())
    assert config["arguments"]["layer_decay"] == 0.5


@pytest.mark.parametrize("options, phrase", [
    (dict(model_name="test_efficientnet"), "needs a ViT backbone"), (dict(**VIT, unfreeze="gradual"), "leave two_stage")])
def test_layer_decay_refused(df, tmp_path, options, phrase):
    with pytest.raises(ValueError, match=phrase): train_model(df, tmp_path, **{**TINY, **options}, layer_decay=0.65)


TEST_VIT_LAYOUT = dict(embed_dim=64, depth=6, num_heads=2, mlp_ratio=3)  # timm's test_vit


def test_retfound_weights_start_the_run_and_the_model_reloads(df, tmp_path, capsys):
    checkpoint = random_retfound_checkpoint(tmp_path/"retfound.pth", img_size=160, decoder_dim=32, **TEST_VIT_LAYOUT)
    c = TrainConfig(**VIT, retfound_weights=checkpoint)
    model, config = build_model(get_task("dr"), c, {"dr": 5}, {})
    state = read_checkpoint(checkpoint)
    assert torch.equal(model.backbone.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    assert model.backbone.pos_embed.shape == (1, 1 + 2 * 2, 64)  # 10x10 patches interpolated to 2x2 for 32 pixels
    assert config["timm_kwargs"] == {"img_size": 32, "global_pool": "avg"}
    assert "interpolated (bicubic) from 10x10 to 2x2" in capsys.readouterr().out
    result = train_model(df.iloc[:8], tmp_path/"run", config=c)
    reloaded, saved = load_any_model(result["best_model_path"])
    assert saved["model_name"] == "test_vit" and reloaded.backbone.global_pool == "avg"
    assert json.loads(Path(result["config_path"]).read_text())["arguments"]["retfound_weights"] == str(checkpoint)
    x = torch.randn(2, 3, 32, 32)
    assert reloaded(x).shape == (2, 5)


def test_retfound_weights_of_another_layout_are_refused(tmp_path):
    checkpoint = random_retfound_checkpoint(tmp_path/"dinov2.pth", img_size=56, decoder_dim=32, layout="dinov2",
                                            patch_size=16, **TEST_VIT_LAYOUT)
    c = TrainConfig(**VIT, retfound_weights=checkpoint)
    with pytest.raises(CheckpointError, match=r"dinov2.pth is a RETFound dinov2 checkpoint .* vit_large_patch14_dinov2"):
        build_model(get_task("dr"), c, {"dr": 5}, {})
    with pytest.raises(ValueError, match="needs a ViT backbone"):
        train_model(None, tmp_path, **{**TINY, "model_name": "test_efficientnet"}, retfound_weights=checkpoint)


def test_multitask_takes_label_smoothing_and_drop_path(tmp_path):
    mt = read_dataset(write_dataset("multitask", tmp_path/"mt", n=16, size=48, seed=0))
    result = train_model(mt, tmp_path/"run", task="multitask", model_name="test_convnext", **TINY, label_smoothing=0.1,
                         drop_path=0.1)
    model, config = load_any_model(result["best_model_path"])
    assert config["timm_kwargs"] == {"drop_path_rate": 0.1}
    assert max(m.drop_prob for m in model.modules() if isinstance(m, DropPath)) == pytest.approx(0.1)
