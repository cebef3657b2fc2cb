"""The run's processes: a torchrun launch with one process still starts its process group (gloo on the CPU)
and trains through DDP; a plain launch does not."""
import json
import os
import subprocess
import sys

from reparam_zoo.processes import Processes

from test_train import _free_port

ONE_PROCESS_RUN = r"""
import json, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
from reparam_zoo.processes import Processes
procs = Processes.from_env("cpu")
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
F.cross_entropy(model(x), y).backward()
plain = [p.grad.clone() for p in model.parameters()]
model.zero_grad()
ddp = nn.parallel.DistributedDataParallel(model)
F.cross_entropy(ddp(x), y).backward()
err = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(), plain))
print(json.dumps({"distributed": procs.distributed, "world_size": procs.world_size, "rank": procs.rank,
                  "backend": dist.get_backend(), "sum": procs.sum([1.5, 2.0]), "max_abs_error": err}))
procs.close()
print(json.dumps({"closed": not dist.is_initialized()}))
"""


def test_one_process_torchrun_starts_its_group_and_runs_ddp():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(_free_port()), "--no-python", sys.executable, "-c", ONE_PROCESS_RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    assert lines[0]["distributed"] is True and lines[0]["world_size"] == 1 and lines[0]["rank"] == 0
    assert lines[0]["backend"] == "gloo" and lines[0]["sum"] == [1.5, 2.0]
    assert lines[0]["max_abs_error"] <= 1e-7  # DDP over one rank averages over one rank
    assert lines[1] == {"closed": True}


def test_a_plain_launch_stays_single_process(monkeypatch):
    for name in ("RANK", "MASTER_ADDR", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    procs = Processes.from_env("cpu")
    assert not procs.distributed and procs.world_size == 1 and not procs.owns_group
    monkeypatch.setenv("RANK", "0")  # RANK alone (no rendezvous address) is not a torchrun launch
    assert not Processes.from_env("cpu").distributed
