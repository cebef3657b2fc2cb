"""fold / fuse: real timm models end to end, verification, low precision, idempotence, the verifier."""
import copy

import pytest
import timm
import torch
import torch.nn as nn

import reparam_zoo
from reparam_zoo import ConversionError, EquivalenceError, RefConvNd, ReparamError, convert, fold, fuse
from reparam_zoo.deploy import nothing_to_fuse, verify_equivalence
from reparam_zoo.model_info import example_inputs
from reparam_zoo.surgery import refconv_layers

from helpers import randomize_bn


def randomize_transforms(model, scale=0.1, seed=0):
    torch.manual_seed(seed)
    for _, layer in refconv_layers(model):
        layer.reset_transform("xavier")
        layer.transform_weight.data.mul_(scale)
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


def test_verifier_judges_tiny_outputs_by_their_own_scale():
    class Tiny(nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.scale = scale

        def forward(self, x):
            return self.conv(x).mean((2, 3)) * self.scale

    torch.manual_seed(0)
    reference = Tiny(1e-8).eval()
    x = (torch.randn(1, 3, 8, 8),)
    zeros = Tiny(0.0).eval()
    zeros.load_state_dict(reference.state_dict())
    with pytest.raises(EquivalenceError, match="max rel error 1 "):
        verify_equivalence(reference, zeros, x, rtol=1e-4, atol=0.0)
    nudged = Tiny(1e-8 * (1 + 1e-6)).eval()
    nudged.load_state_dict(reference.state_dict())
    _, rel, _ = verify_equivalence(reference, nudged, x, rtol=1e-4, atol=0.0)
    assert 0 < rel < 1e-5


def test_verification_compares_float64_copies_and_reports_the_originals_own_rounding():
    # float32 rounding in deep trained nets can exceed a tolerance tight enough to catch a wrong fold
    seen = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].bias += 1e-3
    with pytest.raises(EquivalenceError, match=r"\(rtol=1e-06, atol=0\); the original's own float32 rounding error "
                                               r"is [0-9.e+-]+; first diverging module: 0$"):
        verify_equivalence(model, other, (torch.randn(1, 3, 8, 8),), rtol=1e-6, atol=0.0)
    assert seen[:4] == [torch.float64] * 4  # both models at both batch sizes
    assert next(model.parameters()).dtype == torch.float32  # copies, the models are untouched


def test_fold_only_keeps_the_original_keys_and_a_later_fuse_still_fuses():
    torch.manual_seed(0)
    plain = randomize_bn(timm.create_model("test_resnet", num_classes=4)).eval()
    converted = randomize_transforms(convert(plain)).eval()
    x = torch.randn(1, 3, 32, 32)
    folded = fuse(converted, example_inputs=x, fold_only=True)
    report = folded.fuse_report
    assert report.fold_only and report.verified and report.fused == [] and report.folded
    assert "fold only" in str(report)
    fresh = timm.create_model("test_resnet", num_classes=4).eval()
    fresh.load_state_dict(folded.state_dict(), strict=True)  # the unconverted architecture takes it as it is
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), converted(x), rtol=1e-5, atol=1e-6)
    fused = fuse(folded, example_inputs=x)
    assert fused.fuse_report.fused and not fused.fuse_report.fold_only
    assert fused.fuse_report.folded == report.folded  # the history says where the kernels came from


def test_inputs_the_model_cannot_take_are_a_clear_error():
    model = randomize_bn(timm.create_model("test_resnet", num_classes=4)).eval()
    with pytest.raises(ConversionError, match=r"cannot run ResNet on input 1x1x32x32: RuntimeError: .*3 channels"):
        fuse(model, example_inputs=torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_transposed_conv_bn_fuses_only_without_groups(groups):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.ConvTranspose2d(4, 4, 2, stride=2, groups=groups), nn.BatchNorm2d(4)))
    fused = fuse(model.eval(), example_inputs=torch.randn(1, 4, 5, 5))
    if groups == 1:
        assert fused.fuse_report.fused == [("0", "1")] and isinstance(fused[1], nn.Identity)
    else:
        assert fused.fuse_report.fused == [] and fused.fuse_report.left_alone == [("1", "grouped transposed conv")]
    assert fused.fuse_report.verified


def test_fuse_is_idempotent_and_warns_in_train_mode():
    model = timm.create_model("mobilenetv3_small_100", num_classes=4).train()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="train mode"):
        once = fuse(randomize_transforms(convert(model)), example_inputs=x)
    twice = fuse(once, example_inputs=x)
    # nothing left to fold or fuse, and the report still describes the whole fused structure
    assert once.fuse_report.fused and once.fuse_report.folded
    assert twice.fuse_report.fused == once.fuse_report.fused
    assert twice.fuse_report.folded == once.fuse_report.folded
    assert twice.fuse_report.verified
    assert str(twice.state_dict().keys()) == str(once.state_dict().keys())


def test_fusing_a_fused_then_converted_model_keeps_the_earlier_structure():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    once = fuse(randomize_bn(timm.create_model("test_resnet", num_classes=4)).eval(), example_inputs=x)
    first = once.fuse_report
    assert len(first.fused) == 15 and not any(isinstance(m, nn.BatchNorm2d) for m in once.modules())

    again = randomize_transforms(convert(once), seed=1).eval()
    assert again.fuse_report == first  # convert carries the report along
    twice = fuse(again, example_inputs=x)
    report = twice.fuse_report
    # the structure: earlier pairs (no new ones: the norms are gone), every RefConv folded
    assert report.fused == first.fused
    assert first.folded == [] and report.folded == [n for n, _ in refconv_layers(again)]
    assert report.reparameterized == [] and report.left_alone == []
    # the numbers: those of the latest fuse (against the converted model), recomputed independently
    assert report.verified
    assert (report.max_abs_error, report.max_rel_error) == reparam_zoo.deploy.verify_equivalence(
        again, twice, (x,), rtol=1e-4, atol=1e-5)[:2]
    assert report.max_abs_error > 0  # the random transforms changed the weights
    assert not torch.equal(twice.conv1[0].weight, once.conv1[0].weight)
    # the earlier report is left as it was
    assert once.fuse_report is first and len(first.fused) == 15

    unverified = fuse(again, example_inputs=x, verify=False).fuse_report
    assert unverified.fused == first.fused and not unverified.verified and unverified.max_abs_error is None


def test_rep_blocks_merged_by_an_earlier_fuse_are_not_merged_again():
    class OneShotRep(nn.Module):
        """Merges its branches once; a second `reparameterize` would fail (the branches are gone)."""

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.merged = None

        def forward(self, x):
            return self.merged(x) if self.merged is not None else self.a(x) + self.b(x)

        def reparameterize(self):
            self.merged = nn.Conv2d(4, 4, 3, padding=1)
            self.merged.weight.data.copy_(self.a.weight + self.b.weight)
            self.merged.bias.data.copy_(self.a.bias + self.b.bias)
            del self.a, self.b

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), OneShotRep())
    x = torch.randn(1, 3, 8, 8)
    once = fuse(randomize_bn(model).eval(), example_inputs=x)
    assert once.fuse_report.reparameterized == ["2"] and once.fuse_report.fused == [("0", "1")]
    twice = fuse(randomize_transforms(convert(once), seed=2).eval(), example_inputs=x)
    assert twice.fuse_report.reparameterized == ["2"] and twice.fuse_report.fused == [("0", "1")]
    assert twice.fuse_report.folded == ["0", "2.merged"]


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
    with pytest.raises(ReparamError, match=r"cannot tell the input size of Sequential \(no timm pretrained_cfg\); "
                                           r"pass --input-size C,H,W / example_inputs="):
        fuse(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval())
    # the evaluation size where timm gives one, in the model's dtype
    model = nn.Conv2d(3, 4, 3).double()
    model.pretrained_cfg = dict(input_size=(3, 32, 32), test_input_size=(3, 40, 40))
    (x,) = example_inputs(model)
    assert x.shape == (1, 3, 40, 40) and x.dtype == torch.float64


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


class ConvOutputAlsoUsed(nn.Module):
    """A conv whose output a BN normalizes and something else uses too, in the ways a module hook cannot see."""

    def __init__(self, use: str):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)
        self.use = use
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_()
                bn.bias.normal_()

    def forward(self, x):
        y = self.conv(x)
        if self.use == "functional":
            return self.bn(y) + y
        if self.use == "output":
            return self.bn(y), y
        if self.use == "list":
            return torch.cat([self.bn(y), y], dim=1)
        if self.use == "keyword":
            return torch.add(self.bn(y), other=y)
        if self.use == "two norms":  # each BN alone looks like a fusable pair
            return self.bn(y) + self.bn2(y)
        assert y.shape[1] == 4 and y.dim() == 4  # metadata reads are not uses
        return self.bn(y)


@pytest.mark.parametrize("use", ["functional", "output", "list", "keyword", "two norms"])
def test_bn_is_not_fused_into_a_conv_whose_output_is_used_elsewhere(use):
    model = ConvOutputAlsoUsed(use).eval()
    x = torch.randn(2, 4, 8, 8)
    fused = fuse(model, example_inputs=x[:1], verify=False)
    bn2 = "output of conv is also used elsewhere" if use == "two norms" else "not called in forward"
    expected = [("bn", "output of conv is also used elsewhere"), ("bn2", bn2)]
    assert fused.fuse_report.fused == [] and fused.fuse_report.left_alone == expected
    with torch.no_grad():
        for a, b in zip(torch.utils._pytree.tree_leaves(fused(x)), torch.utils._pytree.tree_leaves(model(x))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_metadata_reads_of_a_conv_output_do_not_stop_fusion():
    model = ConvOutputAlsoUsed("shape").eval()
    x = torch.randn(2, 4, 8, 8)
    fused = fuse(model, example_inputs=x[:1])
    assert fused.fuse_report.fused == [("conv", "bn")]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_an_unfused_refconv_model_can_be_traced_and_exported():
    # a captured graph must compute the refocused kernels, not bake in the evaluation-time cache
    torch.manual_seed(0)
    model = convert(timm.create_model("test_resnet"), init="xavier").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), pytest.warns(Warning):  # torch.jit's own deprecation and tracer notices
        traced = torch.jit.trace(model, x)  # its check runs the model twice and compares the graphs
    with torch.no_grad():
        exported = torch.export.export(model, (x,)).module()
        expected = model(x)
        for captured in (traced, exported):
            torch.testing.assert_close(captured(x), expected, rtol=0, atol=0)



def test_fuse_leaves_the_callers_model_as_it_was_and_looks_through_wrappers():
    torch.manual_seed(0)
    converted = randomize_transforms(convert(randomize_bn(timm.create_model("test_resnet", num_classes=4))))
    converted.train()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="fused in eval mode"):
        fused = fuse(converted, example_inputs=x)
    assert converted.training and all(m.training for m in converted.modules())
    with pytest.raises(EquivalenceError), pytest.warns(UserWarning):
        fuse(converted, example_inputs=x, rtol=0.0)
    assert converted.training  # also when verification fails
    wrapped = fuse(nn.DataParallel(converted.eval()), example_inputs=x)
    assert not isinstance(wrapped, nn.DataParallel) and wrapped.fuse_report.fused == fused.fuse_report.fused
    folded = fold(nn.DataParallel(converted))
    assert not refconv_layers(folded) and all(p.requires_grad for p in folded.parameters())
    with pytest.raises(ReparamError, match=r"fuse\(\) takes an nn.Module, got str; build it first with "
                                           r"reparam_zoo.load_model\('resnet18'\)"):
        fuse("resnet18")
    with pytest.raises(ReparamError, match=r"convert\(\) takes an nn.Module"):
        convert("resnet18")


def test_convert_warns_that_hooks_stay_on_the_original_convs():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model[0].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match=r"hooks registered on 0 stay on the original convs"):
        convert(model)


# -- foreign conv wrappers and Rep blocks with their own methods ---------------------------------------------

class YoloConv(nn.Module):
    """The conv+BN+activation wrapper of YOLO-style code: attributes conv, bn, act; forward calls them in order."""

    def __init__(self, c1, c2, k=3, s=1, own_fuse=None):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=1e-3)
        self.act = nn.SiLU()
        self.own_fuse = own_fuse

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class InPlaceFuse(YoloConv):
    """Its own `fuse` merges the BN into the conv in place, deletes `bn` and returns None (YOLOv5 style)."""

    def fuse(self):
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.conv = fuse_conv_bn_eval(self.conv, self.bn)
        del self.bn

    def forward(self, x):
        return self.act(self.conv(x)) if not hasattr(self, "bn") else super().forward(x)


class DropsABranch(nn.Module):
    """A Rep block whose `reparameterize` sets one child to None and replaces another."""

    def __init__(self):
        super().__init__()
        self.main = YoloConv(8, 8)
        self.shortcut = nn.BatchNorm2d(8)
        self.merged = None

    def forward(self, x):
        if self.merged is not None:
            return self.merged(x)
        return self.main(x) + self.shortcut(x)

    def reparameterize(self):
        self.merged = Sum(self.main, self.shortcut)  # numerically the same: enough for the walk
        self.main = None
        self.shortcut = None


class Sum(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = YoloConv(3, 8, 3, 2)
        self.inplace = InPlaceFuse(8, 8)
        self.rep = DropsABranch()
        self.fuse = nn.Conv2d(8, 4, 1)  # a submodule named `fuse` is no method: it must not be called

    def forward(self, x):
        return self.fuse(self.rep(self.inplace(self.stem(x))))


def test_yolo_style_wrappers_convert_and_fuse_and_blocks_may_drop_children():
    torch.manual_seed(0)
    model = randomize_bn(Detector()).eval()
    x = torch.randn(2, 3, 32, 32)
    converted = randomize_transforms(convert(model)).eval()
    assert {n for n, _ in refconv_layers(converted)} >= {"stem.conv", "inplace.conv", "rep.main.conv"}
    fused = fuse(converted, example_inputs=x[:1])
    report = fused.fuse_report
    assert report.verified
    assert ("stem.conv", "stem.bn") in report.fused and isinstance(fused.stem.bn, nn.Identity)
    assert report.reparameterized == ["inplace", "rep"]
    assert fused.rep.main is None and not hasattr(fused.inplace, "bn")
    assert isinstance(fused.fuse, nn.Conv2d)
    with torch.no_grad():  # independent of the verifier
        expected, actual = converted.double()(x.double()), fused.double()(x.double())
    assert (actual - expected).abs().max() <= 1e-6 * expected.abs().max()  # the fused float32 weights' rounding


def test_fusing_an_unverified_fused_model_does_not_call_it_verified():
    # comparing a fused model with itself would always pass: fuse() must keep what the first fuse recorded
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    model = randomize_bn(timm.create_model("test_resnet", num_classes=4)).eval()
    unverified = fuse(model, example_inputs=x, verify=False)
    assert nothing_to_fuse(unverified) and not nothing_to_fuse(model)
    again = fuse(unverified, example_inputs=x)
    assert again is not unverified and again.fuse_report.verified is False
    assert again.fuse_report == unverified.fuse_report and again.fuse_report.max_abs_error is None
    torch.testing.assert_close(again(x), unverified(x), rtol=0, atol=0)
    same = fuse(unverified, example_inputs=x, inplace=True)
    assert same is unverified and not same.training
    # a fold-only model still has norms to fuse: that fuse runs and verifies
    folded = fuse(model, example_inputs=x, fold_only=True)
    assert nothing_to_fuse(folded, fold_only=True) and not nothing_to_fuse(folded)
    fused = fuse(folded, example_inputs=x)
    assert fused.fuse_report.verified and len(fused.fuse_report.fused) == 15
