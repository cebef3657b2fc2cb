"""RefConv layers: the transform math against an independent grouped conv, folding, caching, errors."""
import itertools

import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

import reparam_zoo.layers.refconv as refconv_module
from reparam_zoo import ConversionError, RefConv1d, RefConv2d, RefConv3d, RefConvNd
import reparam_zoo.layers.refocused_conv as refocused_conv_module

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
REFCONV = {1: RefConv1d, 2: RefConv2d, 3: RefConv3d}


def conv_configs():
    """(dims, kwargs): dense, grouped, depthwise, depthwise x2 multiplier; k 3/5/7, non-square; stride,
    dilation, every padding form and mode; with and without bias."""
    cases = []
    for dims, (cin, cout, groups), bias in itertools.product(
        (1, 2, 3), [(4, 6, 1), (4, 8, 2), (4, 4, 4), (4, 8, 4)], (True, False)
    ):
        cases.append((dims, dict(in_channels=cin, out_channels=cout, kernel_size=3, groups=groups, bias=bias,
                                 padding=1)))
    cases += [
        (2, dict(in_channels=3, out_channels=5, kernel_size=5, padding=2, stride=2)),
        (2, dict(in_channels=4, out_channels=4, kernel_size=7, padding=3, groups=4)),
        (2, dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding=(1, 2), groups=2)),
        (2, dict(in_channels=4, out_channels=4, kernel_size=(5, 3), padding="same", dilation=2)),
        (2, dict(in_channels=4, out_channels=8, kernel_size=3, padding="valid", stride=(2, 1))),
        (2, dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, padding_mode="reflect")),
        (2, dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, padding_mode="replicate", groups=4)),
        (2, dict(in_channels=4, out_channels=8, kernel_size=3, padding=1, padding_mode="circular", groups=2)),
        (1, dict(in_channels=4, out_channels=4, kernel_size=5, padding="same", padding_mode="reflect", dilation=2)),
        (3, dict(in_channels=2, out_channels=4, kernel_size=(3, 3, 5), padding=(1, 1, 2), padding_mode="circular")),
        (3, dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, groups=4, padding=1)),
    ]
    return cases


CONFIGS = conv_configs()
IDS = [f"{d}d-" + "-".join(f"{k}={v}" for k, v in kw.items() if k not in ("in_channels",)) for d, kw in CONFIGS]


def make(dims, kwargs, seed=0):
    torch.manual_seed(seed)
    conv = CONV[dims](**kwargs)
    x = torch.randn(2, kwargs["in_channels"], *([10] * dims))
    return conv, x


def independent_refocused_kernel(conv, transform_weight):
    """W_b + T(W_b) with T an ordinary nn.ConvNd in float64, built straight from the paper's definition."""
    w = conv.weight.detach().double()
    n, g = w.shape[0] * w.shape[1], conv.groups
    map_k = transform_weight.shape[-1]
    transform = CONV[w.dim() - 2](n, n, map_k, padding=map_k // 2, groups=n // g, bias=False).double()
    transform.weight.data.copy_(transform_weight.detach().double())
    return w + transform(w.reshape(1, n, *w.shape[2:])).reshape(w.shape)


@pytest.mark.parametrize("dims,kwargs", CONFIGS, ids=IDS)
def test_zero_init_is_exact_and_counts(dims, kwargs):
    conv, x = make(dims, kwargs)
    layer = REFCONV[dims].from_conv(conv)
    assert torch.equal(layer(x), conv(x))
    assert layer.transform_weight.numel() == conv.in_channels * conv.out_channels * 3 ** dims
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["transform_weight"]
    assert "weight_base" in dict(layer.named_buffers())
    assert torch.equal(layer.weight_base, conv.weight)


@pytest.mark.parametrize("dims,kwargs", CONFIGS, ids=IDS)
def test_random_transform_matches_independent_math_and_folds(dims, kwargs):
    conv, x = make(dims, kwargs)
    layer = RefConvNd.from_conv(conv, init="xavier")
    expected_kernel = independent_refocused_kernel(conv, layer.transform_weight)
    torch.testing.assert_close(layer.refocused_weight().double(), expected_kernel, rtol=1e-5, atol=1e-6)

    folded = layer.to_conv()
    assert type(folded) is type(conv)
    for attr in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(folded, attr) == getattr(conv, attr)
    y_ref, y_fold = layer(x), folded(x)
    rel = (y_fold - y_ref).abs().max() / y_ref.abs().max()
    assert rel <= 1e-5
    if conv.bias is not None:
        assert torch.equal(folded.bias, conv.bias)
        assert not layer.bias.requires_grad


@pytest.mark.parametrize("dims,kwargs", CONFIGS[::3], ids=IDS[::3])
def test_gradient_reaches_only_the_transform(dims, kwargs):
    conv, x = make(dims, kwargs)
    layer = RefConvNd.from_conv(conv, init="kaiming")
    layer(x).square().sum().backward()
    assert layer.transform_weight.grad is not None and layer.transform_weight.grad.abs().sum() > 0
    if layer.bias is not None:
        assert layer.bias.grad is None
    # the gradient equals autograd through the independent formulation
    tw = layer.transform_weight.detach().double().requires_grad_()
    w = conv.weight.detach().double()
    n, g = w.shape[0] * w.shape[1], conv.groups
    mixed = getattr(torch.nn.functional, f"conv{dims}d")(w.reshape(1, n, *w.shape[2:]), tw, padding=1, groups=n // g)
    kernel = w + mixed.reshape(w.shape)
    conv64 = RefConvNd.from_conv(conv.double()).to_conv()  # same attributes, float64
    y = conv64._conv_forward(x.double(), kernel, None if conv.bias is None else conv.bias.double())
    (grad,) = torch.autograd.grad(y.square().sum(), tw)
    torch.testing.assert_close(layer.transform_weight.grad.double(), grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims,groups", [(2, 4), (2, 8), (1, 6), (3, 2)], ids=["2d-g4", "2d-dw", "1d-dw", "3d-g2"])
def test_grouped_transform_gradients_match_autograd_to_second_order(dims, groups):
    # grouped and depthwise layers back-propagate through their own Function (the GEMM orientation): its
    # first and second derivatives against finite differences, with cached neighbourhoods as in training
    torch.manual_seed(0)
    conv = CONV[dims](8 if groups != 6 else 6, 8 if groups != 6 else 6, 3, groups=groups).double()
    layer = RefConvNd.from_conv(conv, init="kaiming")
    patches = layer._patches()
    torch.autograd.gradcheck(lambda t: refconv_module.refocus_kernel(layer.weight_base, t, patches),
                             (layer.transform_weight.detach().clone().requires_grad_(),))
    torch.autograd.gradgradcheck(lambda t: refconv_module.refocus_kernel(layer.weight_base, t, patches).square(),
                                 (layer.transform_weight.detach().clone().requires_grad_(),))


def test_map_k_five_on_seven_kernel():
    conv, x = make(2, dict(in_channels=3, out_channels=4, kernel_size=7, padding=3))
    layer = RefConv2d.from_conv(conv, map_k=5, init="xavier")
    assert layer.transform_weight.shape == (12, 1, 5, 5)
    torch.testing.assert_close(layer.refocused_weight().double(),
                               independent_refocused_kernel(conv, layer.transform_weight), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "conv,map_k,message",
    [
        (nn.Conv2d(2, 2, 3), 2, "map_k must be a positive odd integer"),
        (nn.Conv2d(2, 2, (1, 3)), 3, "smaller than map_k=3"),
        (nn.Conv2d(2, 2, 3), 5, "smaller than map_k=5"),
        (nn.Conv2d(2, 2, 1), 3, "1x1"),
        (nn.ConvTranspose2d(2, 2, 3), 3, "transposed"),
        (nn.Conv1d(2, 2, 3), 3, "RefConv2d needs a 2d conv"),
    ],
)
def test_clear_errors(conv, map_k, message):
    with pytest.raises(ConversionError, match=message):
        RefConv2d.from_conv(conv, map_k=map_k)


def test_unknown_init():
    with pytest.raises(ConversionError, match="unknown init 'ones'"):
        RefConv2d.from_conv(nn.Conv2d(2, 2, 3), init="ones")


def test_conv_subclass_keeps_its_forward():
    torch.manual_seed(0)
    conv = Conv2dSame(3, 4, 3, stride=2)  # TF-style asymmetric "same" padding in forward()
    x = torch.randn(1, 3, 9, 9)
    layer = RefConv2d.from_conv(conv)
    assert torch.equal(layer(x), conv(x))
    layer.reset_transform("xavier")
    folded = layer.to_conv()
    assert type(folded) is Conv2dSame
    torch.testing.assert_close(folded(x), layer(x), rtol=1e-5, atol=1e-6)


def test_no_grad_path_reuses_the_kernel_until_the_transform_changes(monkeypatch):
    conv, x = make(2, dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4))
    layer = RefConv2d.from_conv(conv, init="xavier").eval()
    calls, training_calls = [], []
    original, original_into = refconv_module.refocus_kernel, refconv_module.refocus_into
    monkeypatch.setattr(refconv_module, "refocus_kernel", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(refconv_module, "refocus_into",
                        lambda *a, **k: training_calls.append(1) or original_into(*a, **k))
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
    assert len(calls) == 1 and torch.equal(y1, y2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()  # with grad: the training kernel, computed once for forward and backward
    optimizer.step()
    assert len(calls) == 1 and len(training_calls) == 1
    with torch.no_grad():
        y3 = layer(x)
    assert len(calls) == 2 and not torch.equal(y3, y1)
    torch.testing.assert_close(y3, layer.to_conv()(x), rtol=1e-5, atol=1e-6)


def test_weight_property_and_attributes_read_through():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2)
    layer = RefConv2d.from_conv(conv)
    assert (layer.in_channels, layer.out_channels, layer.stride, layer.groups) == (4, 8, (2, 2), 2)
    assert torch.equal(layer.weight, conv.weight)
    assert layer.transform_macs() == layer.transform_weight.numel() * 9


def test_dtype_and_device_moves_invalidate_caches():
    conv, x = make(2, dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4))
    layer = RefConv2d.from_conv(conv, init="xavier").eval()
    with torch.no_grad():
        y = layer(x)
        y64 = layer.double()(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64.float(), y, rtol=1e-5, atol=1e-6)


# -- the evaluation-time kernel cache -----------------------------------------------------------------------------

def _reference_output(layer, x):
    import torch.nn.functional as F

    with torch.no_grad():
        return F.conv2d(x, layer.refocused_weight(), layer.bias, layer.stride, layer.padding, layer.dilation,
                        layer.groups)


def test_cache_follows_in_place_updates_and_is_cleared_after_data_writes():
    torch.manual_seed(0)
    layer = RefConvNd.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=2), init="kaiming").eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        layer(x)
        layer.transform_weight.mul_(2)  # seen by the version counter: no clearing needed
        torch.testing.assert_close(layer(x), _reference_output(layer, x), rtol=0, atol=0)
    # writes through .data are invisible to version counters: clear_kernel_caches makes them count
    layer.transform_weight.data.mul_(3)
    layer.weight_base.data.add_(1)
    refconv_module.clear_kernel_caches(nn.Sequential(layer))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference_output(layer, x), rtol=0, atol=0)


def test_inference_mode_builds_runs_and_does_not_leak_into_autograd():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    with torch.inference_mode():  # inference tensors have no version counter: computed, not cached
        built = RefConvNd.from_conv(nn.Conv2d(4, 4, 3, padding=1), init="xavier")
        out = built(x)
    torch.testing.assert_close(out, _reference_output(built, x), rtol=0, atol=0)
    layer = RefConvNd.from_conv(nn.Conv2d(4, 4, 3, padding=1), init="xavier").requires_grad_(False)
    with torch.inference_mode():
        layer(x)  # a kernel computed here is an inference tensor
    wanted = x.clone().requires_grad_()
    layer(wanted).square().sum().backward()  # ... which autograd outside must not be given
    expected = x.clone().requires_grad_()
    import torch.nn.functional as F

    F.conv2d(expected, layer.refocused_weight().detach(), layer.bias, padding=1).square().sum().backward()
    torch.testing.assert_close(wanted.grad, expected.grad)


def test_a_refconv_takes_the_mode_of_its_conv():
    assert not RefConvNd.from_conv(nn.Conv2d(3, 3, 3).eval()).training
    assert RefConvNd.from_conv(nn.Conv2d(3, 3, 3)).training


@pytest.mark.parametrize("groups", [1, 8])
def test_cache_is_keyed_by_tensor_identity_not_address(groups):
    # functional_call with temporaries: a freed tensor's address is reused by the next one, same version
    torch.manual_seed(0)
    layer = RefConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False), init="kaiming").eval()
    start = layer.transform_weight.detach().clone()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        for scale in (0.0, 0.5, 1.0):
            transform = start * scale
            out = torch.func.functional_call(layer, {"transform_weight": transform}, (x,))
            kernel = refconv_module.refocus_kernel(layer.weight_base, transform)
            expected = nn.functional.conv2d(x, kernel, padding=1, groups=groups)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            del transform, out


def test_kernel_cached_under_autocast_is_the_layers_own_dtype():
    torch.manual_seed(0)
    layer = RefConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, groups=8), init="kaiming").eval()
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        expected = layer(x)
        refconv_module.clear_kernel_caches(layer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_export_and_compile_capture_grouped_transforms_without_caches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    from reparam_zoo import convert

    converted = convert(model, init="kaiming").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = converted(x)
    program = torch.export.export(converted, (x,))
    torch.testing.assert_close(program.module()(x), expected, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.explain(converted)(x).graph_break_count == 0


def test_constructor_checks_and_copies_without_caches():
    import copy

    with pytest.raises(ConversionError, match="RefConvNd is the shared base class"):
        RefConvNd(nn.Conv2d(2, 2, 3))
    with pytest.raises(ConversionError, match="map_k must be a positive odd integer, got True"):
        RefConv2d.from_conv(nn.Conv2d(2, 2, 3), map_k=True)
    layer = RefConv2d.from_conv(nn.Conv2d(4, 4, 3), init="kaiming")
    with pytest.raises(ConversionError, match="unknown init 'Zero'"):
        layer.reset_transform("Zero")
    layer.reset_transform("zero")
    assert layer.init == "zero" and not layer.transform_weight.any()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 4, 8, 8))
    assert layer._kernel_cache is not None
    assert copy.deepcopy(layer)._kernel_cache is None  # copies carry weights, not derived kernels


def test_folded_conv_takes_the_layers_current_mode():
    layer = RefConv2d.from_conv(nn.Conv2d(4, 4, 3).eval())
    assert not layer.training
    assert layer.train().to_conv().training and not layer.eval().to_conv().training


# -- the training path: one autograd Function with the kernel in the layer's buffer ------------------------------

def _step_results(layer, x, grad_out, fused, monkeypatch):
    """Output and gradients (input, transform, bias) of one forward + backward, through the one-Function
    training path or (fused=False) through the separate differentiable ops."""
    if not fused:
        monkeypatch.setattr(layer, "_runs_as_one_function", lambda *a: False)
    x = x.clone().requires_grad_()
    layer.transform_weight.grad = None
    if layer.bias is not None:
        layer.bias.requires_grad_(True)
        layer.bias.grad = None
    y = layer(x)
    y.backward(grad_out)
    monkeypatch.undo()
    return [y, x.grad, layer.transform_weight.grad] + ([] if layer.bias is None else [layer.bias.grad])


@pytest.mark.parametrize("dims,kwargs", CONFIGS, ids=IDS)
def test_training_path_matches_a_plain_conv_with_the_independent_kernel(dims, kwargs, monkeypatch):
    conv, x = make(dims, kwargs)
    layer = RefConvNd.from_conv(conv, init="kaiming")
    assert layer._runs_as_one_function(x, layer.transform_weight)
    # chunks of a few kernel slices each, so that the chunked kernel math runs over many chunk boundaries
    monkeypatch.setattr(refocused_conv_module, "SCRATCH_BYTES", 3 * layer.weight_base[0, 0].nbytes)
    grad_out = torch.randn_like(conv(x))
    fused = _step_results(layer, x, grad_out, True, monkeypatch)
    # independent: a float64 plain conv of the same class and attributes with the paper's kernel
    tw = layer.transform_weight.detach().double().requires_grad_()
    bias = None if conv.bias is None else conv.bias.detach().double().requires_grad_()
    x64 = x.double().requires_grad_()
    conv64 = RefConvNd.from_conv(conv.double()).to_conv()
    w = conv.weight.detach().double()
    n = w.shape[0] * w.shape[1]
    image = w.reshape(1, n, *w.shape[2:])
    mixed = getattr(torch.nn.functional, f"conv{dims}d")(image, tw, padding=1, groups=n // conv.groups)
    y = conv64._conv_forward(x64, w + mixed.reshape(w.shape), bias)
    y.backward(grad_out.double())
    expected = [y, x64.grad, tw.grad] + ([] if bias is None else [bias.grad])
    for got, want in zip(fused, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    # and the separate ops' floats up to rounding (the same ops, but a chunk may take another conv kernel)
    for got, want in zip(fused, _step_results(layer, x, grad_out, False, monkeypatch)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups,map_k,kernel", [(1, 3, 3), (1, 3, 5), (2, 3, 3), (4, 3, 3)],
                         ids=["dense", "dense-map3-on-5", "grouped", "depthwise"])
def test_training_function_gradients_to_second_order(groups, map_k, kernel):
    torch.manual_seed(0)
    channels = 2 if groups == 1 else 4  # a dense layer's double backward is a float64 grouped conv: slow
    layer = RefConv2d.from_conv(nn.Conv2d(channels, channels, kernel, padding=1, groups=groups).double(),
                                map_k=map_k, init="kaiming")
    x = torch.randn(1, channels, 4, 4, dtype=torch.float64, requires_grad=True)
    transform = layer.transform_weight

    def run(x, t):
        return torch.func.functional_call(layer, {"transform_weight": t}, (x,))

    assert layer._runs_as_one_function(x, transform)
    torch.autograd.gradcheck(run, (x, transform))
    torch.autograd.gradgradcheck(lambda x, t: run(x, t).square(), (x, transform))


def test_training_keeps_one_kernel_buffer_and_allocates_only_the_gradient(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    layer = RefConv2d.from_conv(nn.Conv2d(256, 256, 3, padding=1, bias=False), init="kaiming")
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(1, 256, 3, 3)
    kernel_bytes = layer.weight_base.nbytes
    monkeypatch.setattr(refocused_conv_module, "SCRATCH_BYTES", kernel_bytes // 8)  # temporaries: chunks, smaller

    class LargeNewStorages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    if t.untyped_storage().nbytes() >= kernel_bytes:
                        self.sizes.append(t.untyped_storage().nbytes())
            return out

    def step():
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    buffer = layer._kernel_cache[1]
    counter = LargeNewStorages()
    before = layer.transform_weight.detach().clone()  # the transform this step's kernel comes from
    with counter:
        step()
    assert layer._kernel_cache[1] is buffer  # rewritten in place, not a new tensor
    assert counter.sizes == [kernel_bytes]  # the kernel's gradient, which becomes the transform's
    with torch.no_grad():
        expected = refconv_module.refocus_kernel(layer.weight_base, before)
    torch.testing.assert_close(buffer, expected, rtol=1e-6, atol=1e-7)


def test_training_path_falls_back_where_it_cannot_run():
    layer = RefConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1), init="kaiming")
    x = torch.randn(1, 4, 6, 6)
    assert layer._runs_as_one_function(x, layer.transform_weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer._runs_as_one_function(x, layer.transform_weight)
        assert layer(x).dtype == torch.bfloat16
    assert not layer._runs_as_one_function(x.double(), layer.transform_weight)
    same = RefConv2d.from_conv(Conv2dSame(4, 4, 3, stride=2), init="kaiming")
    assert same.keeps_kernel_in_graph() and not same._runs_as_one_function(x, same.transform_weight)
    assert not layer.keeps_kernel_in_graph()


def test_training_path_with_a_layer_called_twice_per_step(monkeypatch):
    """A layer runs twice, with two transforms, before one backward: the first forward's backward finds the
    buffer holding the second forward's kernel and must still use its own."""
    torch.manual_seed(0)
    layer = RefConv2d.from_conv(nn.Conv2d(3, 3, 3, padding=1), init="kaiming")
    x = torch.randn(2, 3, 5, 5)
    t1 = layer.transform_weight.detach().clone().requires_grad_()
    t2 = (2 * t1.detach()).requires_grad_()

    def run(fused):
        if not fused:
            monkeypatch.setattr(layer, "_runs_as_one_function", lambda *a: False)
        assert layer._runs_as_one_function(x, t1) == fused
        t1.grad = t2.grad = None
        first = torch.func.functional_call(layer, {"transform_weight": t1}, (x,))
        second = torch.func.functional_call(layer, {"transform_weight": t2}, (first,))
        (first.square().sum() + second.sum()).backward()
        monkeypatch.undo()
        return first, second, t1.grad, t2.grad

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_training_path_under_activation_checkpointing(reentrant):
    """torch.utils.checkpoint reruns the forward in the backward (a second training forward of every layer):
    the gradients are those of the ordinary backward."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=4))
    layers = [RefConvNd.from_conv(c, init="kaiming") for c in (net[0], net[2])]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1])
    x = torch.randn(2, 3, 7, 7, requires_grad=reentrant)

    def grads(checkpointed):
        model.zero_grad(set_to_none=True)
        y = checkpoint(model, x, use_reentrant=reentrant) if checkpointed else model(x)
        y.square().sum().backward()
        return [layer.transform_weight.grad for layer in layers]

    assert all(layer._runs_as_one_function(x, layer.transform_weight) for layer in layers)
    for got, want in zip(grads(True), grads(False)):
        if reentrant:  # its backward also differentiates the input, which may round differently
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, want)
