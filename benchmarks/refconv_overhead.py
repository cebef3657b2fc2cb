"""RefConv training overhead: step time and training memory of refocusing vs plain fine-tuning vs the
straightforward RefConv formulation, on CPU.

    python benchmarks/refconv_overhead.py [--models resnet18 mobilenetv2_100 rexnetv1_100] [--batch 32]
        [--size 224] [--reps 3] [--max-reps 15] [--budget-s 360] [--threads 1] [--profile] [--default-malloc]
        [--no-readme]
    python benchmarks/refconv_overhead.py --own-loop-only [--own-loop-rounds 8]

Three variants of the same randomly initialised timm model (`pretrained=False`; the weights' values do
not change the cost), side by side in one process:

* plain:   full fine-tuning, every parameter trains (SGD with momentum).
* refconv: `reparam_zoo.convert(model)` in the default "transforms" scope: only the refocusing transforms
  train, BatchNorm keeps updating its running statistics.
* naive:   the same convs replaced by `NaiveRefConv2d` below, the formulation of the authors' script (a
  grouped `nn.Conv2d` over the base kernel recomputed in every forward), same "transforms" scope.

A step is forward + cross-entropy + backward + optimizer step + zero_grad on one fixed batch. The
variants run interleaved, in rotating order, after one warm-up step each: at least `--reps` rounds, more
while the model's share of `--budget-s` lasts. Reported are the medians of process CPU time (primary: with
one thread it is the process's own work, where wall time on a shared machine measures the other jobs) and
of wall time, and ratios as the median over rounds of the per-round ratio. Separately, the part where
RefConv and the naive formulation differ (computing every kernel and back-propagating into the
transforms) is timed alone, since it is small against a whole step.

Memory (what is measured): `saved` is every tensor autograd keeps from the forward for the backward
(seen through `torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage, counted by the whole
storage's size, the model's own parameters and buffers excluded, the input batch included);
`grads` and `optimizer` are the bytes of the gradients and SGD momentum buffers after a step; `model` is
parameters plus buffers. `total` adds the four: the memory a training step needs besides the
allocator's transient workspace (not counted).

Own loop, default allocator: what a user's own training loop gets, in a child process that leaves glibc's
allocator as it is (the main process keeps freed memory, as `reparam train` does): a plain PyTorch loop,
one SGD optimizer per model, plain / RefConv / RefConv through separate differentiable ops (the
implementation before the layer's one-Function training path; `keeps_kernel_in_graph` layers and autocast
still take it) in paired, rotating steps, for each of `OWN_LOOP_CONFIGS` (issue 19's batch 32 at 224 with two
threads, and batch 8 at 112 with one). It records CPU and wall time and the process's minor page faults per
step (`getrusage`), the allocator's cost that does not depend on the machine's load.

Work (deterministic context for the timings): `step GMACs` are the conv and matmul multiply-accumulates of
forward + backward as `torch.utils.flop_counter` counts them (its flops / 2, with its conv-backward
formula corrected for grouped convs, see `_conv_backward_flop`; weight gradients only where they are
needed; BatchNorm, elementwise ops and the optimizer are not counted).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import flop_counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timm  # noqa: E402

import reparam_zoo  # noqa: E402  (also registers rexnetv1_* with timm)
from reparam_zoo.surgery import refconv_layers, replace_modules  # noqa: E402
from reparam_zoo.processes import keep_freed_memory  # noqa: E402

from benchmarks import _common  # noqa: E402

DEFAULT_MODELS = ("resnet18", "mobilenetv2_100", "rexnetv1_100")
DEPTHWISE_HEAVY = ("mobilenetv2_100", "rexnetv1_100")
VARIANTS = ("plain", "refconv", "naive")
GOALS = {"refconv_vs_plain_max": 1.0, "refconv_faster_than_naive_on": list(DEPTHWISE_HEAVY)}


class NaiveRefConv2d(nn.Module):
    """The straightforward RefConv, as the authors' script writes it: the transform is an `nn.Conv2d`
    with `C_in*C_out/g**2` groups applied to the frozen kernel in every forward. Reference only."""

    def __init__(self, conv: nn.Conv2d, map_k: int = 3):
        super().__init__()
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
            raise TypeError(f"NaiveRefConv2d needs a zero-padded nn.Conv2d, got {conv}")
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.num_2d_kernels = conv.out_channels * conv.in_channels // conv.groups
        self.convmap = nn.Conv2d(
            self.num_2d_kernels, self.num_2d_kernels, map_k, stride=1, padding=map_k // 2,
            groups=conv.in_channels * conv.out_channels // conv.groups ** 2, bias=False,
        )
        nn.init.zeros_(self.convmap.weight)

    def kernel(self) -> torch.Tensor:
        origin = self.weight.view(1, self.num_2d_kernels, *self.weight.shape[2:])
        return self.weight + self.convmap(origin).view(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def naive_convert(model: nn.Module, names) -> nn.Module:
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    swaps = {id(modules[n]): NaiveRefConv2d(modules[n]) for n in names}
    replace_modules(model, lambda m: swaps.get(id(m)))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("convmap.weight"))
    return model


def build_variants(name: str) -> dict:
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False).train()
    refconv = reparam_zoo.convert(plain).train()
    naive = naive_convert(plain, refconv.refconv_summary.converted_names).train()
    return {"plain": plain, "refconv": refconv, "naive": naive}


def check_same_function(models: dict) -> float:
    """With the same non-zero transforms, RefConv and the naive formulation must compute the same thing
    (so the benchmark compares two implementations of one function). Returns the max abs difference."""
    refconv, naive = models["refconv"], models["naive"]
    naive_modules = dict(naive.named_modules())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in refconv_layers(refconv):
            values = torch.randn(layer.transform_weight.shape, generator=generator) * 0.02
            layer.transform_weight.copy_(values)
            naive_modules[name].convmap.weight.copy_(values)
        x = torch.randn(2, 3, 64, 64, generator=generator)
        diff = (refconv.eval()(x) - naive.eval()(x)).abs().max().item()
        for name, layer in refconv_layers(refconv):
            layer.transform_weight.zero_()
            naive_modules[name].convmap.weight.zero_()
    refconv.train(), naive.train()
    if diff > 1e-3:
        raise SystemExit(f"RefConv and the naive formulation disagree (max abs diff {diff:.3g}): not benchmarking")
    return diff


class Trainer:
    """One training step of one variant on a fixed batch; also measures the step's memory."""

    def __init__(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
        self.model, self.x, self.labels = model, x, labels
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=1e-4, momentum=0.9)

    def step(self) -> dict:
        """One step; returns the CPU seconds of its phases (zero_grad counts to the optimizer)."""
        t0 = time.process_time()
        loss = F.cross_entropy(self.model(self.x), self.labels)
        t1 = time.process_time()
        loss.backward()
        t2 = time.process_time()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.process_time()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}

    def measured_step(self) -> dict:
        """A step with the memory and MAC bookkeeping of the module docstring (doubles as the warm-up step)."""
        own = {t.untyped_storage().data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())}
        saved = {}

        def pack(t: torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with flop_counter.FlopCounterMode(display=False, custom_mapping=_FLOP_FORMULAS) as counter:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = F.cross_entropy(self.model(self.x), self.labels)
            loss.backward()
        self.optimizer.step()
        grads = sum(p.grad.nbytes for p in self.params if p.grad is not None)
        optimizer = sum(
            t.nbytes for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        )
        model = sum(t.nbytes for t in list(self.model.parameters()) + list(self.model.buffers()))
        self.optimizer.zero_grad(set_to_none=True)
        memory = {"saved": sum(saved.values()), "grads": grads, "optimizer": optimizer, "model": model}
        memory = {k: v / _common.MIB for k, v in memory.items()}
        memory["total"] = sum(memory.values())
        return {"memory_mib": memory, "gmacs": counter.get_total_flops() / 2e9}


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:
    """torch.utils.flop_counter's formula with a grouped conv's weight gradient counted right: torch's
    counts it as if the conv were dense (C_in*C_out instead of C_in*C_out/groups, e.g. 32x too much for a
    32-channel depthwise conv). The weight gradient costs what the forward does."""
    flops = 0
    if output_mask[0]:
        flops += flop_counter.conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        flops += flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return flops


_FLOP_FORMULAS = {torch.ops.aten.convolution_backward: _conv_backward_flop}


def profile_step(trainer: Trainer, rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def transform_cost(models: dict, reps: int) -> dict:
    """CPU seconds of computing every converted layer's kernel and back-propagating a gradient into its
    transform, RefConv vs the naive formulation: the part of a step where the two differ, measured alone
    (it is small against a step, so the step timings cannot resolve it on a noisy machine)."""
    layers = refconv_layers(models["refconv"])
    naive_modules = dict(models["naive"].named_modules())
    naive = [naive_modules[name] for name, _ in layers]
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(layer.weight_base.shape, generator=generator) for _, layer in layers]

    def run(kernels, params):
        torch.autograd.backward(kernels, grads)
        for p in params:
            p.grad = None

    variants = {
        "refconv": lambda: run([l.refocused_weight() for _, l in layers], [l.transform_weight for _, l in layers]),
        "naive": lambda: run([m.kernel() for m in naive], [m.convmap.weight for m in naive]),
    }
    times = _common.interleaved(variants, reps=reps, warmup=1)
    return {
        "cpu_ms": {v: 1e3 * statistics.median(times[v]["cpu"]) for v in variants},
        "refconv_vs_naive": _common.median_ratio(times, "refconv", "naive", "cpu"),
    }


def measure_model(name: str, args, budget_s: float) -> dict:
    models = build_variants(name)
    max_diff = check_same_function(models)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator)
    trainers = {v: Trainer(models[v], x, labels) for v in VARIANTS}
    counted = {v: trainers[v].measured_step() for v in VARIANTS}  # also the warm-up
    times = _common.interleaved(
        {v: trainers[v].step for v in VARIANTS}, reps=args.reps, warmup=0, budget_s=budget_s, max_reps=args.max_reps
    )
    transforms = transform_cost(models, reps=args.transform_reps)

    layers = refconv_layers(models["refconv"])
    step_cpu = {v: statistics.median(times[v]["cpu"]) for v in VARIANTS}
    result = {
        "converted_layers": len(layers),
        "depthwise_layers": sum(1 for _, l in layers if l.groups > 1 and l.groups == l.in_channels == l.out_channels),
        "params": sum(p.numel() for p in models["plain"].parameters()),
        "trainable_params": {v: sum(p.numel() for p in trainers[v].params) for v in VARIANTS},
        "transform_gmacs_per_step": sum(l.transform_macs() for _, l in layers) / 1e9,
        "refconv_vs_naive_max_abs_diff": max_diff,
        "rounds": len(times["plain"]["cpu"]),
        "step_cpu_s": step_cpu,
        "step_s": {v: statistics.median(times[v]["wall"]) for v in VARIANTS},
        "phase_cpu_s": {
            v: {phase: statistics.median(times[v][phase]) for phase in ("forward", "backward", "optimizer")}
            for v in VARIANTS
        },
        "refconv_vs_plain_cpu_time": _common.median_ratio(times, "refconv", "plain", "cpu"),
        "refconv_vs_naive_cpu_time": _common.median_ratio(times, "refconv", "naive", "cpu"),
        "naive_vs_plain_cpu_time": _common.median_ratio(times, "naive", "plain", "cpu"),
        "refconv_vs_plain_cpu_time_range": _ratio_range(times, "refconv", "plain"),
        "refconv_vs_naive_cpu_time_range": _ratio_range(times, "refconv", "naive"),
        "refconv_vs_plain_wall": _common.median_ratio(times, "refconv", "plain"),
        "refconv_vs_naive_wall": _common.median_ratio(times, "refconv", "naive"),
        "transform_fwd_bwd_cpu_ms": transforms["cpu_ms"],
        "transform_refconv_vs_naive_cpu_time": transforms["refconv_vs_naive"],
        "transform_share_of_plain_step": {
            v: ms / 1e3 / step_cpu["plain"] for v, ms in transforms["cpu_ms"].items()
        },
        "memory_mib": {v: counted[v]["memory_mib"] for v in VARIANTS},
        "step_gmacs": {v: counted[v]["gmacs"] for v in VARIANTS},
        "times": times,
    }
    if args.profile:
        result["profile"] = {v: profile_step(trainers[v]) for v in VARIANTS}
    return result


OWN_LOOP_VARIANTS = ("plain", "refconv", "refconv_separate_ops")
# (batch, resolution, threads): issue 19's configuration, and a small step in which the weight-sized
# allocations are a visible share (at batch 32 the activations' page faults dominate every variant's)
OWN_LOOP_CONFIGS = ((32, 224, 2), (8, 112, 1))
OWN_LOOP_MODEL = "resnet18"


def own_loop(name: str, batch: int, size: int, threads: int, rounds: int) -> dict:
    """Paired steps of a plain PyTorch loop (see the module docstring); run it in a process whose allocator
    is untouched. Returns medians of CPU and wall seconds and minor page faults per step, and the medians
    of the per-round ratios to plain."""
    from reparam_zoo.layers.refconv import RefConvNd

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plain = timm.create_model(name, pretrained=False).train()
    refconv = reparam_zoo.convert(plain).train()
    separate = copy.deepcopy(refconv)
    for module in separate.modules():
        if isinstance(module, RefConvNd):
            module._runs_as_one_function = lambda *args: False  # the separate differentiable ops
    models = dict(zip(OWN_LOOP_VARIANTS, (plain, refconv, separate)))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    optimizers = {v: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
                  for v, m in models.items()}

    def step(variant):
        faults, cpu, wall = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time(), time.perf_counter()
        F.cross_entropy(models[variant](x), labels).backward()
        optimizers[variant].step()
        optimizers[variant].zero_grad(set_to_none=True)
        return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall,
                "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}

    for variant in OWN_LOOP_VARIANTS:  # two warm-up steps: momentum buffers exist from the second on
        step(variant)
        step(variant)
    samples = {v: [] for v in OWN_LOOP_VARIANTS}
    for r in range(rounds):
        for variant in OWN_LOOP_VARIANTS[r % 3:] + OWN_LOOP_VARIANTS[:r % 3]:
            samples[variant].append(step(variant))

    def median(variant, key):
        return statistics.median(s[key] for s in samples[variant])

    def ratio(variant, key):
        return statistics.median(a[key] / b[key] for a, b in zip(samples[variant], samples["plain"]))

    return {
        "model": name, "batch": batch, "resolution": size, "threads": threads, "rounds": rounds,
        "allocator": "glibc default (mallopt untouched)",
        "step_cpu_s": {v: median(v, "cpu") for v in OWN_LOOP_VARIANTS},
        "step_wall_s": {v: median(v, "wall") for v in OWN_LOOP_VARIANTS},
        "minor_faults_per_step": {v: median(v, "faults") for v in OWN_LOOP_VARIANTS},
        "vs_plain_cpu_time": {v: ratio(v, "cpu") for v in OWN_LOOP_VARIANTS[1:]},
        "vs_plain_wall": {v: ratio(v, "wall") for v in OWN_LOOP_VARIANTS[1:]},
        "samples": samples,
    }


def own_loop_in_child(rounds: int) -> list:
    """`own_loop` for each of OWN_LOOP_CONFIGS, each in a fresh process: this one may already keep freed
    memory, which no call undoes."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.refconv_overhead import own_loop; "
            "print(json.dumps(own_loop(sys.argv[2], *map(int, sys.argv[3:]))))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for batch, size, threads in OWN_LOOP_CONFIGS:
        proc = subprocess.run([sys.executable, "-c", code, root, OWN_LOOP_MODEL, str(batch), str(size), str(threads),
                               str(rounds)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"own-loop child failed: {(proc.stderr.strip().splitlines() or [''])[-1]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"own loop, default allocator ({r['model']}, batch {batch} at {size}, {threads} threads, {rounds} "
              "rounds): " + ", ".join(f"{v} {r['step_cpu_s'][v]:.3f} s CPU {r['step_wall_s'][v]:.3f} s wall "
                                      f"{r['minor_faults_per_step'][v]:.0f} faults" for v in OWN_LOOP_VARIANTS),
              flush=True)
    return rows


def own_loop_block(results: dict) -> str:
    env = results["environment"]
    rows = []
    for r in results["own_loop_default_allocator"]:
        for v in OWN_LOOP_VARIANTS:
            ratios = "1 / 1" if v == "plain" else f"**{r['vs_plain_cpu_time'][v]:.3f}** / {r['vs_plain_wall'][v]:.3f}"
            rows.append([f"batch {r['batch']} at {r['resolution']}, {r['threads']} thr.", v.replace("_", " "),
                         f"{r['step_cpu_s'][v]:.3f} / {r['step_wall_s'][v]:.3f}", ratios,
                         f"{r['minor_faults_per_step'][v]:.0f}"])
    first = results["own_loop_default_allocator"][0]
    return "\n".join([
        *_common.section_head("RefConv in your own loop, default allocator (`refconv_overhead.py`, alone: "
                               "`--own-loop-only`)", results["command"]),
        f"{_common.facts_line(env)}; "
        f"{first['model']} at the threads given per row, a plain PyTorch loop (one SGD optimizer per model, "
        f"`zero_grad(set_to_none=True)`) in a child process that leaves glibc's allocator untouched, "
        f"{first['rounds']} paired rounds after two "
        "warm-up steps each. `refconv` is the layer's training path (one autograd Function, the kernel in a "
        "buffer the layer keeps), `refconv separate ops` the same layer through separate differentiable ops "
        "(its only path before). Ratios are medians of per-round ratios; minor page faults per step are the "
        "allocator's cost and do not depend on the machine's load.",
        "",
        _common.markdown_table(["own loop", "variant", "step s CPU / wall", "vs plain CPU / wall",
                                "minor page faults / step"], rows),
    ])


def _ratio_range(times, numerator, denominator):
    ratios = [a / b for a, b in zip(times[numerator]["cpu"], times[denominator]["cpu"])]
    return [min(ratios), max(ratios)]


def readme_block(results: dict) -> str:
    step_rows, memory_rows = [], []
    for name, r in results["models"].items():
        cpu, phases, m = r["step_cpu_s"], r["phase_cpu_s"], r["memory_mib"]
        lo, hi = r["refconv_vs_plain_cpu_time_range"]
        step_rows.append([
            name, r["rounds"],
            " / ".join(f"{cpu[v]:.2f}" for v in VARIANTS),
            " / ".join(f"{phases[v]['optimizer']:.2f}" for v in VARIANTS),
            f"**{r['refconv_vs_plain_cpu_time']:.3f}** ({lo:.2f}-{hi:.2f}) [{r['refconv_vs_plain_wall']:.2f}]",
            f"**{r['refconv_vs_naive_cpu_time']:.3f}** [{r['refconv_vs_naive_wall']:.2f}]",
            " / ".join(f"{r['transform_fwd_bwd_cpu_ms'][v]:.0f}" for v in ("refconv", "naive"))
            + f" (**{r['transform_refconv_vs_naive_cpu_time']:.2f}x**)",
        ])
        memory_rows.append([
            name, f"{r['converted_layers']} ({r['depthwise_layers']} dw)",
            " / ".join(f"{r['trainable_params'][v] / 1e6:.1f}M" for v in ("plain", "refconv")),
            " / ".join(f"{r['step_gmacs'][v]:.0f}" for v in VARIANTS), f"{r['transform_gmacs_per_step']:.2f}",
            " / ".join(f"{m[v]['saved']:.0f}" for v in VARIANTS),
            " / ".join(f"{m[v]['grads'] + m[v]['optimizer']:.0f}" for v in VARIANTS),
            " / ".join(f"{m[v]['total']:.0f}" for v in VARIANTS),
        ])
    env = results["environment"]
    lines = [
        *_common.section_head("RefConv training overhead (`refconv_overhead.py`)", results["command"]),
        f"{_common.facts_line(env)}; batch {results['batch']}, "
        f"{results['resolution']}x{results['resolution']}, one training step = forward + backward + SGD step"
        + (", freed memory kept for reuse as `reparam train` keeps it (`keep_freed_memory`). "
           if results.get("keep_freed_memory") else ", glibc's default allocator settings. ") +
        "The three variants run interleaved; ratios are medians over rounds of the per-round ratio of process "
        "CPU time (the primary measure: a single-threaded process's CPU time is its own work, while its wall "
        "time on this shared machine mostly measures the other jobs; wall-time ratio in square brackets, "
        "range of the per-round CPU ratios in round brackets). Goals: RefConv/plain <= 1.0 on every model, "
        f"RefConv faster than naive on {', '.join(DEPTHWISE_HEAVY)}. Goals met (step CPU time): "
        f"{_common.goals_text(results['goals_met'])}.",
        "",
        _common.markdown_table(
            ["model", "rounds", "step CPU s plain / RefConv / naive", "of which optimizer",
             "RefConv/plain", "RefConv/naive", "transform fwd+bwd CPU ms RefConv / naive"],
            step_rows,
        ),
        "",
        _common.markdown_table(
            ["model", "RefConv layers", "trainable params plain / RefConv", "step GMACs plain / RefConv / naive",
             "transform GMACs", "saved MiB plain / RefConv / naive", "grads + momentum MiB",
             "total MiB plain / RefConv / naive"],
            memory_rows,
        ),
        "",
        "Step GMACs: conv and matmul multiply-accumulates of forward + backward (`torch.utils.flop_counter` / 2, "
        "its conv-backward formula corrected for grouped convs, whose weight gradient it counts as dense; weight "
        "gradients only where needed); `transform GMACs` is the transform's forward alone. `saved` = "
        "tensors autograd keeps for backward (parameters and buffers excluded); `total` = saved + gradients + "
        "SGD momentum + parameters and buffers. `transform fwd+bwd` = computing all refocused kernels and "
        "back-propagating into the transforms, timed alone (median of "
        f"{results['transform_reps']} interleaved rounds).",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=3, help="rounds per model at least")
    parser.add_argument("--max-reps", type=int, default=15, help="rounds per model at most")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="wall seconds for the step timings of all models together; rounds beyond --reps "
                             "are added while a model's share of it lasts")
    parser.add_argument("--transform-reps", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="also store a torch.profiler table per variant")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (default: keep freed memory, as `reparam train` does)")
    parser.add_argument("--own-loop-only", action="store_true",
                        help="measure only the 'own loop, default allocator' row (a child process; JSON to --out, "
                             "default results/refconv_overhead_own_loop.json)")
    parser.add_argument("--own-loop-rounds", type=int, default=8)
    _common.add_run_options(parser, "refconv_overhead.json")
    args = _common.parse_run_options(parser, argv)
    if args.own_loop_only:
        return main_own_loop(args, argv)
    own = own_loop_in_child(args.own_loop_rounds)  # before this process changes its allocator
    keeps_freed_memory = False if args.default_malloc else keep_freed_memory()

    results = {
        "command": _common.command_line("refconv_overhead.py", argv),
        "environment": _common.machine_facts(),
        "batch": args.batch, "resolution": args.size, "min_reps": args.reps, "max_reps": args.max_reps,
        "budget_s": args.budget_s, "transform_reps": args.transform_reps,
        "optimizer": "SGD(lr=1e-4, momentum=0.9) over the trainable parameters; zero_grad(set_to_none=True)",
        "keep_freed_memory": keeps_freed_memory,
        "what_is_measured": __doc__.split("Memory (what is measured): ")[1].strip(),
        "goals": GOALS,
        "own_loop_default_allocator": own,
        "models": {},
    }
    started = time.perf_counter()
    for name, share in _common.budget_shares(args.models, args.budget_s):
        t0 = time.perf_counter()
        r = measure_model(name, args, share)
        results["models"][name] = r
        cpu = r["step_cpu_s"]
        print(
            f"{name}: step CPU s plain {cpu['plain']:.2f}, RefConv {cpu['refconv']:.2f}, naive {cpu['naive']:.2f} "
            f"({r['rounds']} rounds); RefConv/plain {r['refconv_vs_plain_cpu_time']:.3f} (wall "
            f"{r['refconv_vs_plain_wall']:.3f}), RefConv/naive {r['refconv_vs_naive_cpu_time']:.3f} (wall "
            f"{r['refconv_vs_naive_wall']:.3f}); transforms alone RefConv/naive "
            f"{r['transform_refconv_vs_naive_cpu_time']:.2f} ({r['transform_fwd_bwd_cpu_ms']['refconv']:.0f} vs "
            f"{r['transform_fwd_bwd_cpu_ms']['naive']:.0f} ms); total MiB "
            + " / ".join(f"{r['memory_mib'][v]['total']:.0f}" for v in VARIANTS)
            + f" [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
        for variant, table in r.get("profile", {}).items():
            print(f"--- {name} {variant}\n{table}")
    models = results["models"]
    results["goals_met"] = {
        "refconv_vs_plain": all(
            r["refconv_vs_plain_cpu_time"] <= GOALS["refconv_vs_plain_max"] for r in models.values()
        ),
        "refconv_faster_than_naive": all(
            models[m]["refconv_vs_naive_cpu_time"] < 1.0 for m in DEPTHWISE_HEAVY if m in models
        ),
    }
    _common.finish_run(results, args, "refconv_overhead", readme_block, started)
    if not args.no_readme:
        _common.update_readme_block("refconv_own_loop", own_loop_block(results))
    print(f"goals met: {results['goals_met']}; wrote {args.out} [{results['elapsed_s']:.0f} s]")
    return results


def main_own_loop(args, argv) -> dict:
    started = time.perf_counter()
    if args.out == os.path.join(_common.RESULTS_DIR, "refconv_overhead.json"):
        args.out = os.path.join(_common.RESULTS_DIR, "refconv_overhead_own_loop.json")
    results = {"command": _common.command_line("refconv_overhead.py", argv), "environment": _common.machine_facts(),
               "own_loop_default_allocator": own_loop_in_child(args.own_loop_rounds)}
    _common.finish_run(results, args, "refconv_own_loop", own_loop_block, started)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
