"""Reversible multi-level columns: training that keeps no activations inside the columns.

A *column* has `L` levels and a state `(c_0, ..., c_{L-1})`. Column `j` updates its state level by
level, in order 0, 1, ..., L-1::

    c_l <- alpha_l * c_l + F_l(down_l, upper_l)

where `down_l` is the stem output `x` for level 0 and the *new* `c_{l-1}` otherwise, and `upper_l`
holds the *previous* column's states above level `l` (`c_{l+1}, ..., c_{L-1}`, before this column's
update). Because `F_l` reads only the new state below it and the old states above it, the old state is
recoverable from the new one, top level first::

    c_l(old) = (c_l(new) - F_l(down_l, upper_l)) / alpha_l          for l = L-1, ..., 0

`run_columns(..., reversible=True)` runs a whole sequence of columns inside one autograd Function that
keeps only the stem output and the last column's state. Its backward walks the columns in reverse; for
each level it recomputes `F_l` with autograd enabled (replaying the RNG and autocast state of the
forward, so DropPath masks and precisions are identical), reconstructs the old state from it, and
backpropagates through that one level. The memory kept for backward therefore does not grow with the
number of columns or levels (the authors' version kept every column's four output maps).

Parameters are explicit inputs of the Function and their gradients are returned from its backward, so
they stay visible to autograd: `torch.autograd.grad(loss, params)` works and DDP finds every parameter
in the graph (with `find_unused_parameters` True or False).

Caveats of recomputation (as for any activation checkpointing): levels must be deterministic given
the RNG state, must not change the module mode (train/eval) between forward and backward, and must not
update buffers in forward (BatchNorm running statistics would be updated twice). Double backward is not
supported.

Scripting and fx tracing: `torch.jit.script` and `torch.fx.symbolic_trace` record the ordinary path
(the autograd Function and its per-level recomputation are eager-only); its values and gradients are
those of the reversible path, but every column's activations are kept.
"""
import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_function
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = ["ReversibleColumn", "level_update", "column_forward", "run_columns", "clamp_magnitude_"]

States = Tuple[Optional[torch.Tensor], ...]


class ReversibleColumn(nn.Module):
    """Base class of a column: `num_levels` level modules and one scale `alpha_l` per level.

    A level module is called as `level(down_input, upper_states)`, with `upper_states` the tuple of the
    previous column's states above that level (all `None` for the first column, whose state is zero).
    Subclasses keep their own attribute names (so checkpoints keep theirs) and expose them here.
    """

    def level_modules(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    def level_alphas(self) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, states: States) -> Tuple[torch.Tensor, ...]:
        return column_forward(self, x, states)


def level_update(alpha: torch.Tensor, previous: Optional[torch.Tensor], level_output: torch.Tensor) -> torch.Tensor:
    """`alpha * previous + level_output`; `previous=None` stands for the zero state of the first column."""
    if previous is None:
        # `alpha * 0` keeps alpha in the graph with an exact zero gradient, as in the reference
        # implementation (whose first column starts from the integer 0): every parameter then takes
        # part in every step, which DDP with find_unused_parameters=False requires.
        return alpha * 0 + level_output
    return alpha * previous + level_output


def column_forward(column: ReversibleColumn, x: torch.Tensor, states: States) -> Tuple[torch.Tensor, ...]:
    """One column with ordinary autograd (every activation kept for backward)."""
    new_states: List[torch.Tensor] = []
    for level_index, (level, alpha) in enumerate(zip(column.level_modules(), column.level_alphas())):
        down = x if level_index == 0 else new_states[-1]
        level_output = level(down, tuple(states[level_index + 1:]))
        new_states.append(level_update(alpha, states[level_index], level_output))
    return tuple(new_states)


def clamp_magnitude_(tensors: List[torch.Tensor], min_magnitude: float) -> None:
    """In place: entries with |t| < min_magnitude become +-min_magnitude, keeping the sign (0 -> +).

    Done before a forward under no_grad, so forward and reconstruction divide by the same values. The
    tensors are written only when some entry is actually too small: an unconditional in-place write would
    bump their version counters and break a pending backward of an earlier forward.

    Written for TorchScript (no decorator, no early return inside `no_grad`), and an fx leaf: its check
    is data-dependent control flow, so a traced graph calls it as one opaque, side-effecting node.
    """
    with torch.no_grad():
        smallest: List[torch.Tensor] = []
        for t in tensors:
            if t.numel() > 0 and not t.is_meta:  # meta tensors (shape inference) have no values to check
                smallest.append(t.detach().abs().amin().to(torch.float32))
        if len(smallest) > 0 and bool((torch.stack(smallest) < min_magnitude).any()):
            for t in tensors:
                too_small = t.abs() < min_magnitude
                signed_min = torch.where(t < 0, -min_magnitude, min_magnitude).to(t.dtype)
                t.copy_(torch.where(too_small, signed_min, t))


# fx leaf for timm's tracers (register_notrace_function) and for plain `torch.fx.symbolic_trace`
# (torch.fx.wrap in the calling modules); kept by dead-code elimination although it returns nothing.
register_notrace_function(clamp_magnitude_)
torch.fx.node.has_side_effect(clamp_magnitude_)


def is_symbolic_tracing(x: torch.Tensor) -> bool:
    """True while torch.fx traces: `x` is then a Proxy, and a graph can only record the ordinary path."""
    return isinstance(x, torch.fx.Proxy)


def run_columns(
    columns: Sequence[ReversibleColumn],
    x: torch.Tensor,
    states: Optional[Sequence[torch.Tensor]] = None,
    *,
    reversible: bool = False,
    taps: Sequence[Tuple[int, int]] = (),
    grad_checkpointing: bool = False,
) -> Tuple[Tuple[torch.Tensor, ...], List[torch.Tensor]]:
    """Run `columns` in sequence from `states` (None: the zero state). Returns (last state, tapped).

    `taps` lists `(column_index, level_index)` pairs whose state (after that column) is also returned,
    in the given order; e.g. RevCol's supervision heads read the top level of some columns.
    `reversible=True` keeps no activations inside the columns (see the module docstring); it falls back
    to the ordinary path when no gradient is being recorded or under a JIT trace. `grad_checkpointing`
    (ordinary path only) recomputes each column in backward instead of keeping its activations.
    Under `torch.jit.trace` or `torch.fx` tracing the ordinary path is recorded (see the module docstring).
    """
    if not columns:
        raise ValueError("run_columns needs at least one column")
    num_levels = len(columns[0].level_modules())
    for column in columns:
        if len(column.level_modules()) != num_levels or len(column.level_alphas()) != num_levels:
            raise ValueError("all columns must have the same number of levels and one alpha per level")
    if states is not None and len(states) != num_levels:
        raise ValueError(f"expected {num_levels} initial states, got {len(states)}")
    for column_index, level_index in taps:
        if not (0 <= column_index < len(columns) and 0 <= level_index < num_levels):
            raise ValueError(f"tap {(column_index, level_index)} outside {len(columns)} columns x {num_levels} levels")

    # Neither a JIT trace (e.g. fvcore's MAC counting) nor an fx graph can record the custom Function;
    # both get the ordinary path, which computes the same values and gradients.
    if reversible and torch.is_grad_enabled() and not (torch.jit.is_tracing() or is_symbolic_tracing(x)):
        return _run_reversible(columns, x, states, taps, num_levels)

    current: States = tuple(states) if states is not None else (None,) * num_levels
    tapped: Dict[Tuple[int, int], torch.Tensor] = {}
    for column_index, column in enumerate(columns):
        if grad_checkpointing and torch.is_grad_enabled():
            current = checkpoint(column_forward, column, x, current, use_reentrant=False)
        else:
            current = column_forward(column, x, current)
        for tap in taps:
            if tap[0] == column_index:
                tapped[tap] = current[tap[1]]
    return tuple(current), [tapped[tap] for tap in taps]


# ----------------------------------------------------------------------------------------------------
# Reversible path


@dataclass
class _Plan:
    """Everything the Function needs besides tensors (autograd only tracks tensor arguments)."""

    columns: Sequence[ReversibleColumn]
    num_levels: int
    has_initial_states: bool
    # parameter_groups[j][l]: positions, in the flat parameter inputs, of the alpha (first, when it
    # requires grad) and of the level's own parameters that require grad.
    parameter_groups: List[List[List[int]]]
    # taps that are separate outputs (those of the last column are read off its final state)
    output_taps: List[Tuple[int, int]]


def _run_reversible(columns, x, states, taps, num_levels):
    parameters: List[torch.Tensor] = []
    position: Dict[int, int] = {}
    parameter_groups: List[List[List[int]]] = []

    def index_of(p: torch.Tensor) -> int:
        # a parameter shared between levels or columns is one input whose gradients accumulate
        if id(p) not in position:
            position[id(p)] = len(parameters)
            parameters.append(p)
        return position[id(p)]

    for column in columns:
        groups = []
        for level, alpha in zip(column.level_modules(), column.level_alphas()):
            group = [index_of(alpha)] if alpha.requires_grad else []
            group += [index_of(p) for p in level.parameters() if p.requires_grad]
            groups.append(group)
        parameter_groups.append(groups)

    last = len(columns) - 1
    output_taps = [tap for tap in dict.fromkeys(taps) if tap[0] != last]
    plan = _Plan(columns, num_levels, states is not None, parameter_groups, output_taps)
    initial = tuple(states) if states is not None else ()
    outputs = _ReversibleColumnsFunction.apply(plan, x, *initial, *parameters)
    final_states = tuple(outputs[:num_levels])
    tapped = dict(zip(output_taps, outputs[num_levels:]))
    for tap in taps:
        if tap[0] == last:
            tapped[tap] = final_states[tap[1]]
    return final_states, [tapped[tap] for tap in taps]


class _RngState:
    """CPU and accelerator RNG state at one point of the forward, to replay it in backward."""

    def __init__(self, device: torch.device):
        self.cpu_state = torch.get_rng_state()
        self.device_type = device.type
        self.device_index: Optional[int] = None
        self.device_state: Optional[torch.Tensor] = None
        if device.type not in ("cpu", "meta"):
            module = torch.get_device_module(device.type)
            if hasattr(module, "get_rng_state"):
                self.device_index = device.index if device.index is not None else module.current_device()
                self.device_state = module.get_rng_state(self.device_index)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        # fork_rng restores the global state afterwards: backward must not shift later random draws
        devices = [self.device_index] if self.device_state is not None else []
        device_type = self.device_type if devices else "cuda"
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu_state)
            if self.device_state is not None:
                torch.get_device_module(self.device_type).set_rng_state(self.device_state, self.device_index)
            yield


class _AutocastState:
    """Autocast settings of the forward (CPU and the input's device type), re-entered in backward.

    Backward runs on autograd's threads, where the forward's thread-local autocast state is not active.
    """

    def __init__(self, device_type: str):
        types = ["cpu"] if device_type == "cpu" else ["cpu", device_type]
        self.settings = [
            (t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t))
            for t in types
            if torch.amp.is_autocast_available(t)
        ]
        self.cache_enabled = torch.is_autocast_cache_enabled()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.settings:
                stack.enter_context(
                    torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled)
                )
            yield


def _accumulate(total: Optional[torch.Tensor], new: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if new is None:
        return total
    return new if total is None else total + new


def _leaf(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().requires_grad_(True)


class _ReversibleColumnsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, x: torch.Tensor, *inputs: torch.Tensor):
        num_levels = plan.num_levels
        num_initial = num_levels if plan.has_initial_states else 0
        initial, parameters = inputs[:num_initial], inputs[num_initial:]
        ctx.plan = plan
        ctx.autocast = _AutocastState(x.device.type)
        ctx.rng_states = []

        states: States = tuple(initial) if num_initial else (None,) * num_levels
        tap_outputs: Dict[Tuple[int, int], torch.Tensor] = {}
        for column_index, column in enumerate(plan.columns):
            column_rng = []
            new_states: List[torch.Tensor] = []
            for level_index, (level, alpha) in enumerate(zip(column.level_modules(), column.level_alphas())):
                column_rng.append(_RngState(x.device))
                down = x if level_index == 0 else new_states[-1]
                level_output = level(down, states[level_index + 1:])
                new_states.append(level_update(alpha, states[level_index], level_output))
            ctx.rng_states.append(column_rng)
            states = tuple(new_states)
            for tap in plan.output_taps:
                if tap[0] == column_index:
                    tap_outputs[tap] = states[tap[1]]

        # Parameters are saved too: autograd then refuses a backward after they were changed in place.
        ctx.save_for_backward(x, *states, *parameters)
        ctx.set_materialize_grads(False)
        # A tap is a column's state, which the next column does not modify; return it as its own tensor
        # so that autograd can tell the outputs apart.
        return (*states, *(tap_outputs[tap] for tap in plan.output_taps))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs: Optional[torch.Tensor]):
        plan: _Plan = ctx.plan
        num_levels = plan.num_levels
        saved = ctx.saved_tensors
        x = saved[0].detach()
        states: States = tuple(s.detach() for s in saved[1:1 + num_levels])
        parameters = saved[1 + num_levels:]
        num_initial = num_levels if plan.has_initial_states else 0

        # grads[l]: gradient of the loss w.r.t. state l of the column being processed
        grads: List[Optional[torch.Tensor]] = list(grad_outputs[:num_levels])
        tap_grads = dict(zip(plan.output_taps, grad_outputs[num_levels:]))
        grad_x: Optional[torch.Tensor] = None
        parameter_grads: List[Optional[torch.Tensor]] = [None] * len(parameters)
        x_needs_grad = ctx.needs_input_grad[1]

        for column_index in reversed(range(len(plan.columns))):
            column = plan.columns[column_index]
            levels, alphas = column.level_modules(), column.level_alphas()
            for (tap_column, tap_level), g in tap_grads.items():
                if tap_column == column_index:
                    grads[tap_level] = _accumulate(grads[tap_level], g)
            first_of_zero_state = column_index == 0 and not plan.has_initial_states

            previous: List[Optional[torch.Tensor]] = [None] * num_levels
            previous_grads: List[Optional[torch.Tensor]] = [None] * num_levels
            for level_index in reversed(range(num_levels)):
                alpha = alphas[level_index]
                group = [parameters[i] for i in plan.parameter_groups[column_index][level_index]]
                upper = tuple(_leaf(p) for p in previous[level_index + 1:])
                down_source = x if level_index == 0 else states[level_index - 1]
                wants_down_grad = level_index > 0 or x_needs_grad
                down = _leaf(down_source) if wants_down_grad else down_source
                grad = grads[level_index]

                with ctx.rng_states[column_index][level_index].replay(), ctx.autocast.replay():
                    with torch.set_grad_enabled(grad is not None):
                        level_output = levels[level_index](down, upper)
                    with torch.no_grad():
                        if not first_of_zero_state:
                            previous[level_index] = (states[level_index] - level_output) / alpha
                    if grad is None:
                        continue  # nothing flows back through this level: reconstruction only
                    with torch.enable_grad():
                        old_state = _leaf(previous[level_index])
                        new_state = level_update(alpha, old_state, level_output)

                # One small graph per level: gradients w.r.t. its inputs and its parameters.
                targets = [t for t in (down if wants_down_grad else None, *upper, old_state) if t is not None]
                if not targets and not group:  # a frozen level fed by frozen inputs: nothing to differentiate
                    del new_state, level_output
                    continue
                results = torch.autograd.grad(new_state, targets + group, grad, allow_unused=True)
                input_grads, group_grads = iter(results[:len(targets)]), results[len(targets):]
                if wants_down_grad:
                    g = next(input_grads)
                    if level_index == 0:
                        grad_x = _accumulate(grad_x, g)
                    else:
                        grads[level_index - 1] = _accumulate(grads[level_index - 1], g)
                for offset, u in enumerate(upper):
                    if u is not None:
                        k = level_index + 1 + offset
                        previous_grads[k] = _accumulate(previous_grads[k], next(input_grads))
                if old_state is not None:
                    previous_grads[level_index] = _accumulate(previous_grads[level_index], next(input_grads))
                for i, g in zip(plan.parameter_groups[column_index][level_index], group_grads):
                    parameter_grads[i] = _accumulate(parameter_grads[i], g)
                del new_state, level_output, results

            states = tuple(previous)
            grads = previous_grads

        initial_grads = tuple(grads) if num_initial else ()
        return (None, grad_x, *initial_grads, *parameter_grads)
