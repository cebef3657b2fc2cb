"""The zoo as FPN backbones of torchvision's detectors and a DeepLabV3-style segmenter (models/dense.py)."""
import re

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from reparam_zoo import architectures, modelfile, resolve
from reparam_zoo.errors import ArgumentConflictError, CheckpointError
from reparam_zoo.models import dense, reversible
from reparam_zoo.models.revcol import REVCOL_VARIANTS

SIZE = 64


def _images(n=1, size=SIZE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=g, dtype=dtype) for _ in range(n)]


def _small_sampling(model):
    """Fewer proposals and sampled regions than COCO training uses: the R-CNN heads' cost, not the
    backbone's, dominates a step at 64 px otherwise."""
    if hasattr(model, "rpn"):
        model.rpn._pre_nms_top_n = dict(training=64, testing=64)
        model.rpn._post_nms_top_n = dict(training=32, testing=32)
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 16
    return model


def _targets(n=1, dtype=torch.float32, masks=False):
    out = []
    for _ in range(n):
        t = dict(boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]], dtype=dtype),
                 labels=torch.tensor([1, 2]))
        if masks:
            m = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
            m[0, 6:50, 4:40] = 1
            m[1, 10:30, 20:60] = 1
            t["masks"] = m
        out.append(t)
    return out


# -- names ------------------------------------------------------------------------------------------------

def test_names_cover_every_variant_and_head():
    backbones = dense.backbone_names()
    assert sorted(b for b in backbones if b.startswith("revcol_")) == sorted(REVCOL_VARIANTS)
    assert {"rexnetv1_090", "rexnetv1_100", "rexnetv1_130", "rexnetv1_150", "rexnetv1_200", "rexnetv1_300"} <= set(
        backbones)
    names = dense.dense_names()
    assert len(names) == len(dense.HEADS) * len(backbones) == 5 * 12
    assert dense.split_name("maskrcnn_revcol_base_fpn") == ("maskrcnn", "revcol_base")
    assert dense.split_name("deeplabv3_rexnetv1_130_fpn") == ("deeplabv3", "rexnetv1_130")
    for bad in ("fasterrcnn_resnet50_fpn", "fasterrcnn_revcol_tiny", "yolo_revcol_tiny_fpn", "revcol_tiny", None):
        assert dense.split_name(bad) is None
    assert modelfile.is_architecture("fcos_revcol_huge_fpn")
    assert architectures.source_of("fcos_revcol_huge_fpn") == "zoo-dense"
    with pytest.raises(modelfile.ArchitectureError, match="did you mean fasterrcnn_revcol_tiny_fpn"):
        modelfile.create_model("fasterrcnn_revcol_tny_fpn")


_VARIANTS = list(REVCOL_VARIANTS) + ["rexnetv1_100", "rexnetv1_300"]


# every RevCol variant (and two ReXNets), each head over several of them
@pytest.mark.parametrize("backbone,head",
                         [(b, list(dense.HEADS)[i % len(dense.HEADS)]) for i, b in enumerate(_VARIANTS)])
def test_every_variant_builds_as_a_backbone_on_meta(backbone, head):
    # the FPN reads the backbone's channels at strides 4..32 (R-CNNs) or 8..32 (RetinaNet, FCOS, segmenter)
    with torch.device("meta"):
        model = modelfile.create_model(f"{head}_{backbone}_fpn")
    spec = dense.HEADS[head]
    if backbone.startswith("revcol_"):
        channels = REVCOL_VARIANTS[backbone]["channels"]
        expected = [channels[{4: 0, 8: 1, 16: 2, 32: 3}[s]] for s in spec.strides]
        assert model.backbone.body.num_columns == REVCOL_VARIANTS[backbone]["num_columns"]
        assert not any(k.startswith("cls.") for k in model.backbone.body.state_dict())
    else:
        info = {i["reduction"]: i["num_chs"] for i in model.backbone.body.feature_info}
        expected = [info[s] for s in spec.strides]
    fpn_in = [block[0].in_channels for block in model.backbone.fpn.inner_blocks]
    assert fpn_in == expected
    assert modelfile.architecture_of(model)["kwargs"]["num_classes"] == spec.default_classes


# -- training inside the detector -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def revcol_detector():
    torch.manual_seed(0)
    model = dense.create("fasterrcnn_revcol_tiny_fpn", num_classes=3, trainable_layers=3, min_size=SIZE,
                         max_size=SIZE)
    _small_sampling(model)
    with torch.no_grad():  # layer scales of a trained model, so that every block matters in the gradients
        for name, p in model.backbone.body.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.2, 0.6)
    return model


def test_frozen_stages_follow_torchvision_trainable_layers(revcol_detector):
    body = revcol_detector.backbone.body
    # trainable_layers=3: the stem and level 0 of every column (with its alpha) are frozen, levels 1-3 train
    frozen_pattern = re.compile(r"^(stem\.|subnet\d+\.(level0\.|alpha0$))")
    for name, p in body.named_parameters():
        assert p.requires_grad is not bool(frozen_pattern.match(name)), name
    assert all(p.requires_grad for n, p in revcol_detector.named_parameters() if not n.startswith("backbone.body."))
    # every setting, through the architecture table
    with torch.device("meta"):
        for trainable in range(dense.NUM_STAGES + 1):
            m = modelfile.create_model("fasterrcnn_revcol_tiny_fpn", trainable_layers=trainable)
            frozen_levels = {int(x) for n, p in m.backbone.body.named_parameters() if not p.requires_grad
                             for x in re.findall(r"subnet\d+\.(?:level|alpha)(\d)", n)}
            stem_frozen = not m.backbone.body.stem[0].weight.requires_grad
            assert stem_frozen == (trainable < 5)
            assert frozen_levels == set(range(max(0, 4 - trainable))), trainable


def test_reversible_gradients_equal_ordinary_inside_the_detector_float64(revcol_detector, monkeypatch):
    model = revcol_detector.double().train()
    images, targets = _images(dtype=torch.float64), _targets(dtype=torch.float64)
    calls = []
    original = reversible._run_reversible
    monkeypatch.setattr(reversible, "_run_reversible", lambda *a: calls.append(1) or original(*a))

    def step(save_memory):
        model.backbone.body.save_memory = save_memory
        torch.manual_seed(1)  # the same proposal sampling and drop-path masks in both modes
        loss = sum(model(images, targets).values())
        model.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    threads = torch.get_num_threads()
    # one thread: float64 kernels with two threads on a loaded 2-core machine mostly wait for each other
    torch.set_num_threads(1)
    try:
        loss_ordinary, ordinary = step(False)
        assert not calls
        loss_reversible, rev = step(True)
        assert calls, "the reversible path did not run"
    finally:
        model.float()
        torch.set_num_threads(threads)
    assert loss_reversible == loss_ordinary
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert ordinary[name] is None and rev[name] is None, name
            continue
        assert ordinary[name] is not None and rev[name] is not None, name
        torch.testing.assert_close(rev[name], ordinary[name], rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
    # the gradients reach every trainable backbone level (nothing vacuous)
    assert all(ordinary[f"backbone.body.subnet3.level{l}.blocks.0.dwconv.weight"].abs().sum() > 0 for l in (1, 2, 3))


@pytest.mark.parametrize("head", ["maskrcnn", "retinanet", "fcos"])
def test_detectors_train_and_predict(head):
    torch.manual_seed(0)
    model = modelfile.create_model(f"{head}_rexnetv1_100_fpn", num_classes=4, trainable_layers=2, min_size=SIZE,
                                   max_size=SIZE)
    _small_sampling(model)
    body = model.backbone.body
    # ReXNetV1 (SPEC): blocks per stage 1,2,2,3,3,5, block i is features.{3+i}; the stride-16 maps start at
    # block 5 = features.8, so trainable_layers=2 (strides 16 and 32) freezes features.0-7
    layer = lambda name: int(name.split(".")[1])  # noqa: E731
    assert {layer(n) for n, p in body.named_parameters() if not p.requires_grad} == {0, 3, 4, 5, 6, 7}
    assert min(layer(n) for n, p in body.named_parameters() if p.requires_grad) == 8
    frozen_bn = {n for n, m in body.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert frozen_bn and all(layer(n) <= 7 for n in frozen_bn)  # frozen stages keep their statistics
    statistics = {k: v.clone() for k, v in body.state_dict().items() if "running_mean" in k}
    model.train()
    losses = model(_images(2), _targets(2, masks=head == "maskrcnn"))
    changed = {layer(k) for k, v in body.state_dict().items()
               if "running_mean" in k and not torch.equal(v, statistics[k])}
    assert changed and min(changed) >= 8
    expected = {"maskrcnn": {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"},
                "retinanet": {"classification", "bbox_regression"},
                "fcos": {"classification", "bbox_regression", "bbox_ctrness"}}[head]
    assert set(losses) == expected
    sum(losses.values()).backward()
    last = model.backbone.body.features[-1].out[0].weight  # the top stage trains
    assert last.grad is not None and last.grad.abs().sum() > 0
    assert model.backbone.body.features[0].weight.grad is None
    model.eval()
    with torch.no_grad():
        (out,) = model(_images(1, size=48))
    assert out["boxes"].shape[1:] == (4,) and out["boxes"].shape[0] == out["scores"].shape[0]
    if len(out["labels"]):
        assert 0 <= int(out["labels"].min()) and int(out["labels"].max()) < 4


def test_segmenter_pads_any_size_and_crops_back():
    torch.manual_seed(0)
    model = dense.create("deeplabv3_revcol_tiny_fpn", num_classes=5).eval()
    assert model.pretrained_cfg["input_size"] == (3, 520, 520)
    x = torch.randn(1, 3, 40, 50)  # not a multiple of 32: RevCol's up-fusions would not fit unpadded
    with torch.no_grad():
        out = model(x)["out"]
        padded = model(torch.nn.functional.pad(x, (0, 14, 0, 24)))["out"]
    assert out.shape == (1, 5, 40, 50)
    # the logits are those of the zero-padded image, cropped (not a resize of the whole map)
    torch.testing.assert_close(out, padded[..., :40, :50], rtol=0, atol=0)
    with pytest.raises(modelfile.ArchitectureError, match="segmenter: min_size / max_size apply to detectors only"):
        modelfile.create_model("deeplabv3_revcol_tiny_fpn", min_size=320)


# -- model files ------------------------------------------------------------------------------------------

def test_model_file_round_trip_keeps_frozen_stages_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = modelfile.create_model("retinanet_rexnetv1_100_fpn", num_classes=3, trainable_layers=1, min_size=SIZE,
                                   max_size=96)
    assert modelfile.architecture_of(model)["kwargs"] == dict(num_classes=3, trainable_layers=1, min_size=SIZE,
                                                               max_size=96)
    path = tmp_path / "det.safetensors"
    modelfile.save(model, path)
    loaded = modelfile.load(path)
    assert type(loaded) is type(model) and loaded.transform.min_size == (SIZE,) and loaded.transform.max_size == 96
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == [
        n for n, p in model.named_parameters() if not p.requires_grad]
    model.eval(), loaded.eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model.backbone(x), loaded.backbone(x)
    assert list(a) == ["0", "1", "2", "p6", "p7"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a new head: the class-dependent modules change, and the class count the head keeps with them
    modelfile.set_num_classes(loaded, 7)
    assert loaded.head.classification_head.num_classes == 7
    assert loaded.head.classification_head.cls_logits.out_channels == 9 * 7
    modelfile.save(loaded, tmp_path / "det7.safetensors")
    assert modelfile.read_info(tmp_path / "det7.safetensors").architecture["kwargs"]["num_classes"] == 7


# -- official RevCol detection / segmentation checkpoints -------------------------------------------------

def _mm_checkpoint(body_state, layout):
    """An mmdet (Cascade Mask R-CNN) or mmseg (UperNet) checkpoint of the authors' release: the backbone under
    `backbone.`, the neck and heads next to it, all under `state_dict`, with `meta`."""
    g = torch.Generator().manual_seed(5)
    others = {
        "mmdet": ["neck.lateral_convs.0.conv.weight", "rpn_head.rpn_conv.weight",
                  "roi_head.bbox_head.0.fc_cls.weight", "roi_head.mask_head.conv_logits.weight"],
        "mmseg": ["decode_head.conv_seg.weight", "decode_head.bottleneck.conv.weight",
                  "auxiliary_head.conv_seg.weight"],
    }[layout]
    state = {"backbone." + k: v.clone() for k, v in body_state.items()}
    state.update({k: torch.randn(4, 4, generator=g) for k in others})
    return {"meta": {"epoch": 36, "mmdet_version": "2.x"}, "state_dict": state}, others


@pytest.fixture(scope="module")
def revcol_tiny_source():
    """A revcol_tiny backbone with weights unlike any fresh model's (another seed, non-default layer scales)."""
    import timm

    torch.manual_seed(123)
    body = timm.create_model("revcol_tiny", num_classes=0)
    with torch.no_grad():
        for name, p in body.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.1, 0.2)
    return {k: v for k, v in body.state_dict().items() if not k.startswith("cls.")}


@pytest.mark.parametrize("layout,name",
                         [("mmdet", "fasterrcnn_revcol_tiny_fpn"), ("mmseg", "deeplabv3_revcol_tiny_fpn")])
def test_official_dense_checkpoint_backbone_loads(tmp_path, revcol_tiny_source, layout, name):
    checkpoint, others = _mm_checkpoint(revcol_tiny_source, layout)
    path = tmp_path / f"revcol_tiny_{layout}.pth"
    torch.save(checkpoint, path)
    resolved = resolve.resolve_model(name, checkpoint=path)
    model = resolved.model
    body = model.backbone.body.state_dict()
    assert body.keys() == revcol_tiny_source.keys()
    for k, v in revcol_tiny_source.items():
        assert torch.equal(body[k], v), k
    notes = " | ".join(resolved.notes)
    groups = sorted({k.split(".")[0] + ".*" for k in others})
    assert f"ignored {len(others)} tensors of the source model's neck and heads ({', '.join(groups)})" in notes
    rest = len([k for k in model.state_dict() if not k.startswith("backbone.body.")])
    assert f"the FPN and heads keep their initialisation ({rest} tensors)" in notes


def test_dense_checkpoint_of_another_variant_is_refused(tmp_path, revcol_tiny_source):
    checkpoint, _ = _mm_checkpoint(revcol_tiny_source, "mmdet")
    path = tmp_path / "tiny.pth"
    torch.save(checkpoint, path)
    # RevCol-S has the same levels but 8 columns: subnet4..7 are missing from a T file
    with pytest.raises(CheckpointError,
                       match=r"the checkpoint's backbone weights does not fit RevCol: \d+ missing keys \(subnet4\."):
        modelfile.create_model("fasterrcnn_revcol_small_fpn", checkpoint=path)


def test_classification_checkpoint_loads_into_the_backbone(tmp_path, revcol_tiny_source):
    # the authors' ImageNet files: {"model": state_dict} with the classifier `cls.classifier.{0,1}`
    g = torch.Generator().manual_seed(3)
    classifier = dict(revcol_tiny_source)
    classifier.update({"cls.classifier.0.weight": torch.ones(512), "cls.classifier.0.bias": torch.zeros(512),
                       "cls.classifier.1.weight": torch.randn(1000, 512, generator=g),
                       "cls.classifier.1.bias": torch.zeros(1000)})
    path = tmp_path / "revcol_tiny_1k.pth"
    torch.save({"model": classifier, "epoch": 300}, path)
    resolved = resolve.resolve_model("retinanet_revcol_tiny_fpn", checkpoint=path)
    notes = " | ".join(resolved.notes)
    assert "backbone weights (468 tensors) loaded into backbone.body" in notes
    assert "dropped the classifier (4 keys): the model has none" in notes
    body = resolved.model.backbone.body.state_dict()
    assert body.keys() == revcol_tiny_source.keys()
    assert all(torch.equal(body[k], v) for k, v in revcol_tiny_source.items())


@pytest.mark.parametrize("name", ["retinanet_rexnetv1_090_fpn", "deeplabv3_rexnetv1_090_fpn"])
def test_own_layout_checkpoint_sizes_the_head(tmp_path, name):
    # a fine-tuned model's state_dict (torchvision's reference scripts: {"model": ..., "epoch": ...})
    torch.manual_seed(0)
    trained = modelfile.create_model(name, num_classes=3)
    path = tmp_path / "fine_tuned.pth"
    torch.save({"model": trained.state_dict(), "epoch": 12}, path)
    resolved = resolve.resolve_model(name, checkpoint=path)
    default = dense.HEADS[dense.split_name(name)[0]].default_classes
    assert f"head sized from the checkpoint: 3 classes (not {default})" in resolved.notes
    assert modelfile.architecture_of(resolved.model)["kwargs"]["num_classes"] == 3
    own = resolved.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(ArgumentConflictError, match="has a 3-class head"):
        resolve.resolve_model(name, checkpoint=path, num_classes=5)


# -- no dead weights ----------------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_thread")  # small tensors: threads on a loaded machine cost more than the work
@pytest.mark.parametrize("head", list(dense.HEADS))
@pytest.mark.parametrize("backbone", ["rexnetv1_090", "revcol_tiny"])  # the smallest variant of each family
def test_every_parameter_is_used_in_training_and_every_weighted_module_runs_in_eval(head, backbone):
    # Independent of the counters the report uses: autograd says which parameters the training forward used,
    # forward hooks which modules the (deployed) eval forward called. A module built and never run would be
    # weights a deployed model carries for nothing.
    torch.manual_seed(0)
    name = f"{head}_{backbone}_fpn"
    segmenter = dense.HEADS[head].task == "segmentation"
    model = _small_sampling(dense.create(name, num_classes=3, **({} if segmenter else dict(min_size=SIZE,
                                                                                            max_size=SIZE))))
    model.train()
    if segmenter:  # batch 2: the ASPP's image-pooling branch normalises a 1x1 map over the batch
        loss = model(torch.stack(_images(2)))["out"].square().mean()
    else:
        loss = sum(model(_images(2), _targets(2, masks=head == "maskrcnn")).values())
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == [], f"{name}: parameters the training forward never used: {unused[:8]}"

    ran = set()
    hook = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: ran.add(id(m)))
    try:
        with torch.no_grad():
            model.eval()(torch.stack(_images(1)) if segmenter else _images(1))
    finally:
        hook.remove()
    modules = dict(model.named_modules())
    # a module that holds weights itself runs, or (a body read through forward_intermediates, a RevCol
    # column's alphas) one of its submodules does
    weighted = [n for n, m in modules.items() if any(True for _ in m.parameters(recurse=False))]
    idle = [n for n in weighted if not any(id(m) in ran for k, m in modules.items() if k == n or k.startswith(n + "."))]
    assert idle == [], f"{name}: modules holding weights that the eval forward never ran: {idle[:8]}"


def test_segmenter_fpn_computes_torchvisions_stride_8_level():
    # the FPN the segmenter builds is torchvision's over the strides 8-32, less the output convs of the levels
    # nothing reads: its one level equals torchvision's class's first output with the same weights
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

    torch.manual_seed(0)
    model = dense.create("deeplabv3_rexnetv1_090_fpn", num_classes=3).eval()
    fpn = model.backbone.fpn
    assert len(fpn.inner_blocks) == 3 and len(fpn.layer_blocks) == 1
    in_channels = [block[0].in_channels for block in fpn.inner_blocks]
    info = {i["reduction"]: i["num_chs"] for i in model.backbone.body.feature_info}
    assert in_channels == [info[8], info[16], info[32]]
    reference = FeaturePyramidNetwork(in_channels, 256).eval()
    with torch.no_grad():
        for ours, theirs in zip(fpn.inner_blocks, reference.inner_blocks):
            theirs.load_state_dict(ours.state_dict())
        reference.layer_blocks[0].load_state_dict(fpn.layer_blocks[0].state_dict())
        g = torch.Generator().manual_seed(1)
        maps = {str(k): torch.randn(1, c, 16 >> k, 16 >> k, generator=g) for k, c in enumerate(in_channels)}
        out, expected = fpn(maps), reference(maps)
    assert list(out) == ["0"]
    torch.testing.assert_close(out["0"], expected["0"], rtol=0, atol=0)


def test_segmenter_report_parts_sum_to_the_totals_and_the_counters_agree():
    import math

    import reparam_zoo
    from torch import nn

    torch.manual_seed(0)
    model = dense.create("deeplabv3_rexnetv1_090_fpn", num_classes=5)
    result = reparam_zoo.report(model, (3, 64, 96), depth=1)
    # every weight ran: fvcore's trace and torch's eager flop_counter count the same convs
    assert result.uncalled_modules == [] and result.unused_output_modules == []
    check = result.macs_check
    assert check.fvcore_macs == check.flop_counter_macs and check.differing_modules == {}
    # the conv MACs, by hand from the output shapes forward hooks see: Cout * Cin/g * kh * kw per position
    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(
        o.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 64, 96))
    for h in hooks:
        h.remove()
    assert check.fvcore_macs == sum(macs)
    # the parts and `other` (the final bilinear upsampling of the 5 class maps to 64x96: 4 multiply-adds per
    # output element, one per neighbour) sum to the model's totals
    assert list(result.groups) == ["backbone", "neck", "heads", "other"]
    assert result.groups["other"] == {"training_params": 0, "inference_params": 0, "macs": 4 * 5 * 64 * 96}
    assert result.outside_parts_ops == {"upsample_bilinear2d": 4 * 5 * 64 * 96}
    for key, total in (("macs", result.inference["macs"]), ("inference_params", result.inference["params"]),
                       ("training_params", result.training["params"])):
        assert sum(g[key] for g in result.groups.values()) == total, key
    assert result.groups["neck"]["inference_params"] == sum(p.numel() for p in model.backbone.fpn.parameters())
    text = result.to_table()
    assert ("part 'other': what the model's own forward computes outside backbone, neck, heads "
            f"(MACs by op: upsample_bilinear2d {4 * 5 * 64 * 96:,})") in text
    assert "WARNING" not in text
