"""Training memory in reports: gradients and the activations autograd keeps, against hand counts, RefConv vs
the plain model it came from, RevCol's reversible saving, and the model left untouched."""
import json

import pytest
import timm
import torch
import torch.nn as nn

import reparam_zoo
from reparam_zoo.memory import training_memory
from reparam_zoo.report import compare, report

SIDE = 16
FLOAT = 4  # bytes


def three_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def test_hand_counted_activations_and_gradients():
    model = three_layers()
    memory = training_memory(model, (3, SIDE, SIDE))
    # conv1 keeps its input for its weight gradient, ReLU its output, which conv2 keeps too (one storage)
    assert memory.activation_bytes == (3 + 8) * SIDE * SIDE * FLOAT
    params = (8 * 3 * 9 + 8) + (4 * 8 * 9 + 4)
    assert memory.gradient_bytes == memory.weight_bytes == params * FLOAT
    model[0].requires_grad_(False)  # nothing before the first trainable layer needs keeping
    memory = training_memory(model, (3, SIDE, SIDE))
    assert memory.activation_bytes == 8 * SIDE * SIDE * FLOAT
    assert memory.gradient_bytes == (4 * 8 * 9 + 4) * FLOAT


def test_refconv_keeps_what_the_plain_model_keeps_and_adds_its_weight_state():
    plain = three_layers()
    converted = reparam_zoo.convert(plain)
    a, b = training_memory(plain, (3, SIDE, SIDE)), training_memory(converted, (3, SIDE, SIDE))
    assert b.activation_bytes == a.activation_bytes  # the refocused kernels are per step, not per image
    transforms = sum(l.transform_weight.numel() for _, l in reparam_zoo.surgery.refconv_layers(converted))
    assert b.gradient_bytes == transforms * FLOAT
    assert b.weight_bytes == a.weight_bytes + transforms * FLOAT


def test_depthwise_refconv_cache_is_weight_state_not_activation():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64))
    converted = reparam_zoo.convert(plain)
    a, b = training_memory(plain, (64, 8, 8)), training_memory(converted, (64, 8, 8))
    assert a.activation_bytes == b.activation_bytes == 64 * 8 * 8 * FLOAT  # the conv's input, nothing else
    patches = 64 * 9 * 9  # one (C*map_k^2) x prod(K) block of base-kernel neighbourhoods
    transforms = 64 * 64 * 9
    assert b.weight_bytes == a.weight_bytes + (transforms + patches) * FLOAT


def test_reversible_revcol_keeps_far_less():
    kwargs = dict(channels=(8, 16, 32, 64), layers=(1, 1, 1, 1), num_columns=4, num_classes=10)
    torch.manual_seed(0)
    ordinary = reparam_zoo.models.revcol.RevCol(**kwargs, save_memory=False)
    reversible = reparam_zoo.models.revcol.RevCol(**kwargs, save_memory=True)
    reversible.load_state_dict(ordinary.state_dict())
    a = report(ordinary, (3, 64, 64), depth=0)
    b = report(reversible, (3, 64, 64), depth=0)
    assert a.training["weight_bytes"] == b.training["weight_bytes"]
    assert a.training["activation_bytes"] > 10 * b.training["activation_bytes"] > 0
    row = {r["metric"]: r for r in compare(a, b).rows()}["activations / image (bytes)"]
    assert row["ratio"] == pytest.approx(b.training["activation_bytes"] / a.training["activation_bytes"])


def test_measuring_leaves_the_model_rng_and_statistics_as_they_were():
    model = timm.create_model("test_resnet", num_classes=5, drop_rate=0.5).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    r = report(model, (3, 32, 32), depth=0)
    assert r.training["activation_bytes"] > 0
    assert not model.training and not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


class FailsInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if self.training:
            raise RuntimeError("eval only\nsecond line")
        return self.conv(x).mean((2, 3))


def test_a_forward_that_fails_in_training_is_noted_not_fatal():
    r = report(FailsInTraining(), (3, 8, 8), depth=0)
    assert r.training["activation_bytes"] is None and r.training["gradient_bytes"] == (4 * 27 + 4) * FLOAT
    assert "activations not measured: the training-mode forward failed (RuntimeError: eval only)" in r.to_table()
    assert json.loads(r.to_json())["training"]["activation_bytes"] is None
    assert "activations / image" in r.to_table()
