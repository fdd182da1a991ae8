"RETFound's fine-tuning recipe and the practitioner's options as training options: label smoothing, drop path, layer-wise lr\ndecay, RETFound weights, MixUp/CutMix, EMA, gradient accumulation, lr='auto' and progressive resizing."
import argparse, json, math, re
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
from fundus_lab.train import TrainConfig, build_model, config_arguments, get_task, train_model

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


class MixRecorder(Callback):
    "The first training batch's inputs before (order -1) and after (MixUp/CutMix, order 0) mixing, and the loss function after training."
    order = 1
    def before_fit(self): self.plain = self.mixed = None
    def after_pred(self):
        if self.training and self.mixed is None: self.mixed = self.learn.xb[0].detach().clone()
    def after_train(self): self.loss_after = self.learn.loss_func


class PlainBatch(Callback):
    order = -1
    def __init__(self, recorder): self.recorder = recorder
    def before_batch(self):
        if self.training and self.recorder.plain is None: self.recorder.plain = self.learn.xb[0].detach().clone()


@pytest.mark.parametrize("option", [dict(mixup=0.4), dict(cutmix=1.0)])
def test_mixup_and_cutmix_mix_the_training_batches(df, tmp_path, option):
    recorder = MixRecorder()
    result = train_model(df, tmp_path, model_name="test_efficientnet", **TINY, **option, callbacks=[recorder, PlainBatch(recorder)])
    assert recorder.plain.shape == recorder.mixed.shape and not torch.allclose(recorder.plain, recorder.mixed)
    assert isinstance(recorder.loss_after, torch.nn.Module)  # the task's loss, not the mixing one, is back for validation
    arguments = json.loads(Path(result["config_path"]).read_text())["arguments"]
    assert {k: arguments[k] for k in ("mixup", "cutmix")} == {"mixup": 0.0, "cutmix": 0.0, **option}


@pytest.mark.parametrize("options, phrase", [
    (dict(mixup=0.4, cutmix=1.0), "set one of them to 0"), (dict(task="multilabel", mixup=0.4), "task 'multilabel'"),
    (dict(mixup=-1), "--mixup: -1 is not a finite number >= 0")])
def test_mixing_refused_where_it_does_not_apply(df, tmp_path, options, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)):
        train_model(df, tmp_path, model_name="test_efficientnet", **{**TINY, **options})


class EmaWatcher(Callback):
    "Whether validation ran with the EMA weights, and the EMA and raw weights after the last epoch."
    order = 70
    def before_fit(self): self.valid_on_ema = []
    def after_pred(self):
        if not self.training: self.valid_on_ema.append(self.learn.model is self.learn.ema.average.module)
    def after_epoch(self):
        self.ema_state = {k: v.detach().clone() for k, v in self.learn.ema.average.module.state_dict().items()}
        self.raw_state = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}


def test_ema_validates_and_saves_the_averaged_weights(df, tmp_path):
    watcher = EmaWatcher()
    result = train_model(df, tmp_path, model_name="test_efficientnet", **{**TINY, "batch_size": 4}, lr=1e-2, ema=0.5,
                         callbacks=[watcher])
    assert watcher.valid_on_ema and all(watcher.valid_on_ema)
    saved, config = load_any_model(result["best_model_path"])
    for name, value in saved.state_dict().items():
        assert torch.equal(value, watcher.ema_state[name]), name
    differ = [k for k, v in watcher.raw_state.items() if v.is_floating_point() and not torch.equal(v, watcher.ema_state[k])]
    assert differ  # the average is not the last weights
    checkpoint = torch.load(result["last_checkpoint_path"], weights_only=False)
    assert torch.equal(checkpoint["model_state_dict"][differ[0]], watcher.raw_state[differ[0]])  # resume keeps the raw weights
    assert json.loads(Path(result["config_path"]).read_text())["arguments"]["ema"] == 0.5


class StepCounter(Callback):
    def before_fit(self): self.batches, self.steps = 0, 0
    def after_batch(self): self.batches += self.training
    def after_step(self): self.steps += 1


def test_grad_accum_steps_every_n_batches(df, tmp_path):
    counter = StepCounter()
    result = train_model(df, tmp_path, model_name="test_efficientnet", **{**TINY, "batch_size": 2}, grad_accum=3, callbacks=[counter])
    assert counter.batches >= 6 and counter.steps == counter.batches // 3
    assert json.loads(Path(result["config_path"]).read_text())["arguments"]["grad_accum"] == 3


def test_lr_auto_runs_lr_find_and_records_the_rate(df, tmp_path, capsys):
    recorder = LrRecorder()
    result = train_model(df, tmp_path, model_name="test_efficientnet", **TINY, lr="auto", schedule="cosine", callbacks=[recorder])
    config = json.loads(Path(result["config_path"]).read_text())
    found = config["lr_find"]["lr"]
    assert math.isfinite(found["lr"]) and found["lr"] > 0 and found["suggestion"] == "valley"
    assert config["arguments"]["lr"] == "auto" and (tmp_path/"lr_find.png").stat().st_size > 0
    assert recorder.lrs[0] == pytest.approx(found["lr"])  # the cosine schedule starts at its peak
    assert f"lr = auto: {found['lr']:.3g}" in capsys.readouterr().out
    assert not (tmp_path/"models").exists()
    checkpoint = torch.load(result["last_checkpoint_path"], weights_only=False)
    assert checkpoint["config"]["lr_find"] == config["lr_find"]


class SizeRecorder(Callback):
    def before_fit(self): self.sizes = {}
    def after_pred(self):
        key = ("train" if self.training else "valid", self.epoch)
        self.sizes.setdefault(key, set()).add(self.learn.xb[0].shape[-1])


def test_progressive_resize_trains_small_then_at_image_size(df, tmp_path):
    recorder = SizeRecorder()
    cache = tmp_path/"cache"
    result = train_model(df, tmp_path/"run", model_name="test_efficientnet", **{**TINY, "image_size": 64, "epochs": 3},
                         progressive_resize=[32, 48], cache_dir=cache, callbacks=[recorder])
    assert [recorder.sizes["train", e] for e in range(3)] == [{32}, {48}, {64}]
    assert all(recorder.sizes["valid", e] == {64} for e in range(3))
    config = json.loads(Path(result["config_path"]).read_text())
    assert config["arguments"]["progressive_resize"] == [32, 48] and config["cache"]["size"] == 64


def test_the_options_are_flags_in_their_groups_and_yaml_keys():
    parser = argparse.ArgumentParser()
    groups = config_arguments(parser)
    titles = {a.dest: g.title for g in groups.values() for a in g._group_actions}
    assert {k: titles[k] for k in ("mixup", "cutmix", "progressive_resize", "ema", "grad_accum", "lr")} == {
        "mixup": "loss and augmentation", "cutmix": "loss and augmentation", "progressive_resize": "loss and augmentation",
        "ema": "training schedule", "grad_accum": "training schedule", "lr": "training schedule"}
    args = parser.parse_args(["--mixup", "0.4", "--ema", "0.999", "--grad-accum", "4", "--lr", "auto", "--progressive-resize", "128,192"])
    assert (args.mixup, args.ema, args.grad_accum, args.lr, args.progressive_resize) == (0.4, 0.999, 4, "auto", [128, 192])
    c = TrainConfig.from_dict({"cutmix": 1, "lr-stage2": "auto", "progressive-resize": [96, 160], "grad_accum": 2}, "recipe.yaml")
    assert (c.cutmix, c.lr_stage2, c.progressive_resize, c.grad_accum) == (1.0, "auto", [96, 160], 2)
    with pytest.raises(ValueError, match=re.escape("recipe.yaml: --progressive-resize: '[160, 96]': list the sizes from small")):
        TrainConfig.from_dict({"progressive_resize": [160, 96]}, "recipe.yaml")
