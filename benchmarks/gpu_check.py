"""Accelerator readiness in one run (< 5 minutes on one GPU): the device-dependent paths, measured.

    python benchmarks/gpu_check.py            # writes benchmarks/results/gpu_check.json on a GPU

Prints one table:
- refocus training step vs plain fine-tuning (resnet18, batch 32, 224 px; step = forward + backward +
  SGD step): step time ratio and peak memory ratio under float32, AMP float16 (GradScaler), AMP
  bfloat16, channels_last and torch.compile; the two models' steps interleaved, medians;
- fuse verification of a refocused model with TF32 on and off (it computes in float64 and must pass at the
  default rtol 1e-4 either way), beside the float32 error under TF32 that shows why;
- RevCol reversible gradients on CUDA vs ordinary backprop with drop path (CUDA RNG replay): float64
  (exact up to rounding) and float32 (close);
- a one-process nccl DDP refocus step (gradients vs the plain step) and `reparam train` under torchrun on
  the GPUs present (DDP over nccl with 2 or more; one GPU: a single-process CUDA run).
Without CUDA it says so and exits 0 without writing anything.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(BENCH_DIR, "results", "gpu_check.json")
REPO = os.path.dirname(BENCH_DIR)


def cuda_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


# -- refocus vs plain fine-tuning ---------------------------------------------------------------------
def make_trainer(model, *, amp, channels_last, compile_):
    """One training step of `model` (the trainable parameters only) under the given setting."""
    model = model.cuda().train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    run = torch.compile(model) if compile_ else model

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            loss = F.cross_entropy(run(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return model, step


def refocus_vs_plain(setting, *, amp=None, channels_last=False, compile_=False, batch=32, size=224, steps=8):
    from reparam_zoo import convert, create_model

    torch.manual_seed(0)
    plain_model = create_model("resnet18", num_classes=1000)
    refocus_model = convert(copy.deepcopy(plain_model))
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    peaks = {}
    for name, model in (("plain", plain_model), ("refocus", refocus_model)):  # peak memory: one model at a time
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trained, step = make_trainer(copy.deepcopy(model), amp=amp, channels_last=channels_last, compile_=compile_)
        for _ in range(3):
            step(x, y)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - before
        del trained, step
    torch.cuda.empty_cache()
    _, plain_step = make_trainer(plain_model, amp=amp, channels_last=channels_last, compile_=compile_)
    _, refocus_step = make_trainer(refocus_model, amp=amp, channels_last=channels_last, compile_=compile_)
    for _ in range(3):  # warm-up (and compilation)
        plain_step(x, y)
        refocus_step(x, y)
    ratios, plain_ms, refocus_ms = [], [], []
    for i in range(steps):  # interleaved, alternating which goes first
        pair = [("plain", plain_step), ("refocus", refocus_step)]
        times = {n: cuda_ms(lambda s=s: s(x, y)) for n, s in (pair if i % 2 == 0 else pair[::-1])}
        plain_ms.append(times["plain"])
        refocus_ms.append(times["refocus"])
        ratios.append(times["refocus"] / times["plain"])
    return {"check": "refocus / plain step", "setting": setting,
            "plain_ms": statistics.median(plain_ms), "refocus_ms": statistics.median(refocus_ms),
            "time_ratio": statistics.median(ratios), "peak_mib_plain": peaks["plain"] / 2 ** 20,
            "peak_mib_refocus": peaks["refocus"] / 2 ** 20, "memory_ratio": peaks["refocus"] / peaks["plain"]}


# -- fuse verification under TF32 ---------------------------------------------------------------------
def fuse_tf32():
    from reparam_zoo import convert, create_model, fuse
    from reparam_zoo.deploy import verify_equivalence
    from reparam_zoo.errors import EquivalenceError
    from reparam_zoo.layers.refconv import RefConvNd

    torch.manual_seed(0)
    model = convert(create_model("resnet50", num_classes=1000))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RefConvNd):
                m.transform_weight.normal_(0, 0.05)
    model = model.cuda().eval()
    x = (torch.randn(1, 3, 224, 224, device="cuda"),)
    rows, fused = [], None
    for tf32 in (False, True):
        set_tf32(tf32)
        start = time.perf_counter()
        try:
            fused = fuse(model, example_inputs=x)
            ok, rel, note = True, fused.fuse_report.max_rel_error, "float64 verification"
        except EquivalenceError as e:
            ok, rel, note = False, e.max_rel_error, str(e)[:120]
        flags_kept = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
        rows.append({"check": "fuse verification", "setting": f"TF32 {'on' if tf32 else 'off'}", "passed": ok,
                     "max_rel_error": rel, "rtol": 1e-4, "tf32_flags_unchanged": flags_kept,
                     "seconds": time.perf_counter() - start, "note": note})
    for tf32 in (False, True):  # the same check in float32, for contrast: what TF32 does to it
        set_tf32(tf32)
        try:
            _, rel, _ = verify_equivalence(model, fused, x, rtol=1e-4, atol=0.0, in_float64=False)
            ok = True
        except EquivalenceError as e:
            ok, rel = False, e.max_rel_error
        rows.append({"check": "float32 comparison (contrast)", "setting": f"TF32 {'on' if tf32 else 'off'}",
                     "passed": ok, "max_rel_error": rel, "rtol": 1e-4})
    set_tf32(False)
    return rows


# -- reversible gradients -----------------------------------------------------------------------------
def reversible_grads():
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_revcol import TINY, randomize_
    from reparam_zoo.models.revcol import RevCol

    rows = []
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-3)):
        torch.manual_seed(0)
        model = randomize_(RevCol(**TINY, num_columns=4, num_classes=10, drop_path_rate=0.3)).to(dtype).cuda().train()
        x = torch.randn(4, 3, 64, 64, dtype=dtype, device="cuda")
        grads, losses = {}, {}
        for save_memory in (False, True):
            model.save_memory = save_memory
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            loss = model(x).square().mean()
            loss.backward()
            grads[save_memory] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            losses[save_memory] = loss.item()
        errors = [((grads[True][n] - g).norm() / g.norm()).item() for n, g in grads[False].items() if g.norm() > 0]
        rows.append({"check": "RevCol reversible grads (drop path 0.3)", "setting": str(dtype).replace("torch.", ""),
                     "passed": losses[True] == losses[False] and max(errors) <= tol, "max_rel_error": max(errors),
                     "tolerance": tol, "same_loss": losses[True] == losses[False]})
    return rows


# -- DDP ----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_checks():
    import importlib.util

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from test_train import make_dataset

    # the one-process DDP step is the CUDA test's own script (loaded by path: tests/cuda is not a package)
    spec = importlib.util.spec_from_file_location("test_cuda_ddp", os.path.join(REPO, "tests", "cuda", "test_cuda_ddp.py"))
    ddp_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ddp_test)
    DDP_STEP = ddp_test.DDP_STEP

    rows = []
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", DDP_STEP], capture_output=True, text=True, timeout=240, env=env)
    if proc.returncode == 0:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"check": "nccl DDP refocus step", "setting": "1 process", "passed": result["max_rel_error"] <= 1e-6,
                     **result})
    else:
        rows.append({"check": "nccl DDP refocus step", "setting": "1 process", "passed": False,
                     "error": proc.stderr.strip().splitlines()[-1:]})
    work = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        data = make_dataset(os.path.join(work, "data"))
        nproc = min(2, torch.cuda.device_count())
        reparam = shutil.which("reparam") or os.path.join(os.path.dirname(sys.executable), "reparam")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "--no-python", reparam, "train", "resnet10t", "--data", data, "--num-classes", "3",
               "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0",
               "--amp", "-q", "-o", os.path.join(work, "run")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        row = {"check": "reparam train under torchrun", "setting": f"{nproc} process(es), --amp",
               "passed": proc.returncode == 0, "seconds": time.perf_counter() - start}
        if proc.returncode == 0:
            with open(os.path.join(work, "run", "config.json")) as f:
                row["world_size"] = json.load(f)["world_size"]
            row["passed"] = row["world_size"] == nproc
            row["note"] = f"DDP over nccl, {nproc} process(es)"  # torchrun starts the group also for one
        else:
            row["error"] = (proc.stderr.strip().splitlines() or [""])[-1]
        rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def summary(row) -> str:
    if "time_ratio" in row:
        return (f"time {row['time_ratio']:.3f}x ({row['refocus_ms']:.1f} / {row['plain_ms']:.1f} ms), "
                f"peak memory {row['memory_ratio']:.3f}x ({row['peak_mib_refocus']:.0f} / {row['peak_mib_plain']:.0f} MiB)")
    parts = []
    for key in ("max_rel_error", "world_size", "seconds"):
        if key in row and row[key] is not None:
            parts.append(f"{key.replace('_', ' ')} {row[key]:.3g}")
    if "error" in row:
        parts.append(f"error: {row['error']}")
    if "note" in row and row["check"] != "fuse verification":
        parts.append(row["note"])
    return ", ".join(parts) + ("" if row.get("passed", True) else "  FAILED")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="where the JSON goes (default: %(default)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; nothing measured, nothing written")
        return 0
    started = time.perf_counter()
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_tf32(False)
    rows = []
    for setting, kwargs in (("float32", {}), ("AMP float16 + GradScaler", {"amp": torch.float16}),
                            ("AMP bfloat16", {"amp": torch.bfloat16}), ("channels_last", {"channels_last": True}),
                            ("torch.compile", {"compile_": True})):
        try:
            rows.append(refocus_vs_plain(setting, **kwargs))
        except Exception as e:  # one failing setting is a result, not the end of the check
            rows.append({"check": "refocus / plain step", "setting": setting, "passed": False,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        print(f"  {setting}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for part in (fuse_tf32, reversible_grads, ddp_checks):
        try:
            rows.extend(part())
        except Exception as e:
            rows.append({"check": part.__name__, "setting": "", "passed": False,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        print(f"  {part.__name__}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags

    width = max(len(r["check"]) for r in rows)
    set_width = max(len(r["setting"]) for r in rows)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
    print(f"{'check'.ljust(width)}  {'setting'.ljust(set_width)}  result")
    print(f"{'-' * width}  {'-' * set_width}  ------")
    for r in rows:
        print(f"{r['check'].ljust(width)}  {r['setting'].ljust(set_width)}  {summary(r)}")
    seconds = time.perf_counter() - started
    print(f"({seconds:.0f} s)")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpus": torch.cuda.device_count(), "seconds": seconds, "rows": rows,
              "command": "python benchmarks/gpu_check.py"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if all(r.get("passed", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
