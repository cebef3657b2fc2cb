"""RevCol's reversible backward on CUDA against ordinary backprop, with drop path: the backward must
replay the forward's CUDA random numbers (drop-path masks) to reconstruct the activations."""
import pytest
import timm
import torch

from reparam_zoo.models.revcol import RevCol

from test_revcol import TINY, assert_same_gradients, randomize_

DEVICE = torch.device("cuda")


def gradients(model, x, *, save_memory, seed=1):
    model.save_memory = save_memory
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # seeds the CUDA generators too: both modes draw the same forward masks
    loss = model(x).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["<input>"] = x.grad
    return loss.detach(), grads


def test_float64_reversible_gradients_equal_backprop_with_drop_path():
    torch.manual_seed(0)
    model = randomize_(RevCol(**TINY, num_columns=3, num_classes=5, drop_path_rate=0.4)).double().to(DEVICE).train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    loss_ref, ref = gradients(model, x, save_memory=False)
    loss_rev, rev = gradients(model, x, save_memory=True)
    assert torch.equal(loss_ref, loss_rev)
    assert_same_gradients(ref, rev, rtol=1e-9)


def test_float32_reversible_gradients_close_to_backprop_with_drop_path():
    torch.manual_seed(0)
    model = randomize_(timm.create_model("revcol_tiny", num_classes=10, drop_path_rate=0.3)).to(DEVICE).train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    loss_ref, ref = gradients(model, x, save_memory=False)
    loss_rev, rev = gradients(model, x, save_memory=True)
    assert torch.equal(loss_ref, loss_rev)
    assert_same_gradients(ref, rev, rtol=1e-3)


def test_a_different_drop_path_draw_gives_different_gradients():
    """The replay is what makes them equal: without the same masks the gradients differ (the check can fail)."""
    torch.manual_seed(0)
    model = randomize_(RevCol(**TINY, num_columns=3, num_classes=5, drop_path_rate=0.4)).double().to(DEVICE).train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, device=DEVICE)
    _, a = gradients(model, x, save_memory=True, seed=1)
    _, b = gradients(model, x, save_memory=True, seed=2)
    with pytest.raises(AssertionError):
        assert_same_gradients(a, b, rtol=1e-9)
