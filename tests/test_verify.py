"""The equivalence verifier must be able to fail: a later output folded wrong, a wrong fold hidden by a model
whose output hardly depends on its input, conv+BN fusion against its closed form (float64, non-default eps,
near-zero variances), low precision against a float64 reference cast to the dtype. Errors are computed here,
independently of the code under test."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import reparam_zoo
from reparam_zoo import EquivalenceError, fuse
from reparam_zoo import deploy
from reparam_zoo.verify import as_call_inputs, tensor_leaves, verify_equivalence

from helpers import randomize_bn

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: dict


class TwoBranch(nn.Module):
    """Two conv+BN branches; `shape` says how the outputs are returned; the later output is branch b."""

    def __init__(self, shape: str):
        super().__init__()
        self.shape = shape
        self.conv_a, self.bn_a = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv_b, self.bn_b = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)

    def forward(self, x):
        a, b = self.bn_a(self.conv_a(x)), self.bn_b(self.conv_b(x))
        return {
            "tuple": lambda: (a, b),
            "dict": lambda: {"first": a, "second": b},
            "nested": lambda: {"x": [a, (a.mean(), {"y": b})]},
            "dataclass": lambda: Out(a, {"later": [b]}),
        }[self.shape]()


def wrong_fusion_of(monkeypatch, conv_name: str, factor: float):
    """Make `fuse_conv_bn` scale one fused conv's kernel by `factor` (a fold wrong in a single layer)."""
    honest = deploy.fuse_conv_bn

    def wrong(model, inputs):
        pairs, left = honest(model, inputs)
        with torch.no_grad():
            model.get_submodule(conv_name).weight.mul_(factor)
        return pairs, left

    monkeypatch.setattr(deploy, "fuse_conv_bn", wrong)


@pytest.mark.parametrize("shape", ["tuple", "dict", "nested", "dataclass"])
def test_a_later_output_fused_wrong_is_caught_and_named(shape, monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(TwoBranch(shape)).eval()
    fused = fuse(model, example_inputs=X)  # the honest fuse passes
    assert fused.fuse_report.verified and fused.fuse_report.modules_verified == 2
    wrong_fusion_of(monkeypatch, "conv_b", 1.05)
    with pytest.raises(EquivalenceError) as info:
        fuse(model, example_inputs=X)
    assert info.value.first_diverging_module == "conv_b"
    assert "conv_b (fused with bn_b)" in str(info.value)


@pytest.mark.parametrize("shape", ["tuple", "dict", "nested", "dataclass"])
def test_end_to_end_alone_compares_every_output(shape):
    # no units: only the end-to-end comparison can see branch b, the later output
    torch.manual_seed(0)
    reference = randomize_bn(TwoBranch(shape)).eval()
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.conv_b.weight.mul_(1.01)
    with torch.no_grad():  # the test's own measure of the error of the later output
        b_ref = reference.bn_b(reference.conv_b(X))
        b_bad = candidate.bn_b(candidate.conv_b(X))
    assert (b_bad - b_ref).abs().max() > 1e-3 * b_ref.abs().max()
    with pytest.raises(EquivalenceError, match="first diverging module: conv_b"):
        verify_equivalence(reference, candidate, X, rtol=1e-4, atol=0.0)
    # and the unchanged model passes
    verify_equivalence(reference, copy.deepcopy(reference), X, rtol=1e-4, atol=0.0)


class Insensitive(nn.Module):
    """Deep, badly scaled: the last layer's tiny weights and big bias make the output almost constant."""

    def __init__(self):
        super().__init__()
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            self.head.weight.mul_(1e-6)
            self.head.bias.fill_(10.0)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def test_a_wrong_fold_hidden_by_an_insensitive_output_is_still_caught(monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(Insensitive()).eval()
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.body[0].weight.mul_(1.05)
    # the premise, measured here: end to end a 5% wrong first layer is far inside rtol=1e-4
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        e, a = model.double()(x), bad.double()(x)
    model.float()
    assert ((a - e).abs().max() / e.abs().max()).item() < 1e-6
    assert fuse(model, example_inputs=X).fuse_report.verified
    wrong_fusion_of(monkeypatch, "body.0", 1.05)
    with pytest.raises(EquivalenceError) as info:
        fuse(model, example_inputs=X)
    assert info.value.first_diverging_module == "body.0"
    assert info.value.max_rel_error == pytest.approx(0.05, rel=0.2)


def test_correct_folds_pass_on_many_random_models():
    for seed in range(6):
        torch.manual_seed(seed)
        model = randomize_bn(Insensitive(), seed=seed).eval()
        converted = reparam_zoo.convert(model)
        for m in converted.modules():
            if isinstance(m, reparam_zoo.RefConvNd):
                m.reset_transform("xavier")
        report = fuse(converted.eval(), example_inputs=torch.randn(1, 3, 12, 12)).fuse_report
        assert report.verified and report.modules_verified == 4


# -- conv+BN fusion against its closed form -------------------------------------------------------------------

def closed_form(conv: nn.Conv2d, bn: nn.BatchNorm2d, eps: float):
    """W' = W * g / sqrt(v + eps) per output channel, b' = (b - m) * g / sqrt(v + eps) + beta, in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=torch.float64)
    return conv.weight.double() * scale[:, None, None, None], (bias - bn.running_mean.double()) * scale + bn.bias.double()


def conv_bn(eps=1e-3, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    conv, bn = nn.Conv2d(3, 8, 3, bias=bias), nn.BatchNorm2d(8, eps=eps)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        if bias:
            conv.bias.copy_(torch.randn(8, generator=g))
        bn.running_mean.copy_(torch.randn(8, generator=g))
        var = torch.rand(8, generator=g) + 0.5
        var[[1, 5]] = torch.tensor([1e-9, 0.0])  # near-zero and zero variances: eps decides these channels
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.randn(8, generator=g))
        bn.bias.copy_(torch.randn(8, generator=g))
    return nn.Sequential(conv, bn).eval()


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_fusion_matches_the_closed_form_in_float64(bias):
    model = conv_bn(eps=1e-3, bias=bias).double()
    fused = fuse(model, example_inputs=X.double())
    assert fused.fuse_report.fused == [("0", "1")] and isinstance(fused[1], nn.Identity)
    weight, b = closed_form(model[0], model[1], eps=1e-3)
    torch.testing.assert_close(fused[0].weight, weight, rtol=1e-13, atol=0)
    torch.testing.assert_close(fused[0].bias, b, rtol=1e-13, atol=1e-13)
    # the comparison sees eps dropped or doubled (channels 1 and 5 change by orders of magnitude)
    for wrong_eps in (0.0, 2e-3):
        wrong, _ = closed_form(model[0], model[1], eps=max(wrong_eps, 1e-30))
        assert not torch.allclose(wrong, weight, rtol=1e-3, atol=0)


@pytest.mark.parametrize("wrong_eps", [lambda e: e * 2, lambda e: e * 0])
def test_the_verifier_rejects_a_fusion_with_eps_doubled_or_dropped(wrong_eps, monkeypatch):
    model = conv_bn(eps=1e-3)
    honest = deploy.fuse_conv_bn_weights

    def wrong(w, b, rm, rv, eps, *args, **kwargs):
        return honest(w, b, rm, rv + 1e-30, wrong_eps(eps), *args, **kwargs)

    monkeypatch.setattr(deploy, "fuse_conv_bn_weights", wrong)
    with pytest.raises(EquivalenceError) as info:
        fuse(model, example_inputs=X)
    assert info.value.first_diverging_module == "0"


def relative_error(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype) -> float:
    """max |a - e| / |e| over the elements the dtype holds as normal numbers (the test's own measure)."""
    nonzero = expected64.abs() >= torch.finfo(dtype).tiny
    return ((actual.double() - expected64).abs()[nonzero] / expected64.abs()[nonzero]).max().item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_fusion_is_the_float64_closed_form_rounded_to_the_dtype(dtype, monkeypatch):
    reference = conv_bn(eps=1e-3)
    var = reference[1].running_var
    with torch.no_grad():
        var[[1, 5]] = 1e-2  # fp16 cannot hold the scale 1/sqrt(1e-3 + 1e-9) times the weights otherwise
    model = copy.deepcopy(reference).to(dtype)
    fused = fuse(model, example_inputs=X.to(dtype))
    assert fused[0].weight.dtype == dtype and fused.fuse_report.verified
    expected, _ = closed_form(model[0], model[1], eps=1e-3)  # from the dtype's own weights, in float64
    half_ulp = torch.finfo(dtype).eps / 2  # rounding to nearest: at most half a unit in the last place
    assert relative_error(fused[0].weight, expected, dtype) <= half_ulp * 1.001
    # the same comparison rejects a kernel 1% wrong
    assert relative_error((expected * 1.01).to(dtype), expected, dtype) > half_ulp * 1.001

    if dtype == torch.float16:  # fp16 resolves 1% by far (eps 1e-3); bf16's resolution is 0.8%
        wrong_fusion_of(monkeypatch, "0", 1.01)
        with pytest.raises(EquivalenceError) as info:
            fuse(model, example_inputs=X.to(dtype))
        assert info.value.first_diverging_module == "0"


# -- inputs of any structure ---------------------------------------------------------------------------------

class Keyworded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, images, *, scale, extra=None):
        out = [self.bn(self.conv(i.unsqueeze(0)))[0] * scale for i in images]
        return out + ([extra["bias"].sum()] if extra is not None else [])


def test_inputs_as_lists_dicts_and_keywords():
    torch.manual_seed(0)
    model = randomize_bn(Keyworded()).eval()
    images = [torch.randn(3, 10, 10), torch.randn(3, 10, 10)]
    fused = fuse(model, example_inputs=(images,), example_kwargs={"scale": torch.tensor(2.0),
                                                                    "extra": {"bias": torch.ones(3)}})
    report = fused.fuse_report
    assert report.verified and report.fused == [("conv", "bn")]
    assert report.input_shapes == [[1, 3, 10, 10], [2, 3, 10, 10]]  # a list of 1, then of 2 images
    with torch.no_grad():
        got = fused(images, scale=torch.tensor(2.0))
        want = model(images, scale=torch.tensor(2.0))
    assert len(got) == 2 and all(torch.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(got, want))
    # a dict as example_inputs is the keyword inputs
    call = as_call_inputs({"images": images, "scale": torch.tensor(1.0)})
    assert call.args == () and set(call.kwargs) == {"images", "scale"}
    with pytest.raises(reparam_zoo.ConversionError, match="example_inputs hold no tensor"):
        fuse(model, example_inputs=([],))


def test_tensor_leaves_of_dataclasses_in_order():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    leaves = tensor_leaves({"k": [Out(a, {"z": (b, None, 3)})], "m": c})
    assert [t.shape for t in leaves] == [(1,), (2,), (3,)]


def test_export_takes_nested_inputs_and_checks_the_artifact(tmp_path):
    from reparam_zoo.export import export

    torch.manual_seed(0)
    model = fuse(randomize_bn(TwoBranch("dict")).eval(), example_inputs=X)
    images = [torch.randn(3, 16, 16)]

    class ListInput(nn.Module):  # a detector-like call: a list of images in, a dict out
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(torch.stack(images))

    wrapped = ListInput(model).eval()
    result = export(wrapped, tmp_path / "m.torchscript.pt", "torchscript", example_inputs=(images,))
    assert result.max_rel_error is not None and result.max_rel_error < 1e-5
    loaded = torch.jit.load(str(tmp_path / "m.torchscript.pt"))
    with torch.no_grad():
        two = [torch.randn(3, 16, 16)]  # (a traced list keeps its length)
        got, want = loaded(two), wrapped(two)
    assert set(got) == {"first", "second"} and torch.allclose(got["second"], want["second"], atol=1e-6)
    with pytest.raises(reparam_zoo.ReparamError, match="ONNX export takes tensor inputs only"):
        export(wrapped, tmp_path / "m.onnx", "onnx", example_inputs=(images,))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.torchscript.pt"]
