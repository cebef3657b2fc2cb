"""INT8 export checked in onnxruntime, the calibration images it reads, and the INT8 sensitivity report,
on a tiny resnet10t (32 px) trained for a few steps to tell four colour classes apart."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

pytest.importorskip("onnxruntime", reason="INT8 export needs onnxruntime (the 'deploy' extra)")
import onnx  # noqa: E402
import onnxruntime  # noqa: E402

from reparam_zoo import convert, create_model, fuse, save  # noqa: E402
from reparam_zoo.calibration import CalibrationError, calibration_images, find_images  # noqa: E402
from reparam_zoo.errors import ReparamError  # noqa: E402
from reparam_zoo.quantize import (QuantizationError, compare_outputs, export_int8, quant_compare,  # noqa: E402
                                  quant_report, sqnr_db)

from helpers import randomize_bn  # noqa: E402
from test_cli import fails, ok  # noqa: E402

SIZE = (3, 32, 32)
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "grey": (128, 128, 128)}


def _image(colour, rng):
    noise = rng.integers(-60, 60, size=(5, 5, 3))
    pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((40, 40), Image.BILINEAR)


def write_images(root, per_class, seed, constant=False):
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (40, 40), (128, 128, 128)) if constant else _image(colour, rng)
            image.save(os.path.join(root, name, f"{i}.png"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    write_images(root / "train", 10, seed=0)
    write_images(root / "val", 8, seed=1)
    return root


@pytest.fixture(scope="module")
def trained(data):
    """resnet10t trained on the colour classes until its predictions depend on the image."""
    torch.manual_seed(0)
    model = randomize_bn(create_model("resnet10t", num_classes=len(COLOURS)))
    images = calibration_images(model, data, calib_images=40, held_out_images=32, input_size=SIZE, progress=False)
    x = images.calibration
    targets = torch.tensor([sorted(COLOURS).index(_colour_of(img)) for img in x])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(25):
        loss = nn.functional.cross_entropy(model(x), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _colour_of(normalized):
    """The class of a preprocessed image by its mean colour (what the tiny model learns)."""
    mean = normalized.mean((1, 2))
    if (mean.max() - mean.min()) < 0.5:
        return "grey"
    return ["red", "green", "blue"][int(mean.argmax())]


def test_sqnr_and_agreement_against_hand_computed_values():
    ref = torch.ones(4, 3)
    assert sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)  # noise energy 1% of the signal's
    assert sqnr_db(ref, ref) == math.inf
    a = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0], [5.0, 4.0]])
    b = torch.tensor([[1.0, 2.5], [2.0, 2.5], [0.0, 1.0], [5.0, 4.0]])
    agreement = compare_outputs(a, b)
    assert agreement.top1_agreement == 0.75 and agreement.images == 4
    assert agreement.max_logit_error == 2.5 and agreement.mean_logit_error == pytest.approx(4.0 / 8)
    with pytest.raises(QuantizationError, match="logit tensors"):
        compare_outputs(a, b[:2])


def test_calibration_layouts_split_and_skip_unreadable(tmp_path, data, trained):
    found = calibration_images(trained, data, calib_images=12, held_out_images=5, input_size=SIZE, progress=False)
    assert (found.layout, len(found.calibration), len(found.held_out)) == ("train/val", 12, 5)
    assert tuple(found.calibration.shape[1:]) == SIZE
    flat = tmp_path / "flat"
    write_images(flat, 3, seed=2)  # 12 images in sub-folders, no train/
    (flat / "broken.png").write_bytes(b"not a png")
    os.mkfifo(flat / "pipe.png")  # opening it would block: never read
    (flat / ".hidden.png").write_bytes(b"x")
    assert len(find_images(flat)) == 13
    split = calibration_images(trained, flat, calib_images=100, held_out_images=100, input_size=SIZE, progress=False)
    # too few for both: a quarter (3) is held out, the rest calibrates; the broken file is skipped and counted
    assert split.layout == "folder" and split.unreadable == 1
    assert len(split.calibration) + len(split.held_out) == 12 and len(split.held_out) in (2, 3)
    again = calibration_images(trained, flat, calib_images=100, held_out_images=100, input_size=SIZE, progress=False)
    assert torch.equal(again.held_out, split.held_out)  # the split is seeded
    with pytest.raises(CalibrationError, match="found 0 image"):
        calibration_images(trained, _empty(tmp_path), calib_images=1, held_out_images=1)
    with pytest.raises(CalibrationError, match="no such folder"):
        calibration_images(trained, tmp_path / "missing")


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images")
    return folder


def test_int8_export_writes_a_qdq_model_that_agrees_with_the_model(tmp_path, data, trained):
    path = tmp_path / "m.int8.onnx"
    result = export_int8(trained, path, data, calib_images=40, held_out_images=32, input_size=SIZE, progress=False)
    assert result.agreement.top1_agreement >= 0.99 and result.agreement.images == 32
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # per-channel weights: the first conv's weight is int8 with one scale per output channel
    init = {t.name: t for t in graph.initializer}
    weights = [init[n.input[0]] for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in init and len(init[n.input[0]].dims) == 4]
    assert weights and all(w.data_type == onnx.TensorProto.INT8 for w in weights)
    scales = [init[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weights[0].name]
    assert list(scales[0].dims) == [weights[0].dims[0]]
    # independently: the written file against the PyTorch model on the same held-out images
    held = calibration_images(trained, data, calib_images=40, held_out_images=32, input_size=SIZE,
                              progress=False).held_out
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    int8 = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: held.numpy()})[0])
    with torch.no_grad():
        reference = trained(held)
    assert len(set(reference.argmax(1).tolist())) >= 3, "the test model must tell images apart"
    agree = (int8.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree == pytest.approx(result.agreement.top1_agreement)
    diff = (int8.double() - reference.double())
    signal = reference.double().pow(2).sum().item()
    assert result.agreement.sqnr_db == pytest.approx(10 * math.log10(signal / diff.pow(2).sum().item()), abs=0.1)
    assert result.agreement.max_logit_error == pytest.approx(diff.abs().max().item(), rel=1e-3, abs=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["m.int8.onnx"]


def test_int8_calibrated_on_constant_images_is_refused(tmp_path, data, trained):
    bad = tmp_path / "bad"
    write_images(bad / "train", 4, seed=0, constant=True)  # every calibration image the same grey
    os.symlink(data / "val", bad / "val")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QuantizationError, match=r"INT8 model not written: top-1 agreement 0\.\d+ on 32 held-out images"
                                                r".*below --min-agreement 0.99") as e:
        export_int8(trained, out / "m.int8.onnx", bad, held_out_images=32, input_size=SIZE, progress=False)
    assert e.value.agreement.top1_agreement < 0.99
    assert os.listdir(out) == []  # nothing written, no temporary file left
    with pytest.raises(ReparamError, match="ONNX file"):
        export_int8(trained, out / "m.safetensors", data)
    with pytest.raises(ReparamError, match="min_agreement"):
        export_int8(trained, out / "m.onnx", data, min_agreement=1.5)


def test_quant_report_rows_sorted_with_finite_sqnr_and_weight_stats(trained):
    model = trained
    report = quant_report(model, calib_images=8, input_size=SIZE)
    deployed = fuse(model, example_inputs=(torch.randn(1, *SIZE),))
    layers = {n: m for n, m in deployed.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert sorted(r.name for r in report.layers) == sorted(layers)
    sqnrs = [r.output_sqnr_db for r in report.layers]
    assert sqnrs == sorted(sqnrs)
    assert all(math.isfinite(s) and s > 0 for r in report.layers for s in (r.output_sqnr_db, r.layer_sqnr_db))
    assert math.isfinite(report.all_layers_sqnr_db) and report.all_layers_sqnr_db < min(sqnrs) + 1e-9
    for row in report.layers:  # weight statistics, computed here by hand
        w = layers[row.name].weight.detach().double().flatten(1)
        absmax = w.abs().amax(1)
        assert row.channel_absmax_max == pytest.approx(absmax.max().item())
        assert row.channel_range_ratio == pytest.approx((absmax.max() / absmax.median()).item())
        scale = (absmax / 127)[:, None]
        q = (w / scale).round().clamp(-127, 127) * scale
        expected = 10 * math.log10(w.pow(2).sum().item() / (w - q).pow(2).sum().item())
        assert row.weight_sqnr_db == pytest.approx(expected, abs=0.05)
    parsed = json.loads(report.render("json"))
    assert [r["name"] for r in parsed["layers"]] == [r.name for r in report.layers]
    assert report.render("csv").splitlines()[0].startswith("name,kind,out_channels")


def test_an_activation_outlier_makes_its_layer_the_most_sensitive():
    model = randomize_bn(create_model("resnet10t", num_classes=4)).eval()
    with torch.no_grad():
        # one input channel of layer2.0.conv2 far above the rest (a BN bias of 100) that carries no signal on
        # (its weights zero): the per-tensor int8 step of that layer's input becomes ~0.4, the others' values ~1
        model.layer2[0].bn1.bias[0] = 100.0
        model.layer2[0].conv2.weight[:, 0] = 0
    report = quant_report(model, calib_images=8, input_size=SIZE)
    first = report.layers[0]
    assert first.name == "layer2.0.conv2" and first.input_max > 90
    assert first.output_sqnr_db < report.layers[1].output_sqnr_db - 6


def test_quant_compare_joins_layers(trained):
    refconv = convert(create_model("resnet10t", num_classes=4))
    comparison = quant_compare(trained, refconv, names=("orig", "refocused"), calib_images=2, input_size=SIZE)
    rows = comparison.rows()
    a = {r.name: r.output_sqnr_db for r in comparison.reports[0].layers}
    b = {r.name: r.output_sqnr_db for r in comparison.reports[1].layers}
    assert {r[0] for r in rows} == set(a) | set(b)
    for name, _, _, sa, sb, delta in rows:
        if name in a and name in b and math.isfinite(a[name]) and math.isfinite(b[name]):
            assert (sa, sb) == (a[name], b[name]) and delta == pytest.approx(b[name] - a[name])
    assert "output SQNR dB refocused" in comparison.render("table")


# -- the command line ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_file(tmp_path_factory, trained):
    path = tmp_path_factory.mktemp("model") / "colours.safetensors"
    save(trained, path)
    return path


def test_cli_fuse_int8_writes_and_refuses(tmp_path, data, model_file):
    out = tmp_path / "m.int8.onnx"
    result = ok("fuse", model_file, "--int8", "--calib", data, "--input-size", "32", "--calib-images", 40,
                "--held-out-images", 32, "-o", out)
    assert re.search(r"wrote .*m\.int8\.onnx \[onnx int8\] .*top-1 agreement 1\.0000 on 32 held-out", result.stdout)
    assert onnx.load(str(out)).graph.node
    bad = tmp_path / "bad"
    write_images(bad, 4, seed=0, constant=True)
    work = tmp_path / "work"
    work.mkdir()
    # a threshold above 1 is a usage error, found before any work
    fails(work, 2, r"Invalid value for '--min-agreement'", "fuse", model_file, "--int8", "--calib", bad,
          "--min-agreement", "1.5")
    os.symlink(data / "val", bad / "val")
    (bad / "train").mkdir()
    for name in COLOURS:
        os.rename(bad / name, bad / "train" / name)
    fails(work, 1, r"INT8 model not written: top-1 agreement 0\.\d+", "fuse", model_file, "--int8", "--calib", bad,
          "--input-size", "32", "-o", work / "m.int8.onnx")
    fails(work, 2, r"--int8 needs --calib", "fuse", model_file, "--int8", "-o", work / "x.onnx")
    fails(work, 2, r"--calib is for --int8", "fuse", model_file, "--calib", data, "-o", work / "x.onnx")
    fails(work, 2, r"--min-agreement is for --int8", "fuse", model_file, "--min-agreement", "0.5")
    fails(work, 2, r"--int8 writes an ONNX model, but --format is pt2", "fuse", model_file, "--int8", "--format",
          "pt2", "--calib", data)
    fails(work, 2, r"no such folder", "fuse", model_file, "--int8", "--calib", tmp_path / "nope", "-o", work / "x.onnx")


def test_cli_report_and_compare_quant(tmp_path, data, model_file):
    result = ok("report", model_file, "--input-size", "32", "--depth", "0", "--quant", "--calib", data,
                "--calib-images", 8, "--format", "json")
    parsed = json.loads(result.stdout)
    assert parsed["report"]["inference"]["params"] > 0
    assert parsed["quant"]["calibration"].startswith("8 images from")
    assert len(parsed["quant"]["layers"]) == 15  # resnet10t: 14 convs and the classifier
    table = ok("compare", model_file, model_file, "--input-size", "32", "--quant", "--calib-images", 4).stdout
    assert "INT8 sensitivity side by side" in table and "B - A dB" in table
    fails(tmp_path, 2, r"--calib is for --quant", "report", model_file, "--calib", data)

