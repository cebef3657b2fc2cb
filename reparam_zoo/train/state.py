"""The checkpoint of a run and exact resumption.

A checkpoint is two files: the model (last.safetensors, or last.pt for a trusted pickle's run) and
train_state.pt, written second as the commit point; both carry the global step, so a pair from different
steps (a kill between the two writes) is refused. train_state.pt holds only tensors and plain containers
(the run's history as JSON text) and is read with `weights_only=True`: a run folder is data, reading it runs
no code.

Exact resumption rests on three things: the data order and every sample's augmentation are functions of
`(seed, epoch, index)` (see `reparam_zoo.data`), dropout/drop-path randomness is re-seeded from
`(seed, epoch, step, rank)` before every step (`step_seed`), and the LR schedule is a function of the step
count. The checkpoint then only needs the weights, the optimizer state, the position and the metrics so far.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpoint import check_compatible, read_state_dict
from ..errors import CheckpointError, first_line
from .config import TrainError
from .run_dir import STATE_FILE, RunDir

__all__ = ["Progress", "STATE_VERSION", "read_state", "check_can_continue", "save_checkpoint", "restore_progress",
           "restore_rank_state", "step_seed", "save_model", "read_model_file", "load_weights", "set_trainable"]

STATE_VERSION = 2  # 2: the epoch's partial sums are a dict named by the task


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """The seed of the global generators for one training step (dropout, drop-path)."""
    return ((((seed * 1_000_003) + epoch) * 1_000_033 + step) * 1_009 + rank) % (2 ** 63)


@dataclass
class Progress:
    """Where a run is, and what it measured so far: all of it saved in the checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based); == epochs when done
    step: int = 0  # batches of `epoch` already trained
    global_step: int = 0
    partial: Dict[str, float] = field(default_factory=dict)  # the task's sums over the epoch in progress
    history: List[Dict[str, Any]] = field(default_factory=list)
    best: Dict[str, Any] = field(default_factory=dict)
    sanity: Dict[str, Any] = field(default_factory=dict)
    unreadable: List[str] = field(default_factory=list)

    def tag(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "global_step": self.global_step}


def read_state(path: str) -> Dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"{path}: unreadable training state ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a training state of this reparam-zoo version")
    return state


def check_can_continue(state: Dict[str, Any], epochs: int, output_dir: str, best_path: Optional[str]) -> None:
    """Whether `epochs` leaves anything to train after the checkpoint (`best_path`: named in the message
    when the run finished, for the user who wanted its deploy model)."""
    if state["step"] == 0 and state["epoch"] >= epochs:
        if state["epoch"] == epochs:
            deploy = f"; to deploy its best model: reparam fuse {best_path}" if best_path else ""
            raise TrainError(f"{output_dir}: the run already finished its {state['epoch']} epochs; pass a larger "
                             f"--epochs / epochs= to train on{deploy}")
        raise TrainError(f"{output_dir}: the run already trained {state['epoch']} epochs; --epochs / epochs= must "
                         f"be more than that to extend it, got {epochs}")
    if state["epoch"] >= epochs:
        raise TrainError(f"{output_dir}: was stopped in epoch {state['epoch'] + 1}; --epochs {epochs} would end "
                         "before it")


def restore_progress(state: Dict[str, Any], *, classes: Sequence[str], digest: str, data_dir: str) -> Progress:
    """The progress of the checkpoint, and its random streams set back; the data must be what it was."""
    if state["classes"] != list(classes):
        raise TrainError(f"{data_dir}: classes differ from the ones the run started with")
    if state.get("images", digest) != digest:
        raise TrainError(f"{data_dir}: holds other images than the run started with (the same class folders, but "
                         "files added, removed or renamed)")
    torch.set_rng_state(state["torch_rng"])
    random.setstate(_as_random_state(state["python_rng"]))
    return Progress(epoch=state["epoch"], step=state["step"], global_step=state["global_step"],
                    partial=dict(state["partial"]), history=json.loads(state["history"]),
                    best=json.loads(state["best"]), sanity=json.loads(state["sanity"]),
                    unreadable=list(state["unreadable"]))


def rank_states(procs, model: nn.Module, progress: Progress) -> Optional[List[Dict[str, Any]]]:
    """Mid-epoch, with several processes: what differs between the ranks until the epoch ends (a rank's
    partial sums and BatchNorm statistics), from every rank. Collective: every rank calls it."""
    if not procs.distributed:
        return None
    buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers() if not n.endswith("weight_base")}
    return procs.all_gather({"partial": dict(progress.partial), "buffers": buffers})


def restore_rank_state(state: Dict[str, Any], procs, model: nn.Module, progress: Progress) -> None:
    """This rank's own partial sums and buffers (after DDP's start, which copies rank 0's to every rank)."""
    ranks = state.get("ranks")
    if not ranks or len(ranks) != procs.world_size:
        return
    own = ranks[procs.rank]
    progress.partial = dict(own["partial"])
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in own["buffers"]:
                buffer.copy_(own["buffers"][name])


def save_checkpoint(run_dir: RunDir, model: nn.Module, progress: Progress, *, optimizer, scaler,
                    trainable: Sequence[str], classes: Sequence[str], digest: str, notes: List[str], log,
                    ranks: Optional[List[Dict[str, Any]]] = None, metadata: Optional[Dict[str, Any]] = None) -> None:
    """last.safetensors, then train_state.pt (the commit point: both carry the global step). Rank 0.
    `metadata`: the task's extra metadata for the model file."""
    from ..fileio import atomic_write_file

    tag = progress.tag()
    save_model(run_dir, model, run_dir.file("last.safetensors"), {"train": tag, **(metadata or {})}, classes, notes,
               log)
    state = {
        "version": STATE_VERSION, **tag, "partial": dict(progress.partial), "ranks": ranks,
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "history": json.dumps(progress.history), "best": json.dumps(progress.best),
        "sanity": json.dumps(progress.sanity), "unreadable": list(progress.unreadable),
        "trainable": list(trainable), "classes": list(classes), "images": digest,
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
    }
    # through a Python file: a failed write reports its OS error (torch's own writer does not say why)
    atomic_write_file(run_dir.writes(run_dir.file(STATE_FILE)), lambda f: torch.save(state, f))
    run_dir.checkpointed = True


def save_model(run_dir: RunDir, model: nn.Module, path: str, extra: Dict[str, Any], classes: Sequence[str],
               notes: List[str], log) -> None:
    """A reparam model file when the architecture is known; else a whole-module pickle (a run of a trusted
    pickle, model_files "pickle"), or a bare safetensors state_dict (an in-memory model). Its extra metadata
    is `extra` and the class names (in output index order: what a deployment needs to label the outputs)."""
    from ..checkpoint import check_finite
    from ..fileio import atomic_write
    from ..modelfile import save
    from ..module_attrs import architecture_of, restore_extra, set_extra

    run_dir.writes(path)
    extra = {**extra, "classes": list(classes)}
    if architecture_of(model) is not None:
        save(model, path, extra_metadata=extra)
        return
    if run_dir.model_files == "pickle":
        # the extra metadata travels as the attribute `load` gives reparam files (`reparam_extra`)
        previous = set_extra(model, extra)
        try:
            save(model, path, trust_pickle=True)
        finally:
            restore_extra(model, previous)
        _note_once(notes, log, f"{type(model).__name__} has no rebuildable architecture: model files are whole-module "
                               "pickles (.pt; read them with --trust-pickle / reparam_zoo.load(path, trust_pickle=True))")
        return
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    check_finite(state)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"extra": json.dumps(extra)}))
    _note_once(notes, log, f"{type(model).__name__} has no rebuildable architecture: model files are bare state_dicts "
                           "(load them with reparam_zoo.load_checkpoint; trust_pickle=True writes whole-module pickles "
                           "instead)")


def read_model_file(path: str, model_files: str, trust_pickle: bool) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """The tensors of a model file of the run, and its training tag (None: none recorded). A pickle run's
    files are unpickled only when the caller trusts them (`trust_pickle`, given again for this process)."""
    if model_files == "pickle":
        if not trust_pickle:
            raise TrainError(f"{path}: the run wrote whole-module pickles; reading them runs code from the run "
                             "folder: pass --trust-pickle / trust_pickle=True if you trust it")
        from ..modelfile import load

        module = load(path, trust_pickle=True)
        from ..module_attrs import extra_of

        extra = extra_of(module)
        tag = extra.get("train") if extra is not None else None
        return module.state_dict(), tag if isinstance(tag, dict) else None
    tensors, meta = read_state_dict(path)
    return tensors, _train_tag(meta)


def load_weights(model: nn.Module, path: str, state: Dict[str, Any], model_files: str, trust_pickle: bool) -> None:
    """The last checkpoint's weights into `model`, when they are from the same step as the state."""
    tensors, tag = read_model_file(path, model_files, trust_pickle)
    if tag is None or tag.get("global_step") != state["global_step"]:
        raise TrainError(f"{path} and {STATE_FILE} are from different steps (the run was killed while "
                         "checkpointing?); cannot resume exactly")
    check_compatible(model, tensors, source=path, strict=True)
    model.load_state_dict(tensors, strict=True)


def set_trainable(model: nn.Module, names: Sequence[str]) -> None:
    names = set(names)
    unknown = names - {n for n, _ in model.named_parameters()}
    if unknown:
        raise TrainError(f"the checkpoint trains parameters the model does not have ({sorted(unknown)[0]}, ...)")
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)


def _note_once(notes: List[str], log, note: str) -> None:
    if note not in notes:
        notes.append(note)
        log(f"note: {note}")


def _train_tag(meta: Dict[str, str]) -> Optional[Dict[str, Any]]:
    try:
        tag = json.loads(meta["extra"])["train"]
    except (KeyError, ValueError, TypeError, RecursionError):
        return None
    return tag if isinstance(tag, dict) else None


def _as_random_state(value):
    """random.setstate wants the nested tuples back (torch.load returns what torch.save got, but be strict)."""
    version, internal, gauss = value
    return int(version), tuple(int(v) for v in internal), gauss
