"""The zoo's models against the behaviours timm's own model tests check (timm's tests/test_models.py is
the reference for the contract; these tests are the project's own): forward/backward, default cfg
fields, the reset_classifier/pooling contract, forward_features/forward_head, forward_intermediates,
features_only in the hook-based and getter-based feature classes, TorchScript, torch.fx forward and
backward, and fx then TorchScript. RevCol runs in both modes: reversible (save_memory=True, timm's
default build) and ordinary backprop.

Inputs are 64 px (feature maps 2x2 at stride 32) instead of timm's 96-384 px test sizes; variants too
big for a CPU test are checked on the meta device only.
"""
import math
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import create_feature_extractor, get_graph_node_names, set_scriptable
from timm.models._features import FeatureGetterNet, FeatureHookNet, FeatureListNet

import reparam_zoo.models  # noqa: F401  (registers the zoo)
from reparam_zoo.models.revcol import MAX_SCRIPTABLE_LEVELS, RevCol

SIZE = 64
REXNET_CPU = ["rexnetv1_090", "rexnetv1_100", "rexnetv1_130", "rexnetv1_150"]
REVCOL_CPU = ["revcol_tiny", "revcol_small"]
META_ONLY = ["rexnetv1_200", "rexnetv1_300", "revcol_base", "revcol_large", "revcol_xlarge", "revcol_huge"]
ALL_VARIANTS = REXNET_CPU + REVCOL_CPU + META_ONLY

# (model name, create_model kwargs): every CPU variant, RevCol in both of its training modes
CASES = [(n, {}) for n in REXNET_CPU] + [
    ("revcol_tiny", dict(save_memory=True)), ("revcol_tiny", dict(save_memory=False)),
    ("revcol_small", dict(save_memory=True)),  # timm's default build; its ordinary mode is revcol_tiny's code path
]
CASE_IDS = [n + ("" if not kw else ("-reversible" if kw["save_memory"] else "-ordinary")) for n, kw in CASES]
# the smallest of each architecture, for the slower checks (scripting, fx)
SMALL_CASES = [("rexnetv1_100", {}), ("revcol_tiny", dict(save_memory=True)), ("revcol_tiny", dict(save_memory=False))]
SMALL_IDS = ["rexnetv1_100", "revcol_tiny-reversible", "revcol_tiny-ordinary"]


@pytest.fixture(autouse=True)
def quiet_jit():
    # torch.jit.script is deprecated but supported; timm's scripting contract still uses it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        yield


def images(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def is_revcol(name: str) -> bool:
    return name.startswith("revcol")


def grads(model: torch.nn.Module) -> dict:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# ---- forward, backward, cfg, head ---------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_backward_reaches_every_parameter(name, kwargs):
    model = timm.create_model(name, num_classes=42, **kwargs).train()
    out = model(images(2))
    assert out.shape == (2, 42) and not out.isnan().any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"


@pytest.mark.parametrize("name", ALL_VARIANTS)
def test_default_cfg_fields_name_real_tensors(name):
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    cfg, state = model.pretrained_cfg, model.state_dict()
    assert model.num_classes == cfg["num_classes"] > 0 and model.num_features > 0 and model.head_hidden_size > 0
    classifier = state[cfg["classifier"] + ".weight"]
    assert classifier.shape[:2] == (cfg["num_classes"], model.num_features)
    assert state[cfg["first_conv"] + ".weight"].shape[1] == 3
    # pool_size: the unpooled map at the default input size (stride 32)
    assert tuple(cfg["pool_size"]) == tuple(s // 32 for s in cfg["input_size"][1:])
    with torch.device("meta"), torch.no_grad():
        features = model.forward_features(torch.empty(1, *cfg["input_size"]))
    assert features.shape == (1, model.num_features, *cfg["pool_size"])


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_forward_features_head_and_classifier_reset(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, model.num_features, SIZE // 32, SIZE // 32)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        assert torch.equal(model(x), model.forward_head(features))

        model.reset_classifier(0)
        assert model.num_classes == 0
        assert torch.equal(model(x), pre_logits)  # no classifier: forward gives the pre-logits

        model.reset_classifier(0, "")
        unpooled = model(x)
    assert unpooled.shape == features.shape  # no pooling either: the 4-D map
    if is_revcol(name):  # RevCol's head keeps its LayerNorm, applied at every position
        norm = model.cls.classifier[0]
        expected = F.layer_norm(features.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(unpooled, expected.permute(0, 3, 1, 2), rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(unpooled, features)


@pytest.mark.parametrize("name", ["rexnetv1_100", "revcol_tiny"])
def test_classifier_and_pooling_removed_at_construction(name):
    torch.manual_seed(0)
    reference = timm.create_model(name).eval()
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, global_pool="").eval()
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if k in model.state_dict()})
    with torch.no_grad():
        out = model(images())
        features = reference.forward_features(images())
    assert out.ndim == 4 and out.shape[-2:] == features.shape[-2:]
    assert model.get_classifier().__class__.__name__ == "Identity"


def pooled(features: torch.Tensor, pool: str) -> torch.Tensor:
    """timm's pool types, computed directly."""
    avg, mx = features.mean((2, 3)), features.amax((2, 3))
    return {"avg": avg, "fast": avg, "max": mx, "avgmax": 0.5 * (avg + mx), "catavgmax": torch.cat([avg, mx], 1)}[pool]


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax", "fast"])
def test_rexnet_pool_types(pool):
    model = timm.create_model("rexnetv1_100").eval()
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0, pool)
        torch.testing.assert_close(model(x), pooled(features, pool), rtol=1e-5, atol=1e-6)
        model.reset_classifier(5, pool)  # the 1x1 conv classifier takes the pooled width (2x for catavgmax)
        conv = model.get_classifier()
        assert conv.in_channels == pooled(features, pool).shape[1]
        expected = F.linear(pooled(features, pool), conv.weight.flatten(1), conv.bias)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    built = timm.create_model("rexnetv1_100", global_pool=pool, num_classes=7)
    assert built.get_classifier().in_channels == conv.in_channels


def test_rexnet_unpooled_classifier_gives_a_map_of_logits():
    model = timm.create_model("rexnetv1_100", num_classes=5, global_pool="").eval()
    with torch.no_grad():
        features = model.forward_features(images())
        logits = model(images())
    conv = model.get_classifier()
    assert logits.shape == (1, 5, SIZE // 32, SIZE // 32)
    torch.testing.assert_close(logits, F.conv2d(features, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "fast"])
def test_revcol_pool_types(pool):
    model = timm.create_model("revcol_tiny").eval()
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0, pool)
        norm = model.cls.classifier[0]
        expected = F.layer_norm(pooled(features, pool), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        model.reset_classifier(5, pool)
        fc = model.get_classifier()
        torch.testing.assert_close(model(x), F.linear(expected, fc.weight, fc.bias), rtol=1e-5, atol=1e-5)


def test_pooling_errors_are_clear():
    with pytest.raises(ValueError, match=r"RevCol: global_pool='catavgmax' changes the pooled width \(2x\)"):
        timm.create_model("revcol_tiny", global_pool="catavgmax")
    model = timm.create_model("revcol_tiny")
    with pytest.raises(ValueError, match="RevCol: global_pool='catavgmax' changes the pooled width"):
        model.reset_classifier(0, "catavgmax")
    for name in ("rexnetv1_100", "revcol_tiny"):
        with pytest.raises(ValueError, match=r"unknown global_pool 'median'; choose one of '', 'avg', 'max'"):
            timm.create_model(name, global_pool="median")
    rexnet = timm.create_model("rexnetv1_100")
    with pytest.raises(ValueError, match="ReXNetV1: unknown global_pool 'median'"):
        rexnet.reset_classifier(3, "median")
    assert rexnet.num_classes == 1000  # a refused reset changes nothing


# ---- features -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_forward_intermediates_match_feature_info(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    x = images()
    info = timm.models.FeatureInfo(model.feature_info, range(len(model.feature_info)))
    final, maps = model.forward_intermediates(x)
    assert len(maps) == len(info) >= 4
    for channels, reduction, m in zip(info.channels(), info.reduction(), maps):
        assert m.shape == (1, channels, math.ceil(SIZE / reduction), math.ceil(SIZE / reduction))
    assert torch.equal(final, model.forward_features(x))
    model.set_grad_checkpointing(True)
    checkpointed, _ = model.forward_intermediates(x)
    torch.testing.assert_close(checkpointed, final, rtol=1e-5, atol=1e-6)


FEATURE_CLASSES = {"list": FeatureListNet, "hook": FeatureHookNet, "getter": FeatureGetterNet}


@pytest.mark.parametrize("feature_cls", ["list", "hook", "getter"])
@pytest.mark.parametrize("name,kwargs", SMALL_CASES, ids=SMALL_IDS)
def test_features_only_classes_give_the_intermediate_maps(name, kwargs, feature_cls):
    if is_revcol(name) and feature_cls == "list":
        with pytest.raises(ValueError, match="feature_cls='list' needs a model whose top-level children run in seq"):
            timm.create_model(name, features_only=True, feature_cls="list", **kwargs)
        return
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, feature_cls=feature_cls, **kwargs).eval()
    assert isinstance(features, FEATURE_CLASSES[feature_cls])
    torch.manual_seed(0)  # the same random weights: features_only builds the full model first
    model = timm.create_model(name, **kwargs).eval()
    expected = model.forward_intermediates(images(), intermediates_only=True)
    got = features(images())
    assert features.feature_info.channels() == [m.shape[1] for m in expected]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_revcol_hooked_features_are_the_level_states_with_gradients_in_reversible_mode():
    """The hook taps the last column's states (not its level modules' outputs), after the reversible
    Function, so training through hook-based features gives the gradients of the getter."""
    results = {}
    for feature_cls in ("hook", "getter"):
        torch.manual_seed(0)
        features = timm.create_model(
            "revcol_tiny", features_only=True, feature_cls=feature_cls, save_memory=True, drop_path_rate=0.0
        )
        maps = features.train()(images(2))
        sum(m.square().mean() for m in maps).backward()
        results[feature_cls] = (maps, grads(features))
    (hook_maps, hook_grads), (getter_maps, getter_grads) = results["hook"], results["getter"]
    for h, g in zip(hook_maps, getter_maps):
        torch.testing.assert_close(h, g, rtol=0, atol=0)
    # the same parameters under each wrapper's prefix; the hook net keeps the head's unused LayerNorm
    hook_grads = {k.removeprefix("body."): v for k, v in hook_grads.items()}
    getter_grads = {k.removeprefix("model."): v for k, v in getter_grads.items()}
    assert set(hook_grads) - set(getter_grads) == {"cls.classifier.0.weight", "cls.classifier.0.bias"}
    assert all(v is not None for v in getter_grads.values())
    for name, g in getter_grads.items():
        torch.testing.assert_close(hook_grads[name], g, rtol=0, atol=0, msg=name)


# ---- TorchScript and fx -------------------------------------------------------------------------


def build_scriptable(name, **kwargs):
    with set_scriptable(True):
        return timm.create_model(name, **kwargs)


@pytest.mark.parametrize("name,kwargs", SMALL_CASES, ids=SMALL_IDS)
def test_torchscript_matches_eager(name, kwargs):
    model = build_scriptable(name, **kwargs).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(images()), model(images()), rtol=1e-5, atol=1e-6)


def test_scripted_reversible_revcol_trains_with_the_gradients_of_eager_reversible_mode():
    """TorchScript cannot call the reversible autograd Function: a scripted save_memory=True model runs
    ordinary backprop. Its gradients are those of the eager reversible model (activations are kept)."""
    torch.manual_seed(0)
    # no drop path: the two runs draw different random masks. float64: the reversible backward
    # reconstructs the states, exact only up to rounding
    model = build_scriptable("revcol_tiny", num_classes=10, save_memory=True, drop_path_rate=0.0).double().train()
    scripted = torch.jit.script(model)
    model(images(2).double()).logsumexp(1).mean().backward()
    eager = grads(model)
    model.zero_grad(set_to_none=True)
    scripted(images(2).double()).logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-9, atol=1e-12, msg=name)


def test_torchscript_level_limit_is_a_clear_error():
    model = RevCol(channels=(4,) * (MAX_SCRIPTABLE_LEVELS + 1), layers=(1,) * (MAX_SCRIPTABLE_LEVELS + 1),
                   num_columns=1, num_classes=0)
    with pytest.raises(ValueError, match=f"TorchScript supports RevCol with at most {MAX_SCRIPTABLE_LEVELS} levels"):
        torch.jit.script(model)


def fx_graph(model, train: bool):
    """timm's way to trace: torchvision's feature extractor with timm's leaf modules and functions,
    returning the last node of the train or eval graph."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, [(train_nodes if train else eval_nodes)[-1]])


def only_output(outputs: dict) -> torch.Tensor:
    (out,) = outputs.values()
    return out


@pytest.mark.parametrize("name,kwargs", SMALL_CASES, ids=SMALL_IDS)
def test_fx_forward_matches_eager(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    x = images()
    # grad enabled: the eager reversible path against the graph's ordinary path
    eager = model(x)
    assert torch.equal(only_output(fx_graph(model, train=False)(x)), eager)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), eager)  # plain fx, without timm's leaf lists
    with torch.inference_mode():
        assert torch.equal(only_output(fx_graph(model, train=False)(x)), model(x))


@pytest.mark.parametrize("name,kwargs", SMALL_CASES, ids=SMALL_IDS)
def test_fx_backward_gives_the_eager_gradients(name, kwargs):
    # float64: eager reversible RevCol reconstructs its states, exact only up to rounding.
    # Drop path on: the graph must draw the same masks in the same order and rescale them as eager does.
    model = timm.create_model(name, num_classes=42, drop_path_rate=0.1, **kwargs).double().train()
    if is_revcol(name):
        with torch.no_grad():  # layer scale starts at 1e-6: raise it so a wrong drop path shows in the gradients
            for block in model.modules():
                if hasattr(block, "gamma"):
                    block.gamma.fill_(0.5)
    graph = fx_graph(model, train=True)
    torch.manual_seed(1)  # the same dropout masks in both runs
    out = only_output(graph(images(2).double()))
    assert out.shape == (2, 42)
    out.mean().backward()
    traced = grads(graph)
    assert len(traced) == len(list(model.parameters()))
    graph.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model(images(2).double()).mean().backward()
    for name_, p in model.named_parameters():
        torch.testing.assert_close(traced[name_], p.grad, rtol=1e-9, atol=1e-12, msg=name_)


@pytest.mark.parametrize("name,kwargs", SMALL_CASES, ids=SMALL_IDS)
def test_fx_then_torchscript_matches_eager(name, kwargs):
    model = build_scriptable(name, **kwargs).eval()
    scripted = torch.jit.script(fx_graph(model, train=False))
    with torch.inference_mode():
        torch.testing.assert_close(only_output(scripted(images())), model(images()), rtol=1e-5, atol=1e-6)


def test_fx_graph_keeps_the_alpha_clamp():
    """The clamp is a leaf of the graph (its check is data-dependent), and it still runs there."""
    model = timm.create_model("revcol_tiny", num_classes=0).eval()
    graph = torch.fx.symbolic_trace(model)
    assert [n.target.__name__ for n in graph.graph.nodes if n.op == "call_function"].count("clamp_magnitude_") == 1
    with torch.no_grad():
        model.subnet2.alpha1[0, 3] = -1e-5
    graph(images())
    assert model.subnet2.alpha1[0, 3].item() == torch.tensor(-1e-3).item()  # float32 -1e-3


def test_traced_drop_path_keeps_its_rescaling_after_dead_code_elimination():
    """Issue 21's cause: timm's drop_path rescales its mask in place (`div_`) and uses the mask, so a
    traced graph's `div_` node has no users and `eliminate_dead_code()` (run by create_feature_extractor)
    removes it: the graph drops paths without rescaling. The zoo's DropPath divides out of place."""
    from timm.layers import DropPath as TimmDropPath
    from reparam_zoo.models.drop import DropPath

    x = torch.randn(64, 3, 2, 2, dtype=torch.float64)

    def eager_and_traced(module):
        module.train()
        graph = torch.fx.symbolic_trace(module)
        graph.graph.eliminate_dead_code()
        graph.recompile()
        torch.manual_seed(3)
        eager = module(x)
        torch.manual_seed(3)
        return eager, graph(x)

    eager, traced = eager_and_traced(DropPath(0.25))
    assert torch.equal(traced, eager)
    # independent computation: kept samples are x / 0.75, dropped ones 0, with the mask of the same draw
    torch.manual_seed(3)
    keep = torch.empty(64, 1, 1, 1, dtype=torch.float64).bernoulli_(0.75)
    assert 0 < keep.sum() < 64
    torch.testing.assert_close(eager, x * keep / 0.75, rtol=1e-15, atol=0)
    # bit-identical to timm's eager DropPath; timm's traced graph loses the 1/keep_prob scaling
    timm_eager, timm_traced = eager_and_traced(TimmDropPath(0.25))
    assert torch.equal(eager, timm_eager)
    torch.testing.assert_close(timm_traced, x * keep, rtol=0, atol=0)


def test_zoo_models_use_the_fx_safe_drop_path():
    from timm.layers import DropPath as TimmDropPath
    from reparam_zoo.models.drop import DropPath

    for name in ("rexnetv1_100", "revcol_tiny"):
        model = timm.create_model(name, drop_path_rate=0.1)
        kinds = {type(m) for m in model.modules() if isinstance(m, TimmDropPath)}
        assert kinds == {DropPath}, name
