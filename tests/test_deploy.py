"""fold / fuse: real timm models end to end, verification, low precision, idempotence, the verifier."""
import pytest
import timm
import torch
import torch.nn as nn

import reparam_zoo
from reparam_zoo import ConversionError, EquivalenceError, RefConvNd, convert, fold, fuse
from reparam_zoo.surgery import refconv_layers


def randomize_transforms(model, scale=0.1, seed=0):
    torch.manual_seed(seed)
    for _, layer in refconv_layers(model):
        layer.reset_transform("xavier")
        layer.transform_weight.data.mul_(scale)
    return model


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


MODELS = ["resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto", "regnetx_002", "repvgg_a0"]


@pytest.mark.parametrize("name", MODELS)
def test_timm_model_convert_fuse_verified_and_fold_loads_strictly(name):
    torch.manual_seed(0)
    original = randomize_bn(timm.create_model(name, num_classes=10)).eval()
    converted = randomize_transforms(convert(original))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = converted.eval()(x)

    fused = fuse(converted, example_inputs=x[:1])
    report = fused.fuse_report
    assert report.verified and report.max_rel_error < 1e-4
    assert len(report.folded) == len(converted.refconv_summary.converted)
    assert not any(isinstance(m, RefConvNd) for m in fused.modules())
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in original.modules())
    if name == "repvgg_a0":
        assert len(report.reparameterized) == 22
    elif has_bn:
        assert report.fused and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    with torch.no_grad():  # independent of the internal verifier
        actual = fused(x)
    assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-5

    folded = fold(converted)
    fresh = timm.create_model(name, num_classes=10)
    assert list(folded.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-4, atol=1e-5)


def test_fold_restores_requires_grad_and_drops_summary():
    model = timm.create_model("resnet18", num_classes=4)
    folded = fold(convert(model))
    assert all(p.requires_grad for p in folded.parameters())
    assert not hasattr(folded, "refconv_summary")


def test_verifier_catches_a_corrupted_fold(monkeypatch):
    # timm zero-inits each block's last BN gamma: randomize, or a corrupted conv1 would not show
    converted = randomize_transforms(convert(randomize_bn(timm.create_model("resnet18", num_classes=4))))
    honest = RefConvNd.to_conv

    def corrupted(self):
        conv = honest(self)
        if self.out_channels == 128 and self.stride == (2, 2):  # layer2.0.conv1 only
            conv.weight.data[0, 0, 1, 1] += 0.5
        return conv

    monkeypatch.setattr(RefConvNd, "to_conv", corrupted)
    with pytest.raises(EquivalenceError) as info:
        fuse(converted.eval(), example_inputs=torch.randn(1, 3, 32, 32))
    assert info.value.first_diverging_module == "layer2.0.conv1"
    assert info.value.max_abs_error > 0
    assert "first diverging module: layer2.0.conv1" in str(info.value)


def test_fuse_is_idempotent_and_warns_in_train_mode():
    model = timm.create_model("mobilenetv3_small_100", num_classes=4).train()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="train mode"):
        once = fuse(randomize_transforms(convert(model)), example_inputs=x)
    twice = fuse(once, example_inputs=x)
    assert twice.fuse_report.fused == [] and twice.fuse_report.folded == []
    assert twice.fuse_report.verified
    assert str(twice.state_dict().keys()) == str(once.state_dict().keys())


def test_batchnorm_act_keeps_its_activation():
    model = randomize_bn(timm.create_model("efficientnet_b0", num_classes=4)).eval()
    fused = fuse(model, example_inputs=torch.randn(1, 3, 32, 32))
    assert isinstance(fused.bn1, nn.SiLU)  # BatchNormAct2d(SiLU) -> its activation
    assert ("conv_stem", "bn1") in fused.fuse_report.fused


def test_sync_batchnorm_is_fused():
    model = randomize_bn(timm.create_model("resnet18", num_classes=4))
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    fused = fuse(model, example_inputs=torch.randn(1, 3, 32, 32))
    assert len(fused.fuse_report.fused) == 20
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in fused.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_folds_in_float64(dtype):
    model = convert(timm.create_model("resnet18", num_classes=4)).to(dtype)
    randomize_transforms(model)
    layer = model.layer1[0].conv1
    expected = layer.refocused_weight(dtype=torch.float64).to(dtype)
    folded = fold(model)
    assert folded.layer1[0].conv1.weight.dtype == dtype
    assert torch.equal(folded.layer1[0].conv1.weight, expected)
    fused = fuse(model.eval(), example_inputs=torch.randn(1, 3, 32, 32, dtype=dtype))
    assert fused.fuse_report.verified and next(fused.parameters()).dtype == dtype


def test_default_inputs_come_from_pretrained_cfg_or_a_clear_error():
    model = timm.create_model("regnetx_002", num_classes=4).eval()
    fused = fuse(model)
    assert fused.fuse_report.input_shapes == [[1, 3, 224, 224], [2, 3, 224, 224]]
    with pytest.raises(ConversionError, match="pass example_inputs"):
        fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())


def test_shared_and_reused_outputs_are_left_alone():
    class ReusesConvOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + self.act(y)  # the conv output feeds BN and something else

    model = randomize_bn(ReusesConvOutput()).eval()
    fused = fuse(model, example_inputs=torch.randn(1, 3, 8, 8))
    assert fused.fuse_report.fused == []
    assert fused.fuse_report.left_alone == [("bn", "output of conv is also used elsewhere")]


def test_public_names():
    for name in ("RefConv1d", "RefConv2d", "RefConv3d", "convert", "fold", "fuse", "EquivalenceError",
                 "load_checkpoint"):
        assert hasattr(reparam_zoo, name)
