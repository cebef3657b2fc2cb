"""DistributedDataParallel over nccl: a one-process group whose refocus gradients equal the plain step's,
and `reparam train` under torchrun on the GPUs present (DDP over nccl; with one GPU a single torchrun
process, which still starts its nccl group and trains through DDP; config.json records world_size 1)."""
import json
import os
import subprocess
import sys

import torch

from test_train import CLASSES, TRAIN_PER_CLASS, _free_port, make_dataset

REPARAM = os.path.join(os.path.dirname(sys.executable), "reparam")

DDP_STEP = r"""
import json, os, sys, torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from reparam_zoo import convert, create_model
dist.init_process_group("nccl", rank=0, world_size=1)
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
torch.manual_seed(0)
model = convert(create_model("resnet10t", num_classes=10)).cuda().train()
for n, p in model.named_parameters():
    if p.requires_grad:
        with torch.no_grad():
            p.normal_(0, 0.02)
x = torch.randn(4, 3, 64, 64, device="cuda"); y = torch.randint(0, 10, (4,), device="cuda")
def grads(m):
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
plain = grads(model)
wrapped = DDP(model, device_ids=[0])
ddp = grads(wrapped)
err = max(((ddp[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in plain.items())
print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(), "params": len(plain),
                  "max_rel_error": err}))
dist.destroy_process_group()
"""


def test_one_process_nccl_ddp_refocus_gradients_equal_the_plain_step():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", DDP_STEP], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["backend"] == "nccl" and result["world_size"] == 1 and result["params"] > 0
    assert result["max_rel_error"] <= 1e-6  # one process: DDP's all-reduce averages over one rank


def test_reparam_train_under_torchrun_on_cuda(tmp_path):
    data = make_dataset(tmp_path / "data")
    nproc = min(2, torch.cuda.device_count())
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), "--no-python", REPARAM, "train", "resnet10t", "--data", data, "--num-classes",
           str(len(CLASSES)), "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
           "--warmup-epochs", "0", "--amp", "-q", "-o", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["world_size"] == nproc and config["amp"] is True
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    per_step = 8 * nproc
    assert rows[-1]["train_images"] == len(CLASSES) * TRAIN_PER_CLASS // per_step * per_step
    assert rows[-1]["train_loss"] > 0 and all(0 <= r["val_acc"] <= 1 for r in rows)
