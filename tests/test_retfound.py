"RETFound at full size: a 1.2 GB ViT-L/16 checkpoint in RETFound's MAE format loads at 224 and 448 pixels, safely; the DINOv2 ViT-L/14 layout maps key for key."
import io

import pytest
import torch
import torch.nn.functional as F

from fundus_lab.retfound import (CheckpointError, RETFoundLoRA, _timm_names, checkpoint_layout, layer_decay_param_groups,
                                 load_retfound_model, lora_trainable_count, random_retfound_checkpoint, retfound_vit)


@pytest.fixture(scope="module")
def vit_large_checkpoint(tmp_path_factory):
    "A RETFound-format checkpoint of a full ViT-L/16 (random weights, about 1.2 GB), written once for this module."
    return random_retfound_checkpoint(tmp_path_factory.mktemp("retfound")/"RETFound_cfp_weights.pth")


def test_checkpoint_has_retfound_layout(vit_large_checkpoint):
    assert vit_large_checkpoint.stat().st_size > 1.2e9
    state = torch.load(vit_large_checkpoint, weights_only=False, mmap=True)["model"]
    for key in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.23.attn.qkv.weight", "norm.weight",
                "mask_token", "decoder_embed.weight", "decoder_pred.weight"]:
        assert key in state, key
    assert state["blocks.0.attn.qkv.weight"].shape == (3072, 1024)
    assert state["pos_embed"].shape == (1, 197, 1024)


@pytest.fixture(scope="module")
def vit_large_224(vit_large_checkpoint):
    "The ViT-L checkpoint loaded at 224 pixels with a 5-class head, once for this module."
    return load_retfound_model(vit_large_checkpoint, num_classes=5, verbose=False)


def test_loads_at_224_with_checkpoint_blocks(vit_large_checkpoint, vit_large_224):
    state = torch.load(vit_large_checkpoint, weights_only=False, mmap=True)["model"]  # written by the fixture
    model = vit_large_224
    assert sum(p.numel() for p in model.parameters()) == 303_306_757
    for name, tensor in model.blocks.state_dict().items():
        assert torch.equal(tensor, state[f"blocks.{name}"]), name
    assert torch.equal(model.pos_embed.detach(), state["pos_embed"])
    report = model.load_report
    assert sorted(report.new) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert {"norm.weight", "norm.bias", "mask_token", "decoder_embed.weight"} <= set(report.dropped)
    with torch.no_grad(): assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_loads_at_448_with_bicubic_position_embedding(vit_large_checkpoint):
    state = torch.load(vit_large_checkpoint, weights_only=False, mmap=True)["model"]  # written by the fixture
    model = load_retfound_model(vit_large_checkpoint, num_classes=0, img_size=448, verbose=False)
    assert model.patch_embed.grid_size == (28, 28) and model.pos_embed.shape == (1, 785, 1024)
    grid = state["pos_embed"][:, 1:].reshape(1, 14, 14, 1024).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 784, 1024)
    torch.testing.assert_close(model.pos_embed.detach()[:, 1:], expected, rtol=0, atol=1e-6)
    assert torch.equal(model.pos_embed.detach()[:, 0], state["pos_embed"][:, 0])
    for name, tensor in model.blocks.state_dict().items():
        assert torch.equal(tensor, state[f"blocks.{name}"]), name
    assert model.load_report.pos_embed_grid == (14, 28)


def test_malicious_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path/"payload_ran"

    class Payload:
        def __reduce__(self): return (io.open, (str(marker), "w"))

    bad = tmp_path/"RETFound_cfp_weights.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 1024)}, "args": Payload()}, bad)
    with pytest.raises(CheckpointError, match="RETFound_cfp_weights.pth is not a weights-only checkpoint") as error:
        load_retfound_model(bad, num_classes=5)
    assert "Use a weights-only checkpoint" in str(error.value)
    assert not marker.exists()


def test_malicious_dinov2_teacher_runs_nothing(tmp_path):
    marker = tmp_path/"payload_ran"

    class Payload:
        def __reduce__(self): return (io.open, (str(marker), "w"))

    bad = tmp_path/"RETFound_dinov2_meh.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 1024)}, "args": Payload()}, bad)
    with pytest.raises(CheckpointError, match="RETFound_dinov2_meh.pth is not a weights-only checkpoint"):
        load_retfound_model(bad, num_classes=5)
    assert not marker.exists()


@pytest.mark.parametrize("block_chunks", [0, 4])
def test_dinov2_teacher_names_fit_vit_large_patch14(block_chunks):
    "RETFound-DINOv2 teacher names (backbone. prefix, flat or chunked blocks) map onto timm's ViT-L/14, key for key."
    with torch.device("meta"):
        encoder = retfound_vit(num_classes=0, global_pool=False, layout="dinov2")
        teacher = {"backbone.mask_token": torch.empty(1, 1024), "dino_head.mlp.0.weight": torch.empty(2048, 1024)}
    for name, tensor in encoder.state_dict().items():
        if block_chunks and name.startswith("blocks."):
            name = f"blocks.{int(name.split('.')[1]) // (24 // block_chunks)}.{name.removeprefix('blocks.')}"
        teacher[f"backbone.{name}"] = tensor
    state = _timm_names(teacher)
    assert {k: v.shape for k, v in state.items() if k in encoder.state_dict()} == {k: v.shape for k, v in encoder.state_dict().items()}
    assert sorted(set(state) - set(encoder.state_dict())) == ["dino_head.mlp.0.weight", "mask_token"]
    assert checkpoint_layout(state) == "dinov2"
    assert encoder.patch_embed.patch_size == (14, 14) and encoder.pos_embed.shape == (1, 257, 1024)


def test_dinov2_vit_large_parameter_count():
    d = 1024
    block = 12*d**2 + 13*d + 2*d  # + layer scale ls1, ls2
    with torch.device("meta"):
        model = retfound_vit(num_classes=5, layout="dinov2")
    assert sum(p.numel() for p in model.parameters()) == 3*14*14*d + d + d + 257*d + 24*block + 2*d + 5*d + 5 == 303_233_029


def test_model_guide_examples_at_full_size(vit_large_checkpoint, capsys):
    "The guide's RETFound calls, as written, on the ViT-L checkpoint."
    images = torch.randn(1, 3, 224, 224)
    model = load_retfound_model(checkpoint_path=vit_large_checkpoint, num_classes=5, global_pool=False)
    model.eval()
    with torch.no_grad():
        outputs = model(images)
        predictions = torch.argmax(outputs, dim=1)
    assert outputs.shape == (1, 5) and predictions.shape == (1,)
    model = load_retfound_model(checkpoint_path=vit_large_checkpoint, num_classes=0)
    with torch.no_grad(): assert model.eval()(images).shape == (1, 1024)
    del model
    model = RETFoundLoRA(checkpoint_path=vit_large_checkpoint, num_classes=5, lora_r=8, lora_alpha=32, lora_dropout=0.1,
                         head_dropout=0.3)
    capsys.readouterr()
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 793,605 || all params: ")
    with torch.no_grad(): assert model.eval()(images).shape == (1, 5)


@pytest.mark.parametrize("global_pool,num_classes,expected", [(True, 0, 786_432 + 2048), (False, 5, 791_557), (True, 5, 793_605)])
def test_lora_counts_of_vit_large(global_pool, num_classes, expected):
    with torch.device("meta"):
        lora = RETFoundLoRA(retfound_vit(num_classes=num_classes, global_pool=global_pool), num_classes, r=8)
    assert lora.trainable_parameters() == expected
    assert sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) == 786_432
    assert expected == lora_trainable_count(1024, 24, 8, num_classes=num_classes, fc_norm=global_pool)


def test_lora_qkv_proj_count_and_layer_decay_of_vit_large():
    with torch.device("meta"):
        lora = RETFoundLoRA(retfound_vit(num_classes=5), 5, r=16, target_modules=("qkv", "proj"))
        groups = layer_decay_param_groups(lora, lr=1e-3)
    assert lora.trainable_parameters() == 24*16*(4096 + 2048) + 5125 + 2048
    lrs = {g["layer"]: g["lr"] for g in groups}
    assert sorted(lrs) == list(range(1, 26))  # the embeddings are frozen under LoRA
    assert lrs[1] / lrs[25] == pytest.approx(0.65**24, rel=1e-12)


def test_lora_adapter_file_of_vit_large_is_small(vit_large_224, tmp_path):
    lora = RETFoundLoRA(vit_large_224, num_classes=5)  # wraps the module's model: keep this test last
    path = lora.save_lora_adapters(tmp_path/"aptos.safetensors")
    assert 793_605*4 < path.stat().st_size < 793_605*4 + 20_000  # ~3.2 MB of float32, plus the header
    assert [p.name for p in tmp_path.iterdir()] == ["aptos.safetensors"]
