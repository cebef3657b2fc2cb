"""The `reparam` command line end to end: happy paths on resnet18 and tiny models, and every kind of bad
input through click's CliRunner (plus a few through the installed console script, in parallel)."""
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from safetensors.torch import save_file

import reparam_zoo
from reparam_zoo import export as export_module
from reparam_zoo.checkpoint import read_state_dict
from reparam_zoo import convert, fuse
from reparam_zoo import modelfile as mf
from reparam_cli.main import main
from reparam_zoo.layers.refconv import RefConvNd

from helpers import randomize_bn
from test_modelfile import TinyRepNet, randomize_transforms, tiny  # also registers tiny_reptest

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="reparam", **kwargs)


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def snapshot(folder):
    return {name: (os.stat(os.path.join(folder, name)).st_mtime_ns, open(os.path.join(folder, name), "rb").read())
            for name in sorted(os.listdir(folder))}


def fails(folder, code, pattern, *args):
    """The command fails with one line on stderr matching `pattern`, and the folder is left as it was."""
    before = snapshot(folder)
    result = invoke(*args)
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert len([line for line in lines if line.startswith("error: ")]) == 1
    assert all(line.startswith(("error: ", "warning: ", "model: ", "  - ")) for line in lines), result.stderr
    assert re.search(pattern, lines[-1]), (pattern, lines[-1])
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(folder) == before, "an output file was created or changed"
    return result


def outputs(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs for the bad-input cases; `out.safetensors` is an existing output that must survive errors."""
    d = tmp_path_factory.mktemp("inputs")
    model = tiny()
    torch.save(model.state_dict(), d / "tiny.pth")
    mf.save(model, d / "tiny.safetensors")
    save_file(model.state_dict(), str(d / "bare.safetensors"))
    torch.save(randomize_bn(TinyRepNet()), d / "whole.pt")  # built without create_model: no architecture tag
    torch.save(mf.create_model("resnet18", num_classes=10).state_dict(), d / "resnet18.pth")
    nan = model.state_dict()
    nan["dw.weight"] = nan["dw.weight"].clone()
    nan["dw.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, d / "nan.pth")
    (d / "empty.pth").write_bytes(b"")
    (d / "garbage.pth").write_bytes(b"not a checkpoint at all" * 8)
    (d / "trunc.safetensors").write_bytes((d / "tiny.safetensors").read_bytes()[:2000])
    refconv = randomize_transforms(convert(model))
    mf.save(refconv, d / "tiny.refconv.safetensors")
    (d / "out.safetensors").write_bytes(b"previous output")
    # for the console-script cases, which cannot see the test-only tiny_reptest architecture
    r18 = mf.create_model("resnet18", num_classes=10)
    r18_nan = r18.state_dict()
    r18_nan["conv1.weight"] = r18_nan["conv1.weight"].clone().fill_(float("inf"))
    torch.save(r18_nan, d / "r18_inf.pth")
    mf.save(randomize_transforms(convert(randomize_bn(r18), include=["layer1.*"])), d / "r18.refconv.safetensors")
    return d


# -- happy paths -------------------------------------------------------------------------------------------

def test_version_and_help_on_every_command():
    assert ok("--version").stdout.strip() == f"reparam {reparam_zoo.__version__}"
    for command in (["--help"], ["convert", "--help"], ["fuse", "--help"], ["report", "--help"],
                    ["compare", "--help"], ["zoo", "--help"], ["zoo", "list", "--help"], ["zoo", "report", "--help"]):
        result = ok(*command)
        assert result.stdout.startswith("Usage: "), command


def test_resnet18_convert_fuse_report_compare(tmp_path):
    torch.manual_seed(0)
    original = randomize_bn(mf.create_model("resnet18", num_classes=10))
    torch.save(original.state_dict(), tmp_path / "r18.pth")
    refconv_path, fused_path = tmp_path / "r18.refconv.safetensors", tmp_path / "r18.fused.safetensors"

    result = ok("convert", "resnet18", "--checkpoint", tmp_path / "r18.pth", "--num-classes", 10, "--refconv",
                "--include", "layer1.*", "--input-size", "3,32,32", "-o", refconv_path)
    assert "RefConv: 4 layers converted (map_k=3, init=zero, train_scope=transforms)" in result.stdout
    assert "+ layer1.0.conv1: RefConv2d 64->64 3x3 g=1, 36,864 transform params" in result.stdout
    assert "not included: 16" in result.stdout
    assert re.search(r"transform MACs / step\s+1,327,104\s+0", result.stdout)  # 4 * 64*64*9 * 9
    assert f"wrote {refconv_path}" in result.stdout
    refconv = mf.load(refconv_path)
    torch.testing.assert_close(outputs(refconv), outputs(original), rtol=0, atol=0)  # zero init: same model
    assert {n for n, p in refconv.named_parameters() if p.requires_grad} == {
        f"layer1.{b}.conv{c}.transform_weight" for b in (0, 1) for c in (1, 2)}

    randomize_transforms(refconv)  # stands for refocus training
    mf.save(refconv, refconv_path)
    result = ok("fuse", refconv_path, "--input-size", "3,32,32")
    assert "folded 4 RefConv layers, fused 20 conv+norm pairs" in result.stdout
    assert re.search(r"verified on inputs \[\[1, 3, 32, 32\], \[2, 3, 32, 32\]\]: max abs error", result.stdout)
    assert f"wrote {fused_path} [safetensors]" in result.stdout  # default name: .refconv dropped
    fused = mf.load(fused_path)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(outputs(fused), outputs(refconv), rtol=1e-4, atol=1e-5)

    report = json.loads(ok("report", fused_path, "--input-size", "3,32,32", "--format", "json").stdout)
    assert report["stage"] == "fused"
    assert report["inference"]["params"] == sum(p.numel() for p in fused.parameters())

    rows = {r["metric"]: r for r in csv.DictReader(io.StringIO(
        ok("compare", refconv_path, fused_path, "--input-size", "3,32,32", "--format", "csv").stdout))}
    transform_params = 4 * 64 * 64 * 9
    assert int(rows["training params"]["r18.refconv"]) - int(rows["inference params"]["r18.refconv"]) == transform_params
    assert int(rows["trainable params"]["r18.refconv"]) == transform_params
    assert int(rows["transform MACs / step"]["r18.fused"]) == 0
    assert int(rows["inference params"]["r18.fused"]) == sum(p.numel() for p in fused.parameters())


def test_tiny_model_fused_to_every_format(tmp_path):
    refconv = randomize_transforms(convert(tiny()))
    mf.save(refconv, tmp_path / "t.refconv.safetensors")
    fused = fuse(refconv.eval(), example_inputs=X[:1])
    expected = outputs(fused)
    for fmt, suffix in export_module.EXPORT_SUFFIXES.items():
        result = ok("fuse", tmp_path / "t.refconv.safetensors", "--format", fmt)  # input size from the timm cfg
        path = tmp_path / f"t.fused{suffix}"
        assert f"wrote {path} [{fmt}]" in result.stdout and "re-parameterized 1 blocks" in result.stdout
        if fmt != "safetensors":
            assert "reproduces the fused model: max abs error" in result.stdout
        # each artifact loaded with its own tools, independently of the command's own check
        if fmt == "safetensors":
            got = outputs(mf.load(path))
        elif fmt == "torchscript":
            with warnings.catch_warnings():  # torch.jit's own deprecation notice
                warnings.simplefilter("ignore", FutureWarning)
                got = outputs(torch.jit.load(str(path)))
        elif fmt == "pt2":
            got = torch.export.load(str(path)).module()(X)  # an exported program has no eval()
        else:
            from onnx.reference import ReferenceEvaluator

            got = torch.from_numpy(ReferenceEvaluator(str(path)).run(None, {"input": X.numpy()})[0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["t.refconv.safetensors"] + [f"t.fused{s}" for s in export_module.EXPORT_SUFFIXES.values()])
    # the artifacts are for inference runtimes: reading one back as a model is refused with what it is
    for fmt, kind in (("onnx", "an ONNX"), ("torchscript", "a TorchScript"), ("pt2", r"a pt2 \(torch.export\)")):
        path = tmp_path / f"t.fused{export_module.EXPORT_SUFFIXES[fmt]}"
        for trust in ([], ["--trust-pickle"]):
            fails(tmp_path, 1, f"{path.name}: {kind} deployment artifact, made for inference runtimes",
                  "report", path, *trust)


def test_no_verify_and_an_already_fused_model(files, tmp_path):
    result = ok("fuse", files / "tiny.refconv.safetensors", "--no-verify", "-o", tmp_path / "nv.safetensors")
    assert "NOT verified" in result.stdout
    assert mf.read_info(tmp_path / "nv.safetensors").fuse.verified is False
    result = ok("fuse", tmp_path / "nv.safetensors", "-o", tmp_path / "again.safetensors")
    assert "already fused, nothing left to do: writing it as it is; what its fuse recorded:" in result.stdout
    again = mf.load(tmp_path / "again.safetensors")
    assert again.fuse_report.reparameterized == ["rep"]
    torch.testing.assert_close(outputs(again), outputs(mf.load(tmp_path / "nv.safetensors")), rtol=0, atol=0)


def test_pickled_custom_model_round_trip_with_trust_pickle(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)))
    torch.save(model, tmp_path / "custom.pt")
    result = ok("convert", tmp_path / "custom.pt", "--refconv", "--trust-pickle", "--input-size", "3,16,16")
    assert "RefConv: 2 layers converted" in result.stdout and f"wrote {tmp_path / 'custom.refconv.pt'}" in result.stdout
    refconv = mf.load(tmp_path / "custom.refconv.pt", trust_pickle=True)
    assert isinstance(refconv[0], RefConvNd) and refconv.refconv_summary.converted_names == ["0", "3"]
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(outputs(refconv, x), outputs(model, x), rtol=0, atol=0)

    fails(tmp_path, 1, "cannot tell the input size of Sequential.*--input-size",
          "fuse", tmp_path / "custom.refconv.pt", "--trust-pickle")
    result = ok("fuse", tmp_path / "custom.refconv.pt", "--trust-pickle", "--input-size", "3,16,16")
    assert f"wrote {tmp_path / 'custom.fused.pt'} [pickle]" in result.stdout
    fused = mf.load(tmp_path / "custom.fused.pt", trust_pickle=True)
    assert isinstance(fused[1], nn.Identity)
    torch.testing.assert_close(outputs(fused, x), outputs(model, x), rtol=1e-4, atol=1e-5)
    report = json.loads(ok("report", tmp_path / "custom.fused.pt", "--trust-pickle", "--input-size", "3,16,16",
                           "--format", "json").stdout)
    assert report["stage"] == "fused" and report["inference"]["params"] == sum(p.numel() for p in fused.parameters())


def test_default_output_names_and_dry_run(tmp_path, monkeypatch, files):
    monkeypatch.chdir(tmp_path)
    result = ok("convert", "tiny_reptest", "--refconv", "--dry-run", "--exclude", "stem")
    assert "RefConv: 2 layers converted" in result.stdout and "dry run: nothing written" in result.stdout
    assert re.search(r"trainable params\s+1,152", result.stdout)  # 8*8*9 (dw) + 8*8*9 (rep.conv3)
    assert os.listdir(tmp_path) == []
    result = ok("convert", "tiny_reptest", "--refconv")
    assert sorted(os.listdir(tmp_path)) == ["tiny_reptest.refconv.safetensors"]
    assert "warning: tiny_reptest has random weights: pass --checkpoint FILE (or --pretrained)" in result.stderr
    with_weights = ok("convert", "tiny_reptest", "--checkpoint", files / "tiny.pth", "--refconv", "-o", "w.safetensors")
    assert "random weights" not in with_weights.stderr
    assert mf.read_info("tiny_reptest.refconv.safetensors").refconv["converted"] == ["stem", "dw", "rep.conv3"]


def test_report_formats_and_depth(files):
    path = files / "tiny.refconv.safetensors"
    table = ok("report", path).stdout
    assert "tiny.refconv (refconv, 3 RefConv layers) at 1x3x32x32" in table and "per module (depth 1):" in table
    markdown = ok("report", path, "--format", "markdown", "--depth", "0").stdout
    assert markdown.startswith("**tiny.refconv") and "per module" not in markdown.lower()
    rows = list(csv.DictReader(io.StringIO(ok("report", path, "--format", "csv", "--depth", "2").stdout)))
    assert rows[0]["module"] == "(model)" and "rep.conv3" in {r["module"] for r in rows}
    data = json.loads(ok("report", path, "--format", "json").stdout)
    assert (data["model"], data["architecture"]) == ("tiny.refconv", "tiny_reptest")  # a file's name, and what it is
    # C_in * C_out * 9 per layer, depthwise or not: stem 3->8, dw 8->8, rep.conv3 8->8
    assert data["training"]["trainable_params"] == 3 * 8 * 9 + 2 * 8 * 8 * 9


def test_csv_report_warnings_go_to_stderr():
    # timm's test_vit: attention that fvcore does not count, so the MACs cross-check disagrees
    result = ok("report", "test_vit", "--input-size", "3,64,64", "--format", "csv", "--depth", "0")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["module"] for r in rows] == ["(model)"]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "DISAGREE beyond 2%" in warnings[0]
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in warnings[0]
    table = ok("report", "test_vit", "--input-size", "3,64,64", "--depth", "0")
    assert "WARNING: MACs check" in table.stdout and "warning: " not in table.stderr


def test_compare_names_and_architecture_arguments(files):
    result = ok("compare", "tiny_reptest", files / "tiny.refconv.safetensors", "--names", "plain,refconv",
                "--format", "json")
    data = json.loads(result.stdout)
    assert data["names"] == ["plain", "refconv"]
    deltas = {r["metric"]: r["delta"] for r in data["rows"]}
    assert deltas["trainable params"] == 3 * 8 * 9 + 2 * 8 * 8 * 9 - sum(p.numel() for p in tiny().parameters())


def test_zoo_list_and_report():
    rows = json.loads(ok("zoo", "list", "--format", "json").stdout)
    assert [r["name"] for r in rows][:3] == ["rexnetv1_090", "rexnetv1_100", "rexnetv1_130"]
    assert len(rows) == 12 and all(r["params_match"] for r in rows)
    assert {r["name"]: r["params"] for r in rows}["revcol_tiny"] == 30_456_168
    data = json.loads(ok("zoo", "report", "rexnetv1_100", "--input-size", "3,32,32", "--format", "json",
                         "--depth", "0").stdout)
    assert data["published"]["top1"] == "77.9" and data["inference"]["params"] == 4_796_873
    assert data["input_size"] == [3, 32, 32]


# -- bad input: one line, exit 1 (failure) or 2 (usage), nothing written ---------------------------------------

def test_missing_empty_truncated_corrupt_files(files):
    out = ("-o", files / "out.safetensors")
    fails(files, 1, r"missing.safetensors: no such file", "convert", files / "missing.safetensors", "--refconv", *out)
    fails(files, 1, r"empty.pth: file is empty", "convert", files / "empty.pth", "--arch", "tiny_reptest",
          "--refconv", *out)
    fails(files, 1, r"trunc.safetensors: not a readable safetensors file", "fuse", files / "trunc.safetensors", *out)
    fails(files, 1, r"garbage.pth: corrupt or truncated checkpoint", "fuse", files / "garbage.pth",
          "--arch", "tiny_reptest", *out)
    fails(files, 1, r"empty.pth: file is empty", "convert", "tiny_reptest", "--checkpoint", files / "empty.pth",
          "--refconv", *out)
    fails(files, 1, r"missing.pth: no such file", "convert", "tiny_reptest", "--checkpoint",
          files / "missing.pth", "--refconv", *out)


def test_files_that_need_an_architecture_or_trust(files):
    out = ("-o", files / "out.safetensors")
    fails(files, 1, r"whole.pt: contains pickled Python objects.*refused \(pass --trust-pickle",
          "convert", files / "whole.pt", "--refconv", *out)
    fails(files, 1, r"pickled Python objects", "report", files / "whole.pt")
    fails(files, 1, r"tiny.pth: a bare state_dict checkpoint.*--arch NAME", "convert", files / "tiny.pth",
          "--refconv", *out)
    fails(files, 1, r"bare.safetensors: a safetensors file without reparam metadata.*--arch NAME",
          "fuse", files / "bare.safetensors", *out)


def test_unknown_architecture_and_mismatched_checkpoints(files):
    out = ("-o", files / "out.safetensors")
    fails(files, 1, r"unknown architecture 'tiny_rep'.*did you mean tiny_reptest", "convert", "tiny_rep",
          "--refconv", *out)
    fails(files, 1, r"unknown architecture 'nope'", "convert", files / "tiny.pth", "--arch", "nope", "--refconv", *out)
    fails(files, 1, r"resnet18.pth does not fit TinyRepNet: \d+ missing keys .*unexpected keys",
          "convert", files / "resnet18.pth", "--arch", "tiny_reptest", "--refconv", *out)
    fails(files, 1, r"tiny.pth does not fit ResNet", "convert", "resnet18", "--checkpoint", files / "tiny.pth",
          "--refconv", *out)
    fails(files, 2, r"tiny.pth has a 10-class head, but num_classes / --num-classes asks for 5: leave it out to keep "
          r"the checkpoint's head, or let training replace it \(reparam train ... --num-classes 5 trains the new head\)",
          "convert", "tiny_reptest", "--checkpoint", files / "tiny.pth", "--num-classes", "5", "--refconv", *out)
    fails(files, 2, r"10-class head; --num-classes 5 does not fit", "convert", files / "tiny.safetensors",
          "--num-classes", "5", "--refconv", *out)


def test_pretrained_weights_offline(files, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fails(files, 1, r"could not get pretrained weights for resnet18 .*--checkpoint", "convert", "resnet18",
          "--pretrained", "--refconv", "-o", files / "out.safetensors")


def test_conversion_settings_that_select_nothing(files):
    out = ("-o", files / "out.safetensors")
    fails(files, 2, r"Invalid value for '--map-k': must be a positive odd integer.*got 4.*reparam convert --help",
          "convert", "tiny_reptest", "--refconv", "--map-k", "4", *out)
    fails(files, 2, r"--map-k.*got 0", "convert", "tiny_reptest", "--refconv", "--map-k", "0", *out)
    fails(files, 1, r"no conv layer selected for RefConv conversion \(kernel 3x3 smaller than map_k=5: 3; 1x1: 1\)",
          "convert", "tiny_reptest", "--refconv", "--map-k", "5", *out)
    fails(files, 1, r"include pattern 'nothing\*' matches no conv layer", "convert", "tiny_reptest", "--refconv",
          "--include", "nothing*", *out)
    fails(files, 1, r"exclude pattern 'head' matches no conv layer", "convert", "tiny_reptest", "--refconv",
          "--exclude", "head", *out)
    fails(files, 1, r"no conv layer selected .*\(excluded: 4\)", "convert", "tiny_reptest", "--refconv",
          "--exclude", "*", *out)
    fails(files, 2, r"say which conversion: --refconv", "convert", "tiny_reptest", *out)
    fails(files, 1, r"already converted", "convert", files / "tiny.refconv.safetensors", "--refconv", *out)


def test_non_finite_weights(files):
    out = ("-o", files / "out.safetensors")
    fails(files, 1, r"non-finite \(NaN/Inf\) weights in dw.weight; refusing to convert",
          "convert", files / "nan.pth", "--arch", "tiny_reptest", "--refconv", *out)
    fails(files, 1, r"non-finite \(NaN/Inf\) weights in dw.weight; refusing to fuse",
          "fuse", files / "nan.pth", "--arch", "tiny_reptest", *out)


def test_fuse_fold_only_writes_the_original_keys(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = ok("fuse", files / "tiny.refconv.safetensors", "--fold-only", "-o", "tiny.folded.safetensors")
    assert "fold only" in result.stdout and "verified on inputs" in result.stdout
    folded, _ = read_state_dict(tmp_path / "tiny.folded.safetensors")
    assert sorted(folded) == sorted(tiny().state_dict())
    ok("fuse", files / "tiny.refconv.safetensors", "--fold-only")  # default name says what it is
    assert sorted(os.listdir(tmp_path)) == ["tiny.folded.safetensors"]  # next to the input, not here
    assert os.path.exists(files / "tiny.folded.safetensors")
    os.remove(files / "tiny.folded.safetensors")


def test_output_names_must_say_their_format_and_are_checked_before_the_work(files):
    for fmt, name, suffix in (("pt2", "model.bin", ".pt2"), ("torchscript", "x.pt", ".torchscript.pt"),
                              ("onnx", "y.onnx.tmp", ".onnx")):
        fails(files, 2, f"'.*{name}' does not say it is .* file; name it <name>{suffix}", "fuse",
              files / "tiny.safetensors", "--format", fmt, "-o", files / name)
    # with --trust-pickle the architecture is known only after loading: still before fusing
    result = fails(files, 2, r"'.*late.pt': the model is written as a safetensors model file", "fuse",
                   files / "tiny.safetensors", "--trust-pickle", "-o", files / "late.pt")
    assert "folded" not in result.stdout


def test_bad_output_paths(files):
    fails(files, 2, r"Invalid value for -o/--output: '.*tiny.safetensors' is an input; refusing to overwrite it",
          "fuse", files / "tiny.safetensors", "-o", files / "tiny.safetensors")
    fails(files, 2, r"is an input; refusing to overwrite it", "fuse", files / "tiny.safetensors",
          "-o", files / "x" / ".." / "tiny.safetensors")
    fails(files, 2, r"is an input; refusing to overwrite it", "convert", "tiny_reptest", "--checkpoint", files / "tiny.pth",
          "--refconv", "-o", files / "tiny.pth")
    fails(files, 2, r"folder '.*missing' does not exist", "fuse", files / "tiny.safetensors",
          "-o", files / "missing" / "f.safetensors")
    fails(files, 2, r"is a directory", "fuse", files / "tiny.safetensors", "-o", files)
    fails(files, 2, r"'.*new.safetensors': a model without a rebuildable architecture is written as a whole-module "
          r"pickle; name it <name>.pt", "fuse", files / "whole.pt", "--trust-pickle",
          "--input-size", "3,32,32", "-o", files / "new.safetensors")


def test_options_that_do_not_go_together_and_compare_without_arch(files):
    fails(files, 2, r"--pretrained / pretrained= and --checkpoint / checkpoint= both give the weights; pass one of them", "report",
          "tiny_reptest", "--pretrained", "--checkpoint", files / "tiny.pth")
    fails(files, 1, r"tiny.pth: a weights file that does not say its architecture, and compare takes no --arch; "
          r"make it a reparam model file first \(reparam fuse FILE --arch NAME", "compare", files / "tiny.safetensors", files / "tiny.pth")


def test_output_names_and_formats_must_agree(files, tmp_path):
    # the file name says what it holds: nothing is written under a misleading name
    fails(files, 2, r"'.*ck.pth': the model is written as a safetensors model file; name it <name>.safetensors",
          "convert", files / "tiny.safetensors", "--refconv", "-o", files / "ck.pth")
    fails(files, 2, r"'.*ck.onnx' names an ONNX file; convert writes a model file", "convert",
          files / "tiny.safetensors", "--refconv", "-o", files / "ck.onnx")
    fails(files, 2, r"'.*m.safetensors' names a safetensors file, but --format is onnx", "fuse",
          files / "tiny.safetensors", "--format", "onnx", "-o", files / "m.safetensors")
    fails(files, 2, r"'.*m.pt2' names a pt2 \(torch.export\) file, but --format is torchscript", "fuse",
          files / "tiny.safetensors", "--format", "torchscript", "-o", files / "m.pt2")
    # without --format, the output's name picks the format
    ok("fuse", files / "tiny.safetensors", "--input-size", "3,32,32", "-o", tmp_path / "m.onnx")
    import onnx

    assert onnx.load(str(tmp_path / "m.onnx")).graph.input[0].name


def test_malformed_option_values(files):
    for size in ("3,a", "0", "3,,4", "-3,32,32", "x", "32x32", "3,32", "3,32,32,32"):
        fails(files, 2, r"Invalid value for '--input-size': expected C,H,W as three positive integers",
              "fuse", files / "tiny.safetensors", "--input-size", size, "-o", files / "out.safetensors")
    fails(files, 2, r"Invalid value for '--format'", "report", files / "tiny.safetensors", "--format", "xml")
    fails(files, 2, r"two comma-separated names", "compare", "tiny_reptest", "tiny_reptest", "--names", "a")
    fails(files, 2, r"'nope' is not a zoo variant", "zoo", "report", "nope")
    fails(files, 2, r"No such command 'frobnicate'", "frobnicate")
    fails(files, 2, r"Missing argument 'MODEL'", "fuse")


def test_verification_failure_writes_nothing(files, monkeypatch):
    def corrupted(self):
        conv = original(self)
        conv.weight.data.mul_(1.5)
        return conv

    original = RefConvNd.to_conv
    monkeypatch.setattr(RefConvNd, "to_conv", corrupted)
    fails(files, 1, r"verification failed: (.* on the input it received: )?max abs error .* first diverging module: (stem|dw|rep.conv3)",
          "fuse", files / "tiny.refconv.safetensors", "-o", files / "out.safetensors")


def test_an_export_that_does_not_reproduce_the_model_is_not_kept(files, monkeypatch):
    export_torchscript = export_module._EXPORTERS["torchscript"]

    def wrong(model, tmp, inputs):
        runner = export_torchscript(model, tmp, inputs)
        return lambda *x: runner(*x) + 1.0

    monkeypatch.setitem(export_module._EXPORTERS, "torchscript", wrong)
    fails(files, 1, r"the exported torchscript file does not reproduce the model: verification failed",
          "fuse", files / "tiny.safetensors", "--format", "torchscript", "-o", files / "out.torchscript.pt")


def test_onnx_missing_gives_a_clear_error(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    fails(files, 1, r"ONNX export needs the 'onnx' package", "fuse", files / "tiny.safetensors",
          "--format", "onnx", "-o", files / "t.onnx")


def test_internal_errors_are_one_line_unless_debug(files, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("something\nunexpected")

    monkeypatch.setattr(sys.modules["reparam_zoo.report"], "report", broken)
    fails(files, 1, r"internal error: ValueError: something unexpected \(rerun with --debug or REPARAM_DEBUG=1",
          "report", files / "tiny.safetensors")
    result = invoke("--debug", "report", files / "tiny.safetensors")
    assert isinstance(result.exception, ValueError)  # propagated: click's runner holds the traceback
    result = invoke("report", files / "tiny.safetensors", env={"REPARAM_DEBUG": "1"})
    assert isinstance(result.exception, ValueError)


# -- the installed console script ------------------------------------------------------------------------------

def _sigint_as_in_a_terminal():
    # a runner that starts the tests in the background hands them SIGINT ignored (or blocked), and a child
    # inherits both
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _wait_until_importing_torch(pid: int, timeout: float = 120) -> None:
    """Past Python's own start-up (where an interrupt is Python's to report): torch's library is loading."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/maps") as f:
            if "libtorch" in f.read():
                return
        time.sleep(0.02)
    raise AssertionError("the console script never started importing torch")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_ctrl_c_while_the_console_script_starts_is_one_line():
    # importing torch and timm takes seconds: an interrupt then must end like one during a command
    script = os.path.join(os.path.dirname(sys.executable), "reparam")
    proc = subprocess.Popen([script, "report", "resnet18"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    _wait_until_importing_torch(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err, out) == (130, "error: interrupted\n", ""), err


def test_console_script_end_to_end(files):
    """Every kind of bad input once more through the real entry point as a subprocess: one line on stderr,
    the right exit status, no traceback, nothing written. Run a few at a time (each pays torch's import)."""
    script = os.path.join(os.path.dirname(sys.executable), "reparam")
    env = {**os.environ, "REPARAM_DEBUG": "", "HF_HUB_OFFLINE": "1"}
    out = ["-o", str(files / "out.safetensors")]
    cases = {  # name: (arguments, exit status, pattern of the error line)
        "missing": (["convert", str(files / "missing.safetensors"), "--refconv", *out], 1, "no such file"),
        "empty": (["convert", "resnet18", "--checkpoint", str(files / "empty.pth"), "--refconv", *out], 1,
                  "file is empty"),
        "truncated": (["fuse", str(files / "trunc.safetensors"), *out], 1, "not a readable safetensors file"),
        "corrupt": (["report", str(files / "garbage.pth"), "--arch", "resnet18"], 1, "corrupt or truncated"),
        "pickle": (["convert", str(files / "whole.pt"), "--refconv", *out], 1, "pickled Python objects"),
        "unknown_arch": (["convert", "resnet_eighteen", "--refconv", *out], 1, "unknown architecture"),
        "other_arch": (["convert", "resnet18", "--checkpoint", str(files / "tiny.pth"), "--refconv", *out], 1,
                       "does not fit ResNet"),
        "map_k_even": (["convert", "resnet18", "--refconv", "--map-k", "2", *out], 2, "--map-k"),
        "map_k_large": (["convert", "resnet18", "--refconv", "--map-k", "9", *out], 1, "smaller than map_k=9"),
        "pattern": (["convert", "resnet18", "--refconv", "--include", "nothing*", *out], 1, "matches no conv"),
        "inf": (["fuse", str(files / "r18_inf.pth"), "--arch", "resnet18", "--num-classes", "10", *out], 1,
                "non-finite"),
        "same_output": (["fuse", str(files / "tiny.safetensors"), "-o", str(files / "tiny.safetensors")], 2,
                        "is an input; refusing to overwrite it"),
        "missing_folder": (["fuse", str(files / "tiny.safetensors"), "-o", str(files / "nope" / "f.safetensors")], 2,
                           "does not exist"),
        # exact equality cannot hold after conv+BN fusion: a real verification failure, no monkeypatching
        "verification": (["fuse", str(files / "r18.refconv.safetensors"), "--input-size", "3,32,32", "--rtol", "0",
                          "--atol", "0", *out], 1, "verification failed"),
        "input_size": (["report", str(files / "tiny.safetensors"), "--input-size", "3,a"], 2, "--input-size"),
    }
    before = snapshot(files)
    results = {}
    pending = list(cases.items())
    while pending:
        batch, pending = pending[:4], pending[4:]
        procs = {k: subprocess.Popen([script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=files) for k, (args, _, _) in batch}
        results.update({k: (p.wait(timeout=300), *p.communicate()) for k, p in procs.items()})
    for key, (code, stdout, stderr) in results.items():
        args, expected_code, pattern = cases[key]
        assert code == expected_code, (key, code, stdout, stderr)
        error_lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1 and re.search(re.escape(pattern), error_lines[0]), (key, stderr)
        assert "Traceback" not in stderr + stdout, (key, stderr)
    assert snapshot(files) == before

    debug = subprocess.run([script, "--debug", "report", str(files / "garbage.pth"), "--arch", "resnet18"],
                           capture_output=True, text=True, env=env, cwd=files, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_option_mistakes_are_usage_errors_found_before_any_work(files):
    fails(files, 2, r"MODEL .*tiny.safetensors is a file with weights already; --checkpoint / checkpoint= goes with an architecture",
          "convert", files / "tiny.safetensors", "--checkpoint", files / "tiny.pth", "--refconv")
    fails(files, 2, r"MODEL is the architecture tiny_reptest, but --arch / arch= says resnet18", "convert", "tiny_reptest",
          "--arch", "resnet18", "--refconv")
    # the output's name is checked before converting (the report would come first otherwise)
    result = fails(files, 2, r"'.*r.pt': the model is written as a safetensors model file", "convert",
                   "tiny_reptest", "--refconv", "--input-size", "3,32,32", "-o", files / "r.pt")
    assert "RefConv:" not in result.stdout


def test_replacing_an_existing_output_is_said(tmp_path):
    model_file = mf.save(tiny(), tmp_path / "m.safetensors")
    first = ok("convert", model_file, "--refconv")
    assert first.stdout.strip().endswith(f"wrote {tmp_path / 'm.refconv.safetensors'}")
    again = ok("convert", model_file, "--refconv")
    assert again.stdout.strip().endswith("m.refconv.safetensors (replaced the existing file)")
