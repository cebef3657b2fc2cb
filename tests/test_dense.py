"""torchvision detectors and segmenters as `torchvision:NAME`: building without weights, class heads, convert /
fuse with verification on the continuous outputs, a single wrong layer caught and named, model files,
reference-script checkpoints, reports at the detector's own image size with backbone / neck / heads."""
import argparse
import json

import pytest
import torch
import torch.nn as nn
import torchvision
from click.testing import CliRunner

import reparam_zoo
from reparam_zoo import EquivalenceError, deploy
from reparam_zoo import modelfile as mf
from reparam_zoo import torchvision_models as tvm_models
from reparam_zoo.surgery import refconv_layers
from reparam_cli.main import main

from helpers import randomize_bn

SMALL = {"min_size": 128, "max_size": 128}  # the detector's own resize, kept small for the tests
IMAGE = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def randomize(model, seed=0):
    """Non-trivial BN statistics and RefConv transforms, so that a mis-fused layer shows."""
    randomize_bn(model, seed)
    torch.manual_seed(seed)
    for _, layer in refconv_layers(model):
        layer.reset_transform("xavier")
        layer.transform_weight.data.mul_(0.1)
    return model.eval()


def features(model, image=IMAGE):
    """The backbone's feature maps of one image, after the detector's own transform (the test's own path)."""
    model.eval()
    with torch.no_grad():
        batch, _ = model.transform([image])
        return list(model.backbone(batch.tensors).values())


@pytest.mark.parametrize("name, params", [
    ("fasterrcnn_resnet50_fpn", None), ("retinanet_resnet50_fpn", None), ("fcos_resnet50_fpn", None),
    ("maskrcnn_resnet50_fpn", None), ("keypointrcnn_resnet50_fpn", None), ("ssdlite320_mobilenet_v3_large", None),
    ("deeplabv3_resnet50", {"aux_loss": True}), ("lraspp_mobilenet_v3_large", None),
])
def test_big_models_build_on_meta_with_torchvisions_published_param_counts(name, params):
    kwargs = dict(params or {})
    if tvm_models.kind_of(name) == "detection" and not name.startswith("ssd"):
        kwargs["frozen_batchnorm"] = True  # as torchvision builds them for its published weights
    assert mf.is_architecture("torchvision:" + name)
    with torch.device("meta"):
        model = mf.create_model("torchvision:" + name, **kwargs)
    published = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
    assert sum(p.numel() for p in model.parameters()) == published


def test_unknown_dense_name_suggests_a_close_one():
    with pytest.raises(mf.ArchitectureError, match=r"detection or segmentation model\); did you mean "
                                                    r"torchvision:fasterrcnn_resnet50_fpn"):
        mf.create_model("torchvision:fasterrcnn_resnet50_fp")


@pytest.mark.parametrize("name, heads", [
    ("fasterrcnn_resnet50_fpn", {"roi_heads.box_predictor.cls_score.weight": (7, 1024),
                                 "roi_heads.box_predictor.bbox_pred.weight": (28, 1024)}),
    ("retinanet_resnet50_fpn", {"head.classification_head.cls_logits.weight": (9 * 7, 256, 3, 3)}),
    ("fcos_resnet50_fpn", {"head.classification_head.cls_logits.weight": (7, 256, 3, 3)}),
    ("ssdlite320_mobilenet_v3_large", {"head.classification_head.module_list.0.1.weight": (6 * 7, 672, 1, 1)}),
    ("maskrcnn_resnet50_fpn", {"roi_heads.mask_predictor.mask_fcn_logits.weight": (7, 256, 1, 1)}),
    ("deeplabv3_resnet50", {"classifier.4.weight": (7, 256, 1, 1), "aux_classifier.4.weight": (7, 256, 1, 1)}),
    ("lraspp_mobilenet_v3_large", {"classifier.high_classifier.weight": (7, 128, 1, 1),
                                   "classifier.low_classifier.weight": (7, 40, 1, 1)}),
])
def test_set_num_classes_replaces_the_class_dependent_heads_only(name, heads):
    kwargs = {"aux_loss": True} if name.startswith("deeplab") else {}
    with torch.device("meta"):
        model = mf.create_model("torchvision:" + name, **kwargs)
        before = {k: v.shape for k, v in model.state_dict().items()}
        mf.set_num_classes(model, 7)
    after = model.state_dict()
    for key, shape in heads.items():
        assert tuple(after[key].shape) == shape
    changed = {k.rsplit(".", 1)[0] for k in before if before[k] != after[k].shape}
    expected = {k.rsplit(".", 1)[0] for k in heads}
    if name.startswith("ssd"):  # one classification conv per feature map
        expected = {f"head.classification_head.module_list.{i}.1" for i in range(6)}
    if name.startswith(("fasterrcnn", "maskrcnn")):
        expected |= {"roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
    assert changed == expected  # nothing but the class-dependent layers
    assert model.reparam_arch["kwargs"]["num_classes"] == 7
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is not None:  # the head reshapes its logits by its own class count
        assert getattr(head, "num_classes", getattr(head, "num_columns", None)) == 7


def test_detector_convert_fuse_verified_on_backbone_and_head_outputs(tmp_path):
    model = mf.create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=5, **SMALL)
    converted = randomize(reparam_zoo.convert(randomize_bn(model)))
    fused = reparam_zoo.fuse(converted, example_inputs=([IMAGE],))
    report = fused.fuse_report
    assert report.verified and report.compared_outputs == ["backbone", "rpn.head"]
    assert report.fused and report.modules_verified >= len(report.fused)
    assert report.input_shapes == [[1, 3, 96, 128], [2, 3, 96, 128]]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # independently: the backbone features agree (float32)
    for e, a in zip(features(converted), features(fused)):
        assert (a - e).abs().max() <= 1e-4 * e.abs().max()
    with torch.no_grad():
        detections = fused([IMAGE])
    assert set(detections[0]) == {"boxes", "labels", "scores"}

    # model files: the stage and the outputs survive a round trip
    for stage, m in (("refconv", converted), ("fused", fused)):
        loaded = mf.load(mf.save(m, tmp_path / f"det.{stage}.safetensors"))
        assert mf.model_stage(loaded) == stage and type(loaded).__name__ == "FasterRCNN"
        assert loaded.transform.min_size == (128,)
        if stage == "fused":  # what the verification covered is kept in the file
            assert loaded.fuse_report.compared_outputs == ["backbone", "rpn.head"]
            assert loaded.fuse_report.modules_verified == report.modules_verified
        for e, a in zip(features(m), features(loaded)):
            assert torch.equal(e, a)


@pytest.mark.parametrize("name, kind", [
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "detector"), ("lraspp_mobilenet_v3_large", "segmenter"),
    ("resnet18", "classifier"),
])
def test_a_single_layer_fused_5_percent_wrong_is_named(name, kind, monkeypatch):
    kwargs = SMALL if kind == "detector" else {}
    model = randomize(mf.create_model("torchvision:" + name, num_classes=3, **kwargs))
    inputs = ([IMAGE],) if kind == "detector" else torch.randn(1, 3, 64, 64)
    pairs, _ = deploy._trace_conv_bn_pairs(model, reparam_zoo.verify.as_call_inputs(inputs))
    target = pairs[len(pairs) // 2][0]  # a layer in the middle
    honest = deploy.fuse_conv_bn

    def wrong(m, call):
        fused, left = honest(m, call)
        with torch.no_grad():
            m.get_submodule(target).weight.mul_(1.05)
        return fused, left

    monkeypatch.setattr(deploy, "fuse_conv_bn", wrong)
    with pytest.raises(EquivalenceError) as info:
        reparam_zoo.fuse(model, example_inputs=inputs)
    assert info.value.first_diverging_module == target
    assert f"first diverging module: {target}" in str(info.value)


def test_frozen_batchnorm_fuses_like_batchnorm():
    model = mf.create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", frozen_batchnorm=True, **SMALL)
    frozen = [n for n, m in model.named_modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d)]
    assert frozen and all(n.startswith("backbone.body.") for n in frozen)
    g = torch.Generator().manual_seed(1)
    for n in frozen:
        bn = model.get_submodule(n)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
    fused = reparam_zoo.fuse(model.eval(), example_inputs=([IMAGE],))
    assert {bn for _, bn in fused.fuse_report.fused} >= set(frozen)
    for e, a in zip(features(model), features(fused)):
        assert (a - e).abs().max() <= 1e-4 * e.abs().max()


@pytest.mark.parametrize("frozen", [False, True])
def test_reference_script_checkpoints_load(tmp_path, frozen):
    name = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    trained = mf.create_model(name, num_classes=4, frozen_batchnorm=frozen, **SMALL)
    path = tmp_path / "model_25.pth"
    # what torchvision's references/detection/train.py saves
    torch.save({"model": trained.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"last_epoch": 25}, "args": argparse.Namespace(lr=0.02, model="x"), "epoch": 25}, path)
    loaded = mf.create_model(name, checkpoint=path, **SMALL)
    assert loaded.roi_heads.box_predictor.cls_score.out_features == 4
    assert loaded.reparam_arch["kwargs"].get("frozen_batchnorm", False) == frozen
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_report_at_the_detectors_own_size_with_parts_and_training_memory():
    model = mf.create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3, **SMALL)
    result = reparam_zoo.report(model, (3, 96, 128), depth=2)
    # min_size 128 would scale 96 -> 128, but max_size 128 caps the long side: 96x128, padded to 32
    assert result.resized_input == (3, 96, 128)
    assert result.memory_error is None and result.training["activation_bytes"] > 0
    # `other`: the detector's own resize of the image (bilinear, 4 multiply-adds per output element), which
    # makes the parts sum to the model's MACs
    assert set(result.groups) == {"backbone", "neck", "heads", "other"}
    assert result.groups["other"] == {"training_params": 0, "inference_params": 0, "macs": 4 * 3 * 96 * 128}
    assert sum(g["macs"] for g in result.groups.values()) == result.inference["macs"]
    own = {g: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))
           for g, prefixes in (("backbone", "backbone.body."), ("neck", "backbone.fpn."),
                               ("heads", ("rpn.", "roi_heads.")), ("other", "transform."))}
    assert {g: v["inference_params"] for g, v in result.groups.items()} == own
    assert sum(own.values()) == result.inference["params"]
    # the FPN's output convs, counted here by hooks at the size the backbone really sees
    macs = []
    convs = [m for m in model.backbone.fpn.layer_blocks.modules() if isinstance(m, nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda m, i, o: macs.append(
        o.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])) for c in convs]
    with torch.no_grad():
        model.eval()([torch.rand(3, 96, 128)])
    for h in hooks:
        h.remove()
    row = next(r for r in result.modules if r.name == "backbone.fpn.layer_blocks")
    assert row.group == "neck" and row.macs == sum(macs)
    text = result.render("table")
    assert "resized by the model to 3x96x128" in text and "by part:" in text
    again = reparam_zoo.Report.from_dict(json.loads(result.to_json()))
    assert again.groups == result.groups and again.resized_input == result.resized_input


def test_segmenter_report_training_memory_and_parts():
    model = mf.create_model("torchvision:lraspp_mobilenet_v3_large", num_classes=3)
    result = reparam_zoo.report(model, (3, 64, 64), depth=1)
    assert result.resized_input is None and result.memory_error is None
    assert set(result.groups) == {"backbone", "heads", "other"}
    assert result.groups["heads"]["inference_params"] == sum(p.numel() for p in model.classifier.parameters())
    # `other`: torchvision's final upsampling of the 3 class maps to 64x64 (bilinear: 4 multiply-adds each)
    assert result.groups["other"]["macs"] == 4 * 3 * 64 * 64
    assert sum(g["macs"] for g in result.groups.values()) == result.inference["macs"]


def test_cli_report_and_fuse_a_detector(tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["report", "torchvision:ssdlite320_mobilenet_v3_large", "--num-classes", "3",
                               "--format", "json", "--depth", "1"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["input_size"] == [3, 320, 320] and data["resized_input"] == [3, 320, 320]
    assert set(data["groups"]) == {"backbone", "neck", "heads", "other"}  # other: SSD's own resize, bilinear
    assert data["groups"]["other"]["macs"] == 4 * 3 * 320 * 320
    assert sum(g["macs"] for g in data["groups"].values()) == data["inference"]["macs"]
    target = tmp_path / "seg.fused.safetensors"
    fused = runner.invoke(main, ["fuse", "torchvision:lraspp_mobilenet_v3_large", "--num-classes", "2",
                                 "--input-size", "3,64,64", "-o", str(target)])
    assert fused.exit_code == 0, fused.output
    loaded = mf.load(target)
    assert mf.model_stage(loaded) == "fused" and loaded.classifier.high_classifier.out_channels == 2


class TwoInputs(nn.Module):
    """Keyword inputs and a list of images: what report/compare take as example inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, images, *, gate):
        x = torch.stack(images)
        return {"logits": self.head(self.bn(self.conv(x)).mean((2, 3))) * gate}


def test_report_and_compare_take_structured_and_keyword_inputs():
    model = TwoInputs()
    images = [torch.rand(3, 20, 24)]
    result = reparam_zoo.report(model, example_inputs=(images,), example_kwargs={"gate": torch.ones(1)})
    assert result.input_size == (3, 20, 24) and result.memory_error is None
    # the conv and linear MACs, counted here: 20*24 positions x 8 outputs x 27, and 8 x 2
    assert result.inference["conv_linear_macs"] == 20 * 24 * 8 * 27 + 8 * 2
    assert next(r for r in result.modules if r.name == "conv").macs == 20 * 24 * 8 * 27
    assert result.training["activation_bytes"] > 0
    fused = reparam_zoo.fuse(model.eval(), example_inputs=(images,), example_kwargs={"gate": torch.ones(1)})
    both = reparam_zoo.compare(model, fused, example_inputs=(images,), example_kwargs={"gate": torch.ones(1)})
    params = {row["metric"]: row for row in both.rows()}["inference params"]
    assert params["delta"] == -2 * 8  # the BatchNorm's weight and bias fused away (the conv had a bias)
