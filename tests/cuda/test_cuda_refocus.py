"""Refocus training steps on CUDA: float16 autocast with loss scaling, bfloat16, channels_last and
torch.compile, each against the float32 eager step on the same weights and batch."""
import copy

import pytest
import torch
import torch.nn.functional as F

from reparam_zoo import convert, create_model
from reparam_zoo.layers.refconv import RefConvNd

from helpers import randomize_bn

DEVICE = torch.device("cuda")
SIZE = 64


def refconv_model():
    torch.manual_seed(0)
    model = convert(randomize_bn(create_model("resnet10t", num_classes=10)))
    with torch.no_grad():  # transforms away from their zero init, so the refocused kernels matter
        for m in model.modules():
            if isinstance(m, RefConvNd):
                for p in m.parameters():
                    if p.requires_grad:
                        p.normal_(0, 0.02)
    return model.to(DEVICE).train()


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def trainable_grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def step_grads(model, x, y, *, dtype=None, scaler=None):
    """One forward/backward (no optimizer step); gradients unscaled when a scaler is given."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y)
    if scaler is not None:
        scaler.scale(loss).backward()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    return loss.detach().float(), trainable_grads(model)


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close_grads(reference, candidate, rtol):
    assert reference.keys() == candidate.keys()
    for name, expected in reference.items():
        assert torch.isfinite(candidate[name]).all(), name
        assert relative_error(candidate[name], expected) <= rtol, (name, relative_error(candidate[name], expected))


# Bounds from a run of this test under CPU autocast (5-9% for float16, 14-25% for bfloat16 on random labels,
# where the gradients are small differences): they catch unscaled, mis-cast or wrong gradients (off by
# orders of magnitude), not the precision itself.
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 0.15), (torch.bfloat16, 0.4)], ids=["fp16", "bf16"])
def test_mixed_precision_refocus_gradients_follow_float32(dtype, rtol):
    model = refconv_model()
    x, y = batch()
    loss32, ref = step_grads(model, x, y)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    loss, grads = step_grads(model, x, y, dtype=dtype, scaler=scaler)
    for _ in range(30):  # what GradScaler does in training: an overflowing scale is halved and the step redone
        if scaler is None or all(torch.isfinite(g).all() for g in grads.values()):
            break
        scaler.update()
        loss, grads = step_grads(model, x, y, dtype=dtype, scaler=scaler)
    assert abs(loss.item() - loss32.item()) <= 5e-2 * abs(loss32.item())
    assert_close_grads(ref, grads, rtol)  # finite too: with loss scaling, no step would have been skipped


def test_float16_training_steps_with_loss_scaling_change_only_the_transforms():
    model = refconv_model()
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_base")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    x, y = batch()
    losses = []
    for _ in range(20):  # the first steps may overflow the initial scale of 2**16 and be skipped
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same batch again and again: the loss must go down
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before))
    for name, b in model.named_buffers():
        if name in frozen:
            assert torch.equal(b, frozen[name]), f"{name}: a frozen base kernel changed"
    assert all(p.dtype == torch.float32 for p in trainable)  # master weights stay float32


def test_channels_last_matches_contiguous():
    model = refconv_model()
    x, y = batch()
    loss_ref, ref = step_grads(model, x, y)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    loss_cl, grads = step_grads(cl, x.contiguous(memory_format=torch.channels_last), y)
    assert torch.allclose(loss_cl, loss_ref, rtol=1e-5, atol=0)
    assert_close_grads(ref, grads, 1e-4)


def test_torch_compile_matches_eager():
    model = refconv_model()
    x, y = batch()
    loss_ref, ref = step_grads(model, x, y)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model)
    compiled_model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    assert torch.allclose(loss.detach(), loss_ref, rtol=1e-5, atol=0)
    assert_close_grads(ref, trainable_grads(compiled_model), 1e-4)
