"""Model surgery: selection by pattern, shared modules, skip reasons, training scopes, exactness."""
import pytest
import torch
import torch.nn as nn

from reparam_zoo import ConversionError, RefConvNd, convert
from reparam_zoo.surgery import refconv_layers


class Nested(nn.Module):
    """Sequential, ModuleList, ModuleDict, a shared conv, 1x1 convs, a Linear, BN."""

    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([
            nn.ModuleDict({"dw": shared, "pw": nn.Conv2d(8, 8, 1), "bn": nn.BatchNorm2d(8)}),
            nn.ModuleDict({"dw": shared, "pw": nn.Conv2d(8, 8, 1), "bn": nn.BatchNorm2d(8)}),
        ])
        self.wide = nn.Conv2d(8, 8, (1, 5), padding=(0, 2))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block["bn"](block["pw"](block["dw"](x))).relu()
        x = self.wide(x)
        return self.head(x.mean((2, 3)))


def test_converts_spatial_convs_once_and_reports_skips():
    model = Nested()
    converted = convert(model)
    summary = converted.refconv_summary
    assert summary.converted_names == ["stem.0", "blocks.0.dw"]
    assert converted.blocks[0]["dw"] is converted.blocks[1]["dw"]  # shared -> one RefConv
    assert isinstance(converted.blocks[1]["dw"], RefConvNd)
    reasons = dict(summary.skipped)
    assert reasons["blocks.0.pw"] == "1x1" and reasons["blocks.1.pw"] == "1x1"
    assert reasons["wide"] == "kernel 1x5 smaller than map_k=3"
    assert summary.transform_params == 3 * 8 * 9 + 8 * 8 * 9
    assert isinstance(model.stem[0], nn.Conv2d)  # not in place by default
    assert "stem.0" in str(summary) and "1x1: 2" in str(summary)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_zero_init_conversion_is_exact(mode):
    torch.manual_seed(0)
    model = Nested()
    converted = convert(model)
    getattr(model, mode)()
    getattr(converted, mode)()
    x = torch.randn(4, 3, 12, 12)
    assert torch.equal(converted(x), model(x))
    if mode == "train":  # BN running statistics moved identically
        assert torch.equal(converted.stem[1].running_mean, model.stem[1].running_mean)


def test_include_exclude_patterns():
    converted = convert(Nested(), include=["blocks.*"])
    assert converted.refconv_summary.converted_names == ["blocks.0.dw"]
    assert dict(converted.refconv_summary.skipped)["stem.0"] == "not included"
    converted = convert(Nested(), exclude="stem.*")
    assert converted.refconv_summary.converted_names == ["blocks.0.dw"]
    assert dict(converted.refconv_summary.skipped)["stem.0"] == "excluded"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(include=["nothing.*"]), "include pattern 'nothing.\\*' matches no conv layer"),
        (dict(exclude=["nope"]), "exclude pattern 'nope' matches no conv layer"),
        (dict(include=["blocks.0.pw"]), "no conv layer selected .*1x1"),
        (dict(map_k=5), "no conv layer selected .*smaller than map_k=5"),
        (dict(map_k=4), "map_k must be a positive odd integer"),
        (dict(train_scope="everything"), "unknown train_scope 'everything'"),
    ],
)
def test_selection_errors(kwargs, message):
    with pytest.raises(ConversionError, match=message):
        convert(Nested(), **kwargs)


def test_converting_twice_is_an_error_not_a_double_wrap():
    converted = convert(Nested())
    with pytest.raises(ConversionError, match="already converted \\(2 RefConv layers"):
        convert(converted)


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_train_scopes():
    assert trainable(convert(Nested())) == ["blocks.0.dw.transform_weight", "stem.0.transform_weight"]
    with_norm = trainable(convert(Nested(), train_scope="transforms+norm"))
    assert "stem.1.weight" in with_norm and "blocks.1.bn.bias" in with_norm and "head.weight" not in with_norm
    everything = trainable(convert(Nested(), train_scope="all-but-base"))
    model = convert(Nested(), train_scope="all-but-base")
    assert everything == sorted(n for n, _ in model.named_parameters())
    assert all("weight_base" not in n for n in everything)


def test_transforms_scope_trains_only_transforms_but_bn_statistics_follow():
    torch.manual_seed(0)
    model = convert(Nested(), init="xavier").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 3, 12, 12)).sum().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"stem.0.transform_weight", "blocks.0.dw.transform_weight"} <= changed
    assert "stem.1.running_mean" in changed
    frozen_changed = {k for k in changed if not k.endswith(("transform_weight", "running_mean", "running_var",
                                                           "num_batches_tracked"))}
    assert frozen_changed == set()


def test_inplace_and_refconv_layers_helper():
    model = Nested()
    same = convert(model, inplace=True)
    assert same is model
    assert [n for n, _ in refconv_layers(model)] == ["stem.0", "blocks.0.dw"]


def test_a_model_that_is_itself_a_conv_converts_and_folds():
    from reparam_zoo import fold

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    converted = convert(conv, init="xavier")
    assert isinstance(converted, RefConvNd) and converted.refconv_summary.converted_names == [""]
    assert [n for n, p in converted.named_parameters() if p.requires_grad] == ["transform_weight"]
    folded = fold(converted)
    assert type(folded) is nn.Conv2d and all(p.requires_grad for p in folded.parameters())
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), converted(x), rtol=1e-5, atol=1e-6)
    assert not torch.equal(folded.weight, conv.weight)
