"""RevCol: structure, official keys, numbers, reversible gradients, timm interface,
checkpoints, supervision loss, RefConv conversion and DDP."""
import os
import re

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import reparam_zoo
from reparam_zoo.checkpoint import load_checkpoint
from reparam_zoo.errors import CheckpointError
from reparam_zoo.models.revcol import REVCOL_VARIANTS, RevCol, RevColSupervisionLoss, supervision_columns

# A small RevCol for fast tests: 4 levels, one block each.
TINY = dict(channels=(8, 16, 32, 64), layers=(1, 1, 1, 1))


@pytest.fixture(autouse=True)
def single_thread():
    # Tiny tensors: a second intra-op thread only adds synchronisation (badly so on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
PUBLISHED_PARAMS_M = {"revcol_tiny": 30.46, "revcol_small": 60.57, "revcol_base": 138.62, "revcol_large": 273.10}
PUBLISHED_GMACS_224 = {"revcol_tiny": 4.5, "revcol_small": 9.0, "revcol_base": 16.6, "revcol_large": 39.0}


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights away from their init so every path matters: layer scales ~0.3 instead of 1e-6, alphas of
    both signs in [0.5, 1.5], everything else jittered."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if re.search(r"\.alpha\d+$", name):
                sign = torch.where(torch.rand(p.shape, generator=g) < 0.3, -1.0, 1.0).to(p.dtype)
                p.copy_(sign * (0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype)))
            elif name.endswith("gamma"):
                p.copy_(0.3 * noise)
            else:
                p.add_(0.05 * noise)
    return model


def gradients(model, x, *, save_memory, supervised=False, seed=1):
    """Loss gradients of every parameter and of the input, with a fixed seed before the forward."""
    model.save_memory = save_memory
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    if supervised:
        logits, images = model.forward_with_supervision(x)
        loss = sum((l * (i + 1)).square().mean() for i, l in enumerate(logits)) + sum(im.sin().mean() for im in images)
    else:
        loss = model(x).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["<input>"] = x.grad
    return loss.detach(), grads


def assert_same_gradients(reference, candidate, rtol=1e-9):
    assert reference.keys() == candidate.keys()
    for name, expected in reference.items():
        actual = candidate[name]
        assert (expected is None) == (actual is None), name
        if expected is None:  # e.g. levels of the last column that no output reads
            continue
        norm = expected.norm()
        if norm == 0:  # the first column's alphas multiply the zero state
            assert torch.equal(actual, expected), f"{name}: expected an exact zero gradient"
        else:
            error = ((actual - expected).norm() / norm).item()
            assert error <= rtol, f"{name}: relative error {error:.3e}"


# ---------------------------------------------------------------------------------------------------
# structure, keys, numbers


def test_official_key_layout_of_revcol_tiny():
    with torch.device("meta"):
        single = timm.create_model("revcol_tiny").state_dict()
        supervised = timm.create_model("revcol_tiny", inter_supv=True).state_dict()
    assert len(single) == 468 and len(supervised) == 603
    patterns = [
        r"stem\.[01]\.(weight|bias)",
        r"subnet\d\.alpha[0-3]",
        r"subnet\d\.level[1-3]\.fusion\.down\.[01]\.(weight|bias)",
        r"subnet[1-3]\.level[0-2]\.fusion\.up\.channel_reschedule\.[01]\.(weight|bias)",
        r"subnet\d\.level[0-3]\.blocks\.\d\.(gamma|(dwconv|norm|pwconv1|pwconv2)\.(weight|bias))",
        r"cls\.classifier\.[01]\.(weight|bias)",
        r"cls_blocks\.[0-3]\.classifier\.[01]\.(weight|bias)",
        r"decoder_blocks\.[0-2]\.(proj_layers\.[0-2]\.[01]|normal_layers\.[0-2]\.0\.(dwconv|norm|pwconv1|pwconv2)"
        r"|projback\.0)\.(weight|bias)",
        r"decoder_blocks\.[0-2]\.normal_layers\.[0-2]\.0\.gamma",
    ]
    for key in list(single) + list(supervised):
        assert any(re.fullmatch(p, key) for p in patterns), key
    assert single["subnet0.alpha0"].shape == (1, 64, 1, 1)
    assert single["subnet1.level0.fusion.up.channel_reschedule.0.weight"].shape == (64, 128)
    assert single["subnet0.level2.blocks.3.dwconv.weight"].shape == (256, 1, 3, 3)
    assert not any(k.startswith("subnet0.") and ".up." in k for k in single)  # first column: no up edge
    assert supervised["decoder_blocks.0.proj_layers.0.0.weight"].shape == (256, 512, 1, 1)
    assert supervised["decoder_blocks.2.projback.0.weight"].shape == (48, 64, 1, 1)


def test_huge_has_the_top_to_bottom_edge():
    with torch.device("meta"):
        model = timm.create_model("revcol_huge")
    keys = model.state_dict().keys()
    up2 = sorted(k for k in keys if ".up2." in k)
    assert len(up2) == 4 * 7  # columns 1..7, level 0, Linear + LayerNorm
    assert "subnet1.level0.fusion.up2.channel_reschedule.0.weight" in keys
    assert model.state_dict()["subnet1.level0.fusion.up2.channel_reschedule.0.weight"].shape == (360, 2880)


@pytest.mark.parametrize("name", list(PUBLISHED_PARAMS_M))
def test_parameter_counts_match_spec(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert f"{params / 1e6:.2f}" == f"{PUBLISHED_PARAMS_M[name]:.2f}"  # 4 significant digits


def test_parameter_counts_of_xl_and_h_are_close_to_spec():
    with torch.device("meta"):
        xl, huge = timm.create_model("revcol_xlarge"), timm.create_model("revcol_huge")
    assert abs(sum(p.numel() for p in xl.parameters()) / 834e6 - 1) < 0.005
    assert abs(sum(p.numel() for p in huge.parameters()) / 2.16e9 - 1) < 0.005


def fvcore_macs(model: nn.Module, size: int) -> tuple:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model.eval(), torch.randn(1, 3, size, size))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = analysis.by_module()
    return analysis.total(), by_module


FVCORE_JIT_WARNING = "ignore:`torch.jit.script` is deprecated:FutureWarning"  # raised inside fvcore


@pytest.mark.filterwarnings(FVCORE_JIT_WARNING)
@pytest.mark.parametrize("name", list(PUBLISHED_GMACS_224))
def test_macs_at_224_match_spec(name):
    # Counting the full model at 224 costs seconds of tracing per variant. Instead: fvcore on a 2-column
    # copy at 64x64, then two exact extrapolations.
    # - Columns: columns 1..N-1 have identical structure, so N columns cost the 2-column total plus
    #   (N - 2) times column 1.
    # - Resolution: fvcore counts a conv or linear as output elements x (C_in/groups x kernel), and
    #   norms/upsampling per element; with every stride dividing 64 (and 224) each feature map's area
    #   scales by exactly (224/64)^2. Only the classifier head (on the pooled vector) does not scale.
    cfg = dict(REVCOL_VARIANTS[name], num_columns=2)
    total, by_module = fvcore_macs(RevCol(**cfg), 64)
    head = by_module["cls"]
    columns = REVCOL_VARIANTS[name]["num_columns"]
    total_224 = (total - head + (columns - 2) * by_module["subnet1"]) * (224 / 64) ** 2 + head
    assert abs(total_224 / 1e9 / PUBLISHED_GMACS_224[name] - 1) < 0.02


@pytest.mark.filterwarnings(FVCORE_JIT_WARNING)
def test_mac_extrapolation_is_exact():
    model = RevCol(channels=(16, 32, 64, 128), layers=(1, 1, 2, 1), num_columns=4)
    direct, _ = fvcore_macs(model, 64)
    two = RevCol(channels=(16, 32, 64, 128), layers=(1, 1, 2, 1), num_columns=2)
    total, by_module = fvcore_macs(two, 32)
    head = by_module["cls"]
    assert (total - head + 2 * by_module["subnet1"]) * 4 + head == direct


def test_drop_path_schedule_is_the_same_in_every_column():
    with torch.device("meta"):
        model = timm.create_model("revcol_tiny", drop_path_rate=0.1)
    expected = torch.linspace(0, 0.1, 10).tolist()
    for column in model.columns():
        rates = [getattr(b.drop_path, "drop_prob", 0.0) for lvl in column.level_modules() for b in lvl.blocks]
        assert rates == pytest.approx(expected)


def test_supervision_columns():
    assert supervision_columns(4) == [0, 1, 2, 3]
    assert supervision_columns(8) == [1, 3, 5, 7]
    assert supervision_columns(16) == [3, 7, 11, 15]
    with pytest.raises(ValueError, match="at least 4 columns"):
        RevCol(**TINY, num_columns=3, inter_supv=True)


# ---------------------------------------------------------------------------------------------------
# reversible training


@pytest.mark.parametrize("supervised", [False, True], ids=["single-head", "supervision-heads"])
def test_reversible_gradients_equal_backprop_on_tiny_structure(supervised):
    torch.manual_seed(0)
    model = randomize_(timm.create_model("revcol_tiny", num_classes=10, drop_path_rate=0.3, inter_supv=supervised))
    model = model.double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    loss_ref, ref = gradients(model, x, save_memory=False, supervised=supervised)
    loss_rev, rev = gradients(model, x, save_memory=True, supervised=supervised)
    assert torch.equal(loss_ref, loss_rev)
    assert_same_gradients(ref, rev)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(TINY, num_columns=3),
        dict(TINY, num_columns=4, inter_supv=True),
        dict(TINY, num_columns=3, top_to_bottom_fusion=True),
        dict(channels=(8, 16, 32), layers=(1, 2, 1), num_columns=3),  # 3 levels
        dict(channels=(8, 16, 32, 32, 64), layers=(1, 1, 1, 1, 1), num_columns=2),  # 5 levels
    ],
    ids=["3-columns", "supervision-heads", "H-edge", "3-levels", "5-levels"],
)
def test_reversible_gradients_equal_backprop_on_small_configs(cfg):
    torch.manual_seed(0)
    model = randomize_(RevCol(**cfg, num_classes=5, drop_path_rate=0.4)).double().train()
    size = 4 * 2 ** (len(cfg["channels"]) - 1) * 2
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    supervised = cfg.get("inter_supv", False)
    loss_ref, ref = gradients(model, x, save_memory=False, supervised=supervised)
    loss_rev, rev = gradients(model, x, save_memory=True, supervised=supervised)
    assert torch.equal(loss_ref, loss_rev)
    assert_same_gradients(ref, rev)


@pytest.mark.parametrize("top_to_bottom", [False, True], ids=["plain", "H-edge"])
def test_input_not_a_multiple_of_32_upsamples_to_the_map_it_is_added_to(top_to_bottom):
    """200x136: the stride-2 downsamplings floor 25x17 to 12x8, so a fixed 2x upsample would give 24x16."""
    torch.manual_seed(0)
    model = randomize_(RevCol(**TINY, num_columns=3, num_classes=5, drop_path_rate=0.4,
                              top_to_bottom_fusion=top_to_bottom)).double().train()
    x = torch.randn(2, 3, 200, 136, dtype=torch.float64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape[-2:]) for m in maps] == [(50, 34), (25, 17), (12, 8), (6, 4)]
    loss_ref, ref = gradients(model, x, save_memory=False)
    loss_rev, rev = gradients(model, x, save_memory=True)
    assert torch.isfinite(loss_ref)
    assert torch.equal(loss_ref, loss_rev)
    assert_same_gradients(ref, rev)


def test_upsample_to_a_size_equals_the_fixed_scale_when_the_size_is_a_multiple():
    from reparam_zoo.models.revcol import UpSample

    up = UpSample(8, 4, 8)
    x = torch.randn(1, 8, 3, 5)
    by_scale = up(x)
    assert by_scale.shape == (1, 4, 24, 40)
    assert torch.equal(up(x, [24, 40]), by_scale)
    # independent: nearest upsampling by 8 repeats every pixel in an 8x8 block
    expected = up.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    expected = expected.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    assert torch.equal(by_scale, expected)
    assert up(x, [25, 41]).shape == (1, 4, 25, 41)


def test_reversible_training_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = randomize_(RevCol(**TINY, num_columns=3, num_classes=5, drop_path_rate=0.2)).train()
    x = torch.randn(2, 3, 32, 32)
    results = []
    for save_memory in (False, True):
        model.save_memory = save_memory
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).square().mean()
        loss.backward()  # outside autocast, as AMP training does: the recomputation must re-enter it
        results.append({n: p.grad for n, p in model.named_parameters()})
    # Same bf16 computation in both modes; the reconstruction's fp32 rounding can flip a bf16 rounding
    # downstream, so agreement is to bf16 precision (a recomputation in fp32 would be ~10x further off).
    for name, expected in results[0].items():
        assert torch.isfinite(results[1][name]).all(), name
        assert (results[1][name] - expected).norm() <= 2e-2 * expected.norm(), name


def saved_activation_bytes(model, x):
    """Bytes of distinct non-parameter storages autograd keeps for backward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    loss.backward()
    return sum(seen.values())


def test_reversible_memory_does_not_grow_with_columns():
    x = torch.randn(2, 3, 32, 32)
    saved = {}
    for columns in (2, 6):
        for save_memory in (False, True):
            model = RevCol(**TINY, num_columns=columns, num_classes=5, save_memory=save_memory).train()
            saved[columns, save_memory] = saved_activation_bytes(model, x)
    assert saved[2, True] == saved[6, True]
    # ordinary backprop keeps every column's activations
    assert saved[6, False] > 2 * saved[2, False] > 4 * saved[2, True]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize_(RevCol(**TINY, num_columns=3, num_classes=5, drop_path_rate=0.2)).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _, ref = gradients(model, x, save_memory=False)
    model.set_grad_checkpointing(True)
    _, ckpt = gradients(model, x, save_memory=False)
    assert_same_gradients(ref, ckpt, rtol=1e-12)


def test_reversible_backward_with_frozen_stem_and_first_column():
    # fine-tuning only the later columns: the first column's first level has nothing to differentiate
    torch.manual_seed(0)
    model = randomize_(RevCol(**TINY, num_columns=3, num_classes=5, drop_path_rate=0.2)).double().train()
    model.stem.requires_grad_(False)
    model.subnet0.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _, ordinary = gradients(model, x, save_memory=False)
    _, reversible = gradients(model, x, save_memory=True)
    assert ordinary["subnet0.alpha0"] is None and ordinary["subnet1.alpha0"] is not None
    assert_same_gradients(ordinary, reversible)


def test_torch_export_of_an_eval_revcol_matches_eager():
    torch.manual_seed(0)
    model = randomize_(RevCol(**TINY, num_columns=2, num_classes=5)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        exported = torch.export.export(model, (x,)).module()
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)


def test_autograd_grad_over_all_parameters_in_reversible_mode():
    model = timm.create_model(
        "revcol_tiny", **TINY, save_memory=True, inter_supv=True, drop_path_rate=0.1, num_classes=10
    )
    params = list(model.parameters())
    logits, images = model.forward_with_supervision(torch.randn(2, 3, 32, 32))
    loss = sum(l.sum() for l in logits) + sum(i.sum() for i in images)
    grads = torch.autograd.grad(loss, params)
    assert len(grads) == len(params) and all(g is not None for g in grads)


def test_alphas_are_clamped_away_from_zero_keeping_the_sign():
    model = RevCol(**TINY, num_columns=2, num_classes=5, save_memory=True)
    with torch.no_grad():
        model.subnet1.alpha2.copy_(torch.linspace(-2e-4, 2e-4, 32).view(1, 32, 1, 1))
        model.subnet1.alpha2[0, 16] = 0.0
        model.subnet0.alpha0.fill_(-0.7)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    alpha = model.subnet1.alpha2.detach().flatten()
    assert torch.all(alpha.abs() >= 1e-3)
    assert torch.all(alpha[:16] < 0) and torch.all(alpha[16:] > 0)
    assert torch.all(model.subnet0.alpha0 == -0.7)


def test_reversible_and_ordinary_forward_agree_and_no_grad_skips_the_function():
    model = randomize_(RevCol(**TINY, num_columns=3, num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    reversible = model(x)
    assert torch.equal(plain, reversible) and reversible.grad_fn is not None


# ---------------------------------------------------------------------------------------------------
# timm interface


def test_timm_create_model_and_interface():
    model = timm.create_model("revcol_tiny", save_memory=True, inter_supv=False, drop_path_rate=0.1, num_classes=10)
    assert isinstance(model, RevCol) and model.save_memory and model.num_classes == 10
    cfg = model.pretrained_cfg
    assert cfg["first_conv"] == "stem.0" and cfg["classifier"] == "cls.classifier.1"
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg["url"].startswith("https://github.com/megvii-research/RevCol/releases/")
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 512, 2, 2)
    assert model.forward_head(features, pre_logits=True).shape == (2, 512)
    assert model.forward_head(features).shape == (2, 10)
    assert model.get_classifier() is model.cls.classifier[1]
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 512) and "cls.classifier.1.weight" not in model.state_dict()
    groups = model.group_matcher()
    assert re.match(groups["stem"], "stem.0.weight")
    assert re.match(groups["blocks"][0][0], "subnet2.level1.blocks.0.gamma")
    assert re.match(groups["blocks"][0][0], "subnet2.alpha1")
    assert re.match(model.group_matcher(coarse=True)["blocks"], "subnet3.level0.fusion.up.channel_reschedule.0.weight")
    assert all(timm.is_model(n) for n in REVCOL_VARIANTS)
    in_chans = timm.create_model("revcol_tiny", **TINY, in_chans=1, num_classes=4)
    assert in_chans(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_supervised_model_forward_returns_the_last_heads_logits():
    model = randomize_(timm.create_model("revcol_tiny", **TINY, inter_supv=True, num_classes=7)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, images = model.forward_with_supervision(x)
        assert len(logits) == 4 and len(images) == 3
        assert all(l.shape == (2, 7) for l in logits) and all(i.shape == (2, 3, 32, 32) for i in images)
        assert torch.equal(model(x), logits[-1])
    with pytest.raises(RuntimeError, match="inter_supv"):
        timm.create_model("revcol_tiny", **TINY).forward_with_supervision(x)


def test_features_only_returns_the_last_columns_maps_with_gradients_in_reversible_mode():
    torch.manual_seed(0)
    features = timm.create_model("revcol_tiny", features_only=True, save_memory=True, drop_path_rate=0.1)
    assert features.feature_info.channels() == [64, 128, 256, 512]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert not any(k.startswith(("model.cls", "model.decoder")) for k in features.state_dict())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    maps = features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2), (2, 512, 1, 1)]
    sum((m * m).mean() for m in maps).backward()
    assert x.grad is not None and all(p.grad is not None for p in features.parameters())


def test_features_only_gradients_equal_between_modes():
    torch.manual_seed(0)
    model = timm.create_model("revcol_tiny", **TINY, features_only=True, out_indices=(0, 2), drop_path_rate=0.3)
    randomize_(model).double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = []
    for save_memory in (False, True):
        model.model.save_memory = save_memory
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        sum(m.sin().sum() for m in model(x)).backward()
        results.append({n: p.grad for n, p in model.named_parameters()})
    assert_same_gradients(*results)
    # the last column's top level feeds no requested map, in either mode
    assert results[1]["model.subnet3.level3.blocks.0.pwconv1.weight"] is None


# ---------------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("prefix", ["", "module.", "backbone."])
def test_pretraining_checkpoint_loads_into_single_head_model(tmp_path, prefix):
    pretrain = randomize_(timm.create_model("revcol_tiny", **TINY, inter_supv=True, num_classes=10))
    path = tmp_path / "revcol_tiny_1k.pth"
    torch.save({"model": {prefix + k: v for k, v in pretrain.state_dict().items()}, "epoch": 299}, path)
    model = timm.create_model("revcol_tiny", **TINY, num_classes=10)
    report = load_checkpoint(model, path)
    notes = "\n".join(report.notes)
    assert "cls_blocks.3" in notes and "decoder_blocks" in notes and "dropped 12 keys" in notes
    assert "dropped 123 keys" in notes
    if prefix:
        assert f"stripped key prefix '{prefix}'" in notes
    for k, v in model.state_dict().items():
        source = "cls_blocks.3." + k[len("cls."):] if k.startswith("cls.") else k
        assert torch.equal(v, pretrain.state_dict()[source]), k


def test_matching_checkpoints_load_without_notes(tmp_path):
    for kwargs in (dict(TINY), dict(TINY, inter_supv=True)):
        source = randomize_(timm.create_model("revcol_tiny", **kwargs))
        path = tmp_path / "ckpt.pth"
        torch.save({"model": source.state_dict()}, path)
        model = timm.create_model("revcol_tiny", **kwargs)
        report = load_checkpoint(model, path)
        assert report.notes == [] and report.num_tensors == len(model.state_dict())
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_classifier_is_dropped_for_a_headless_model_and_mismatches_are_errors(tmp_path):
    source = timm.create_model("revcol_tiny", **TINY, num_classes=10)
    headless = timm.create_model("revcol_tiny", **TINY, num_classes=0)
    report = load_checkpoint(headless, source.state_dict())
    assert any("cls.classifier.1" in n for n in report.notes)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(timm.create_model("revcol_tiny", **TINY, num_classes=5), source.state_dict())
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(timm.create_model("revcol_tiny", **TINY, inter_supv=True, num_classes=10), source.state_dict())


def test_timm_pretrained_filter_fn_adapts_the_official_file():
    from reparam_zoo.models.revcol import checkpoint_filter_fn

    pretrain = timm.create_model("revcol_tiny", **TINY, inter_supv=True)
    model = timm.create_model("revcol_tiny", **TINY)
    adapted = checkpoint_filter_fn({"model": {"module." + k: v for k, v in pretrain.state_dict().items()}}, model)
    model.load_state_dict(adapted)  # strict


# ---------------------------------------------------------------------------------------------------
# supervision loss


def test_supervision_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    images = torch.randn(2, 3, 4, 4) * 3  # denormalised values fall outside [0.01, 0.99] too
    logits = [torch.randn(2, 5) for _ in range(4)]
    recs = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    targets = torch.tensor([1, 4])
    loss = RevColSupervisionLoss(mean=mean, std=std)(logits, recs, images, targets)

    pixels = images.clone()
    for c in range(3):
        pixels[:, c] = (pixels[:, c] * std[c] + mean[c]).clamp(0.01, 0.99)

    def bce(z, t):  # mean over elements of -[t log s(z) + (1 - t) log(1 - s(z))]
        s = 1 / (1 + torch.exp(-z))
        return -(t * torch.log(s) + (1 - t) * torch.log(1 - s)).mean()

    def ce(z, y):
        return -torch.stack([z[i, y[i]] - torch.logsumexp(z[i], 0) for i in range(len(y))]).mean()

    expected = ce(logits[3], targets)
    for i, weight_rec, weight_cls in ((0, 1.0, 0.25), (1, 2 / 3, 0.5), (2, 1 / 3, 0.75)):
        expected = expected + bce(recs[i], pixels) * weight_rec * 3.0 + ce(logits[i], targets) * weight_cls * 0.7
    assert torch.allclose(loss, expected, rtol=1e-6)

    # soft targets (mixup): per-class probabilities
    soft = F.one_hot(targets, 5).float()
    assert torch.allclose(RevColSupervisionLoss(mean=mean, std=std)(logits, recs, images, soft), loss, rtol=1e-6)


def test_supervision_loss_trains_the_supervised_model():
    model = timm.create_model("revcol_tiny", **TINY, inter_supv=True, num_classes=5, save_memory=True)
    x = torch.randn(2, 3, 32, 32)
    logits, recs = model.forward_with_supervision(x)
    loss = RevColSupervisionLoss()(logits, recs, x, torch.tensor([0, 3]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# RefConv


@pytest.mark.parametrize("train_scope", ["transforms", "all-but-base"])
def test_refconv_conversion_trains_reversibly_and_fuses(train_scope):
    torch.manual_seed(0)
    model = randomize_(RevCol(**TINY, num_columns=3, num_classes=5, drop_path_rate=0.2, save_memory=True))
    model = model.double()
    converted = reparam_zoo.convert(model, map_k=3, train_scope=train_scope)
    dwconvs = [n for n in converted.refconv_summary.converted_names if n.endswith("dwconv")]
    assert len(dwconvs) == 3 * 4
    transforms = {n: p for n, p in converted.named_parameters() if n.endswith("transform_weight")}
    with torch.no_grad():
        for p in transforms.values():
            p.normal_(0, 0.05)
    converted.train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    loss_ref, ref = gradients(converted, x, save_memory=False)
    loss_rev, rev = gradients(converted, x, save_memory=True)
    assert torch.equal(loss_ref, loss_rev)
    trainable = {n for n, p in converted.named_parameters() if p.requires_grad}
    assert set(transforms) <= trainable
    ref = {n: g for n, g in ref.items() if n in trainable or n == "<input>"}
    rev = {n: g for n, g in rev.items() if n in trainable or n == "<input>"}
    assert_same_gradients(ref, rev)

    fused = reparam_zoo.fuse(converted.eval(), example_inputs=x[:1])
    assert fused.fuse_report.verified
    assert set(fused.state_dict()) == set(model.state_dict())
    assert fused.subnet2.level0.blocks[0].dwconv.__class__ is nn.Conv2d
    converted.eval()
    with torch.no_grad():
        assert torch.allclose(fused(x), converted(x), rtol=1e-9, atol=1e-12)
    # the folded weights load into the plain architecture
    plain = RevCol(**TINY, num_columns=3, num_classes=5).double().eval()
    plain.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain(x), fused(x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# DDP

DDP_MODEL = dict(TINY, num_columns=2, num_classes=3, drop_path_rate=0.0, save_memory=True)


def _ddp_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1, 2])


def _ddp_model():
    torch.manual_seed(0)
    return randomize_(RevCol(**DDP_MODEL)).double().train()


def _ddp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        x, y = _ddp_inputs()
        x, y = x[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2]
        for find_unused in (False, True):
            model = _ddp_model()
            ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
            for _ in range(2):  # a second step fails if the first left a parameter without gradient
                ddp.zero_grad(set_to_none=True)
                F.cross_entropy(ddp(x), y).backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            torch.save(grads, os.path.join(out_dir, f"rank{rank}_unused{int(find_unused)}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_with_and_without_find_unused_parameters(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = _ddp_model()
    x, y = _ddp_inputs()
    model.save_memory = False
    F.cross_entropy(model(x), y).backward()  # the whole batch in one ordinary process
    reference = {n: p.grad for n, p in model.named_parameters()}
    for find_unused in (0, 1):
        per_rank = [torch.load(tmp_path / f"rank{r}_unused{find_unused}.pt") for r in range(2)]
        for name, expected in reference.items():
            assert torch.equal(per_rank[0][name], per_rank[1][name]), name
        assert_same_gradients(reference, per_rank[0], rtol=1e-9)
