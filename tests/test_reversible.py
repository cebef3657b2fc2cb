"""The generic reversible-column machinery (reparam_zoo/models/reversible.py) on toy columns."""
import pytest
import torch
import torch.nn as nn

from reparam_zoo.models.reversible import ReversibleColumn, clamp_magnitude_, run_columns

DIM = 6


class ToyLevel(nn.Module):
    """tanh(W down) + sum_k sin(U_k upper_k), then dropout (a source of randomness to replay)."""

    def __init__(self, num_upper: int, drop: float):
        super().__init__()
        self.down = nn.Linear(DIM, DIM)
        self.up = nn.ModuleList([nn.Linear(DIM, DIM) for _ in range(num_upper)])
        self.drop = nn.Dropout(drop)
        self.seen_dtypes = []

    def forward(self, down, upper):
        y = torch.tanh(self.down(down))
        for layer, state in zip(self.up, upper):
            if state is not None:
                y = y + torch.sin(layer(state))
        self.seen_dtypes.append(y.dtype)
        return self.drop(y)


class ToyColumn(ReversibleColumn):
    def __init__(self, num_levels: int, drop: float = 0.3, reads_upper: bool = True):
        super().__init__()
        self.levels = nn.ModuleList([
            ToyLevel(num_levels - 1 - level if reads_upper else 0, drop) for level in range(num_levels)
        ])
        # alphas of both signs, away from zero
        signs = torch.tensor([1.0, -1.0]).repeat(num_levels)[:num_levels]
        self.alphas = nn.ParameterList([
            nn.Parameter(signs[level] * (0.5 + torch.rand(DIM))) for level in range(num_levels)
        ])

    def level_modules(self):
        return list(self.levels)

    def level_alphas(self):
        return list(self.alphas)


def make_columns(num_columns, num_levels, drop=0.3, dtype=torch.float64, first_reads_upper=False):
    """Like RevCol, the first column reads no previous state unless initial states are given."""
    torch.manual_seed(0)
    return nn.ModuleList([
        ToyColumn(num_levels, drop, reads_upper=j > 0 or first_reads_upper) for j in range(num_columns)
    ]).to(dtype).train()


def run_and_grad(columns, x, states, reversible, taps=(), seed=123, loss_on_final=True, autocast=None):
    """Loss over the final states and the taps with fixed random weights; returns (loss, grads).
    `autocast`: a dtype to run the forward under CPU autocast (the backward runs outside it)."""
    x = x.detach().clone().requires_grad_()
    states = None if states is None else [s.detach().clone().requires_grad_() for s in states]
    columns.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        final, tapped = run_columns(list(columns), x, states, reversible=reversible, taps=taps)
    weights = torch.Generator().manual_seed(7)
    outputs = (list(final) if loss_on_final else []) + list(tapped)
    loss = sum((o * torch.randn(o.shape, generator=weights, dtype=o.dtype)).sum() for o in outputs)
    loss.backward()
    grads = {f"param{i}": p.grad for i, p in enumerate(columns.parameters())}
    grads["x"] = x.grad
    for i, s in enumerate(states or []):
        grads[f"state{i}"] = s.grad
    return loss.detach(), grads


def assert_same_grads(reference, candidate, rtol=1e-9):
    assert reference.keys() == candidate.keys()
    for name, expected in reference.items():
        actual = candidate[name]
        assert (expected is None) == (actual is None), name
        if expected is None:
            continue
        norm = expected.norm()
        if norm == 0:
            assert torch.equal(actual, expected), f"{name}: expected an exact zero gradient"
        else:
            error = ((actual - expected).norm() / norm).item()
            assert error <= rtol, f"{name}: relative error {error:.3e}"


@pytest.mark.parametrize("num_levels", [1, 2, 3, 5])
@pytest.mark.parametrize("num_columns", [1, 3])
@pytest.mark.parametrize("with_states", [False, True])
def test_gradients_equal_ordinary_backprop(num_levels, num_columns, with_states):
    columns = make_columns(num_columns, num_levels, first_reads_upper=with_states)
    x = torch.randn(4, DIM, dtype=torch.float64)
    states = [torch.randn(4, DIM, dtype=torch.float64) for _ in range(num_levels)] if with_states else None
    taps = [(0, num_levels - 1), (num_columns - 1, 0)]
    loss_ref, ref = run_and_grad(columns, x, states, reversible=False, taps=taps)
    loss_rev, rev = run_and_grad(columns, x, states, reversible=True, taps=taps)
    assert torch.equal(loss_ref, loss_rev)  # the forward computes exactly the same thing
    assert_same_grads(ref, rev)


def test_gradient_through_an_early_tap_only():
    # No gradient reaches the last column: the backward still has to walk back through it.
    columns = make_columns(4, 3)
    x = torch.randn(4, DIM, dtype=torch.float64)
    _, ref = run_and_grad(columns, x, None, reversible=False, taps=[(1, 2)], loss_on_final=False)
    _, rev = run_and_grad(columns, x, None, reversible=True, taps=[(1, 2)], loss_on_final=False)
    assert_same_grads(ref, rev)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in columns[3].parameters())


def test_parameters_are_visible_to_autograd_grad():
    columns = make_columns(3, 3)
    x = torch.randn(4, DIM, dtype=torch.float64)
    params = list(columns.parameters())
    torch.manual_seed(0)
    final, _ = run_columns(list(columns), x, reversible=True)
    grads = torch.autograd.grad(sum(s.sum() for s in final), params)
    assert len(grads) == len(params) and all(g is not None for g in grads)
    # the first column starts from zero: its alphas get an exact zero gradient, not None
    first_alphas = {id(a) for a in columns[0].alphas}
    for p, g in zip(params, grads):
        if id(p) in first_alphas:
            assert torch.equal(g, torch.zeros_like(g))


def test_backward_leaves_the_global_rng_where_ordinary_backprop_does():
    columns = make_columns(3, 3, drop=0.5)
    x = torch.randn(4, DIM, dtype=torch.float64)
    after = []
    for reversible in (False, True):
        run_and_grad(columns, x, None, reversible=reversible)
        after.append(torch.rand(3))
    assert torch.equal(after[0], after[1])


def test_autocast_state_is_replayed_in_backward():
    columns = make_columns(2, 3, drop=0.2, dtype=torch.float32)
    x = torch.randn(4, DIM)
    results = {}
    for reversible in (False, True):
        for level in (lvl for c in columns for lvl in c.levels):
            level.seen_dtypes.clear()
        _, grads = run_and_grad(columns, x, None, reversible=reversible, autocast=torch.bfloat16)
        results[reversible] = grads
        dtypes = [d for c in columns for lvl in c.levels for d in lvl.seen_dtypes]
        # reversible: forward + recomputation in backward (outside the caller's autocast block), both bf16
        assert dtypes == [torch.bfloat16] * (len(dtypes)) and len(dtypes) == (2 if reversible else 1) * 6
    # Same bf16 ops in both modes; the reconstruction's fp32 rounding can flip a bf16 rounding
    # downstream, so agreement is to bf16 precision (without the replay the recomputation would run
    # in fp32 and the dtype check above fails).
    for name, expected in results[False].items():
        difference = (results[True][name] - expected).norm()
        assert difference <= 1e-2 * expected.norm(), name


def test_saved_memory_does_not_grow_with_columns():
    def saved_bytes(num_columns):
        columns = make_columns(num_columns, 3)
        params = {p.untyped_storage().data_ptr() for p in columns.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(4, DIM, dtype=torch.float64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            final, _ = run_columns(list(columns), x, reversible=True)
        sum(s.sum() for s in final).backward()
        return sum(seen.values())

    # x and the last column's 3 states: 4 tensors of 4 x DIM float64
    assert saved_bytes(2) == saved_bytes(6) == 4 * 4 * DIM * 8


def test_in_place_change_of_a_parameter_before_backward_is_refused():
    columns = make_columns(2, 2)
    x = torch.randn(4, DIM, dtype=torch.float64)
    final, _ = run_columns(list(columns), x, reversible=True)
    with torch.no_grad():
        columns[1].levels[0].down.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        sum(s.sum() for s in final).backward()


def test_without_grad_runs_the_ordinary_path():
    columns = make_columns(2, 3)
    x = torch.randn(4, DIM, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        plain, _ = run_columns(list(columns), x, reversible=False)
        torch.manual_seed(1)
        reversible, _ = run_columns(list(columns), x, reversible=True)
    assert all(torch.equal(a, b) and b.grad_fn is None for a, b in zip(plain, reversible))


def test_frozen_parameters_get_no_gradient():
    columns = make_columns(2, 2)
    for p in columns[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(4, DIM, dtype=torch.float64)
    _, ref = run_and_grad(columns, x, None, reversible=False)
    _, rev = run_and_grad(columns, x, None, reversible=True)
    assert_same_grads(ref, rev)
    assert all(p.grad is None for p in columns[0].parameters())


def test_invalid_arguments():
    columns = list(make_columns(2, 3))
    x = torch.randn(4, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least one column"):
        run_columns([], x)
    with pytest.raises(ValueError, match="initial states"):
        run_columns(columns, x, [x, x])
    with pytest.raises(ValueError, match="outside"):
        run_columns(columns, x, taps=[(2, 0)])
    with pytest.raises(ValueError, match="same number of levels"):
        run_columns(columns + list(make_columns(1, 2)), x)


def test_clamp_magnitude_keeps_the_sign_and_moves_zero_up():
    t = torch.tensor([0.5, -0.5, 1e-4, -1e-4, 0.0, -2e-3])
    clamp_magnitude_([t], 1e-3)
    assert torch.equal(t, torch.tensor([0.5, -0.5, 1e-3, -1e-3, 1e-3, -2e-3]))
    # nothing to clamp: no write, so a pending backward through the tensor stays valid
    p = nn.Parameter(torch.tensor([0.5, -0.7]))
    version = p._version
    clamp_magnitude_([p], 1e-3)
    assert p._version == version
