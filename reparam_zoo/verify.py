"""The equivalence verifier: does a folded/fused model compute what the original computes?

Two checks, both on float64 copies of the two models, so that they see the fold/fuse math and not float32
rounding:

* **per module**: every folded RefConv, fused conv+norm pair and re-parameterized block is run on the
  input it actually received in one forward pass of the original (captured with hooks) and compared
  with what the original module(s) returned there, each against the scale of its own output. A deep
  random-weight model whose final output hardly depends on its input cannot hide a wrong fold this way,
  and the failure names the module.
* **end to end**: the model's continuous outputs. Detectors' final boxes pass through score thresholds,
  top-k and NMS, which can flip on a 1e-16 difference, so for them the outputs of the backbone and of
  the dense heads (features, logits, box regressions before post-processing) are compared instead
  (`torchvision_models.continuous_output_modules`). Every output leaf is compared on its own scale.

Inputs and outputs may be any nesting of tensors in lists, tuples, dicts and dataclasses (torch's pytree);
`CallInputs` holds the positional and keyword inputs of one call.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .errors import ConversionError, EquivalenceError, first_line
from .model_info import device_and_dtype

__all__ = ["CallInputs", "as_call_inputs", "Unit", "verify_equivalence", "first_diverging_module", "tensor_leaves",
           "VERIFY_BATCH_SIZES"]

VERIFY_BATCH_SIZES = (1, 2)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# -- inputs -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CallInputs:
    """The positional and keyword inputs of one call of a model, any nesting of tensors.

    Batch convention (for the random trials at batch 1 and 2): a tensor is batch-first; a *list* of
    tensors is a list of samples (a detector's list of images), resampled to `batch` entries.
    """

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: Callable) -> Any:
        return model(*self.args, **self.kwargs)

    def tensors(self) -> List[torch.Tensor]:
        return tensor_leaves((self.args, self.kwargs))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "CallInputs":
        args, kwargs = pytree.tree_map_only(torch.Tensor, fn, (self.args, self.kwargs))
        return CallInputs(tuple(args), dict(kwargs))

    def to(self, dtype: Optional[torch.dtype]) -> "CallInputs":
        if dtype is None:
            return self
        return self.map(lambda t: t.to(dtype) if t.is_floating_point() else t)

    def first_sample(self) -> "CallInputs":
        """The example at batch 1 (its own values)."""
        return self._per_value(lambda v: _first_sample(v))

    def random(self, batch: int, generator: torch.Generator) -> "CallInputs":
        """Random inputs shaped like these at `batch` samples."""
        return self._per_value(lambda v: _resample(v, batch, generator))

    def _per_value(self, fn) -> "CallInputs":
        return CallInputs(tuple(fn(v) for v in self.args), {k: fn(v) for k, v in self.kwargs.items()})

    def shape(self) -> List[int]:
        """The shape a reader recognizes: the first input's, with the sample count first for a list of images."""
        first = self.args[0] if self.args else next(iter(self.kwargs.values()), None)
        if isinstance(first, torch.Tensor):
            return list(first.shape)
        if isinstance(first, list) and first and isinstance(first[0], torch.Tensor):
            return [len(first)] + list(first[0].shape)
        leaves = self.tensors()
        return list(leaves[0].shape) if leaves else []

    def describe(self) -> str:
        return ", ".join("x".join(map(str, t.shape)) for t in self.tensors()) or "no tensors"


def as_call_inputs(example_inputs: Any, example_kwargs: Optional[Dict[str, Any]] = None) -> CallInputs:
    """`example_inputs` as a call: a tensor is the one positional input; a tuple (or, as before, a list of
    tensors) the positional inputs, each any nesting (`([image],)` for a detector); a dict the keyword
    inputs. `example_kwargs` adds keyword inputs."""
    if isinstance(example_inputs, CallInputs):
        call = example_inputs
    elif isinstance(example_inputs, torch.Tensor):
        call = CallInputs((example_inputs,))
    elif isinstance(example_inputs, dict):
        call = CallInputs((), dict(example_inputs))
    elif isinstance(example_inputs, (tuple, list)):
        call = CallInputs(tuple(example_inputs))
    else:
        raise ConversionError("example_inputs must be a tensor, a tuple of positional inputs (tensors, or lists/"
                              f"dicts of tensors) or a dict of keyword inputs; got {type(example_inputs).__name__}")
    if example_kwargs:
        if not isinstance(example_kwargs, dict) or not all(isinstance(k, str) for k in example_kwargs):
            raise ConversionError("example_kwargs must be a dict with string keys")
        call = CallInputs(call.args, {**call.kwargs, **example_kwargs})
    if not call.tensors():
        raise ConversionError("example_inputs hold no tensor")
    return call


def _first_sample(value):
    if isinstance(value, torch.Tensor):
        return value[:1] if value.dim() else value
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        return value[:1]
    return pytree.tree_map_only(torch.Tensor, lambda t: t[:1] if t.dim() else t, value)


def _resample(value, batch: int, generator: torch.Generator):
    if isinstance(value, torch.Tensor):
        return _random_like(value, (batch,) + tuple(value.shape[1:]) if value.dim() else (), generator)
    if isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
        return [_random_like(value[i % len(value)], tuple(value[i % len(value)].shape), generator)
                for i in range(batch)]
    return pytree.tree_map_only(
        torch.Tensor, lambda t: _random_like(t, (batch,) + tuple(t.shape[1:]) if t.dim() else (), generator), value)


def _random_like(t: torch.Tensor, shape, generator: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=t.dtype).to(t.device)
    if t.dtype == torch.bool or not t.numel():
        return t.clone() if tuple(t.shape) == tuple(shape) else torch.zeros(shape, dtype=t.dtype, device=t.device)
    # integer inputs (token ids, indices): resample within the observed range
    low, high = int(t.min()), int(t.max()) + 1
    return torch.randint(low, high, shape, generator=generator, dtype=t.dtype).to(t.device)


def tensor_leaves(tree) -> List[torch.Tensor]:
    """The tensors of any nesting of lists, tuples, dicts, named tuples and dataclasses, in order."""
    out: List[torch.Tensor] = []
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            # pytree does not know arbitrary dataclasses: their fields, in declaration order
            out.extend(tensor_leaves([getattr(leaf, f.name) for f in dataclasses.fields(leaf)]))
    return out


# -- the units a fuse produced ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One thing fuse changed: the original computes it from the input of `ref_in` to the output of `ref_out`;
    the result computes it by running `candidate` (module names, in order) on that input. Named `name`."""

    name: str
    ref_in: str
    ref_out: str
    candidate: Tuple[str, ...]


# -- the verifier ------------------------------------------------------------------------------------------

def verify_equivalence(
    reference: nn.Module, candidate: nn.Module, inputs, *, rtol: float, atol: float,
    absorbed: Optional[Dict[str, str]] = None, in_float64: bool = True, units: Sequence[Unit] = (),
    output_modules: Optional[Sequence[str]] = None,
) -> Tuple[float, float, List[List[int]]]:
    """Compare `candidate` with `reference` on random inputs shaped like `inputs` at batch 1 and 2: every
    unit on its captured input, and the continuous outputs end to end (the outputs of `output_modules`
    when given, e.g. a detector's backbone and heads, else the model's outputs).

    Returns the end-to-end (max abs error, max rel error, input shapes); raises EquivalenceError naming
    the module on disagreement. With `in_float64` both models run as float64 copies. Low-precision models
    widen `rtol` to their resolution (their fused weights are rounded to it): per module 2 eps, end to end
    8 eps. `absorbed` maps a conv that absorbed a BN to that BN (for naming an end-to-end divergence).
    """
    call = as_call_inputs(inputs)
    dtype = device_and_dtype(candidate)[1]
    module_rtol = rtol
    if dtype in _LOW_PRECISION:
        module_rtol = max(rtol, torch.finfo(dtype).eps * 2)
        rtol = max(rtol, torch.finfo(dtype).eps * 8)
    compute = torch.float64 if in_float64 and dtype.is_floating_point else None
    generator = torch.Generator().manual_seed(1234)
    trials = [call.random(batch, generator).to(compute) for batch in VERIFY_BATCH_SIZES]
    ref, cand = _as_dtype(reference, compute), _as_dtype(candidate, compute)
    max_abs = max_rel = 0.0
    for trial in trials:
        expected = _run(ref, trial, output_modules, checks=(units, cand, module_rtol, atol))
        actual = _run(cand, trial, output_modules)
        if len(expected) != len(actual):
            raise EquivalenceError("verification failed: the fused model returns a different number of outputs")
        for e, a in zip(expected, actual):
            if e.shape != a.shape:
                raise EquivalenceError(
                    f"verification failed: output shape {tuple(a.shape)} differs from {tuple(e.shape)}")
            abs_err, rel_err = errors(e, a)
            max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
            if not torch.isfinite(a).all() or not close(e, a, rtol=rtol, atol=atol):
                where = first_diverging_module(ref, cand, trial, rtol=rtol, atol=atol, absorbed=absorbed)
                noise = ""
                if compute is not None:  # how far the original itself is from exact, to judge a looser rtol by
                    own = _run(_as_dtype(reference, None), trial.to(dtype), output_modules)
                    own_err = max((errors(r, o)[1] for o, r in zip(own, expected) if r.numel()), default=0.0)
                    noise = f"; the original's own {str(dtype).replace('torch.', '')} rounding error is {own_err:.3g}"
                raise EquivalenceError(
                    f"verification failed: max abs error {abs_err:.3g}, max rel error {rel_err:.3g} "
                    f"(rtol={rtol:g}, atol={atol:g}){noise}; first diverging module: {where or 'unknown'}",
                    max_abs_error=abs_err, max_rel_error=rel_err, first_diverging_module=where,
                )
    return max_abs, max_rel, [trial.shape() for trial in trials]


def errors(expected: torch.Tensor, actual: torch.Tensor) -> Tuple[float, float]:
    """(max abs error, max abs error / max |expected|)."""
    if not expected.numel():
        return 0.0, 0.0
    diff = (expected.double() - actual.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    return diff, (diff / scale if scale > 0 else diff)


def close(expected: torch.Tensor, actual: torch.Tensor, *, rtol: float, atol: float) -> bool:
    """`max|a - e| <= atol + rtol * max|e|`: relative to the output's scale, so that deep random-weight
    models with huge or tiny activations are judged by significant digits, not by elements that sit near
    zero. `atol` (0 by default) is slack for outputs that should be exactly zero; any fixed value would
    accept everything from a model whose outputs are all smaller than it."""
    if not expected.numel():
        return True
    e, a = expected.double(), actual.double()
    return bool((a - e).abs().max() <= atol + rtol * e.abs().max())


def _as_dtype(model: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    return copy.deepcopy(model).to(dtype).eval() if dtype is not None else model.eval()


def _run(model: nn.Module, call: CallInputs, output_modules: Optional[Sequence[str]], checks=None):
    """The compared outputs of one forward: the leaves of the `output_modules`' outputs (else of the
    model's), with the per-unit checks of `checks` = (units, candidate, rtol, atol) hooked in."""
    handles = []
    recorded: Dict[str, List[torch.Tensor]] = {}
    modules = dict(model.named_modules())
    try:
        if checks is not None and checks[0]:
            handles += _unit_hooks(modules, *checks)
        for name in output_modules or ():
            def record(mod, args, out, name=name):
                recorded.setdefault(name, []).extend(t.detach().clone() for t in tensor_leaves(out))
            handles.append(modules[name].register_forward_hook(record))
        with torch.no_grad():
            out = call(model)
    finally:
        for h in handles:
            h.remove()
    if output_modules:
        return [t for name in output_modules for t in recorded.get(name, [])]
    return tensor_leaves(out)


def _unit_hooks(ref_modules: Dict[str, nn.Module], units: Sequence[Unit], candidate: nn.Module, rtol: float,
                atol: float) -> list:
    """Hooks on the reference that run each unit's candidate modules on the input the reference module
    received and compare with what the reference returned, as it happens (nothing is stored)."""
    cand_modules = dict(candidate.named_modules())
    handles = []
    for unit in units:
        if unit.ref_in not in ref_modules or unit.ref_out not in ref_modules:
            continue
        parts = [cand_modules.get(n) for n in unit.candidate]
        if any(p is None for p in parts):
            continue
        pending: List[Tuple[tuple, dict]] = []

        def capture(mod, args, kwargs, pending=pending):
            # a copy: the model may change its input in place before the unit's output is known
            pending.append(pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, kwargs)))

        def check(mod, args, out, pending=pending, parts=parts, unit=unit):
            if not pending:
                return
            c_args, c_kwargs = pending.pop()
            with torch.no_grad():
                got = parts[0](*c_args, **c_kwargs)
                for part in parts[1:]:
                    got = part(got)
            _compare_unit(unit, tensor_leaves(out), tensor_leaves(got), rtol=rtol, atol=atol)

        handles.append(ref_modules[unit.ref_in].register_forward_pre_hook(capture, with_kwargs=True))
        handles.append(ref_modules[unit.ref_out].register_forward_hook(check))
    return handles


def _compare_unit(unit: Unit, expected: List[torch.Tensor], actual: List[torch.Tensor], *, rtol: float,
                  atol: float) -> None:
    what = unit.name if unit.ref_in == unit.ref_out else f"{unit.name} (fused with {unit.ref_out})"
    if len(expected) != len(actual) or any(e.shape != a.shape for e, a in zip(expected, actual)):
        raise EquivalenceError(f"verification failed: {what} returns outputs of other shapes than the original's; "
                               f"first diverging module: {unit.name}", first_diverging_module=unit.name)
    for e, a in zip(expected, actual):
        if not torch.isfinite(a).all() or not close(e, a, rtol=rtol, atol=atol):
            abs_err, rel_err = errors(e, a)
            raise EquivalenceError(
                f"verification failed: {what} differs from the original on the input it received: max abs error "
                f"{abs_err:.3g}, max rel error {rel_err:.3g} (rtol={rtol:g}, atol={atol:g}); first diverging "
                f"module: {unit.name}",
                max_abs_error=abs_err, max_rel_error=rel_err, first_diverging_module=unit.name,
            )


def first_diverging_module(reference: nn.Module, candidate: nn.Module, inputs, *, rtol: float, atol: float,
                           absorbed: Optional[Dict[str, str]] = None):
    """The first module (in the reference's execution order) whose output differs between the models.

    A weightless module (Identity, activation) that differs passes on an earlier difference that could not
    be compared (a fused BN has no counterpart): the module with weights that ran last before it is named.
    """
    call = as_call_inputs(inputs)
    absorbed = absorbed or {}
    ref_out = _record_outputs(reference, call)
    ref_by_name = dict(ref_out)
    cand_out = dict(_record_outputs(candidate, call))
    modules = dict(reference.named_modules())
    last_weighted = None
    for name, outputs in ref_out:
        if any(True for _ in modules[name].parameters()):
            last_weighted = name
        if name in absorbed:  # a fused conv computes what its BN computed
            outputs = ref_by_name.get(absorbed[name], [])
        other = cand_out.get(name)
        if other is None or len(other) != len(outputs):
            continue
        for e, a in zip(outputs, other):
            if e.shape == a.shape and not close(e, a, rtol=rtol, atol=atol):
                return last_weighted or name
    return None


def _record_outputs(model: nn.Module, call: CallInputs) -> List[Tuple[str, List[torch.Tensor]]]:
    recorded: List[Tuple[str, List[torch.Tensor]]] = []
    handles = []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def hook(mod, args, out, name=name):
                recorded.append((name, [t.detach().clone() for t in tensor_leaves(out)]))
            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call(model)
    finally:
        for h in handles:
            h.remove()
    return recorded


def check_runs(model: nn.Module, call: CallInputs):
    """The model's output on the example at batch 1; a clear error when it cannot take these inputs."""
    one = call.first_sample()
    try:
        with torch.no_grad():
            return one(model)
    except Exception as e:  # wrong input size or channels: the user's to fix
        raise ConversionError(f"cannot run {type(model).__name__} on input {one.describe()}: "
                              f"{type(e).__name__}: {first_line(e)}") from None
