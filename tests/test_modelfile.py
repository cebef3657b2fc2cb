"""Model files: tagged architectures, save/load at every stage, refusals, and what a MODEL argument is.

`tiny_reptest` (registered with timm below) is a small net with a dense, a depthwise and a RepVGG-style
block, so that every structural change (RefConv, conv+BN fusion, Rep-block merge) is covered in
milliseconds; resnet18 at 32x32 stands for a real timm model.
"""
import json
import os

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models import build_model_with_cfg, register_model
from torch.nn.utils.fusion import fuse_conv_bn_weights

import reparam_zoo
from reparam_zoo import ArgumentConflictError, CheckpointError, ReparamError, convert, fuse
from reparam_zoo import modelfile as mf
from reparam_zoo import resolve
from reparam_zoo.surgery import refconv_layers

from helpers import outputs, randomize_bn


# -- a tiny registered architecture -----------------------------------------------------------------------

class RepBlock(nn.Module):
    """3x3 conv+BN plus a 1x1 conv+BN branch, merged into one 3x3 conv by `reparameterize` (RepVGG)."""

    def __init__(self, c):
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.merged = None

    def forward(self, x):
        if self.merged is not None:
            return F.relu(self.merged(x))
        return F.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)))

    def reparameterize(self):
        k3, b3 = _fused(self.conv3, self.bn3)
        k1, b1 = _fused(self.conv1, self.bn1)
        c = k3.shape[0]
        self.merged = nn.Conv2d(c, c, 3, padding=1, device=k3.device, dtype=k3.dtype)
        self.merged.weight.data.copy_(k3 + F.pad(k1, [1, 1, 1, 1]))
        self.merged.bias.data.copy_(b3 + b1)
        del self.conv3, self.bn3, self.conv1, self.bn1


def _fused(conv, bn):
    return fuse_conv_bn_weights(conv.weight, None, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


class TinyRepNet(nn.Module):
    def __init__(self, num_classes=10, in_chans=3, width=8, tie_heads=False, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn_dw = nn.BatchNorm2d(width)
        self.rep = RepBlock(width)
        self.head = nn.Linear(width, num_classes)
        self.aux = nn.Linear(width, num_classes) if tie_heads else None
        if tie_heads:
            self.aux.weight = self.head.weight  # tied: one tensor under two state_dict keys

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.rep(F.relu(self.bn_dw(self.dw(x))))
        x = x.mean((2, 3))
        return self.head(x) + (self.aux(x) if self.aux is not None else 0)

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = nn.Linear(self.head.in_features, num_classes)


default_cfgs = {"tiny_reptest": dict(input_size=(3, 32, 32), num_classes=10)}


@register_model
def tiny_reptest(pretrained=False, **kwargs):
    return build_model_with_cfg(TinyRepNet, "tiny_reptest", pretrained, **kwargs)


# the test model's own constructor arguments, allowed in its files (a model file is data: only what is registered)
mf.register_architecture_kwargs("tiny_reptest", width=lambda v: isinstance(v, int) and 0 < v <= 64,
                                tie_heads=lambda v: isinstance(v, bool))



def randomize_transforms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in refconv_layers(model):
            layer.transform_weight.copy_(torch.randn(layer.transform_weight.shape, generator=g) * 0.05)
    return model


def tiny(**kwargs):
    torch.manual_seed(0)
    return randomize_bn(mf.create_model("tiny_reptest", **kwargs))



X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def raw_metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


# -- architectures ------------------------------------------------------------------------------------------

def test_create_model_tags_the_architecture():
    model = mf.create_model("resnet18", num_classes=7)
    assert model.reparam_arch == {"name": "resnet18", "source": "timm", "kwargs": {"num_classes": 7, "in_chans": 3}}
    assert model.fc.out_features == 7
    zoo = mf.create_model("rexnetv1_100", num_classes=5, in_chans=1)
    assert zoo.reparam_arch["source"] == "zoo"
    assert zoo.reparam_arch["kwargs"] == {"num_classes": 5, "in_chans": 1}
    assert mf.create_model("revcol_tiny", num_classes=3).reparam_arch["source"] == "zoo"
    # the tag travels with the copies convert/fuse make
    assert mf.architecture_of(convert(model)) == model.reparam_arch


def test_create_model_errors_are_one_line():
    with pytest.raises(mf.ArchitectureError, match=r"unknown architecture 'resnet19'.*did you mean resnet18"):
        mf.create_model("resnet19")
    with pytest.raises(mf.ArchitectureError, match="cannot build resnet18"):
        mf.create_model("resnet18", no_such_argument=1)
    with pytest.raises(ReparamError, match="JSON-serializable"):
        mf.create_model("resnet18", act_layer=nn.ReLU)
    with pytest.raises(mf.ArchitectureError, match="non-negative integer"):
        mf.create_model("resnet18", num_classes=-1)


def test_pretrained_without_internet_suggests_a_checkpoint(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="could not get pretrained weights for resnet18.*--checkpoint"):
        mf.create_model("resnet18", pretrained=True)


def test_set_num_classes_changes_head_and_tag_and_the_file_rebuilds_it(tmp_path):
    model = tiny()
    mf.set_num_classes(model, 4)
    assert model.head.out_features == 4 and model.reparam_arch["kwargs"]["num_classes"] == 4
    mf.save(model, tmp_path / "m.safetensors")
    loaded = mf.load(tmp_path / "m.safetensors")
    assert loaded.head.out_features == 4
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)


def test_a_head_changed_behind_the_tags_back_is_refused_before_writing(tmp_path):
    model = tiny()
    model.reset_classifier(4)  # the tag still says 10 classes
    with pytest.raises(ReparamError, match="cannot save: .*head.weight.*set_num_classes"):
        mf.save(model, tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


# -- save / load at each stage -------------------------------------------------------------------------------

def test_plain_round_trip_and_metadata(tmp_path):
    model = tiny()
    path = mf.save(model, tmp_path / "plain.safetensors", extra_metadata={"epoch": 3, "top1": 71.5})
    meta = raw_metadata(path)
    assert set(meta) == {"format", "format_version", "reparam_version", "torch_version", "stage", "architecture",
                         "extra"}
    assert meta["format"] == "reparam-zoo" and meta["format_version"] == "1" and meta["stage"] == "plain"
    assert meta["reparam_version"] == reparam_zoo.__version__
    assert json.loads(meta["architecture"]) == {"name": "tiny_reptest", "source": "timm",
                                                "kwargs": {"num_classes": 10, "in_chans": 3}}
    assert json.loads(meta["extra"]) == {"epoch": 3, "top1": 71.5}
    loaded = mf.load(path)
    assert type(loaded) is TinyRepNet and loaded.reparam_extra == {"epoch": 3, "top1": 71.5}
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["plain.safetensors"]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 != 0o600  # the usual permissions, not mkstemp's


def test_loaded_tensors_are_aligned_so_the_model_computes_bit_for_bit_what_was_saved(tmp_path):
    # safetensors hands out tensors at their file offsets; MKL rounds differently on memory that is not
    # aligned as PyTorch allocates it (64 bytes), which made reloaded models differ in the last bit
    model = reparam_zoo.create_model("test_resnet", num_classes=3).eval()
    randomize_bn(model)
    misaligned = 0
    for pad in range(8):  # header lengths in 8-byte steps move every tensor's offset
        path = mf.save(model, tmp_path / f"m{pad}.safetensors", extra_metadata={"pad": "x" * pad})
        with safe_open(path, framework="pt") as f:
            misaligned += sum(f.get_tensor(k).data_ptr() % 64 != 0 for k in f.keys())
        loaded = mf.load(path)
        assert all(t.data_ptr() % 64 == 0 for t in loaded.state_dict().values())
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(outputs(loaded, x), outputs(model, x), rtol=0, atol=0)
    assert misaligned  # what the test is about did happen


def test_refconv_round_trip_resumes_training(tmp_path):
    model = randomize_transforms(convert(tiny(), map_k=1, init="xavier", exclude=["stem"],
                                         train_scope="transforms+norm"))
    path = mf.save(model, tmp_path / "m.refconv.safetensors")
    refconv = json.loads(raw_metadata(path)["refconv"])
    assert refconv == {"map_k": 1, "init": "xavier", "train_scope": "transforms+norm",
                       "converted": ["dw", "rep.conv3"]}
    loaded = mf.load(path)
    assert [n for n, _ in refconv_layers(loaded)] == ["dw", "rep.conv3"]
    assert loaded.refconv_summary.map_k == 1 and loaded.refconv_summary.train_scope == "transforms+norm"
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)
    # the same parameters train as before saving: transforms and norms, never base kernels
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"dw.transform_weight", "rep.conv3.transform_weight", "bn.weight"} <= trainable
    assert "stem.weight" not in trainable and "dw.weight_base" in dict(loaded.named_buffers())
    # and one step of training moves the transforms
    loaded.train()
    before = loaded.dw.transform_weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.1)
    loaded(X).square().mean().backward()
    optimizer.step()
    assert not torch.equal(before, loaded.dw.transform_weight)


def test_fused_round_trip_restores_the_structure(tmp_path):
    refconv = randomize_transforms(convert(tiny())).eval()
    fused = fuse(refconv, example_inputs=X[:1])
    path = mf.save(fused, tmp_path / "m.fused.safetensors")
    meta = raw_metadata(path)
    assert meta["stage"] == "fused" and "refconv" not in meta
    fuse_meta = json.loads(meta["fuse"])
    assert fuse_meta["reparameterized"] == ["rep"] and fuse_meta["verified"] is True
    assert fuse_meta["fused"] == [["stem", "bn"], ["dw", "bn_dw"]]
    assert fuse_meta["folded"] == ["stem", "dw", "rep.conv3"]
    assert fuse_meta["max_abs_error"] == fused.fuse_report.max_abs_error

    loaded = mf.load(path)
    assert not loaded.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    assert loaded.rep.merged is not None and loaded.stem.bias is not None
    assert loaded.fuse_report.fused == [("stem", "bn"), ("dw", "bn_dw")]
    assert loaded.fuse_report.max_abs_error == fused.fuse_report.max_abs_error
    assert list(loaded.state_dict()) == list(fused.state_dict())
    torch.testing.assert_close(outputs(loaded, X), outputs(fused, X), rtol=0, atol=0)
    torch.testing.assert_close(outputs(loaded, X), outputs(refconv, X), rtol=1e-4, atol=1e-5)


def test_resnet18_files(tmp_path):
    model = randomize_bn(mf.create_model("resnet18", num_classes=10))
    refconv = randomize_transforms(convert(model, include=["layer1.0.*"]))
    for stage, m in (("plain", model), ("refconv", refconv)):
        path = mf.save(m, tmp_path / f"{stage}.safetensors")
        assert mf.read_info(path).stage == stage
        torch.testing.assert_close(outputs(mf.load(path), X), outputs(m, X), rtol=0, atol=0)


def test_fused_then_converted_keeps_both_structures(tmp_path):
    fused = fuse(tiny().eval(), example_inputs=X[:1])
    again = randomize_transforms(convert(fused))
    path = mf.save(again, tmp_path / "m.safetensors")
    info = mf.read_info(path)
    assert info.stage == "refconv" and info.fuse.reparameterized == ["rep"]
    torch.testing.assert_close(outputs(mf.load(path), X), outputs(again, X), rtol=0, atol=0)


def test_fused_converted_and_fused_again_rebuilds_the_whole_history(tmp_path):
    once = fuse(randomize_transforms(convert(tiny()), seed=0).eval(), example_inputs=X[:1])
    first = once.fuse_report
    assert first.fused == [("stem", "bn"), ("dw", "bn_dw")] and first.reparameterized == ["rep"]
    again = randomize_transforms(convert(once), seed=1).eval()
    assert [n for n, _ in refconv_layers(again)] == ["stem", "dw", "rep.merged"]
    twice = fuse(again, example_inputs=X[:1])  # RepBlock.reparameterize would fail if it ran again
    report = twice.fuse_report
    assert report.fused == first.fused and report.reparameterized == ["rep"]
    assert report.folded == ["stem", "dw", "rep.conv3", "rep.merged"]
    # the verification numbers are the latest fuse's (against `again`), recomputed independently
    assert report.verified and report.max_rel_error != first.max_rel_error
    assert (report.max_abs_error, report.max_rel_error) == reparam_zoo.deploy.verify_equivalence(
        again, twice, (X[:1],), rtol=1e-4, atol=1e-5)[:2]
    assert not torch.equal(twice.stem.weight, once.stem.weight)  # the new transforms were folded in
    torch.testing.assert_close(outputs(twice, X), outputs(again, X), rtol=1e-4, atol=1e-5)

    path = mf.save(twice, tmp_path / "twice.fused.safetensors")
    fuse_meta = json.loads(raw_metadata(path)["fuse"])
    assert fuse_meta["fused"] == [["stem", "bn"], ["dw", "bn_dw"]] and fuse_meta["reparameterized"] == ["rep"]
    assert (fuse_meta["max_abs_error"], fuse_meta["max_rel_error"]) == (report.max_abs_error, report.max_rel_error)
    assert fuse_meta["input_shapes"] == [[1, 3, 32, 32], [2, 3, 32, 32]]
    info = mf.read_info(path)
    assert info.stage == "fused" and info.fuse.fused == first.fused
    loaded = mf.load(path)
    assert list(loaded.state_dict()) == list(twice.state_dict())
    for key, tensor in twice.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.fuse_report.fused == first.fused and loaded.fuse_report.reparameterized == ["rep"]
    assert loaded.fuse_report.max_abs_error == report.max_abs_error
    torch.testing.assert_close(outputs(loaded, X), outputs(twice, X), rtol=0, atol=0)

    # and a third round, from the loaded file, keeps going
    thrice = fuse(randomize_transforms(convert(loaded), seed=2).eval(), example_inputs=X[:1])
    assert thrice.fuse_report.fused == first.fused and thrice.fuse_report.reparameterized == ["rep"]
    reloaded = mf.load(mf.save(thrice, tmp_path / "thrice.fused.safetensors"))
    torch.testing.assert_close(outputs(reloaded, X), outputs(thrice, X), rtol=0, atol=0)


def test_cli_fuse_convert_fuse_writes_a_file_that_loads(tmp_path):
    from click.testing import CliRunner
    from reparam_cli.main import main

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args], prog_name="reparam")
        assert result.exit_code == 0, (args, result.stdout, result.stderr, result.exception)
        return result

    torch.manual_seed(0)
    plain = mf.save(randomize_bn(mf.create_model("test_resnet", num_classes=10)), tmp_path / "plain.safetensors")
    a, a_fused = tmp_path / "a.safetensors", tmp_path / "a.fused.safetensors"
    b, b_fused = tmp_path / "b.safetensors", tmp_path / "b.fused.safetensors"
    run("convert", plain, "--refconv", "--init", "xavier", "--input-size", "32", "-o", a)
    run("fuse", a, "--input-size", "32", "-o", a_fused)
    run("convert", a_fused, "--refconv", "--init", "xavier", "--input-size", "32", "-o", b)
    result = run("fuse", b, "--input-size", "32", "-o", b_fused)
    assert f"wrote {b_fused} [safetensors]" in result.stdout

    first, second = mf.read_info(a_fused).fuse, mf.read_info(b_fused).fuse
    assert mf.read_info(b_fused).stage == "fused" and mf.read_info(b).fuse.fused == first.fused
    assert len(first.fused) == 15 and second.fused == first.fused  # the first fuse's pairs are kept
    assert second.verified and second.max_abs_error > 0 and second.max_rel_error != first.max_rel_error

    refconv, fused = mf.load(b), mf.load(b_fused)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # the file holds exactly what fusing the converted model in memory gives
    in_memory = fuse(refconv.eval(), example_inputs=X[:1])
    assert in_memory.fuse_report.fused == second.fused
    assert in_memory.fuse_report.max_abs_error == second.max_abs_error
    assert list(fused.state_dict()) == list(in_memory.state_dict())
    for key, tensor in in_memory.state_dict().items():
        assert torch.equal(fused.state_dict()[key], tensor), key
    torch.testing.assert_close(outputs(fused, X), outputs(in_memory, X), rtol=0, atol=0)
    torch.testing.assert_close(outputs(fused, X), outputs(refconv, X), rtol=1e-4, atol=1e-5)


def test_tied_weights_are_saved_and_stay_tied(tmp_path):
    model = tiny(tie_heads=True)
    assert model.state_dict()["aux.weight"].data_ptr() == model.state_dict()["head.weight"].data_ptr()
    loaded = mf.load(mf.save(model, tmp_path / "tied.safetensors"))
    assert loaded.aux.weight is loaded.head.weight
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)


def test_buffers_computed_at_init_are_rebuilt_on_load(tmp_path):
    # Loading builds the module tree on the meta device and assigns the file's tensors; buffers that are
    # computed at init and not saved (here relative-position indices) need a real build.
    torch.manual_seed(0)
    model = mf.create_model("test_vit_relpos").eval()
    non_persistent = {n for m in model.modules() for n in m._non_persistent_buffers_set}
    assert "relative_position_index" in non_persistent
    loaded = mf.load(mf.save(model, tmp_path / "vit.safetensors")).eval()
    tensors = list(loaded.named_parameters()) + list(loaded.named_buffers())
    assert not any(t.is_meta for _, t in tensors)
    for (name, a), (_, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert torch.equal(a, b), name
    x = torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_half_precision_stays_half_and_wrappers_are_unwrapped(tmp_path):
    model = tiny().half()
    loaded = mf.load(mf.save(nn.DataParallel(model), tmp_path / "half.safetensors"))
    assert loaded.stem.weight.dtype == torch.float16
    assert torch.equal(loaded.stem.weight, model.stem.weight)


# -- refusals --------------------------------------------------------------------------------------------------

def test_non_finite_weights_are_refused_and_nothing_is_overwritten(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"previous content")
    model = tiny()
    with torch.no_grad():
        model.dw.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ReparamError, match=r"non-finite \(NaN/Inf\) weights in dw.weight"):
        mf.save(model, path)
    assert path.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_output_path_problems(tmp_path):
    with pytest.raises(ReparamError, match="does not exist"):
        mf.save(tiny(), tmp_path / "missing" / "m.safetensors")
    with pytest.raises(ReparamError, match="is a directory"):
        mf.save(tiny(), tmp_path)


def test_a_model_without_architecture_is_pickled_only_when_trusted(tmp_path):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(ReparamError, match="no rebuildable architecture.*trust_pickle"):
        mf.save(model, tmp_path / "m.pt")
    with pytest.raises(ReparamError, match="m.safetensors: a model without a rebuildable architecture is written as "
                                           "a whole-module pickle; name it <name>.pt"):
        mf.save(model, tmp_path / "m.safetensors", trust_pickle=True)
    with pytest.raises(ReparamError, match=r"m.pt: the model is written as a safetensors model file; name it "
                                           r"<name>.safetensors"):
        mf.save(tiny(), tmp_path / "m.pt")
    assert os.listdir(tmp_path) == []
    path = mf.save(model, tmp_path / "m.pt", trust_pickle=True)
    with pytest.raises(CheckpointError, match="pickled Python objects.*refused"):
        mf.load(path)
    loaded = mf.load(path, trust_pickle=True)
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)


def test_a_checkpoint_for_other_input_channels_builds_its_stem(tmp_path):
    torch.manual_seed(0)
    gray = timm.create_model("test_resnet", in_chans=1, num_classes=3).eval()
    torch.save(gray.state_dict(), tmp_path / "gray.pth")
    resolved = resolve.resolve_model(str(tmp_path / "gray.pth"), arch="test_resnet")
    assert "input channels from the checkpoint: 1 (not 3)" in resolved.notes
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(outputs(resolved.model, x), outputs(gray, x), rtol=0, atol=0)
    mf.save(resolved.model, tmp_path / "gray.safetensors")  # the file rebuilds the 1-channel stem
    torch.testing.assert_close(outputs(mf.load(tmp_path / "gray.safetensors"), x), outputs(gray, x), rtol=0, atol=0)


class TrainerState:  # what some training scripts pickle next to the weights
    def __init__(self):
        self.step = 7


def test_training_checkpoints_with_settings_load_and_other_objects_need_trust(tmp_path):
    import argparse

    model = tiny()
    # timm's and torchvision's train scripts: weights, EMA weights and the argparse settings
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1, model="tiny_reptest"),
                "epoch": 3}, tmp_path / "timm.pth.tar")
    loaded = resolve.load_model(tmp_path / "timm.pth.tar", arch="tiny_reptest")
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)

    torch.save({"state_dict": model.state_dict(), "trainer": TrainerState()}, tmp_path / "custom.pth")
    with pytest.raises(CheckpointError, match=r"custom.pth: contains pickled Python objects \(.*TrainerState\); "
                                              r"loading it would run arbitrary code, refused"):
        resolve.load_model(tmp_path / "custom.pth", arch="tiny_reptest")
    loaded = resolve.load_model(tmp_path / "custom.pth", arch="tiny_reptest", trust_pickle=True)
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)
    loaded = resolve.load_model("tiny_reptest", checkpoint=tmp_path / "custom.pth", trust_pickle=True)
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)


def test_trusted_pickles_may_hold_the_model_in_a_training_checkpoint(tmp_path):
    model = randomize_bn(TinyRepNet())
    torch.save({"model": model, "epoch": 3}, tmp_path / "ckpt.pt")
    torch.save({"epoch": 3}, tmp_path / "epoch.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.testing.assert_close(outputs(mf.load(tmp_path / "ckpt.pt", trust_pickle=True), X), outputs(model, X))
    with pytest.raises(CheckpointError, match="holds a dict, neither a model nor a state_dict"):
        mf.load(tmp_path / "epoch.pt", trust_pickle=True)
    with pytest.raises(CheckpointError, match="bare state_dict"):
        mf.load(tmp_path / "state.pt", trust_pickle=True)


def test_loading_bad_files(tmp_path):
    good = mf.save(tiny(), tmp_path / "good.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "trunc.safetensors").write_bytes(open(good, "rb").read()[:3000])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 8)
    torch.save(tiny().state_dict(), tmp_path / "state.pth")
    save_file(tiny().state_dict(), str(tmp_path / "bare.safetensors"))
    cases = {
        "nothing.safetensors": "no such file",
        "empty.safetensors": "file is empty",
        "trunc.safetensors": "not a readable safetensors file",
        "garbage.pth": "corrupt or truncated",
        "state.pth": "bare state_dict checkpoint.*--arch",
        "bare.safetensors": "without reparam metadata.*--arch",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            mf.load(tmp_path / name)


def _rewrite_metadata(src, dst, **changes):
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_newer_or_malformed_metadata_is_refused(tmp_path):
    good = mf.save(tiny(), tmp_path / "good.safetensors")
    with pytest.raises(CheckpointError, match="format 2, this reparam-zoo reads up to 1; upgrade"):
        mf.load(_rewrite_metadata(good, tmp_path / "v2.safetensors", format_version="2"))
    with pytest.raises(CheckpointError, match=r"malformed reparam metadata \(architecture: not valid JSON\)"):
        mf.load(_rewrite_metadata(good, tmp_path / "bad.safetensors", architecture="{not json"))
    with pytest.raises(CheckpointError, match=r"malformed reparam metadata \(stage"):
        mf.load(_rewrite_metadata(good, tmp_path / "stage.safetensors", stage="refconv"))
    unknown = json.dumps({"name": "no_such_net", "source": "zoo", "kwargs": {}})
    with pytest.raises(mf.ArchitectureError, match=r"'no_such_net' is not available here \(a reparam-zoo model;"):
        mf.load(_rewrite_metadata(good, tmp_path / "arch.safetensors", architecture=unknown))
    unknown = json.dumps({"name": "torchvision:resnet999", "source": "torchvision", "kwargs": {}})
    with pytest.raises(mf.ArchitectureError, match="'torchvision:resnet999' is not available here .*update torchvision"):
        mf.load(_rewrite_metadata(good, tmp_path / "tv.safetensors", architecture=unknown))


def test_tensors_that_do_not_fit_the_metadata_are_refused(tmp_path):
    good = mf.save(tiny(), tmp_path / "good.safetensors")
    other = json.dumps({"name": "tiny_reptest", "source": "timm", "kwargs": {"num_classes": 3}})
    with pytest.raises(CheckpointError, match=r"shape mismatches \(head.weight \(10, 8\) vs model \(3, 8\)"):
        mf.load(_rewrite_metadata(good, tmp_path / "other.safetensors", architecture=other))


def test_storable_unaliases_and_keeps_values():
    base = torch.arange(12.0)
    state = {"a": base, "b": base, "c": base.view(3, 4).t()}
    out = mf._storable(state)
    pointers = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(pointers) == 3 and all(t.is_contiguous() for t in out.values())
    for k in state:
        assert torch.equal(out[k], state[k])


# -- what a MODEL argument is -----------------------------------------------------------------------------------

@pytest.mark.parametrize("container, prefix", [
    ("state_dict", "model."),  # a LightningModule holding the network as self.model
    ("state_dict", "net."),
    ("state_dict_ema", ""),  # an EMA-only export
    ("model_ema", "module."),
])
def test_training_checkpoint_layouts_load(tmp_path, container, prefix):
    model = tiny()
    checkpoint = {container: {prefix + k: v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(checkpoint, tmp_path / "train.ckpt")
    loaded = mf.create_model("tiny_reptest")
    report = reparam_zoo.load_checkpoint(loaded, tmp_path / "train.ckpt")
    assert (f"stripped key prefix '{prefix}'" in report.notes) == bool(prefix)
    torch.testing.assert_close(outputs(loaded, X), outputs(model, X), rtol=0, atol=0)


def test_load_model_from_each_kind_of_argument(tmp_path):
    model = tiny()
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pth")
    save_file(model.state_dict(), str(tmp_path / "bare.safetensors"))
    mf.save(model, tmp_path / "file.safetensors")
    torch.save(model, tmp_path / "whole.pt")

    expected = outputs(model, X)
    by_name = resolve.resolve_model("tiny_reptest", checkpoint=tmp_path / "ckpt.pth")
    assert by_name.kind == "architecture" and "stripped key prefix 'module.'" in by_name.notes
    for resolved in (
        by_name,
        resolve.resolve_model(str(tmp_path / "ckpt.pth"), arch="tiny_reptest"),
        resolve.resolve_model(str(tmp_path / "bare.safetensors"), arch="tiny_reptest"),
        resolve.resolve_model(str(tmp_path / "file.safetensors")),
        resolve.resolve_model(str(tmp_path / "whole.pt"), trust_pickle=True),
    ):
        torch.testing.assert_close(outputs(resolved.model, X), expected, rtol=0, atol=0)
    assert resolve.load_model(str(tmp_path / "file.safetensors")).reparam_arch["name"] == "tiny_reptest"
    assert resolve.resolve_model(str(tmp_path / "whole.pt"), trust_pickle=True).kind == "pickle"


def test_load_model_errors(tmp_path):
    mf.save(tiny(), tmp_path / "file.safetensors")
    torch.save(tiny().state_dict(), tmp_path / "ckpt.pth")
    torch.save(mf.create_model("resnet18").state_dict(), tmp_path / "resnet.pth")
    torch.save(tiny(), tmp_path / "whole.pt")
    file, ckpt = str(tmp_path / "file.safetensors"), str(tmp_path / "ckpt.pth")
    with pytest.raises(mf.ArchitectureError, match="unknown architecture 'tiny_rep'"):
        resolve.load_model("tiny_rep")
    with pytest.raises(CheckpointError, match="missing.pth: no such file"):
        resolve.load_model(str(tmp_path / "missing.pth"))
    with pytest.raises(CheckpointError, match="does not fit TinyRepNet: .*missing keys.*unexpected keys"):
        resolve.load_model(str(tmp_path / "resnet.pth"), arch="tiny_reptest")
    with pytest.raises(ArgumentConflictError, match=r"ckpt.pth has a 10-class head, but num_classes / --num-classes asks for 4"):
        resolve.load_model("tiny_reptest", checkpoint=ckpt, num_classes=4)
    with pytest.raises(ArgumentConflictError, match="10-class head; --num-classes 4 does not fit"):
        resolve.load_model(file, num_classes=4)
    with pytest.raises(ArgumentConflictError, match="holds a tiny_reptest model, but --arch / arch= says resnet18"):
        resolve.load_model(file, arch="resnet18")
    with pytest.raises(ArgumentConflictError, match="is a file with weights already; --checkpoint / checkpoint="):
        resolve.load_model(file, checkpoint=ckpt)
    with pytest.raises(ArgumentConflictError, match="is a file with weights already; --pretrained / pretrained="):
        resolve.load_model(file, pretrained=True)
    with pytest.raises(ArgumentConflictError, match="both give the weights; pass one of them"):
        resolve.load_model("tiny_reptest", checkpoint=ckpt, pretrained=True)
    with pytest.raises(ArgumentConflictError, match="MODEL is the architecture tiny_reptest, but --arch / arch= says"):
        resolve.load_model("tiny_reptest", arch="resnet18")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        resolve.load_model(str(tmp_path / "whole.pt"))
    with pytest.raises(CheckpointError, match="bare state_dict"):
        resolve.load_model(ckpt, trust_pickle=True)


def test_public_api():
    from reparam_zoo import architectures

    homes = {"create_model": architectures, "save": mf, "load": mf, "load_model": resolve}
    for name, home in homes.items():
        assert getattr(reparam_zoo, name) is getattr(home, name)
