"""Counting for reports: fvcore MACs by module with the torch.utils.flop_counter cross-check, the folded
view of a RefConv model (shapes only), and per-module / per-part rows."""
from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .errors import ReparamError, first_line
from .layers.refconv import RefConvNd
from .model_info import device_and_dtype, example_inputs, save_modes
from .module_attrs import pop_refconv_summary
from .surgery import refconv_layers

MACS_TOLERANCE = 0.02
_DIFFERING_SHOWN = 4  # modules a disagreement names in one line (all of them are in `differing_modules`)
# fvcore's names (after its own simplification) for the conv/matmul work torch's flop_counter also sees
_FVCORE_MATMUL_OPS = ("conv", "linear", "addmm", "bmm", "matmul", "mm", "einsum")


@dataclass
class MacsCheck:
    """fvcore's conv/linear MACs against `torch.utils.flop_counter`'s FLOPs / 2."""

    fvcore_macs: int
    flop_counter_macs: int
    rel_diff: float
    tolerance: float = MACS_TOLERANCE
    fvcore_by_op: Dict[str, int] = field(default_factory=dict)
    flop_counter_by_op: Dict[str, int] = field(default_factory=dict)
    # where the two differ: module -> [fvcore, flop_counter] conv/matmul MACs of the ops the module runs
    # itself (outside its submodules); "" is the model's own forward. Largest differences first.
    differing_modules: Dict[str, List[int]] = field(default_factory=dict)

    @property
    def agrees(self) -> bool:
        return self.rel_diff <= self.tolerance

    def as_dict(self) -> dict:
        out = asdict(self)
        out["agrees"] = self.agrees
        return out

    def describe(self) -> str:
        verdict = f"within {self.tolerance:.0%}" if self.agrees else f"DISAGREE beyond {self.tolerance:.0%}"
        line = (f"MACs check: fvcore conv/linear {self.fvcore_macs:,} vs torch flop_counter "
                f"{self.flop_counter_macs:,} ({self.rel_diff:.2%}, {verdict})")
        if not self.agrees:
            by_op = ", ".join(f"{op} {n:,}" for op, n in self.flop_counter_by_op.items())
            line += f"; flop_counter MACs by op: {by_op}"
            if self.differing_modules:
                shown = list(self.differing_modules.items())[:_DIFFERING_SHOWN]
                where = ", ".join(f"{name or '(the model itself)'} {fv:,} vs {tc:,}" for name, (fv, tc) in shown)
                more = len(self.differing_modules) - len(shown)
                line += f"; they differ in: {where}" + (f" and {more} more" if more > 0 else "")
        return line


@dataclass
class ModuleRow:
    """One module of the per-module table (its whole subtree counted)."""

    name: str
    type: str
    training_params: int
    trainable_params: int
    frozen_params: int
    buffers: int
    transform_macs: int
    inference_params: int
    macs: int
    inference_buffers: int = 0  # reports written before this field counted none
    group: str = ""  # backbone / neck / heads of a detector or segmenter ("" for other models)


@dataclass
class MacCounts:
    """What `count_macs` finds in one eval forward."""

    by_module: Dict[str, int]  # fvcore MACs of each module's subtree ("" the whole model)
    by_module_and_op: Dict[str, Dict[str, int]]  # the same, by fvcore op name
    unsupported: Dict[str, int]  # ops fvcore does not count, with how often they ran
    never_run: List[str]  # modules holding weights that the forward never called (forward hooks)
    unused_output: List[str]  # modules holding weights that ran, but whose outputs nothing used: the traced
    # graph fvcore counts drops them as dead code (no fvcore MACs), torch's flop_counter counts them
    check: MacsCheck


# -- counting ---------------------------------------------------------------------------------------
def count_macs(model: nn.Module, input_size: Tuple[int, ...], name: str, call=None) -> MacCounts:
    """fvcore MACs by module, fvcore's unsupported ops, the modules no MACs were counted for, and the
    flop_counter cross-check, in eval mode without gradients (so that counting changes no BatchNorm statistics).

    fvcore counts a JIT trace of the forward, torch's flop_counter the eager forward: a module run for an
    output nothing uses is in the second and not the first (the trace drops dead code). Forward hooks on the
    eager run tell such a module from one the forward never calls."""
    from torch.utils.flop_counter import FlopCounterMode

    FlopCountAnalysis = _fvcore_analysis()
    device, dtype = device_and_dtype(model)
    if device.type == "meta":
        raise ReparamError(
            f"{name} is on the meta device: MACs need real tensors (build it on cpu; params alone can be "
            "counted on meta with layer_params or sum(p.numel()))"
        )
    counted, prefix = model, ""
    if call is None:
        inputs = example_inputs(model, input_size)  # a detector takes a list of images
    else:
        inputs = tuple(call.args)
        if call.kwargs:  # fvcore traces positional inputs only: a wrapper passes the keywords
            counted, prefix = _WithKeywords(model, call.kwargs), "model."
    restore_modes = save_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            analysis = (FlopCountAnalysis(counted, inputs).unsupported_ops_warnings(False)
                        .uncalled_modules_warnings(False).tracer_warnings("none"))
            by_module = {_strip(k, prefix): v for k, v in analysis.by_module().items() if k + "." != prefix}
            by_module_and_op = {_strip(k, prefix): v for k, v in analysis.by_module_and_operator().items()
                                if k + "." != prefix}
            by_op = analysis.by_operator()
            unsupported = dict(sorted(analysis.unsupported_ops().items()))
            untraced = {_strip(n, prefix) for n in analysis.uncalled_modules()}
            ran = set()
            hook = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: ran.add(id(m)))
            try:
                with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
                    counted(*inputs)
            finally:
                hook.remove()
    except Exception as e:  # the user's model failed to run: one line, not a traceback
        raise ReparamError(f"cannot count MACs of {name} on input 1x{'x'.join(map(str, input_size))}: "
                           f"{type(e).__name__}: {first_line(e)}") from None
    finally:
        restore_modes()
    fvcore_ops = {op: int(n) for op, n in by_op.items() if op in _FVCORE_MATMUL_OPS}
    flop_counts = counter.get_flop_counts()
    torch_ops = {str(op): int(n) // 2 for op, n in flop_counts.get("Global", {}).items()}
    fv, tc = sum(fvcore_ops.values()), int(counter.get_total_flops()) // 2
    rel = abs(fv - tc) / max(fv, tc) if max(fv, tc) else 0.0
    check = MacsCheck(fvcore_macs=fv, flop_counter_macs=tc, rel_diff=rel, fvcore_by_op=fvcore_ops,
                      flop_counter_by_op=torch_ops,
                      differing_modules=_differing_modules(model, counted, prefix, by_module_and_op, flop_counts))
    # a module runs when called or when one of its submodules is (a body read through `forward_intermediates`,
    # a ModuleList); only what neither counter saw run is `never_run`
    ran_names = {n for n, m in model.named_modules() if id(m) in ran}
    ran_names |= {n.rsplit(".", k)[0] for n in ran_names for k in range(1, n.count(".") + 1)}
    never_run = sorted(untraced - ran_names)
    return MacCounts(
        by_module={k: int(v) for k, v in by_module.items()},
        by_module_and_op={k: {op: int(n) for op, n in v.items()} for k, v in by_module_and_op.items()},
        unsupported={k: int(v) for k, v in unsupported.items()},
        never_run=_outermost_with_weights(model, never_run),
        unused_output=_outermost_with_weights(model, untraced - set(never_run)),
        check=check,
    )


def _differing_modules(model: nn.Module, counted: nn.Module, prefix: str,
                       fvcore_by_module: Dict[str, Dict[str, int]], flop_counts) -> Dict[str, List[int]]:
    """Modules whose own conv/matmul MACs (their subtree's, less those of the submodules the counter names)
    differ between the counters, largest difference first. flop_counter names a module `<class of the
    module it ran>.<qualified name>`, and only modules that were called (not a ModuleList, nor a body read
    through another method): their work is then their nearest named ancestor's own."""
    torch_names = {".".join(p for p in (type(counted).__name__, prefix.rstrip("."), n) if p): n
                   for n, _ in model.named_modules()}
    torch_tree = {torch_names[k]: sum(int(v) for v in ops.values()) // 2
                  for k, ops in flop_counts.items() if k in torch_names}
    fvcore_tree = {n: sum(v for op, v in ops.items() if op in _FVCORE_MATMUL_OPS)
                   for n, ops in fvcore_by_module.items()}
    own = {}
    for side, tree in enumerate((fvcore_tree, torch_tree)):
        tree = {"": 0, **tree}
        mine = dict(tree)
        for name, macs in tree.items():
            if name:
                ancestor = name.rpartition(".")[0]
                while ancestor and ancestor not in tree:
                    ancestor = ancestor.rpartition(".")[0]
                mine[ancestor] -= macs
        for name, macs in mine.items():
            own.setdefault(name, [0, 0])[side] = int(macs)
    differ = {n: v for n, v in own.items() if v[0] != v[1]}
    return dict(sorted(differ.items(), key=lambda item: -abs(item[1][0] - item[1][1])))


class _WithKeywords(nn.Module):
    """`model` called with fixed keyword inputs, for counters that pass positional inputs only."""

    def __init__(self, model: nn.Module, kwargs: dict):
        super().__init__()
        self.model = model
        self.kwargs = kwargs

    def forward(self, *args):
        return self.model(*args, **self.kwargs)


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _outermost_with_weights(model: nn.Module, names) -> List[str]:
    """The outermost of `names` that hold parameters (fvcore also lists never-run Identity and dropout
    modules, which cost nothing)."""
    modules = dict(model.named_modules())
    weighted = sorted(n for n in names if n in modules and any(True for _ in modules[n].parameters()))
    return [n for n in weighted if not any(n.startswith(other + ".") for other in weighted)]


def _cpu_attention_flops():
    """flop_counter's attention formula for the CPU attention kernel, which it has no entry for: without it
    the cross-check would not see attention on CPU at all."""
    from torch.utils.flop_counter import sdpa_flop_count

    def formula(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: formula}


def _fvcore_analysis():
    # fvcore.nn's __init__ scripts its focal losses with the deprecated torch.jit.script: a warning
    # about code we never call, so silence it instead of passing it on to the user.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    return FlopCountAnalysis


def folded_view(model: nn.Module) -> nn.Module:
    """The structure `fold(model)` deploys, without copying the model's tensors or computing a kernel.

    A copy of the module tree whose parameters and buffers alias the original's, with each RefConv
    replaced by the plain conv `to_conv()` would build (same class, attributes and shapes) holding the
    base kernel: counting needs shapes only, and refocusing every kernel in float64 costs seconds.
    """
    memo = {}
    for module in model.modules():
        if isinstance(module, RefConvNd):
            memo[id(module)] = _conv_like_folded(module)
        for p in module._parameters.values():
            if p is not None:
                memo.setdefault(id(p), p)
        for value in list(module._buffers.values()) + list(vars(module).values()):
            for t in _tensors_in(value):
                memo.setdefault(id(t), t)
    view = copy.deepcopy(model, memo)
    pop_refconv_summary(view)
    return view


def _conv_like_folded(layer: RefConvNd) -> nn.Module:
    # `_template` is the original conv with weightless (meta) tensors, the same template `to_conv` copies
    conv = copy.deepcopy(layer._template)
    conv.weight = nn.Parameter(layer.weight_base, requires_grad=False)
    if layer.bias is not None:
        conv.bias = layer.bias
    return conv


def _tensors_in(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v


def module_rows(model: nn.Module, deployed: nn.Module, macs: Dict[str, int], depth: int,
                 groups: Optional[Dict[str, str]] = None) -> List[ModuleRow]:
    """Rows down to `depth`; for a detector or segmenter (`groups`: part module -> backbone/neck/heads) each
    part's module and its submodules down to `depth` levels below it, tagged with the part."""
    if not groups:
        return _rows_below(model, deployed, macs, "", depth)
    rows = []
    for root, group in groups.items():
        for row in _rows_below(model, deployed, macs, root, depth - 1, include_root=True):
            row.group = group
            rows.append(row)
    return rows


def group_totals(model: nn.Module, deployed: nn.Module, macs: Dict[str, int],
                  groups: Dict[str, str]) -> Dict[str, Dict[str, int]]:
    totals: Dict[str, Dict[str, int]] = {}
    for root, group in groups.items():
        row = _rows_below(model, deployed, macs, root, 0, include_root=True)
        entry = totals.setdefault(group, {"training_params": 0, "inference_params": 0, "macs": 0})
        for r in row:
            entry["training_params"] += r.training_params
            entry["inference_params"] += r.inference_params
            entry["macs"] += r.macs
    return totals


def _rows_below(model: nn.Module, deployed: nn.Module, macs: Dict[str, int], root: str, depth: int,
                include_root: bool = False) -> List[ModuleRow]:
    base = root.count(".") + 1 if root else 0
    full = base + depth  # rows are the modules with at most `full` name parts
    refconvs = refconv_layers(model)
    base_ids = {id(m.weight_base) for _, m in refconvs}
    params = _by_module(model.named_parameters(), full)
    trainable = _by_module(((n, p) for n, p in model.named_parameters() if p.requires_grad), full)
    bases = _by_module(((_join(n, "weight_base"), m.weight_base) for n, m in refconvs), full)
    buffers = _by_module(((n, b) for n, b in model.named_buffers() if id(b) not in base_ids), full)
    transform = _by_module(((_join(n, "transform_weight"), m.transform_macs()) for n, m in refconvs), full)
    deployed_params = params if deployed is model else _by_module(deployed.named_parameters(), full)
    deployed_buffers = buffers if deployed is model else _by_module(deployed.named_buffers(), full)
    rows = []
    for name, module in model.named_modules():
        if root and not (name == root or name.startswith(root + ".")):
            continue
        if name == root and not include_root or not name or name.count(".") >= full:
            continue
        total = params.get(name, 0) + bases.get(name, 0)
        row = ModuleRow(
            name=name, type=type(module).__name__, training_params=total, trainable_params=trainable.get(name, 0),
            frozen_params=total - trainable.get(name, 0), buffers=buffers.get(name, 0),
            transform_macs=transform.get(name, 0), inference_params=deployed_params.get(name, 0),
            macs=macs.get(name, 0), inference_buffers=deployed_buffers.get(name, 0),
        )
        if row.training_params or row.buffers or row.macs or row.inference_params:
            rows.append(row)
    return rows


def _by_module(named: Iterable[Tuple[str, object]], depth: int) -> Dict[str, int]:
    """Sum tensor sizes (or plain ints) into every ancestor module up to `depth` levels down."""
    out: Dict[str, int] = {}
    for qualified, value in named:
        n = value if isinstance(value, int) else value.numel()
        parts = qualified.split(".")[:-1]
        for k in range(min(len(parts), depth) + 1):
            key = ".".join(parts[:k])
            out[key] = out.get(key, 0) + n
    return out


def _join(module: str, tensor: str) -> str:
    return f"{module}.{tensor}" if module else tensor


def unique_tensors(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


OUTSIDE_PARTS = "other"  # the group of what a detector's or segmenter's own forward computes outside its parts


def add_outside_parts(totals: Dict[str, Dict[str, int]], training_params: int, inference_params: int,
                      counts: MacCounts, groups: Dict[str, str]) -> Dict[str, int]:
    """Add to the part totals the `other` entry that makes them sum to the model's totals (params, MACs), when
    anything is outside the parts; return its MACs by fvcore op (the model's own forward: e.g. a segmenter's
    final upsampling to the input size)."""
    ops: Dict[str, int] = dict(counts.by_module_and_op.get("", {}))
    for root in groups:
        for op, n in counts.by_module_and_op.get(root, {}).items():
            ops[op] = ops.get(op, 0) - n
    other = {
        "training_params": training_params - sum(v["training_params"] for v in totals.values()),
        "inference_params": inference_params - sum(v["inference_params"] for v in totals.values()),
        "macs": counts.by_module.get("", 0) - sum(v["macs"] for v in totals.values()),
    }
    if any(other.values()):
        totals[OUTSIDE_PARTS] = other
    return {op: n for op, n in sorted(ops.items()) if n}
