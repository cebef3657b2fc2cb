"""From a training-time model to a deployable one: fold RefConvs, fuse conv+BN, re-parameterize Rep
blocks, and verify that the result computes what the original computes."""
from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FrozenBatchNorm2d
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .errors import ConversionError
from .layers.refconv import RefConvNd
from .model_info import example_inputs as default_inputs, kept_modes, require_module, save_modes, unwrap
from .module_attrs import fuse_report_of, pop_refconv_summary, set_fuse_report
from .surgery import refconv_layers, replace_modules
from .verify import (CallInputs, Unit, as_call_inputs, check_runs, check_tolerances, tensor_leaves,
                     verify_equivalence)

# the norms fused into the conv before them: BatchNorm, and the frozen one torchvision's detectors train with
_NORMS = (_BatchNorm, FrozenBatchNorm2d)

# a tensor, a tuple of positional inputs (each any nesting of tensors: `([image],)` for a detector), or a
# dict of keyword inputs
Inputs = Any
# torch functions that read a tensor's metadata, not its values: not a use of a conv output
_METADATA_FUNCTIONS = frozenset([
    "__get__", "dim", "size", "numel", "nelement", "stride", "is_floating_point", "is_complex", "is_contiguous",
    "element_size", "get_device", "storage_offset", "data_ptr", "__len__", "__format__", "__repr__", "type",
])


@dataclass
class FuseReport:
    """What `fuse` did, and the error it measured.

    For a model that was already fused (and maybe converted to RefConv again since), the structural
    lists describe the whole history, so that the fused structure can be rebuilt from the report alone:
    `folded`, `fused` and `reparameterized` hold the earlier entries followed by the new ones,
    `left_alone` the norms still unfused now; `verified`, the errors, tolerances and `input_shapes` are
    those of the latest fuse.
    """

    folded: List[str] = field(default_factory=list)
    fused: List[Tuple[str, str]] = field(default_factory=list)  # (conv, norm)
    reparameterized: List[str] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)  # (norm, why)
    verified: bool = False
    max_abs_error: Optional[float] = None
    max_rel_error: Optional[float] = None
    rtol: float = 1e-4
    atol: float = 0.0
    input_shapes: List[List[int]] = field(default_factory=list)
    fold_only: bool = False  # RefConvs folded, norms and Rep blocks left as they were: the original keys
    modules_verified: int = 0  # units checked one by one on the inputs they received (verify.py)
    compared_outputs: List[str] = field(default_factory=list)  # modules whose outputs were compared; []: the model's

    def __str__(self) -> str:
        if self.fold_only:
            lines = [f"folded {len(self.folded)} RefConv layers (fold only: the original structure and "
                     "state_dict keys, BatchNorms and Rep blocks as they were)"]
        else:
            lines = [
                f"folded {len(self.folded)} RefConv layers, fused {len(self.fused)} conv+norm pairs, "
                f"re-parameterized {len(self.reparameterized)} blocks"
            ]
        for norm, why in self.left_alone:
            lines.append(f"  left alone: {norm} ({why})")
        if self.verified:
            outputs = f" (outputs of {', '.join(self.compared_outputs)})" if self.compared_outputs else ""
            per_module = (f"; {self.modules_verified} folded/fused modules each matched on the input it received"
                          if self.modules_verified else "")
            lines.append(
                f"verified on inputs {self.input_shapes}: max abs error {self.max_abs_error:.3g}, "
                f"max rel error {self.max_rel_error:.3g} (rtol={self.rtol:g}, atol={self.atol:g}) end to end"
                f"{outputs}{per_module}"
            )
        else:
            lines.append("NOT verified")
        return "\n".join(lines)


STAGES = ("plain", "refconv", "fused")


def model_stage(model: nn.Module) -> str:
    """`refconv` while RefConv layers are in the model, `fused` after `fuse`, `plain` otherwise."""
    model = unwrap(model)
    if refconv_layers(model):
        return "refconv"
    if fuse_report_of(model) is not None:
        return "fused"
    return "plain"


def nothing_to_fuse(model: nn.Module, *, fold_only: bool = False) -> bool:
    """Whether `fuse(model, fold_only=...)` has nothing to do: the model is fused (no RefConv layers since)
    and its fuse went as far as this one would (a fold-only model can still be fused)."""
    model = unwrap(model)
    report = fuse_report_of(model)
    return model_stage(model) == "fused" and (fold_only or not report.fold_only)


def fold(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Turn every RefConv back into a plain conv holding its refocused kernel (computed in float64).

    The result has the original model's state_dict keys and shapes, and the requires_grad flags the
    model had before `convert` froze it. A training wrapper (DDP, DataParallel, torch.compile) is looked
    through: the result is the plain model.
    """
    require_module(model, "fold")
    model = unwrap(model)
    if not inplace:
        model = copy.deepcopy(model)
    summary = pop_refconv_summary(model)
    folded = {id(m): m.to_conv() for m in model.modules() if isinstance(m, RefConvNd)}
    replace_modules(model, lambda m: folded.get(id(m)))
    model = folded.get(id(model), model)  # the model may be a RefConv itself
    if summary is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(summary.requires_grad_before.get(name, True))
    return model


def fuse(
    model: nn.Module,
    *,
    example_inputs: Optional[Inputs] = None,
    example_kwargs: Optional[Dict[str, Any]] = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 0.0,
    inplace: bool = False,
    fold_only: bool = False,
) -> nn.Module:
    """Fold RefConvs, re-parameterize Rep blocks, fuse conv+BatchNorm, in eval mode; verify by default.

    The result is a fused copy; `model` is left as it was (its train/eval modes too). With `inplace` the
    model itself is changed, also when verification then fails (it saves a copy's memory; keep your own
    copy if you need one). `example_inputs` (and `example_kwargs`) shape the random verification inputs
    (default: one image of the model's configured size; a list of one image for a detector): a tensor, a
    tuple of positional inputs each any nesting of tensors (`([image],)`), or a dict of keyword inputs.
    Verification (`reparam_zoo.verify`) runs float64 copies of both models at batch 1 and 2: every folded,
    fused or re-parameterized module on the input it received, and the continuous outputs end to end (a
    detector's backbone and heads before post-processing); each passes when its max abs error is at most
    `atol + rtol * max|its output|`.
    `fold_only` stops after folding: the result has the original model's structure and state_dict keys
    (loadable into the unconverted architecture), verified the same way. Raises `EquivalenceError` when
    verification fails; `result.fuse_report` says what was done.
    A model with nothing left to fuse (`nothing_to_fuse`) comes back as it is (a copy unless `inplace`, in
    eval mode) with the report its fuse recorded: comparing it with itself would call an unverified model
    verified.
    """
    require_module(model, "fuse")
    check_tolerances(rtol, atol)
    model = unwrap(model)
    if nothing_to_fuse(model, fold_only=fold_only):
        return (model if inplace else copy.deepcopy(model)).eval()
    if model.training:
        warnings.warn("fuse: the model was in train mode; it is fused in eval mode", stacklevel=2)
    restore_modes = save_modes(model)
    original = model.eval()
    try:
        inputs = as_call_inputs(example_inputs if example_inputs is not None else default_inputs(model),
                                example_kwargs)
        reference = copy.deepcopy(original) if (inplace and verify) else original
        model = original if inplace else copy.deepcopy(original)
        previous = fuse_report_of(original)
        report = FuseReport(rtol=rtol, atol=atol, fold_only=fold_only)

        report.folded = [n for n, m in model.named_modules() if isinstance(m, RefConvNd)]
        model = fold(model, inplace=True)
        fused: List[Tuple[str, str]] = []
        if fold_only:
            check_runs(model, inputs)
        else:
            # blocks an earlier fuse re-parameterized are merged already: their methods must not run again
            report.reparameterized = _reparameterize_blocks(
                model, skip=set(previous.reparameterized) if previous is not None else None)
            fused, report.left_alone = fuse_conv_bn(model, inputs)
            report.fused = fused
        units = changed_units(report.folded, fused, report.reparameterized)  # this fuse's, not the history's
        if previous is not None:
            report = _with_history(previous, report)
        model.eval()

        if verify:
            from .torchvision_models import continuous_output_modules

            outputs = continuous_output_modules(model)
            report.max_abs_error, report.max_rel_error, report.input_shapes = verify_equivalence(
                reference, model, inputs, rtol=rtol, atol=atol, absorbed=dict(fused), units=units,
                output_modules=outputs,
            )
            report.modules_verified, report.compared_outputs = len(units), list(outputs or [])
            report.verified = True
        set_fuse_report(model, report)
        return model
    finally:
        if not inplace:  # the caller's model is left as it was, also when verification fails
            restore_modes()


def _with_history(previous: FuseReport, latest: FuseReport) -> FuseReport:
    """The report of fusing an already fused model: the structure done before followed by what the
    latest fuse added (each name once), the norms the latest fuse left alone (the earlier ones are still
    there, so it found them again, unless it fused them now), and the latest fuse's verification."""

    def history(earlier, new):
        return list(dict.fromkeys([*earlier, *new]))

    return dataclasses.replace(
        latest,
        folded=history(previous.folded, latest.folded),
        fused=history([tuple(p) for p in previous.fused], latest.fused),
        reparameterized=history(previous.reparameterized, latest.reparameterized),
        left_alone=list(latest.left_alone),
        fold_only=previous.fold_only and latest.fold_only,  # earlier fusions keep the keys changed
    )


def changed_units(folded: Sequence[str], fused: Sequence[Tuple[str, str]], reparameterized: Sequence[str]) -> List[Unit]:
    """What one fuse changed, as units the verifier checks one by one: each re-parameterized block, each
    conv+norm pair (the norm's output from the conv's input), each folded RefConv not in a pair. Anything
    inside a re-parameterized block is checked with the block (its inner names may be new)."""
    blocks = list(reparameterized)

    def inside(name: str) -> bool:
        return any(name.startswith(b + ".") for b in blocks)

    units = [Unit(b, b, b, (b,)) for b in blocks]
    paired = set()
    for conv, norm in fused:
        paired.add(conv)
        if not inside(conv):
            units.append(Unit(conv, conv, norm, (conv, norm)))
    units += [Unit(n, n, n, (n,)) for n in folded if n not in paired and not inside(n) and n]
    return units


def fuse_conv_bn(model: nn.Module, inputs: CallInputs) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str]]]:
    """Fuse every BatchNorm that directly normalizes one conv's untouched output (found by tracing once).

    Returns (fused (conv, norm) pairs, norms left alone with the reason).
    """
    pairs, left_alone = _trace_conv_bn_pairs(model, inputs)
    modules = dict(model.named_modules())
    replacements: Dict[int, nn.Module] = {}
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        weight, bias = fuse_conv_bn_weights(
            conv.weight.double(), None if conv.bias is None else conv.bias.double(),
            bn.running_mean.double(), bn.running_var.double(), bn.eps,
            None if bn.weight is None else bn.weight.double(), None if bn.bias is None else bn.bias.double(),
            transpose=conv.transposed,
        )
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), conv.weight.requires_grad)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), conv.weight.requires_grad)
        replacements[id(bn)] = _after_norm(bn)
    replace_modules(model, lambda m: replacements.get(id(m)))
    return pairs, left_alone


def _trace_conv_bn_pairs(model: nn.Module, inputs):
    """Run once and pair each BN with the conv whose output it receives unchanged and unshared.

    Uses of a conv's output are seen at the level of torch functions (a TorchFunctionMode), so functional
    ops, tensors in lists or keyword arguments and the model's own outputs count as uses, not only modules;
    only what happens inside the BN that normalizes it, and metadata reads (`.shape`, `.dim()`), do not.
    """
    conv_of_output: Dict[int, Tuple[str, torch.Tensor, int]] = {}
    calls: Dict[str, int] = {}
    outside_uses: Dict[int, int] = {}
    bn_input: Dict[str, Optional[Tuple[str, int]]] = {}
    norms_reading: Dict[int, int] = {}  # conv output id -> how many BN calls normalize it
    normalizing: List[int] = []  # ids of the conv outputs the BNs running now normalize
    handles = []

    def use(t: torch.Tensor) -> None:
        known = conv_of_output.get(id(t))
        if known is not None and known[1] is t and id(t) not in normalizing:
            outside_uses[id(t)] = outside_uses.get(id(t), 0) + 1

    class Uses(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") not in _METADATA_FUNCTIONS:
                for value in pytree.tree_leaves((args, kwargs or {})):
                    if isinstance(value, torch.Tensor):
                        use(value)
            return func(*args, **(kwargs or {}))

    for name, module in model.named_modules():
        if not name or list(module.children()) and not isinstance(module, _NORMS):
            continue

        def pre_hook(mod, args, name=name):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(mod, _NORMS):
                x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                src = None if x is None else conv_of_output.get(id(x))
                unchanged = src is not None and src[1] is x and src[2] == x._version
                bn_input[name] = (src[0], id(x)) if unchanged else None
                if unchanged:
                    norms_reading[id(x)] = norms_reading.get(id(x), 0) + 1
                normalizing.append(None if x is None else id(x))

        handles.append(module.register_forward_pre_hook(pre_hook))
        if isinstance(module, _NORMS):
            def done(mod, args, out):
                normalizing.pop()  # (a hook that returns a value would replace the output)
            handles.append(module.register_forward_hook(done))
        if isinstance(module, nn.modules.conv._ConvNd):
            def hook(mod, args, out, name=name):
                conv_of_output[id(out)] = (name, out, out._version)
            handles.append(module.register_forward_hook(hook))
    try:
        with kept_modes(model, train=False), torch.no_grad(), Uses():
            outputs = check_runs(model, inputs)
        for value in tensor_leaves(outputs):
            use(value)  # returned as it is: the unnormalized map is part of the result
    finally:
        for h in handles:
            h.remove()

    modules = dict(model.named_modules())
    pairs, left_alone = [], []
    for name, module in modules.items():
        if not isinstance(module, _NORMS):
            continue
        source = bn_input.get(name)
        if name not in calls:
            left_alone.append((name, "not called in forward"))
        elif source is None:
            left_alone.append((name, "input is not a conv output"))
        elif calls[name] > 1 or calls.get(source[0], 0) > 1:
            left_alone.append((name, "shared module called more than once"))
        elif outside_uses.get(source[1], 0) > 0 or norms_reading[source[1]] > 1:
            left_alone.append((name, f"output of {source[0]} is also used elsewhere"))
        elif modules[source[0]].transposed and modules[source[0]].groups > 1:
            # torch's fuse_conv_bn_weights scales a transposed weight as if it had one group
            left_alone.append((name, "grouped transposed conv"))
        elif modules[source[0]].out_channels != _channels(module):
            left_alone.append((name, "channel count differs from the conv"))
        elif module.running_mean is None or module.running_var is None:
            left_alone.append((name, "no running statistics"))
        else:
            pairs.append((source[0], name))
    return pairs, left_alone


def apply_fuse_structure(model: nn.Module, report: FuseReport) -> nn.Module:
    """Give a freshly built model, in place, the structure `fuse` gave the model `report` describes:
    re-parameterize the listed Rep blocks, give the listed convs a bias and replace their norms by what
    stays after fusion. No weights are computed and nothing is verified: this only prepares a model for
    strict loading of a fused state_dict (e.g. from a saved model file)."""
    model.eval()
    wanted = set(report.reparameterized)
    done = _reparameterize_blocks(model, only=wanted)
    if set(done) != wanted:
        missing = sorted(wanted - set(done))
        raise ConversionError(f"cannot re-apply fuse structure: no Rep block named {', '.join(missing[:5])}")
    modules = dict(model.named_modules())
    replacements: Dict[int, nn.Module] = {}
    for conv_name, bn_name in report.fused:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if not isinstance(conv, nn.modules.conv._ConvNd) or not isinstance(bn, _NORMS):
            raise ConversionError(f"cannot re-apply fuse structure: no conv+norm pair {conv_name} + {bn_name}")
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
        replacements[id(bn)] = _after_norm(bn)
    replace_modules(model, lambda m: replacements.get(id(m)))
    set_fuse_report(model, report)
    return model


def _reparameterize_blocks(model: nn.Module, only: Optional[set] = None, skip: Optional[set] = None) -> List[str]:
    """Let Rep blocks (RepVGG, MobileOne, ...) merge their branches through their own methods,
    the way timm's `reparameterize_model` does, remembering which ones did (`only`: just these names;
    `skip`: not these, e.g. the blocks an earlier fuse merged already)."""
    done: List[str] = []

    def walk(parent: nn.Module, prefix: str):
        for child_name in list(parent._modules):
            # looked up now: a sibling's own method may have removed or replaced it meanwhile
            child = parent._modules.get(child_name)
            name = f"{prefix}{child_name}"
            if child is None or isinstance(child, nn.modules.conv._ConvNd):
                continue
            if (only is not None and name not in only) or (skip is not None and name in skip):
                pass
            elif _has_method(child, "fuse"):
                merged = child.fuse()
                # `fuse` may merge in place and return None (or self), or return the merged module
                if isinstance(merged, nn.Module):
                    setattr(parent, child_name, merged)
                done.append(name)
            elif _has_method(child, "reparameterize"):
                child.reparameterize()
                done.append(name)
            elif _has_method(child, "switch_to_deploy"):
                child.switch_to_deploy()
                done.append(name)
            now = parent._modules.get(child_name)
            if isinstance(now, nn.Module):  # the block's method may have removed it from its parent
                walk(now, name + ".")

    walk(model, "")
    return done


def _channels(norm: nn.Module) -> Optional[int]:
    stats = getattr(norm, "running_mean", None)
    return stats.numel() if isinstance(stats, torch.Tensor) else None


def _has_method(module: nn.Module, name: str) -> bool:
    """A method of that name (a submodule called `fuse` is no method: calling it would run its forward)."""
    value = getattr(module, name, None)
    return callable(value) and not isinstance(value, nn.Module)


def _after_norm(bn: nn.Module) -> nn.Module:
    """What stays of a norm layer once its affine map is fused: timm's BatchNormAct keeps drop + act."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    parts = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


