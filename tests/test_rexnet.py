"""ReXNetV1 (issue #3): official key layout, published sizes, timm equivalence, loading, timm interface,
graph capture, and RefConv surgery on it. Inputs are kept small (64x64) so the file runs in seconds."""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.models import group_parameters
from timm.models._features import FeatureGetterNet, FeatureListNet
from torch.utils.flop_counter import FlopCounterMode

from reparam_zoo.checkpoint import load_checkpoint
from reparam_zoo.errors import CheckpointError
from reparam_zoo.models.rexnet import ReXNetV1, checkpoint_filter_fn, rexnet_block_configs

# The ReXNet paper: width -> (params, MACs at 224) as published.
PUBLISHED = {
    0.9: (4.09e6, 0.35e9),
    1.0: (4.80e6, 0.40e9),
    1.3: (7.56e6, 0.66e9),
    1.5: (9.73e6, 0.88e9),
    2.0: (16.37e6, 1.53e9),
    3.0: (34.71e6, 3.40e9),
}
SMALL = 64  # input side for numerical tests; strides divide it down to 2x2 at reduction 32


def randomize_norm_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine and running stats, so a mis-mapped BN tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))
    return model


def images(batch: int, side: int = SMALL, chans: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, chans, side, side, generator=torch.Generator().manual_seed(seed))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_linear_macs(model: nn.Module, side: int = 224) -> int:
    """Conv + linear MACs of one image, counted on the meta device (shapes only, no arithmetic).

    torch's FlopCounterMode counts only matmul/conv and 2 flops per MAC, so /2 gives MACs directly,
    including the SE convs on 1x1 maps (which do not scale with H*W, so no small-input extrapolation).
    """
    if next(model.parameters()).device.type != "meta":
        with torch.device("meta"):
            model = ReXNetV1(width_mult=model.width_mult, depth_mult=model.depth_mult).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, model.in_chans, side, side, device="meta"))
    return counter.get_total_flops() // 2


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These inputs are too small to gain from intra-op threads, and on a busy 2-core machine OpenMP
    spin-waiting made this file ~5x slower (90 s vs 17 s). Restored afterwards for other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return randomize_norm_stats(ReXNetV1()).eval()


@pytest.fixture(scope="module")
def timm_rexnet_100():
    return randomize_norm_stats(timm.create_model("rexnet_100", pretrained=False), seed=3).eval()


# --- (1) official key layout ---------------------------------------------------------------------

def test_state_dict_has_official_413_keys(model):
    sd = model.state_dict()
    assert len(sd) == 413
    expected_shapes = {
        "features.0.weight": (32, 3, 3, 3),  # stem conv
        "features.1.running_var": (32,),  # stem BN
        "features.3.out.0.weight": (32, 1, 3, 3),  # t=1 block: dw first
        "features.3.out.3.weight": (16, 32, 1, 1),  # t=1 block: projection
        "features.3.out.4.num_batches_tracked": (),
        "features.4.out.0.weight": (96, 16, 1, 1),  # t=6 block without SE: expansion
        "features.4.out.3.weight": (96, 1, 3, 3),  # its dw conv
        "features.4.out.6.weight": (27, 96, 1, 1),  # its projection
        "features.4.out.7.bias": (27,),
        "features.5.out.0.weight": (162, 27, 1, 1),  # second t=6 block: 27 * 6 channels, no SE
        "features.5.out.6.weight": (38, 162, 1, 1),
        "features.6.out.3.weight": (228, 1, 3, 3),  # first SE block (stage 3): 38 * 6 channels
        "features.6.out.5.fc.0.weight": (19, 228, 1, 1),  # SE squeeze, 228 // 12
        "features.6.out.5.fc.0.bias": (19,),
        "features.6.out.5.fc.1.running_mean": (19,),  # SE BN
        "features.6.out.5.fc.3.weight": (228, 19, 1, 1),  # SE excite
        "features.6.out.5.fc.3.bias": (228,),
        "features.6.out.7.weight": (50, 228, 1, 1),
        "features.6.out.8.weight": (50,),
        "features.18.out.7.weight": (185, 174 * 6, 1, 1),  # last block
        "features.19.weight": (1280, 185, 1, 1),  # head conv
        "features.20.running_mean": (1280,),  # head BN
        "output.1.weight": (1000, 1280, 1, 1),  # classifier is a 1x1 conv
        "output.1.bias": (1000,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith(("features.21", "output.0", "global_pool")) for k in sd)


def test_block_layer_positions_match_release(model):
    """Indices of the param-carrying layers in every block's `out`, by block kind (the authors' layout)."""
    by_kind = {
        "t1": {"0", "1", "3", "4"},
        "t6": {"0", "1", "3", "4", "6", "7"},
        "t6_se": {"0", "1", "3", "4", "5", "7", "8"},
    }
    kinds = ["t1"] + ["t6"] * 2 + ["t6_se"] * 13
    sd = model.state_dict()
    for block_idx, kind in zip(range(3, 19), kinds):
        prefix = f"features.{block_idx}.out."
        positions = {k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)}
        assert positions == by_kind[kind], (block_idx, positions)
    assert {k.split(".")[1] for k in sd if k.startswith("features.")} == {str(i) for i in range(21)} - {"2"}


def test_channel_schedule():
    stem, cfgs = rexnet_block_configs(1.0)
    assert stem == 32 and len(cfgs) == 16
    assert [c.out_chs for c in cfgs] == [16, 27, 38, 50, 61, 72, 84, 95, 106, 117, 128, 140, 151, 162, 174, 185]
    assert [c.stride for c in cfgs] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert [c.use_se for c in cfgs] == [False] * 3 + [True] * 13
    # below width 1 the stem and first block keep their absolute widths
    stem, cfgs = rexnet_block_configs(0.9)
    assert (stem, cfgs[0].in_chs, cfgs[0].out_chs) == (32, 32, 16)
    assert len(rexnet_block_configs(1.0, depth_mult=2.0)[1]) == 32


# --- (2) published sizes -------------------------------------------------------------------------

@pytest.mark.parametrize("width", sorted(PUBLISHED))
def test_params_and_macs_match_paper(width):
    params, macs = PUBLISHED[width]
    with torch.device("meta"):
        m = ReXNetV1(width_mult=width).eval()
    assert f"{param_count(m):.3g}" == f"{params:.3g}"
    assert conv_linear_macs(m) == pytest.approx(macs, rel=0.01)


def test_macs_agree_with_fvcore_at_224():
    """Cross-check the meta-device count with fvcore on real tensors (fvcore: 1 flop per MAC)."""
    m = ReXNetV1().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore uses the deprecated torch.jit APIs
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(m, images(1, 224))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        conv_macs = analysis.by_operator()["conv"]
    assert conv_macs == conv_linear_macs(m) == 398_370_392  # measured on the authors' model: 0.398G


# --- (3) numerical equivalence with timm's rexnet ------------------------------------------------

@pytest.mark.parametrize("variant,width", [("rexnet_100", 1.0), ("rexnet_130", 1.3), ("rexnet_150", 1.5)])
def test_matches_timm_rexnet(tmp_path, variant, width, timm_rexnet_100):
    reference = timm_rexnet_100 if variant == "rexnet_100" else randomize_norm_stats(
        timm.create_model(variant, pretrained=False), seed=4
    ).eval()
    path = tmp_path / f"{variant}.pth"
    torch.save(reference.state_dict(), path)
    ours = ReXNetV1(width_mult=width).eval()
    report = load_checkpoint(ours, path)
    assert "converted timm ReXNet layout (413 keys, positional)" in report.notes
    for batch in (1, 4):
        x = images(batch)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)


def test_matches_timm_rexnet_at_224(model, timm_rexnet_100):
    ours = ReXNetV1().eval()
    load_checkpoint(ours, timm_rexnet_100.state_dict())
    x = images(1, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_rexnet_100(x), rtol=0, atol=1e-5)


def test_random_init_has_timm_rexnets_per_layer_scale(timm_rexnet_100):
    # a fan-out that ignores groups would shrink every depthwise kernel ~C-fold and the signal with it
    torch.manual_seed(0)
    ours = ReXNetV1()
    pairs = [(a, b) for a, b in zip(ours.state_dict().values(), timm_rexnet_100.state_dict().values())
             if a.dim() == 4 and a.numel() >= 1000]
    assert len(pairs) > 40
    for a, b in pairs:
        assert a.std().item() == pytest.approx(b.std().item(), rel=0.25)
    with torch.no_grad():
        assert ours.eval().forward_features(images(2, 64)).std().item() > 1e-3


@pytest.mark.parametrize("width", [1.0, 1.3, 1.5, 2.0, 3.0])
def test_every_timm_width_maps_onto_ours(width):
    """Layout check for all released widths on the meta device (no data, so no cost)."""
    variant = f"rexnet_{round(width * 100)}"
    with torch.device("meta"):
        reference, ours = timm.create_model(variant), ReXNetV1(width_mult=width)
    report = load_checkpoint(ours, reference.state_dict())
    assert report.num_tensors == 413


def test_timm_safetensors_in_sorted_key_order_loads(tmp_path, timm_rexnet_100):
    """safetensors files keep keys sorted, not in module order: the mapping must not trust file order."""
    path = tmp_path / "rexnet_100.safetensors"
    save_file({k: v.contiguous() for k, v in timm_rexnet_100.state_dict().items()}, str(path))
    ours = ReXNetV1().eval()
    load_checkpoint(ours, path)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm_rexnet_100(x), rtol=0, atol=1e-5)


def test_timm_weights_without_bn_counters_load(timm_rexnet_100):
    sd = {k: v for k, v in timm_rexnet_100.state_dict().items() if not k.endswith("num_batches_tracked")}
    ours = ReXNetV1()
    report = load_checkpoint(ours, sd)
    assert any("num_batches_tracked" in n for n in report.notes)
    assert int(ours.features[1].num_batches_tracked) == 0


# --- (4) official-layout files -------------------------------------------------------------------

def test_official_layout_file_with_wrapper_and_prefix_loads(tmp_path, model):
    path = tmp_path / "rexnetv1_1.0.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    fresh = ReXNetV1().eval()
    report = load_checkpoint(fresh, path, strict=True)
    assert report.num_tensors == 413
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_filter_fn_passes_official_layout_through(model):
    sd = model.state_dict()
    for wrapped in (sd, {"state_dict": {"module." + k: v for k, v in sd.items()}}):  # timm's pretrained path too
        out = checkpoint_filter_fn(wrapped, ReXNetV1())
        assert list(out) == list(sd) and all(out[k] is sd[k] for k in sd)


# --- (5) mismatched checkpoints ------------------------------------------------------------------

def test_official_layout_of_other_width_is_rejected(model):
    with torch.device("meta"):
        target = ReXNetV1(width_mult=1.3)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(features\.0\.weight"):
        load_checkpoint(target, model.state_dict())


def test_timm_layout_of_other_width_is_rejected(timm_rexnet_100):
    with torch.device("meta"):
        target = ReXNetV1(width_mult=1.5)
    with pytest.raises(CheckpointError, match=r"other width.*shape mismatches.*stem\.conv\.weight.*features\.0\.weight"):
        load_checkpoint(target, timm_rexnet_100.state_dict())


def test_timm_layout_of_other_depth_is_rejected():
    with torch.device("meta"):
        deeper = timm.create_model("rexnet_100", depth_mult=1.5)
        target = ReXNetV1()
    with pytest.raises(CheckpointError, match=r"unexpected keys \(features\.16\."):
        load_checkpoint(target, deeper.state_dict())


# --- (6) timm interface --------------------------------------------------------------------------

def test_create_model_with_classes_and_channels():
    m = timm.create_model("rexnetv1_100", num_classes=10, in_chans=1).eval()
    assert isinstance(m, ReXNetV1)
    assert m(images(1, chans=1)).shape == (1, 10)
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert (cfg["first_conv"], cfg["classifier"]) == ("features.0", "output.1")
    assert cfg["hf_hub_id"] == "timm/rexnet_100.nav_in1k"


@pytest.mark.parametrize("name,width", [("rexnetv1_130", 1.3), ("rexnetv1_150", 1.5), ("rexnetv1_200", 2.0),
                                        ("rexnetv1_300", 3.0)])
def test_registered_widths(name, width):
    with torch.device("meta"):
        m = timm.create_model(name)
    assert m.width_mult == width
    assert m.pretrained_cfg["hf_hub_id"] == f"timm/{name.replace('v1', '')}.nav_in1k"


def test_width_0_9_is_registered_without_weights():
    with torch.device("meta"):
        m = timm.create_model("rexnetv1_090")
    assert m.width_mult == 0.9 and m.pretrained_cfg.get("hf_hub_id") is None
    assert sum(p.numel() for p in m.parameters()) == 4_091_257  # the paper: 4.09M


def test_width_and_depth_via_kwargs_and_timm_rexnet_untouched():
    with torch.device("meta"):
        m = timm.create_model("rexnetv1_100", width_mult=0.9)
        assert f"{param_count(m):.3g}" == "4.09e+06"
        assert len(timm.create_model("rexnetv1_100", depth_mult=2.0).block_configs) == 32
        assert type(timm.create_model("rexnet_100")).__name__ == "RexNet"


def test_features_only():
    f = timm.create_model("rexnetv1_100", features_only=True).eval()
    assert f.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert f.feature_info.channels() == [16, 38, 61, 128, 185]
    with torch.no_grad():
        outs = f(images(2))
    assert [tuple(o.shape) for o in outs] == [
        (2, c, SMALL // r, SMALL // r) for c, r in zip([16, 38, 61, 128, 185], [2, 4, 8, 16, 32])
    ]
    f = timm.create_model("rexnetv1_150", features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = f(images(1))
    assert [o.shape[-1] for o in outs] == [SMALL // 4, SMALL // 16]
    assert [o.shape[1] for o in outs] == f.feature_info.channels()


def test_forward_intermediates_equal_the_hooked_feature_maps(model):
    x = images(2)
    hooked = FeatureListNet(copy.deepcopy(model), out_indices=range(5), flatten_sequential=True).eval()
    with torch.no_grad():
        expected = hooked(x)
        final, maps = model.forward_intermediates(x)
        only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        early_final, early = model.forward_intermediates(x, indices=2, stop_early=True)
        full = model.forward_features(x)
    assert len(maps) == 5
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(final, full, rtol=0, atol=0)
    assert [o.shape for o in only] == [expected[1].shape, expected[3].shape]
    torch.testing.assert_close(only[1], expected[3], rtol=0, atol=0)
    # indices=2 means the last two taps; stopping early ends at the last of them (the last block)
    assert [o.shape[1] for o in early] == [128, 185]
    assert early_final.shape[1] == 185
    with pytest.raises(ValueError, match="NCHW only"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_getter_features_and_pruning_match_forward_intermediates(model):
    x = images(1)
    built = timm.create_model("rexnetv1_100", features_only=True, feature_cls="getter", out_indices=(0, 2))
    assert built.feature_info.channels() == [16, 61]
    getter = FeatureGetterNet(copy.deepcopy(model), out_indices=(0, 2))
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers(indices=[0, 2]) == [0, 2]
    assert len(pruned.features) == 8 and isinstance(pruned.get_classifier(), nn.Identity)
    with torch.no_grad():
        want = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        for got in (getter.eval()(x), pruned.forward_intermediates(x, indices=[0, 2], intermediates_only=True)):
            assert len(got) == 2
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_forward_intermediates_with_gradient_checkpointing_match_plain_backprop():
    torch.manual_seed(0)
    plain = ReXNetV1(width_mult=0.5).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x = images(2)
    for m in (plain, checkpointed):
        _, maps = m.forward_intermediates(x, indices=[1, 4])
        sum(o.square().mean() for o in maps).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_feature_info_names_modules(model):
    names = dict(model.named_modules())
    assert [i["module"] for i in model.feature_info] == [
        "features.3", "features.5", "features.7", "features.13", "features.18"
    ]
    assert all(i["module"] in names for i in model.feature_info)


def test_classifier_interface():
    m = ReXNetV1().eval()
    assert m.num_features == 1280
    assert m.get_classifier() is m.output[1]
    x = images(1)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (1, 1280, 2, 2)
        assert m.forward_head(feats, pre_logits=True).shape == (1, 1280)
        m.reset_classifier(5)
        assert m.output[1].weight.shape == (5, 1280, 1, 1) and m.num_classes == 5
        assert m(x).shape == (1, 5)
        m.reset_classifier(0)
        assert isinstance(m.get_classifier(), nn.Identity)
        assert m(x).shape == (1, 1280)


def test_group_matcher_and_grad_checkpointing(model):
    groups = group_parameters(model, model.group_matcher())
    assert groups[0] == ["features.0.weight", "features.1.weight", "features.1.bias"]
    assert groups[max(groups)] == ["output.1.weight", "output.1.bias"]

    m = ReXNetV1(drop_rate=0.0)
    m.load_state_dict(model.state_dict())
    m.train()
    x = images(2)
    torch.manual_seed(0)
    expected = m(x)
    m.set_grad_checkpointing()
    torch.manual_seed(0)
    out = m(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert m.features[0].weight.grad is not None


# --- (7) graph capture ---------------------------------------------------------------------------

def test_fx_export_and_script_match_eager(model):
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), expected)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still supported
            scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), expected)


# --- (8) timm pretrained=True through pretrained_filter_fn ---------------------------------------

def test_pretrained_from_local_timm_file(tmp_path, timm_rexnet_100):
    """pretrained=True with a local file override: the filter converts timm's layout, no download."""
    path = tmp_path / "rexnet_100.safetensors"
    save_file({k: v.contiguous() for k, v in timm_rexnet_100.state_dict().items()}, str(path))
    overlay = dict(file=str(path))
    m = timm.create_model("rexnetv1_100", pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(m(x), timm_rexnet_100(x), rtol=0, atol=1e-5)

    # other classes and input channels: timm drops the classifier and adapts the stem after the filter
    m = timm.create_model("rexnetv1_100", pretrained=True, pretrained_cfg_overlay=overlay,
                          num_classes=10, in_chans=1)
    assert torch.equal(m.features[19].weight, timm_rexnet_100.features[16].conv.weight)
    assert m.features[0].weight.shape == (32, 1, 3, 3)
    assert m.output[1].weight.shape == (10, 1280, 1, 1)


# --- (9) RefConv surgery -------------------------------------------------------------------------

def test_refconv_convert_fold_fuse(model):
    reparam_zoo = pytest.importorskip("reparam_zoo")
    if not hasattr(reparam_zoo, "convert"):
        pytest.skip("reparam_zoo.convert not available yet")
    from reparam_zoo.layers.refconv import RefConvNd

    x = images(2, side=32)
    with torch.no_grad():
        expected = model(x)
    converted = reparam_zoo.convert(model, map_k=3).eval()
    # spatial convs only: the stem and the 16 depthwise convs
    refconvs = [m for m in converted.modules() if isinstance(m, RefConvNd)]
    assert len(refconvs) == 17
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected)  # zero-initialized transforms
        g = torch.Generator().manual_seed(5)
        for layer in refconvs:
            layer.transform_weight.copy_(torch.randn(layer.transform_weight.shape, generator=g) * 1e-2)
        refocused = converted(x)
    assert not torch.allclose(refocused, expected)

    folded = reparam_zoo.fold(converted)
    plain = ReXNetV1().eval()
    plain.load_state_dict(folded.state_dict(), strict=True)  # folds back into the release layout
    fused = reparam_zoo.fuse(converted, example_inputs=x)
    assert fused.fuse_report.verified
    with torch.no_grad():
        torch.testing.assert_close(plain(x), refocused, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fused(x), refocused, rtol=1e-4, atol=1e-5)


def test_classifier_weights_are_dropped_for_a_model_without_one():
    timm_weights = timm.create_model("rexnet_100", width_mult=0.5).state_dict()
    with_head = ReXNetV1(width_mult=0.5)
    load_checkpoint(with_head, timm_weights)
    for weights in (timm_weights, with_head.state_dict()):  # timm's layout and the release's
        features = ReXNetV1(width_mult=0.5, num_classes=0).eval()
        report = load_checkpoint(features, weights)
        assert "dropped the classifier (2 keys): the model has none (num_classes=0)" in report.notes
        with torch.no_grad():
            torch.testing.assert_close(features(images(1)), with_head.eval().forward_head(
                with_head.forward_features(images(1)), pre_logits=True), rtol=0, atol=0)

