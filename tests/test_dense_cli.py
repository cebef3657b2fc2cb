"""The CLI on a dense zoo model (detector/segmenter with a zoo backbone): convert to RefConv, fuse with
verification, report. The smallest variant at 128 px keeps it fast."""
import json

import pytest
import torch
from click.testing import CliRunner

from reparam_cli.main import main
from reparam_zoo.models import dense

NAME = "deeplabv3_rexnetv1_090_fpn"
SIZE = "3,128,128"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense_cli")
    refconv, fused = str(out / "x.safetensors"), str(out / "f.safetensors")
    run = CliRunner().invoke(main, ["convert", NAME, "--refconv", "-o", refconv])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(main, ["fuse", refconv, "--input-size", SIZE, "-o", fused])
    assert run.exit_code == 0, run.output
    return refconv, fused, run.output


def test_fuse_verifies_module_by_module_and_drops_exactly_the_bn_parameters(files):
    _, fused, output = files
    assert "each matched on the input it received" in output
    plain = dense.create(NAME)
    plain_params = sum(p.numel() for p in plain.parameters())
    # independent count: each BN's affine params go; the conv before it gains a bias unless it has one
    modules = list(plain.modules())
    bns = [(before, bn) for before, bn in zip(modules, modules[1:]) if isinstance(bn, torch.nn.BatchNorm2d)]
    assert len(bns) == 68 and all(isinstance(conv, torch.nn.Conv2d) for conv, _ in bns)
    expected = plain_params - sum(2 * bn.num_features - (conv.bias is None) * bn.num_features for conv, bn in bns)
    report = json.loads(CliRunner().invoke(main, ["report", fused, "--input-size", SIZE, "--format", "json"]).stdout)
    assert report["inference"]["params"] == expected


def test_report_of_the_refconv_model(files):
    refconv, _, _ = files
    run = CliRunner().invoke(main, ["report", refconv, "--input-size", SIZE, "--format", "json"])
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert report["input_size"] == [3, 128, 128]
    assert report["inference"]["macs"] > 0
    groups = report["groups"]
    assert set(groups) == {"backbone", "neck", "heads", "other"}  # other: the final upsampling to 128x128
    assert groups["other"]["macs"] == 4 * 21 * 128 * 128  # bilinear: 4 multiply-adds per output element
    assert sum(g["macs"] for g in groups.values()) == report["inference"]["macs"]
    assert sum(g["inference_params"] for g in groups.values()) == report["inference"]["params"]
    assert sum(g["training_params"] for g in groups.values()) == report["training"]["params"]
