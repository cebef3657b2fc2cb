"""torchvision classification models as `torchvision:<name>` architectures: building, tagging, model files,
head replacement (also with auxiliary heads and conv classifiers), state_dict checkpoints, and the CLI."""
import os

import pytest
import torch
import torch.nn as nn
import torchvision
from click.testing import CliRunner

import reparam_zoo
from reparam_zoo import CheckpointError
from reparam_zoo import modelfile as mf
from reparam_zoo import torchvision_models
from reparam_cli.main import main
from reparam_zoo.surgery import refconv_layers

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def outputs(model, x=X):
    with torch.no_grad():
        return model.eval()(x)


def test_names_and_data_config():
    assert mf.is_architecture("torchvision:resnet18") and mf.is_architecture("torchvision:inception_v3")
    assert mf.is_architecture("torchvision:fasterrcnn_resnet50_fpn")  # detectors too (tests/test_dense.py)
    assert not mf.is_architecture("torchvision:nope")
    model = mf.create_model("torchvision:inception_v3", num_classes=7, init_weights=False)
    assert type(model) is torchvision.models.Inception3
    assert model.reparam_arch == {"name": "torchvision:inception_v3", "source": "torchvision",
                                  "kwargs": {"num_classes": 7, "init_weights": False}}
    # the published weights' preprocessing: 299 crop of a 342 resize
    assert model.pretrained_cfg["input_size"] == (3, 299, 299)
    assert model.pretrained_cfg["crop_pct"] == pytest.approx(299 / 342)
    assert model.pretrained_cfg["num_classes"] == 7
    with pytest.raises(mf.ArchitectureError, match=r"did you mean torchvision:resnet18\b"):
        mf.create_model("torchvision:resnet181")


def test_converted_file_round_trip_and_fuse(tmp_path):
    torch.manual_seed(0)
    model = mf.create_model("torchvision:resnet18", num_classes=10)
    converted = reparam_zoo.convert(model)
    with torch.no_grad():
        for _, layer in refconv_layers(converted):
            layer.transform_weight.normal_(std=0.02)
    loaded = mf.load(mf.save(converted, tmp_path / "r18.refconv.safetensors"))
    assert type(loaded) is torchvision.models.ResNet and len(refconv_layers(loaded)) == 17
    torch.testing.assert_close(outputs(loaded), outputs(converted), rtol=0, atol=0)
    fused = reparam_zoo.fuse(loaded.eval())  # the default verification input comes from pretrained_cfg
    assert fused.fuse_report.verified and list(fused.fuse_report.input_shapes[0]) == [1, 3, 224, 224]
    torch.testing.assert_close(outputs(fused), outputs(converted), rtol=1e-4, atol=1e-4)


def test_set_num_classes_replaces_only_the_heads():
    torch.manual_seed(0)
    model = reparam_zoo.convert(mf.create_model("torchvision:resnet18"))
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}
    mf.set_num_classes(model, 4)
    assert model.fc.out_features == 4 and outputs(model).shape == (2, 4)
    assert model.reparam_arch["kwargs"]["num_classes"] == 4
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in body.items())
    assert len(refconv_layers(model)) == 17  # the conversion is kept

    googlenet = mf.create_model("torchvision:googlenet", aux_logits=True, init_weights=False)
    assert sorted(torchvision_models.replace_heads(
        googlenet, torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=False))
    ) == ["aux1.fc2", "aux2.fc2", "fc"]
    assert googlenet.aux1.fc2.out_features == googlenet.fc.out_features == 3

    squeezenet = mf.create_model("torchvision:squeezenet1_1")  # a 1x1 conv classifier
    mf.set_num_classes(squeezenet, 5)
    assert squeezenet.classifier[1].out_channels == 5 and squeezenet.num_classes == 5
    assert outputs(squeezenet).shape == (2, 5)


def test_pretrained_weights_keep_the_body_and_get_a_new_head(monkeypatch):
    published = torchvision.models.resnet18()
    real_get_model = torchvision.models.get_model

    def get_model(name, weights=None, **kwargs):
        if weights is not None:
            assert "num_classes" not in kwargs  # torchvision refuses a class count other than the weights'
            return published
        return real_get_model(name, weights=None, **kwargs)

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    model = mf.create_model("torchvision:resnet18", pretrained=True, num_classes=6)
    assert model.fc.out_features == 6 and model.reparam_arch["kwargs"]["num_classes"] == 6
    assert torch.equal(model.layer4[1].conv2.weight, published.layer4[1].conv2.weight)


def test_pretrained_without_internet_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="could not get pretrained weights for torchvision:resnet18 .*--checkpoint"):
        mf.create_model("torchvision:resnet18", pretrained=True)


def test_cli_convert_a_torchvision_state_dict_then_fuse(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), checkpoint)
    runner = CliRunner()
    wrong_head = runner.invoke(main, ["convert", str(checkpoint), "--arch", "torchvision:resnet18", "--num-classes",
                                      "5", "--refconv"])
    assert wrong_head.exit_code == 2
    assert "r18.pth has a 10-class head, but num_classes / --num-classes asks for 5" in wrong_head.output
    assert sorted(os.listdir(tmp_path)) == ["r18.pth"]

    # without --num-classes the head is the checkpoint's
    converted = runner.invoke(main, ["convert", str(checkpoint), "--arch", "torchvision:resnet18", "--refconv",
                                     "--input-size", "64"])
    assert converted.exit_code == 0, converted.output
    assert "head sized from the checkpoint: 10 classes (not 1000)" in converted.output
    fused = runner.invoke(main, ["fuse", str(tmp_path / "r18.refconv.safetensors"), "--input-size", "64"])
    assert fused.exit_code == 0, fused.output
    deployed = reparam_zoo.load(tmp_path / "r18.fused.safetensors")
    original = torchvision.models.resnet18(num_classes=10)
    original.load_state_dict(torch.load(checkpoint, weights_only=True))
    torch.testing.assert_close(outputs(deployed), outputs(original), rtol=1e-4, atol=1e-5)
    assert type(deployed) is torchvision.models.ResNet
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())


def test_cli_default_output_name_drops_the_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["convert", "torchvision:squeezenet1_1", "--refconv", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path) == ["squeezenet1_1.refconv.safetensors"]
