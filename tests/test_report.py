"""Reports: params and MACs of plain, RefConv and fused models against independent counts; renderers;
comparison; and the published ReXNetV1 / RevCol numbers."""
import csv
import io
import json
import logging
import math
import warnings

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import reparam_zoo
from reparam_zoo import ReparamError, convert, fold, fuse
from reparam_zoo.report import STAGES, Comparison, MacsCheck, Report, compare, layer_params, report
from reparam_zoo.surgery import refconv_layers


class Tiny(nn.Module):
    """Dense, grouped and depthwise 3x3 convs, a 1x1 conv, BN, a Linear; no op fvcore counts besides these."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.pw = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = self.pw(self.dw(self.conv2(x)))
        return self.fc(x.flatten(2).sum(-1))


def conv_linear_macs(model, input_size):
    """MACs of every Conv/Linear from the output shapes seen by forward hooks: Cout*Cin/g*prod(k)*prod(out)."""
    total = []

    def hook(module, args, out):
        if isinstance(module, nn.Linear):
            total.append(out.numel() * module.in_features)
        else:
            total.append(out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.randn(1, *input_size))
    for h in handles:
        h.remove()
    return sum(total)


def test_tiny_net_params_and_macs_match_hand_counts():
    model = Tiny()
    r = report(model, (3, 16, 16))
    conv1, conv2, dw, pw, fc = 8 * 3 * 9 * 16 * 16, 8 * 2 * 9 * 8 * 8, 8 * 1 * 9 * 8 * 8, 6 * 8 * 8 * 8, 5 * 6
    hand = conv1 + conv2 + dw + pw + fc
    assert hand == conv_linear_macs(model, (3, 16, 16))
    assert r.inference["conv_linear_macs"] == r.macs_check.fvcore_macs == r.macs_check.flop_counter_macs == hand
    # fvcore also counts eval BatchNorm: 2 per element with affine (scale + shift)
    assert r.inference["macs"] == r.training["macs"] == hand + 2 * 8 * 16 * 16
    params = sum(p.numel() for p in model.parameters())
    assert r.inference["params"] == r.training["params"] == r.training["trainable_params"] == params
    assert r.training["frozen_params"] == r.training["base_kernel_params"] == r.training["transform_macs"] == 0
    assert r.training["buffers"] == r.inference["buffers"] == 8 + 8 + 1
    assert r.stage == "plain" and r.model == "Tiny" and r.input_size == (3, 16, 16)
    assert [(m.name, m.macs) for m in r.modules if m.name in ("conv1", "fc")] == [("conv1", conv1), ("fc", fc)]


def test_frozen_params_follow_requires_grad():
    model = Tiny()
    model.conv1.requires_grad_(False)
    r = report(model, (3, 8, 8), depth=0)
    assert r.training["frozen_params"] == model.conv1.weight.numel() + model.conv1.bias.numel()
    assert r.training["trainable_params"] + r.training["frozen_params"] == r.training["params"]
    assert r.modules == []


def test_resnet18_at_224_matches_published_counts_and_cross_check():
    model = timm.create_model("resnet18")
    r = report(model)
    assert r.inference["params"] == sum(p.numel() for p in model.parameters()) == 11_689_512
    assert r.training["buffers"] == sum(b.numel() for b in model.buffers())
    assert r.inference["conv_linear_macs"] == conv_linear_macs(model, (3, 224, 224))
    assert round(r.inference["macs"] / 1e9, 2) == 1.82  # timm's published 1.82 GMACs
    assert r.macs_check.agrees and r.macs_check.rel_diff < 0.02 and not r.flags
    assert r.unsupported_ops == {"aten::add_": 8, "aten::max_pool2d": 1}
    assert sum(m.macs for m in r.modules) == r.inference["macs"]  # depth 1 partitions resnet18's work


class BatchMatmul(nn.Module):
    """A conv plus a batched matmul via baddbmm, which torch's flop_counter counts and fvcore does not."""

    def __init__(self, mixed_channels):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.c = mixed_channels
        self.register_buffer("offset", torch.ones(1, mixed_channels, mixed_channels))

    def forward(self, x):
        x = self.conv(x).flatten(2)[:, :self.c]
        return torch.baddbmm(self.offset, x, x.transpose(1, 2))


@pytest.mark.parametrize("c, flagged", [(3, False), (8, True)])
def test_cross_check_flags_work_fvcore_misses(c, flagged, caplog):
    # conv: 32*3*9 MACs per pixel; baddbmm: c*c per pixel that fvcore cannot count: 1.0% (c=3), 6.9% (c=8)
    model = BatchMatmul(c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape (fvcore's import, tracer, unsupported ops)
        with caplog.at_level(logging.DEBUG):
            r = report(model, (3, 8, 8))
    assert not [rec for rec in caplog.records if rec.levelno >= logging.INFO]
    conv, bmm = 32 * 3 * 9 * 64, c * c * 64
    check = r.macs_check
    assert (check.fvcore_macs, check.flop_counter_macs) == (conv, conv + bmm)
    assert check.rel_diff == pytest.approx(bmm / (conv + bmm))
    assert check.agrees is not flagged and bool(r.flags) is flagged
    assert r.unsupported_ops == {"aten::baddbmm": 1}
    for text in (r.to_table(), r.to_markdown()):
        assert text.count("aten::baddbmm") == 1
        assert ("WARNING" in text) is flagged
    assert json.loads(r.to_json())["macs_check"]["agrees"] is not flagged


class Attention(nn.Module):
    def __init__(self, heads=2, dim=8):
        super().__init__()
        self.conv = nn.Conv2d(3, 3 * heads * dim, 1, bias=False)
        self.heads, self.dim = heads, dim

    def forward(self, x):
        qkv = self.conv(x).flatten(2).transpose(1, 2)  # (B, L, 3*H*D)
        q, k, v = qkv.reshape(x.shape[0], -1, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_cross_check_counts_cpu_attention():
    model = Attention(heads=2, dim=8)
    r = report(model, (3, 4, 4))  # L = 16 tokens
    attention = 2 * 16 * 16 * 8 * 2  # heads x (Q K^T + A V), each L*L*D MACs
    conv = 3 * 48 * 16
    check = r.macs_check
    # CPU attention runs as bmm's at some sizes and as one fused kernel at others (timm's test_vit, in test_cli)
    assert sum(n for op, n in check.flop_counter_by_op.items() if op != "aten.convolution") == attention
    assert (check.fvcore_macs, check.flop_counter_macs) == (conv, conv + attention)
    assert not check.agrees and r.flags
    # the model's own forward runs the attention (no submodule does): the report says where they differ
    assert check.differing_modules == {"": [0, attention]}
    assert f"they differ in: (the model itself) 0 vs {attention:,}" in r.flags[0]


def test_modules_the_forward_never_runs_are_named():
    # RevCol's intermediate-supervision heads only run in training; dropout/Identity that never run are not news
    model = reparam_zoo.models.revcol.RevCol(channels=(8, 16, 32, 64), layers=(1, 1, 1, 1), num_columns=4,
                                             num_classes=10, inter_supv=True)
    r = report(model, (3, 64, 64), depth=0)
    assert r.uncalled_modules == ["cls_blocks.0", "cls_blocks.1", "cls_blocks.2", "decoder_blocks"]
    assert ("not run by an eval forward, so no MACs counted: cls_blocks.0, cls_blocks.1, cls_blocks.2, "
            "decoder_blocks") in r.to_table()
    assert json.loads(r.to_json())["uncalled_modules"] == r.uncalled_modules
    assert report(timm.create_model("test_resnet"), (3, 32, 32), depth=0).uncalled_modules == []


class DeadBranch(nn.Module):
    """`dead` runs in every forward, but nothing uses its output; `never` holds weights and never runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dead = nn.Conv2d(3, 16, 3, padding=1)
        self.never = nn.Linear(4, 4)

    def forward(self, x):
        self.dead(x)
        return self.conv(x)


def test_modules_whose_outputs_are_unused_are_told_from_modules_never_run():
    # fvcore counts a JIT trace, which drops `dead` as dead code; torch's flop_counter counts the eager run
    r = report(DeadBranch(), (3, 8, 8), depth=1)
    conv, dead = 8 * 8 * 4 * 3 * 9, 8 * 8 * 16 * 3 * 9  # positions x Cout x Cin x k*k
    check = r.macs_check
    assert (check.fvcore_macs, check.flop_counter_macs) == (conv, conv + dead) and not check.agrees
    assert r.uncalled_modules == ["never"] and r.unused_output_modules == ["dead"]
    assert check.differing_modules == {"dead": [0, dead]}
    text = r.to_table()
    assert f"they differ in: dead 0 vs {dead:,}" in text
    assert ("run, but nothing uses their outputs (fvcore's traced graph drops them: no MACs counted, torch's "
            "flop_counter counts them): dead") in text
    assert "not run by an eval forward, so no MACs counted: never" in text
    again = Report.from_dict(json.loads(r.to_json()))
    assert (again.unused_output_modules, again.macs_check.differing_modules) == (["dead"], {"dead": [0, dead]})


def test_cross_check_tolerance_is_two_percent():
    assert MacsCheck(fvcore_macs=98, flop_counter_macs=100, rel_diff=0.02).agrees
    assert not MacsCheck(fvcore_macs=979, flop_counter_macs=1000, rel_diff=0.021).agrees


def spatial_convs(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and max(m.kernel_size) > 1]


@pytest.mark.parametrize("map_k", [1, 3])
def test_refconv_model_training_vs_inference(map_k):
    plain = Tiny()
    plain_report = report(plain, (3, 16, 16))
    convs = spatial_convs(plain)
    converted = convert(plain, map_k=map_k)
    r = report(converted, (3, 16, 16), depth=2)

    # independent of the RefConv implementation: the paper's N*g*map_k^d and N*g*map_k^d*prod(K), N*g = Cin*Cout
    transforms = sum(c.in_channels * c.out_channels * map_k ** 2 for c in convs)
    transform_macs = sum(c.in_channels * c.out_channels * map_k ** 2 * math.prod(c.kernel_size) for c in convs)
    bases = sum(c.weight.numel() for c in convs)
    assert r.stage == "refconv" and r.refconv_layers == len(convs) == 3
    assert r.training["trainable_params"] == transforms
    assert r.training["transform_macs"] == transform_macs
    assert r.training["base_kernel_params"] == bases
    assert r.training["params"] == plain_report.inference["params"] + transforms
    assert r.training["frozen_params"] == plain_report.inference["params"]
    assert r.training["buffers"] == plain_report.training["buffers"]
    assert r.inference == plain_report.inference
    assert r.training["macs"] == plain_report.inference["macs"]
    # the inference column is what `fold` deploys
    folded = report(fold(converted), (3, 16, 16), depth=2)
    assert r.inference == folded.inference
    assert [(m.name, m.inference_params, m.macs) for m in r.modules] == [
        (m.name, m.training_params, m.macs) for m in folded.modules]
    assert sum(m.transform_macs for m in r.modules) == transform_macs


def test_refconv_3d_transform_macs_use_map_k_cubed():
    conv = nn.Conv3d(2, 4, 3, padding=1)
    r = report(convert(nn.Sequential(conv)), (2, 6, 6, 6))
    assert r.training["trainable_params"] == 2 * 4 * 3 ** 3
    assert r.training["transform_macs"] == 2 * 4 * 3 ** 3 * 3 ** 3
    assert r.inference["conv_linear_macs"] == 4 * 2 * 27 * 6 ** 3
    assert r.inference["params"] == conv.weight.numel() + conv.bias.numel()


def test_report_leaves_the_model_as_it_was():
    converted = convert(timm.create_model("resnet18", num_classes=10), train_scope="transforms+norm")
    converted.train()
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    grads = {n: p.requires_grad for n, p in converted.named_parameters()}
    report(converted, (3, 64, 64))
    assert converted.training and all(m.training for m in converted.modules())
    assert {n: p.requires_grad for n, p in converted.named_parameters()} == grads
    after = converted.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert len(refconv_layers(converted)) == 17 and converted.refconv_summary is not None


def test_fused_model_has_bn_folded_away():
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=10).eval()
    fused = fuse(plain, example_inputs=torch.randn(1, 3, 64, 64))
    plain_r = report(plain, (3, 64, 64))
    r = report(fused, (3, 64, 64))
    bns = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_outputs = []
    handles = [bn.register_forward_hook(lambda m, a, out: bn_outputs.append(out.numel())) for bn in bns]
    with torch.no_grad():
        plain(torch.randn(1, 3, 64, 64))
    for h in handles:
        h.remove()
    assert r.stage == "fused" and len(fused.fuse_report.fused) == len(bns) == 20
    # each BN's affine (2C) goes, the conv it folds into gains a bias (C)
    assert r.inference["params"] == plain_r.inference["params"] - sum(bn.num_features for bn in bns)
    assert r.inference["buffers"] == 0 and r.training["transform_macs"] == 0
    assert r.inference["conv_linear_macs"] == plain_r.inference["conv_linear_macs"]
    # what goes is fvcore's eval-BN count, 2 per element (scale + shift); the conv bias is free in fvcore
    assert r.inference["macs"] == plain_r.inference["macs"] - 2 * sum(bn_outputs)


def test_stage_detection_and_override():
    model = Tiny()
    assert report(model, (3, 8, 8), depth=0, stage="fused").stage == "fused"
    model.fuse_report = reparam_zoo.deploy.FuseReport()  # what loading a fused model file sets
    assert report(model, (3, 8, 8), depth=0).stage == "fused"
    with pytest.raises(ReparamError, match="stage 'refconv' does not fit the model: it has no RefConv layers"):
        report(model, (3, 8, 8), stage="refconv")
    with pytest.raises(ReparamError, match="stage 'plain' does not fit the model: it has RefConv layers"):
        report(convert(Tiny()), (3, 8, 8), stage="plain")
    with pytest.raises(ReparamError, match="unknown stage 'deployed', expected one of plain, refconv, fused"):
        report(model, (3, 8, 8), stage="deployed")


@pytest.mark.parametrize("bad", [(3, 0, 8), (3, 8.0, 8), "3x8x8", (), None])
def test_bad_input_size_is_one_line_error(bad):
    with pytest.raises(ReparamError) as info:
        report(Tiny(), bad)
    assert "\n" not in str(info.value)


def test_input_size_none_reads_timm_cfg_and_forward_errors_are_one_line():
    model = timm.create_model("resnet18", num_classes=10)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 32))
    assert report(model, None, depth=0).input_size == (3, 32, 32)
    with pytest.raises(ReparamError, match=r"^cannot count MACs of Tiny on input 1x4x8x8: RuntimeError: ") as info:
        report(Tiny(), (4, 8, 8))
    assert "\n" not in str(info.value)
    with torch.device("meta"):
        meta = Tiny()
    with pytest.raises(ReparamError, match="meta device"):
        report(meta, (3, 8, 8))
    with pytest.raises(ReparamError, match="depth must be a non-negative integer"):
        report(Tiny(), (3, 8, 8), depth=-1)


DOCUMENTED = {
    "model": str, "stage": str, "input_size": list,
    "inference": {"params": int, "macs": int},
    "training": {"params": int, "trainable_params": int, "frozen_params": int, "buffers": int, "transform_macs": int},
}


def test_json_has_the_documented_shape_and_round_trips():
    r = report(convert(Tiny()), (3, 16, 16))
    data = json.loads(r.render("json"))
    for key, kind in DOCUMENTED.items():
        if isinstance(kind, dict):
            assert set(kind) <= set(data[key])
            assert all(type(data[key][k]) is t for k, t in kind.items())
            assert all(type(v) is int for v in data[key].values())
        else:
            assert type(data[key]) is kind
    assert data["stage"] in STAGES and data["input_size"] == [3, 16, 16]
    assert all(type(s) is int for s in data["input_size"])
    assert data["training"]["params"] == data["training"]["trainable_params"] + data["training"]["frozen_params"]
    assert data == r.as_dict()
    assert Report.from_dict(data).as_dict() == data
    with pytest.raises(ReparamError, match="not a reparam-zoo report"):
        Report.from_dict({"model": "x"})


def test_table_markdown_csv_contain_the_numbers():
    r = report(convert(Tiny()), (3, 16, 16))
    numbers = [r.training[k] for k in ("params", "trainable_params", "frozen_params", "transform_macs")]
    numbers += [r.inference["params"], r.inference["macs"]]
    for text in (r.render("table"), str(r), r.render("markdown")):
        assert all(f"{n:,}" in text for n in numbers)
        assert "one fused multiply-add = 1" in text and "refconv" in text
    lines = r.to_table().splitlines()
    header = next(i for i, line in enumerate(lines) if "training" in line and "inference" in line)
    assert len({len(line) for line in lines[header + 1:header + 3]}) == 1  # aligned columns

    rows = list(csv.DictReader(io.StringIO(r.render("csv"))))
    total = rows[0]
    assert total["module"] == "(model)"
    assert int(total["training_params"]) == r.training["params"]
    assert int(total["trainable_params"]) == r.training["trainable_params"]
    assert int(total["transform_macs"]) == r.training["transform_macs"]
    assert int(total["inference_params"]) == r.inference["params"] and int(total["macs"]) == r.inference["macs"]
    assert [row["module"] for row in rows[1:]] == [m.name for m in r.modules]
    assert {row["module"]: int(row["macs"]) for row in rows[1:]}["fc"] == 30
    assert int(total["inference_buffers"]) == r.inference["buffers"] == 17  # BN's mean, var and step count
    assert sum(int(row["inference_buffers"]) for row in rows[1:]) == 17
    assert {row["module"]: int(row["inference_buffers"]) for row in rows[1:]}["bn"] == 17
    with pytest.raises(ReparamError, match="unknown format 'yaml', expected one of table, markdown, json, csv"):
        r.render("yaml")


def test_compare_refconv_training_model_with_its_fused_model():
    torch.manual_seed(0)
    converted = convert(Tiny().eval())
    fused = fuse(converted, example_inputs=torch.randn(1, 3, 16, 16))
    c = reparam_zoo.compare(converted, fused, input_size=(3, 16, 16), names=("refconv", "fused"))
    assert isinstance(c, Comparison)
    a, b = (report(m, (3, 16, 16)) for m in (converted, fused))
    rows = {row["metric"]: row for row in c.rows()}
    assert rows["trainable params"]["a"] == a.training["trainable_params"] == converted.refconv_summary.transform_params
    assert rows["transform MACs / step"]["a"] == a.training["transform_macs"] > 0
    assert rows["transform MACs / step"]["b"] == 0 and rows["transform MACs / step"]["ratio"] == 0
    # the BN's affine (2C) goes; conv1 already has the bias it folds into
    assert rows["inference params"]["delta"] == b.inference["params"] - a.inference["params"] == -2 * 8
    assert rows["MACs / image"]["ratio"] == pytest.approx(b.inference["macs"] / a.inference["macs"])
    table = c.render("table")
    assert "refconv" in table and "fused - refconv" in table and f"{a.training['params']:,}" in table
    assert f"{rows['training params']['delta']:+,}" in table
    data = json.loads(c.render("json"))
    assert data["names"] == ["refconv", "fused"] and [m["stage"] for m in data["models"]] == ["refconv", "fused"]
    assert "| training params |" in c.render("markdown")
    assert next(csv.DictReader(io.StringIO(c.render("csv"))))["refconv"] == str(rows["training params"]["a"])
    # reports can be compared directly, without recounting
    assert compare(a, b, names=("x", "y")).rows() == c.rows()
    with pytest.raises(ReparamError, match="names must be two non-empty strings"):
        compare(a, b, names=("x",))


def test_layer_params_training_vs_inference():
    plain = Tiny()
    converted = convert(plain)
    rows = layer_params(converted)
    by_name = {name: (train, infer) for name, train, infer in rows}
    # depthwise 8 channels, 3x3: 72 weights deployed, 8*8*9 = 576 transform weights while training
    assert by_name["dw"] == (72 + 576, 72)
    assert by_name["conv1"] == (8 * 3 * 9 + 8 + 3 * 8 * 9, 8 * 3 * 9 + 8)
    assert by_name["pw"] == (6 * 8 + 6, 6 * 8 + 6)
    assert sum(t for _, t, _ in rows) == report(converted, (3, 8, 8)).training["params"]
    assert sum(i for _, _, i in rows) == sum(p.numel() for p in plain.parameters())
    assert layer_params(plain) == [(n, p, p) for n, p, _ in layer_params(plain)]


# -- published ReXNetV1 and RevCol numbers -------------------------------------------------------
def zoo_model(name):
    """Built on meta (no init cost), then given zeroed CPU storage: counting needs shapes, not values, and
    zeros avoid the NaN/denormal slow paths of uninitialised memory."""
    with torch.device("meta"):
        model = timm.create_model(name)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.zero_()
    return model


def macs_fit(model):
    """size -> (MACs, conv/linear MACs) at size x size, from counts at 32 and 64 only.

    Every op's MACs are a*r^2 (feature maps, when every stride divides r: total stride 32 here) or a
    constant b (the work after global pooling: SE, classifier), so two sizes determine a and b exactly.
    """
    low, high = (report(model, (3, r, r), depth=0).inference for r in (32, 64))

    def at(size):
        assert size % 32 == 0
        return tuple(low[k] + (high[k] - low[k]) * (size ** 2 - 32 ** 2) // (64 ** 2 - 32 ** 2)
                     for k in ("macs", "conv_linear_macs"))

    return at


# name: (params in M, MACs in G at 224 as published, decimals of the published MACs)
PUBLISHED_NUMBERS = {
    "rexnetv1_090": (4.09, 0.35, 2), "rexnetv1_100": (4.80, 0.40, 2), "rexnetv1_130": (7.56, 0.66, 2), "rexnetv1_150": (9.73, 0.88, 2),
    "rexnetv1_200": (16.37, 1.53, 2), "rexnetv1_300": (34.71, 3.40, 2),
    "revcol_tiny": (30.46, 4.5, 1), "revcol_small": (60.57, 9.0, 1), "revcol_base": (138.62, 16.6, 1),
    "revcol_large": (273.10, 39, 0),
}


@pytest.mark.parametrize("name", list(PUBLISHED_NUMBERS))
def test_spec_params_and_macs(name):
    params, macs, decimals = PUBLISHED_NUMBERS[name]
    model = zoo_model(name)
    assert round(report(model, (3, 32, 32), depth=0).inference["params"] / 1e6, 2) == params
    macs_at = macs_fit(model)
    total, conv_linear = macs_at(224)
    # the papers count conv/linear MACs; fvcore's total adds the BN/LN/pool/upsample work it knows
    assert round(conv_linear / 1e9, decimals) == macs
    assert conv_linear < total < 1.06 * conv_linear
    if name == "rexnetv1_100":
        assert round(conv_linear / 1e9, 3) == 0.398  # conv+linear MACs measured on the authors' model
    if name == "rexnetv1_300":
        assert round(conv_linear / 1e9, 3) == 3.396
    if name == "revcol_base":  # published 48.9G at 384; we count 48.74G conv/linear, 48.96G in all
        assert macs_at(384)[1] / 1e9 == pytest.approx(48.9, rel=0.005)
    if name == "revcol_large":
        assert round(macs_at(384)[1] / 1e9) == 116


@pytest.mark.parametrize("name", ["rexnetv1_100", "revcol_tiny"])
def test_spec_macs_scaling_is_exact(name):
    model = zoo_model(name)
    direct = report(model, (3, 224, 224), depth=0).inference
    assert (direct["macs"], direct["conv_linear_macs"]) == macs_fit(model)(224)
