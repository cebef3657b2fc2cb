"""Refocus training: train only what the RefConv training scope allows, on one process or many, resumably.

    train(model_or_spec, data_dir, output_dir=..., epochs=..., ...)   a fresh run (converts the model first
                                                                      when it has no RefConv layers yet)
    resume(output_dir)                                                continues an interrupted run exactly

Runs under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) as DistributedDataParallel, gloo on
CPU and nccl on GPU; only rank 0 writes files (`torchrun --nproc_per_node 4 --no-python reparam train ...`).

The package, one job per module, imports flowing downwards:

    run.py        `train` / `resume`: the order of one run (set up, sanity check, make the folder, train,
                  finish) and the clean-up after a failed start; `TrainResult`
    loop.py       `Trainer`: epochs of steps, validation, the sanity check, stopping with a checkpoint,
                  divergence caught before it is saved
    setup.py      functions returning what a run needs: the model (loaded, converted, its scope applied),
                  the loaders, the optimizer and schedule
    state.py      the checkpoint (model file + train_state.pt, read weights_only) and exact resumption
                  (`Progress`, RNG state, per-rank state under DDP, the per-step seed)
    run_dir.py    the run folder: file names, train.log, metrics.jsonl, metrics.png, config.json, the
                  clean-up of a failed start (no torch)
    config.py     `TrainConfig` and every rule about settings, including which may change on resume (no
                  torch: the command line reads its defaults and checks from here)
    tasks/        what is learnt: data, loss, metrics, the best-model criterion and what the sanity check
                  compares; `classification.py` is the first task, a new task is a new file there

`reparam_zoo.data` stays the image-folder data layer (timm's dataset made resumable and robust); the
classification task builds on it. Nothing here reads code from a run folder or a data folder: config.json
is JSON, train_state.pt is read with `weights_only=True`, and a pickled model file of a run is read only
when the caller passes `trust_pickle`.

One run per folder: rank 0 holds an flock on the run folder while it runs (`RunDir.lock`), so a second run
into it is refused at once. One SIGINT/SIGTERM stops a run at its next stop point (a training step, a
validation batch, the end of set-up) with a checkpoint; a run stuck where it cannot look (a hung read) is
ended by the stop's watchdog a few seconds later, its last checkpoint intact (`processes.StopRequest`).

Importing this package imports no torch until one of the names below is used (`config` never does).
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import (OPTIMIZERS, RESUMABLE_OVERRIDES, SettingError, TrainConfig, TrainError,
                     default_warmup_epochs)
from .run_dir import read_config

__all__ = ["train", "resume", "read_config", "default_warmup_epochs", "TrainConfig", "TrainResult", "TrainError",
           "SettingError", "OPTIMIZERS", "RESUMABLE_OVERRIDES"]

# name -> module that defines it, imported on first use (they import torch)
_LAZY = {"train": "run", "resume": "run", "TrainResult": "run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
