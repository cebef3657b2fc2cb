"""Refocus training: train only what the RefConv training scope allows, on one process or many, resumably.

    train(model_or_spec, data_dir, output_dir=..., epochs=..., ...)   a fresh run (converts the model first
                                                                      when it has no RefConv layers yet)
    resume(output_dir)                                                continues an interrupted run exactly

Runs under `torchrun` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) as DistributedDataParallel, gloo on
CPU and nccl on GPU; only rank 0 writes files (`torchrun --nproc_per_node 4 --no-python reparam train ...`).

Exact resumption rests on three things: the data order and every sample's augmentation are functions of
`(seed, epoch, index)` (see `reparam_zoo.data`), dropout/drop-path randomness is re-seeded from
`(seed, epoch, step, rank)` before every step, and the LR schedule is a function of the step count. The
checkpoint then only needs the weights, the optimizer state, the position and the metrics so far.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from tqdm import tqdm

from .checkpoint import check_compatible, read_state_dict
from .data import (DataSplits, EpochSampler, IGNORE_TARGET, ShardSampler, build_datasets, check_data_dir,
                   image_list_digest, make_loader)
from .deploy import fold, fuse as fuse_model
from .errors import CheckpointError, ReparamError, first_line, preview
from .model_info import cfg_input_size
from .surgery import TRAIN_SCOPES, apply_train_scope, convert, refconv_layers
from . import torchvision_models
from .processes import Processes, StopRequest

__all__ = ["train", "resume", "default_warmup_epochs", "TrainConfig", "TrainResult", "TrainError", "OPTIMIZERS"]

OPTIMIZERS = {"sgd": "momentum", "adamw": "adamw"}  # our name -> timm's (timm's "sgd" is Nesterov)
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
DEPLOY_FILE = "deploy.safetensors"
# A model without a rebuildable architecture (a trusted pickle) is written as whole-module pickles instead:
# no safetensors file could say what to rebuild.
PICKLE_FILES = {LAST_FILE: "last.pt", BEST_FILE: "best.pt", DEPLOY_FILE: "deploy.pt"}
MODEL_FILES = ("safetensors", "pickle")
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
LOG_FILE = "train.log"
# Settings that may change when a run is resumed: they do not change what is computed (workers, fuse), or
# the change is the point (more epochs).
# settings a resumed run may change: none changes what it computes (--data: the same images, moved)
RESUMABLE_OVERRIDES = ("epochs", "workers", "fuse", "data_dir")
STATE_VERSION = 1
DEFAULT_MAP_K = 3  # the transform kernel of a model converted here when map_k is not given


class TrainError(ReparamError):
    """Training cannot start or go on (bad settings, head/data mismatch, output folder in use, ...)."""


@dataclass
class TrainConfig:
    """Everything that decides what a run computes; saved as OUTDIR/config.json and reused by `resume`."""

    model: str  # the MODEL argument, or "<in-memory ClassName>"
    data_dir: str
    epochs: int = 10
    batch_size: int = 64  # per process
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 4e-5
    warmup_epochs: int = 1  # `train` defaults it to 1 with at least 2 epochs, else 0
    input_size: Optional[int] = None
    num_classes: Optional[int] = None
    train_scope: Optional[str] = None  # None until the run starts: the model's own (converted), else transforms
    map_k: Optional[int] = None  # None until the run starts: the model's own (converted), else DEFAULT_MAP_K
    amp: bool = False
    channels_last: bool = False
    workers: int = 2
    seed: int = 0
    fuse: bool = False
    arch: Optional[str] = None
    checkpoint: Optional[str] = None
    pretrained: bool = False
    trust_pickle: bool = False
    world_size: int = 1
    model_files: str = "safetensors"  # set when the run starts: "pickle" for a model without an architecture

    def check(self) -> None:
        def positive_int(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")

        for name in ("epochs", "batch_size"):
            positive_int(name)
        for name in ("input_size", "num_classes", "map_k"):
            if getattr(self, name) is not None:
                positive_int(name)
        if not (isinstance(self.workers, int) and self.workers >= 0):
            raise TrainError(f"workers must be >= 0, got {self.workers!r}")
        if not (isinstance(self.warmup_epochs, int) and 0 <= self.warmup_epochs < self.epochs):
            raise TrainError(f"warmup-epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum <= 1):
            raise TrainError(f"momentum must be in [0, 1], got {self.momentum!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise TrainError(f"weight-decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainError(f"unknown optimizer '{self.optimizer}', expected one of {', '.join(OPTIMIZERS)}")
        if self.train_scope is not None and self.train_scope not in TRAIN_SCOPES:
            raise TrainError(f"unknown train-scope '{self.train_scope}', expected one of {', '.join(TRAIN_SCOPES)}")
        if self.model_files not in MODEL_FILES:
            raise TrainError(f"unknown model-files '{self.model_files}', expected one of {', '.join(MODEL_FILES)}")


@dataclass
class TrainResult:
    """What a run produced. `history` has one row per epoch (epoch 0: the model before training)."""

    output_dir: str
    history: List[Dict[str, Any]]
    best: Dict[str, Any]
    sanity: Dict[str, Any]
    files: Dict[str, str]
    classes: List[str]
    # the RefConv model after the last epoch (rank 0); the best epoch's is the file files["best"]
    model: Optional[nn.Module] = field(default=None, repr=False)
    interrupted: bool = False
    unreadable_images: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def final(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}


# -- public entry points ------------------------------------------------------------------------------------

def train(
    model: Union[nn.Module, str, os.PathLike],
    data_dir: Union[str, os.PathLike],
    *,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.01,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 4e-5,
    warmup_epochs: Optional[int] = None,
    input_size: Optional[int] = None,
    num_classes: Optional[int] = None,
    train_scope: Optional[str] = None,
    map_k: Optional[int] = None,
    amp: bool = False,
    channels_last: bool = False,
    workers: int = 2,
    seed: int = 0,
    fuse: bool = False,
    arch: Optional[str] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    pretrained: bool = False,
    trust_pickle: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    verbose: bool = True,
) -> TrainResult:
    """Refocus-train `model` on the image folders `data_dir/train/<class>/*`, `data_dir/val/<class>/*`.

    `model` is an `nn.Module` (never modified; a copy trains) or anything `reparam convert` accepts (a timm or
    zoo name, a reparam file, a state_dict checkpoint with `arch`, a pickle with `trust_pickle`). A model
    without RefConv layers is converted first (`map_k`, default 3, zero init); an already converted model
    keeps its own map_k (asking for another one is an error). `input_size` is needed when the model has no
    timm config to take it from. `train_scope` says what trains; None
    (the default) keeps the scope of an already converted model (its `refconv_summary.train_scope`) and is
    "transforms" for a model converted here. A head of the wrong size is replaced only when `num_classes`
    says so (the new head then trains too).

    Defaults follow the RefConv recipe: SGD with momentum 0.9, weight decay 4e-5, linear warmup (None: 1
    epoch when there are at least 2, else none) then cosine decay per step. `batch_size` is per process.
    Writes into `output_dir` (new or empty; default `runs/<model>-<time>`): config.json (the settings as
    used, scope and warmup resolved), train.log, metrics.jsonl, metrics.png, last/best.safetensors,
    train_state.pt, and with `fuse` the verified deploy model (deploy.safetensors). A model without a
    rebuildable architecture is written as whole-module pickles (last.pt, best.pt, deploy.pt; read them with
    `trust_pickle=True` / --trust-pickle) when `trust_pickle` is set (a pickled MODEL needs it anyway), else
    as bare safetensors state_dicts. The model files record the class names in output index order
    (`read_info(path).extra["classes"]`, `reparam_extra["classes"]` of a loaded model). Ctrl-C / SIGTERM
    stops after the current step with a checkpoint; `resume(output_dir)` continues it. A run that fails
    before its first checkpoint removes the files it wrote (and the folder it made).
    """
    spec = model if isinstance(model, nn.Module) else _absolute_if_file(model)
    if warmup_epochs is None:
        warmup_epochs = default_warmup_epochs(epochs)
    config = TrainConfig(
        model=f"<in-memory {type(spec).__name__}>" if isinstance(spec, nn.Module) else spec,
        data_dir=os.path.abspath(data_dir), epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, warmup_epochs=warmup_epochs, input_size=input_size,
        num_classes=num_classes, train_scope=train_scope, map_k=map_k, amp=amp, channels_last=channels_last,
        workers=workers, seed=seed, fuse=fuse, arch=arch,
        checkpoint=None if checkpoint is None else _absolute_if_file(checkpoint), pretrained=pretrained,
        trust_pickle=trust_pickle,
    )
    return _Run(config, output_dir, model=spec if isinstance(spec, nn.Module) else None, resuming=False,
                device=device, verbose=verbose).run()


def default_warmup_epochs(epochs: Any) -> int:
    """The warmup when none is given: 1 epoch when there are at least 2, else none."""
    return 1 if isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 2 else 0


def resume(
    output_dir: Union[str, os.PathLike],
    *,
    model: Optional[nn.Module] = None,
    epochs: Optional[int] = None,
    workers: Optional[int] = None,
    fuse: Optional[bool] = None,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
    verbose: bool = True,
) -> TrainResult:
    """Continue the run in `output_dir` from its last checkpoint, with its saved settings.

    On CPU with the same number of processes the result is bit-identical to an uninterrupted run. `epochs`
    extends (or shortens) the run; `model` is needed only when the run trained an in-memory model whose
    architecture cannot be rebuilt from its files (pass the same model as to `train`). A run of a model
    without an architecture tag (a trusted pickle) re-loads its MODEL as the run did, with its saved
    `trust_pickle`, and then the last checkpoint's weights. `data_dir` follows a data set that moved: it
    must hold the same images (the same paths within it) as the run's.
    """
    output_dir = os.fspath(output_dir)
    config = read_config(output_dir)
    for name, value in (("epochs", epochs), ("workers", workers), ("fuse", fuse)):
        if value is not None:
            setattr(config, name, value)
    if data_dir is not None:
        config.data_dir = os.path.abspath(data_dir)
    return _Run(config, output_dir, model=model, resuming=True, device=device, verbose=verbose).run()


def read_config(output_dir: str) -> TrainConfig:
    """The settings of the run in `output_dir`."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isdir(output_dir):
        raise TrainError(f"{output_dir}: no such run folder")
    if not os.path.exists(os.path.join(output_dir, STATE_FILE)) or not os.path.exists(path):
        raise TrainError(f"{output_dir}: no checkpoint to resume from ({STATE_FILE} / {CONFIG_FILE} missing)")
    try:
        with open(path) as f:
            raw = json.load(f)
        known = {f.name for f in fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in raw.items() if k in known})
    except (OSError, ValueError, TypeError) as e:
        raise TrainError(f"{path}: unreadable run settings ({first_line(e)})") from None


# -- the run ----------------------------------------------------------------------------------------------------

class _Log:
    """Log lines to the console (rank 0, verbose) and OUTDIR/train.log (rank 0)."""

    def __init__(self, procs: Processes, verbose: bool):
        self.procs, self.verbose, self.path = procs, verbose, None
        self.pending: List[str] = []

    def open(self, path: str) -> None:
        self.path = path
        for line in self.pending:
            self._write(line)
        self.pending = []

    def __call__(self, message: str, console: bool = True) -> None:
        """`console=False`: train.log only (a line too long for a terminal, e.g. a thousand class names)."""
        if not self.procs.is_main:
            return
        if self.verbose and console:
            tqdm.write(message)
        if self.path is None:
            self.pending.append(message)
        else:
            self._write(message)

    def _write(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a") as f:
            f.write(f"{stamp} {message}\n")


class _Run:
    def __init__(self, config: TrainConfig, output_dir, *, model: Optional[nn.Module], resuming: bool,
                 device, verbose: bool):
        self.config = config
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.given_model = model
        self.resuming = resuming
        self.device_arg = device
        self.verbose = verbose
        self.notes: List[str] = []
        # progress, all of it saved in the checkpoint
        self.epoch = 0  # the epoch in progress (0-based); == epochs when done
        self.step = 0  # batches of `epoch` already trained
        self.global_step = 0
        self.partial = [0.0, 0.0, 0.0]  # loss sum, correct, images of the epoch in progress
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {}
        self.sanity: Dict[str, Any] = {}
        self.unreadable: List[str] = []
        self.trainable: List[str] = []
        self.reference_name, self.exact_expected = "input model", True  # what the sanity check compares with
        self.classes: List[str] = []
        self.images = ""  # digest of the image paths, see data.image_list_digest
        # what this run wrote (rank 0): a fresh run that fails before its first checkpoint removes it again
        self.written: List[str] = []
        self.made_dirs: List[str] = []  # the output folder and the parents it needed, deepest first
        self.checkpointed = False  # rank 0 wrote train_state.pt: from then on the folder can be resumed

    # -- setup -----------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.procs = Processes.from_env(self.device_arg)
        self.log = _Log(self.procs, self.verbose)
        devices = [self.procs.device] if self.procs.device.type == "cuda" else []
        python_rng = random.getstate()
        try:
            # the run seeds the global generators (exact resumption); the caller's streams go on afterwards
            with torch.random.fork_rng(devices=devices), StopRequest() as self.stop:
                return self._run()
        except BaseException:  # a graceful stop returns, with a checkpoint; anything else lands here
            self._remove_unresumable_outputs()
            raise
        finally:
            random.setstate(python_rng)
            self.procs.close()

    def _writes(self, path: str) -> str:
        """`path`, noted as written by this run (see `_remove_unresumable_outputs`)."""
        if path not in self.written:
            self.written.append(path)
        return path

    def _remove_unresumable_outputs(self) -> None:
        """A fresh run that failed before its first checkpoint: remove exactly the files it wrote and the folders
        it made. Nothing there could be resumed, and a non-empty folder would block the corrected command
        (no command leaves files behind when it fails)."""
        if self.resuming or self.checkpointed or not self.procs.is_main:
            return
        self.log.path = None  # nothing more goes to the file being removed
        for path in reversed(self.written):
            with contextlib.suppress(OSError):  # the run's own error matters more than a file left behind
                os.remove(path)
        for folder in self.made_dirs:
            with contextlib.suppress(OSError):  # not empty: someone else put files there, keep them
                os.rmdir(folder)

    def _run(self) -> TrainResult:
        config = self.config
        # resuming: the epochs already trained first, they explain a too small --epochs better than the
        # warmup check would
        state = self._read_state() if self.resuming else None
        config.check()
        check_data_dir(config.data_dir)  # before loading what may be a large model
        if not self.resuming:
            config.world_size = self.procs.world_size
        # checked first, created only once the model and the data have passed their checks: a run that cannot
        # start leaves no folder behind that would block the corrected command
        self.output_dir = self.procs.on_main(self._resolve_output_dir)
        if state is not None and config.world_size != self.procs.world_size:
            self.log(f"warning: resuming on {self.procs.world_size} processes, the run used {config.world_size}: "
                     "data order differs, so the result is not bit-identical to an uninterrupted run")

        torch.manual_seed(config.seed)  # random inits (a new head) are part of the run
        random.seed(config.seed)
        reference, model = self._build_model(state)
        low = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                      if p.is_floating_point() and p.dtype != torch.float32})
        if low:
            # the optimizer and BatchNorm statistics need float32 weights; --amp computes in low precision
            model.float()
            if reference is not None:
                reference.float()
            self.log(f"note: the model's weights are {', '.join(low)}; training in float32 (--amp / amp=True for mixed precision)")
        self.model = model.to(self.procs.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._build_loaders()
        self._build_optimizer()
        if state is not None:
            self._restore(state)
        self.train_model = self.model
        if self.procs.distributed:
            # Buffers are not broadcast on every forward (the frozen base kernels are buffers, as large as the
            # model); BatchNorm statistics are averaged over the ranks at the end of every epoch instead.
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.procs.device.index] if self.procs.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        if state is not None:
            self._restore_rank_state(state)  # after DDP's start, which copies rank 0's buffers to every rank
        self._describe_start()
        if state is None:
            self._sanity_check(reference)
        del reference
        # only a run that could start gets its folder (and the log lines so far)
        self.procs.on_main(self._create_output_dir)
        if self.procs.is_main:
            self.log.open(self._writes(os.path.join(self.output_dir, LOG_FILE)))
        if state is None:
            self._write_start_files()
        self.model.train()

        interrupted = self._train_epochs()
        self.model.eval()
        files = self.procs.on_main(lambda: self._finish(interrupted))
        self.procs.barrier()
        return TrainResult(
            output_dir=self.output_dir, history=self.history, best=self.best, sanity=self.sanity, files=files,
            classes=self.classes, model=self.model if self.procs.is_main else None, interrupted=interrupted,
            unreadable_images=self.unreadable, notes=self.notes,
        )

    def _resolve_output_dir(self) -> str:
        out = self.output_dir
        if self.resuming:
            return out
        if out is None:
            spec = self.config.model.strip("<>").split()[-1]
            spec = torchvision_models.split_name(spec) or spec
            name = os.path.splitext(os.path.basename(spec))[0] or "model"
            out = os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        if os.path.exists(out) and not os.path.isdir(out):
            raise TrainError(f"{out}: is a file, expected an output folder")
        if os.path.isdir(out) and os.listdir(out):
            raise TrainError(
                f"{out}: output folder is not empty ({preview(sorted(os.listdir(out)), 4)}); choose a new one, or continue the run in it with "
                "--resume / reparam_zoo.resume()"
            )
        return out

    def _create_output_dir(self) -> None:
        missing, folder = [], os.path.abspath(self.output_dir)
        while not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as e:
            raise TrainError(f"{self.output_dir}: cannot create output folder ({first_line(e)})") from None
        self.made_dirs = missing
        # on resume too: the overrides (epochs, ...) are part of the run from now on
        _write_json(self._writes(os.path.join(self.output_dir, CONFIG_FILE)), asdict(self.config))

    def _build_model(self, state) -> Tuple[Optional[nn.Module], nn.Module]:
        """(what the sanity check compares with: the input model, or its folded form when it came converted,
        None when resuming; the model that trains).

        Also builds the data sets: their transforms follow the input model's preprocessing config.
        """
        config = self.config
        last = self._path(LAST_FILE)
        if state is not None and self.given_model is None:
            if config.model_files == "safetensors" and self._describes_architecture(last):
                model = self._load_last_model(last)
                self._build_data(model)
                self._set_trainable(model, state["trainable"])
                return None, model
            if config.model.startswith("<in-memory"):
                raise TrainError(
                    f"{last} does not describe its architecture (the run trained an in-memory model, "
                    f"{config.model.strip('<>').split()[-1]}); pass the same model to resume(model=...)"
                )
            # no architecture in the file (a pickled MODEL): rebuild the model as the run did, then load the
            # last weights into it
        reference = self._load_input_model()
        self._build_data(reference)
        head = self._fit_head(reference)
        if refconv_layers(reference):
            model = reference
            summary = getattr(model, "refconv_summary", None)
            own = getattr(summary, "train_scope", None)
            own = own if own in TRAIN_SCOPES else None
            if config.train_scope is None:  # not given: the model's own, recorded in config.json from now on
                config.train_scope = own or "transforms"
                how = "the model's own" if own else "default; the model does not record one"
            elif state is not None:
                how = "as the run started"
            else:
                how = "given" + (f"; the model's own is {own}" if own and own != config.train_scope else "")
            apply_train_scope(model, config.train_scope)
            if summary is not None:
                summary.train_scope = config.train_scope
            self._adopt_map_k(model, state)
            self.log(f"model is already converted ({len(refconv_layers(model))} RefConv layers); "
                     f"training scope {config.train_scope} ({how})")
            if state is None:
                # its plain form is what it has to agree with: exactly while the transforms are still zero
                self.exact_expected = all(not bool(m.transform_weight.any()) for _, m in refconv_layers(model))
                reference = fold(model)
                self.reference_name = "folded model"
        else:
            if config.train_scope is None:
                config.train_scope = "transforms"
            if config.map_k is None:
                config.map_k = DEFAULT_MAP_K
            model = convert(reference, map_k=config.map_k, train_scope=config.train_scope)
            self.log(f"converted with default settings (map_k={config.map_k}, zero init): "
                     + str(model.refconv_summary).splitlines()[0].removeprefix("RefConv: "))
        for name, p in model.named_parameters():
            if name in head:
                p.requires_grad_(True)
        if state is None:
            from .modelfile import architecture_of

            # no safetensors file can rebuild a model without an architecture tag: a trusted pickle's run
            # writes whole-module pickles, which reparam's commands read back with --trust-pickle
            config.model_files = "pickle" if architecture_of(model) is None and config.trust_pickle else "safetensors"
        if state is not None:
            self._set_trainable(model, state["trainable"])
            self._load_weights(model, last, state)
            return None, model
        return reference, model

    def _adopt_map_k(self, model: nn.Module, state) -> None:
        """An already converted model trains with its own transform kernel, and config.json records that one."""
        own = sorted({m.map_k for _, m in refconv_layers(model)})
        wanted = self.config.map_k
        if state is None and wanted is not None and own != [wanted]:
            raise TrainError(f"map_k {wanted} was asked for, but the model's RefConv layers already have map_k="
                             f"{', '.join(map(str, own))}; map_k applies to models converted here (leave it out, "
                             "or train the unconverted model)")
        self.config.map_k = own[0]

    def _load_input_model(self) -> nn.Module:
        config = self.config
        if self.given_model is not None:
            self.log(f"model: {config.model}")
            return copy.deepcopy(self.given_model)  # the caller's model is never modified
        if config.model.startswith("<in-memory"):
            raise TrainError(f"this run trained an in-memory model ({config.model}); pass it again to resume()")
        from .modelfile import resolve_model

        resolved = resolve_model(config.model, arch=config.arch, checkpoint=config.checkpoint,
                                 pretrained=config.pretrained, trust_pickle=config.trust_pickle)
        self.log(f"model: {resolved.description}")
        for note in resolved.notes:
            self.log(f"  - {note}")
        return resolved.model

    def _fit_head(self, model: nn.Module) -> set:
        """Check the head against the data's classes; replace it when `num_classes` says so.

        Returns the names of the new head's parameters (they train too), empty when the head is kept.
        """
        classes = len(self.classes)
        outputs = _num_outputs(model, self.input_size)
        wanted = self.config.num_classes
        if wanted is None:
            if outputs != classes:
                raise TrainError(
                    f"the model has {outputs} outputs but {self.config.data_dir} has {classes} classes; "
                    f"pass --num-classes {classes} / num_classes={classes} to replace the head"
                )
            return set()
        if wanted != classes:
            raise TrainError(f"num-classes is {wanted} but {self.config.data_dir} has {classes} classes")
        if wanted == outputs:
            return set()
        from .modelfile import set_num_classes

        before = {id(p) for p in model.parameters()}
        set_num_classes(model, wanted)
        head = {n: p for n, p in model.named_parameters() if id(p) not in before}
        count = sum(p.numel() for p in head.values())
        self.notes.append(f"head replaced: {outputs} -> {wanted} classes; the new head ({count:,} params) trains too")
        self.log(self.notes[-1])
        return set(head)

    @staticmethod
    def _set_trainable(model: nn.Module, names: Sequence[str]) -> None:
        names = set(names)
        unknown = names - {n for n, _ in model.named_parameters()}
        if unknown:
            raise TrainError(f"the checkpoint trains parameters the model does not have ({sorted(unknown)[0]}, ...)")
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)

    def _path(self, name: str) -> str:
        """The run's file `name`, as this run writes it (model files: safetensors or pickles)."""
        if self.config.model_files == "pickle":
            name = PICKLE_FILES.get(name, name)
        return os.path.join(self.output_dir, name)

    @staticmethod
    def _describes_architecture(path: str) -> bool:
        from .modelfile import read_info

        return read_info(path) is not None

    def _load_last_model(self, path: str) -> nn.Module:
        from .modelfile import load

        model = load(path)
        self.log(f"model: {path}")
        return model

    def _read_model_file(self, path: str) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]]]:
        """The tensors of a model file this run wrote, and its training tag (None: none recorded)."""
        if self.config.model_files == "pickle":
            from .modelfile import load

            # written by this run, from a MODEL the run was told to trust
            module = load(path, trust_pickle=True)
            extra = getattr(module, "reparam_extra", None)
            tag = extra.get("train") if isinstance(extra, dict) else None
            return module.state_dict(), tag if isinstance(tag, dict) else None
        tensors, meta = read_state_dict(path)
        return tensors, _train_tag(meta)

    def _load_weights(self, model: nn.Module, path: str, state: Dict[str, Any]) -> None:
        tensors, tag = self._read_model_file(path)
        if tag is None or tag.get("global_step") != state["global_step"]:
            raise TrainError(
                f"{path} and {STATE_FILE} are from different steps (the run was killed while checkpointing?); "
                "cannot resume exactly"
            )
        check_compatible(model, tensors, source=path, strict=True)
        model.load_state_dict(tensors, strict=True)

    def _build_data(self, model: nn.Module) -> None:
        if self.config.input_size is None and cfg_input_size(model) is None and not self.resuming:
            # timm would silently use 224x224: say so, as `reparam fuse` and `report` do (a resumed run goes on
            # as it started)
            raise TrainError(f"cannot tell the input size of {type(model).__name__} (no timm pretrained_cfg); "
                             "pass --input-size N / input_size=N")
        self.data: DataSplits = build_datasets(self.config.data_dir, model, self.config.input_size)
        self.classes = self.data.classes
        self.images = image_list_digest(self.data)
        self.input_size = tuple(self.data.data_config["input_size"])

    def _build_loaders(self) -> None:
        config, procs = self.config, self.procs
        self.train_sampler = EpochSampler(self.data.train, num_replicas=procs.world_size, rank=procs.rank,
                                          seed=config.seed)
        self.steps_per_epoch = len(self.train_sampler) // config.batch_size
        if self.steps_per_epoch == 0:
            raise TrainError(
                f"{config.data_dir}/train has {len(self.data.train)} images, fewer than one batch of "
                f"{config.batch_size} per process; lower --batch-size / batch_size="
            )
        pin = procs.device.type == "cuda"
        self.train_loader = make_loader(self.data.train, self.train_sampler, batch_size=config.batch_size,
                                        workers=config.workers, drop_last=True, pin_memory=pin)
        val_sampler = ShardSampler(self.data.val, num_replicas=procs.world_size, rank=procs.rank)
        self.val_loader = make_loader(self.data.val, val_sampler, batch_size=config.batch_size,
                                      workers=config.workers, drop_last=False, pin_memory=pin)

    def _build_optimizer(self) -> None:
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        config = self.config
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        # timm's factory: only parameters that require grad, no weight decay on biases and norms
        self.optimizer = create_optimizer_v2(self.model, opt=OPTIMIZERS[config.optimizer], lr=config.lr,
                                             weight_decay=config.weight_decay, momentum=config.momentum)
        warmup = config.warmup_epochs * self.steps_per_epoch
        total = config.epochs * self.steps_per_epoch
        # Stepped per update: the LR is a function of the update count alone (timm schedulers are stateless),
        # so resuming only needs that count.
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=total - warmup, warmup_t=warmup, warmup_prefix=True,
            warmup_lr_init=config.lr / max(1, warmup), lr_min=0.0, t_in_epochs=False,
        )
        cuda_half = config.amp and self.procs.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda_half)
        self.amp_dtype = torch.float16 if cuda_half else torch.bfloat16

    def _autocast(self):
        return torch.autocast(self.procs.device.type, dtype=self.amp_dtype, enabled=self.config.amp)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _read_state(self) -> Dict[str, Any]:
        path = os.path.join(self.output_dir, STATE_FILE)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses anything but tensors and plain containers
            raise CheckpointError(f"{path}: unreadable training state ({first_line(e)})") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"{path}: not a training state of this reparam-zoo version")
        epochs = self.config.epochs
        if state["step"] == 0 and state["epoch"] >= epochs:
            if state["epoch"] == epochs:
                deploy = (f"; to deploy its best model: reparam fuse {self._path(BEST_FILE)}"
                          if self.config.fuse else "")
                raise TrainError(
                    f"{self.output_dir}: the run already finished its {state['epoch']} epochs; pass a larger "
                    f"--epochs / epochs= to train on{deploy}"
                )
            raise TrainError(
                f"{self.output_dir}: the run already trained {state['epoch']} epochs; --epochs / epochs= must be more than "
                f"that to extend it, got {epochs}"
            )
        if state["epoch"] >= epochs:
            raise TrainError(f"{self.output_dir}: was stopped in epoch {state['epoch'] + 1}; --epochs "
                             f"{self.config.epochs} would end before it")
        return state

    def _restore(self, state: Dict[str, Any]) -> None:
        if state["classes"] != self.classes:
            raise TrainError(f"{self.config.data_dir}: classes differ from the ones the run started with")
        if state.get("images", self.images) != self.images:
            raise TrainError(f"{self.config.data_dir}: holds other images than the run started with (the same "
                             "class folders, but files added, removed or renamed)")
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.global_step = state["epoch"], state["step"], state["global_step"]
        self.partial = list(state["partial"])
        self.history = json.loads(state["history"])
        self.best = json.loads(state["best"])
        self.sanity = json.loads(state["sanity"])
        self.unreadable = list(state["unreadable"])
        self.scheduler.step_update(self.global_step)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_random_state(state["python_rng"]))
        where = f"epoch {self.epoch + 1}" + (f", step {self.step}" if self.step else "")
        self.log(f"resuming {self.output_dir} at {where} (global step {self.global_step})")

    def _rank_states(self) -> Optional[List[Dict[str, Any]]]:
        """Mid-epoch, with several processes: what differs between the ranks until the epoch ends (a rank's
        partial sums and BatchNorm statistics), from every rank. Collective: every rank calls it."""
        if not self.procs.distributed:
            return None
        buffers = {n: b.detach().cpu().clone() for n, b in self.model.named_buffers() if not n.endswith("weight_base")}
        return self.procs.all_gather({"partial": list(self.partial), "buffers": buffers})

    def _restore_rank_state(self, state: Dict[str, Any]) -> None:
        ranks = state.get("ranks")
        if not ranks or len(ranks) != self.procs.world_size:
            return
        own = ranks[self.procs.rank]
        self.partial = list(own["partial"])
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                if name in own["buffers"]:
                    buffer.copy_(own["buffers"][name])

    def _save_checkpoint(self, ranks: Optional[List[Dict[str, Any]]] = None) -> None:
        """last.safetensors, then train_state.pt (the commit point: both carry the global step)."""
        if not self.procs.is_main:
            return
        tag = {"epoch": self.epoch, "step": self.step, "global_step": self.global_step}
        self._save_model(self.model, self._path(LAST_FILE), {"train": tag})
        state = {
            "version": STATE_VERSION, **tag, "partial": list(self.partial), "ranks": ranks,
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "history": json.dumps(self.history), "best": json.dumps(self.best), "sanity": json.dumps(self.sanity),
            "unreadable": list(self.unreadable), "trainable": list(self.trainable), "classes": list(self.classes),
            "images": self.images, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        }
        from .modelfile import atomic_write

        atomic_write(self._writes(os.path.join(self.output_dir, STATE_FILE)), lambda tmp: torch.save(state, tmp))
        self.checkpointed = True

    def _save_model(self, model: nn.Module, path: str, extra: Dict[str, Any]) -> None:
        """A reparam model file when the architecture is known; else a whole-module pickle (a run of a trusted
        pickle, `model_files` "pickle"), or a bare safetensors state_dict (an in-memory model). Its extra metadata
        is `extra` and the class names."""
        from .modelfile import architecture_of, atomic_write, check_finite, save

        self._writes(path)
        # the class names in output index order: what a deployment needs to label the outputs
        extra = {**extra, "classes": list(self.classes)}
        if architecture_of(model) is not None:
            save(model, path, extra_metadata=extra)
            return
        if self.config.model_files == "pickle":
            # the extra metadata travels as the attribute `load` gives reparam files (`reparam_extra`)
            missing = object()
            previous = model.__dict__.get("reparam_extra", missing)
            model.reparam_extra = extra
            try:
                save(model, path, trust_pickle=True)
            finally:
                if previous is missing:
                    del model.reparam_extra
                else:
                    model.reparam_extra = previous
            self._note_once(f"{type(model).__name__} has no rebuildable architecture: model files are whole-module "
                            "pickles (.pt; read them with --trust-pickle / reparam_zoo.load(path, trust_pickle=True))")
            return
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        check_finite(state)
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"extra": json.dumps(extra)}))
        self._note_once(f"{type(model).__name__} has no rebuildable architecture: model files are bare state_dicts "
                        "(load them with reparam_zoo.load_checkpoint; trust_pickle=True writes whole-module pickles "
                        "instead)")

    def _note_once(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)
            self.log(f"note: {note}")

    # -- training --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _evaluate(self, models: Sequence[nn.Module]) -> Tuple[List[Dict[str, float]], float, float]:
        """Validation loss/accuracy of each model over the whole val split (all ranks), the largest logit
        difference between the first two and the largest logit magnitude of the first."""
        sums = [[0.0, 0.0, 0.0] for _ in models]
        max_diff = scale = 0.0
        unreadable = []
        was_training = [m.training for m in models]
        for m in models:
            m.eval()
        criterion = nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE_TARGET)
        for images, targets, bad in self.val_loader:
            unreadable += bad
            images, targets = self._to_device(images, targets)
            valid = targets != IGNORE_TARGET
            outputs = []
            for m, s in zip(models, sums):
                with self._autocast():
                    out = _logits(m(images))
                out = out.float()
                outputs.append(out)
                s[0] += criterion(out, targets).item()
                s[1] += (out.argmax(1)[valid] == targets[valid]).sum().item()
                s[2] += valid.sum().item()
            scale = max(scale, outputs[0].abs().max().item())
            if len(outputs) > 1:
                max_diff = max(max_diff, (outputs[0] - outputs[1]).abs().max().item())
        for m, mode in zip(models, was_training):
            m.train(mode)
        totals = self.procs.sum([v for s in sums for v in s])
        max_diff, scale = self.procs.max([max_diff, scale])
        self._note_unreadable(self.data.val, unreadable)
        metrics = []
        for i in range(len(models)):
            loss, correct, count = totals[3 * i: 3 * i + 3]
            metrics.append({"val_loss": loss / max(count, 1), "val_acc": correct / max(count, 1),
                            "val_images": int(count)})
        return metrics, max_diff, scale

    def _sanity_check(self, reference: nn.Module) -> None:
        """Validate once before training: the converted model must score what its plain form scores, exactly
        for a zero-init conversion (`fold` computes kernels in float64, so trained transforms agree closely)."""
        reference.to(self.procs.device)
        if self.config.channels_last:
            reference.to(memory_format=torch.channels_last)
        (before, after), diff, scale = self._evaluate([reference, self.model])
        reference.cpu()
        if self.exact_expected:
            equal = before == after and diff == 0.0
        else:
            equal = before["val_acc"] == after["val_acc"] and diff <= 1e-4 * max(1.0, scale)
        self.sanity = {"checked": True, "equal": equal, "exact": self.exact_expected, "compared_with": self.reference_name,
                       "max_abs_logit_diff": diff, "input": before, "converted": after}
        line = (f"sanity: {self.reference_name} val loss {before['val_loss']:.6f} acc {100 * before['val_acc']:.2f}% | "
                f"converted val loss {after['val_loss']:.6f} acc {100 * after['val_acc']:.2f}% | "
                f"max |logit diff| {diff:.3g}")
        if equal:
            self.log(line + (" -> identical" if self.exact_expected else " -> consistent"))
        else:
            self.log("!" * 100)
            self.log(f"WARNING: the converted model does not score what the {self.reference_name} scores:")
            self.log(line)
            self.log("WARNING: the conversion is not an exact re-parameterization here; check the init and the model")
            self.log("!" * 100)
            self.notes.append(f"sanity check failed: the converted model differs from the {self.reference_name}")
        self.history = [{"epoch": 0, **after}]
        self.best = {"epoch": 0, **after}

    def _write_start_files(self) -> None:
        """The state before training: best model (epoch 0) and metrics."""
        metrics = {k: v for k, v in self.best.items() if k != "epoch"}
        self.procs.on_main(lambda: self._save_model(self.model, self._path(BEST_FILE),
                                                    {"train": {"epoch": 0, **metrics}}))
        self.procs.on_main(self._write_metrics)

    def _describe_start(self) -> None:
        config = self.config
        counts: Dict[str, int] = {}
        transforms = {id(m.transform_weight) for _, m in refconv_layers(self.model)}
        for p in self.model.parameters():
            if p.requires_grad:
                key = "transforms" if id(p) in transforms else "other"
                counts[key] = counts.get(key, 0) + p.numel()
        # the same total as `reparam report`'s training params: every parameter plus the frozen base kernels
        # (buffers, not parameters)
        base_kernels = sum(m.weight_base.numel() for _, m in refconv_layers(self.model))
        total = sum(p.numel() for p in self.model.parameters()) + base_kernels
        self.log(
            f"training {config.train_scope}: {counts.get('transforms', 0):,} transform params"
            + (f" + {counts['other']:,} other" if counts.get("other") else "")
            + f" of {total:,} training params, base kernels included | {len(self.data.train)} train / "
            f"{len(self.data.val)} val images, "
            f"{len(self.classes)} classes, input {self.input_size[1]}x{self.input_size[2]}"
        )
        if not self.resuming:  # the run's log says once which output index is which class
            self.log(f"classes (output index order): {json.dumps(self.classes)}", console=False)
        self.log(
            f"{config.epochs} epochs x {self.steps_per_epoch} steps, batch {config.batch_size} x "
            f"{self.procs.world_size} process(es) on {self.procs.device}, {config.optimizer} lr {config.lr} "
            f"wd {config.weight_decay}, warmup {config.warmup_epochs} epoch(s) then cosine"
            + (", amp" if config.amp else "") + (", channels_last" if config.channels_last else "")
        )

    def _to_device(self, images, targets):
        images = images.to(self.procs.device, non_blocking=True)
        if self.config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.procs.device, non_blocking=True)

    def _train_epochs(self) -> bool:
        """Train until the last epoch or a stop signal; returns whether it was interrupted."""
        config = self.config
        criterion = nn.CrossEntropyLoss()
        while self.epoch < config.epochs:
            self.train_sampler.set_epoch(self.epoch, skip=self.step * config.batch_size)
            self.model.train()
            show = self.verbose and self.procs.is_main
            # disable=None: no bar when the output is not a terminal (logs, CI); the epoch lines remain
            bar = tqdm(total=self.steps_per_epoch, initial=self.step, disable=None if show else True, leave=False,
                       desc=f"epoch {self.epoch + 1}/{config.epochs}", dynamic_ncols=True)
            start, images_seen = time.perf_counter(), 0
            unreadable: List[int] = []
            for images, targets, bad in self.train_loader:
                unreadable += bad
                images, targets = self._to_device(images, targets)
                # dropout / drop-path draw from the global generator: seed it per step for exact resumption
                torch.manual_seed(_step_seed(config.seed, self.epoch, self.step, self.procs.rank))
                with self._autocast():
                    outputs = _logits(self._train_forward(images))
                    loss = criterion(outputs.float(), targets)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                self.global_step += 1
                self.scheduler.step_update(self.global_step)

                loss_value = loss.item()
                n = targets.numel()
                self.partial[0] += loss_value * n
                self.partial[1] += (outputs.argmax(1) == targets).sum().item()
                self.partial[2] += n
                images_seen += n
                bar.update(1)
                bar.set_postfix(loss=f"{self.partial[0] / self.partial[2]:.4f}",
                                acc=f"{100 * self.partial[1] / self.partial[2]:.1f}%",
                                img_s=_sig3(images_seen / max(time.perf_counter() - start, 1e-9)))
                stop, nonfinite = self.procs.max([float(self.stop.requested), float(not math.isfinite(loss_value))])
                if nonfinite:
                    bar.close()
                    value = loss_value if not math.isfinite(loss_value) else "NaN/Inf on another process"
                    raise self._diverged(f"the loss became {value} in epoch {self.epoch + 1}, step {self.step}")
                if stop and self.step < self.steps_per_epoch:
                    bar.close()
                    self._note_unreadable(self.data.train, unreadable)
                    self._check_finite()
                    self._save_checkpoint(self._rank_states())
                    self.log(f"interrupted at epoch {self.epoch + 1}, step {self.step}: checkpoint saved; "
                             f"continue with: reparam train --resume {self.output_dir}")
                    return True
            bar.close()
            elapsed = time.perf_counter() - start
            self._end_epoch(elapsed, images_seen, unreadable)
            # all ranks must agree, or one would wait forever in the next epoch's collectives
            if self.procs.max([float(self.stop.requested)])[0] and self.epoch < config.epochs:
                self.log(f"interrupted after epoch {self.epoch}: checkpoint saved; "
                         f"continue with: reparam train --resume {self.output_dir}")
                return True
        return False

    def _train_forward(self, images: torch.Tensor):
        try:
            return self.train_model(images)
        except ValueError as e:
            # BatchNorm in training mode needs more than one value per channel; after global pooling (or at
            # a 1x1 feature map) one image gives it exactly one
            if "Expected more than 1 value per channel" not in str(e):
                raise
            raise TrainError("a batch of 1 image per process cannot train BatchNorm (it needs more than 1 value per "
                             "channel); use --batch-size / batch_size= 2 or more") from None

    def _check_finite(self) -> None:
        """Stop a diverged run before it saves anything: NaN/Inf weights or BatchNorm statistics can come with a
        finite loss, and would otherwise fail every later save and every resume."""
        from .modelfile import non_finite

        bad = self.procs.union(non_finite(self.model.state_dict()))  # every rank stops, or the others would wait forever
        if bad:
            raise self._diverged(f"training diverged in epoch {self.epoch + 1}: non-finite (NaN/Inf) values in "
                                 f"{preview(bad, 3)}")

    def _diverged(self, what: str) -> TrainError:
        # every epoch ends with a checkpoint, and a resumed run started from one
        if self.resuming or self.epoch > 0:
            return TrainError(f"{what}; the last good checkpoint is kept, but the learning rate cannot change on resume: "
                              "start a new run with a lower --lr / lr=")
        return TrainError(f"{what}; nothing was kept: run again with a lower --lr / lr=")

    def _end_epoch(self, elapsed: float, images_seen: int, unreadable: List[int]) -> None:
        if self.procs.distributed:
            from timm.utils import distribute_bn

            distribute_bn(self.model, self.procs.world_size, reduce=True)
        self._check_finite()  # before anything of this epoch is saved: the previous epoch's files stay intact
        loss_sum, correct, count = self.procs.sum(self.partial)
        rate = self.procs.sum([images_seen / max(elapsed, 1e-9)])[0]
        self._note_unreadable(self.data.train, unreadable)
        (val,), _, _ = self._evaluate([self.model])
        row = {
            "epoch": self.epoch + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
            "train_images": int(count), **val, "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": rate, "epoch_time_s": elapsed, "unreadable_images": len(self.unreadable),
        }
        self.history.append(row)
        self.log(
            f"epoch {row['epoch']}/{self.config.epochs}: train loss {row['train_loss']:.4f} acc "
            f"{100 * row['train_acc']:.2f}% | val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}% | "
            f"lr {row['lr']:.3g} | {_sig3(rate)} img/s"
        )
        self.epoch += 1
        self.step = 0
        self.partial = [0.0, 0.0, 0.0]
        improved = (val["val_acc"], -val["val_loss"]) > (self.best["val_acc"], -self.best["val_loss"])
        if improved:
            self.best = {"epoch": row["epoch"], **val}
            self.procs.on_main(lambda: self._save_model(self.model, self._path(BEST_FILE),
                                                        {"train": {"epoch": row["epoch"], **val}}))
        self.procs.on_main(self._save_checkpoint)
        self.procs.on_main(self._write_metrics)

    def _note_unreadable(self, dataset, indices: List[int]) -> None:
        names = [os.path.join(os.path.basename(dataset.reader.root), dataset.filename(i)) for i in set(indices)]
        new = sorted(set(self.procs.union(names)) - set(self.unreadable))
        if new:
            self.unreadable = sorted(set(self.unreadable) | set(new))
            self.log(f"warning: skipped {len(new)} unreadable image(s) ({preview(new, 3)}); {len(self.unreadable)} so far")

    # -- outputs ------------------------------------------------------------------------------------------------
    def _write_metrics(self) -> None:
        from .modelfile import atomic_write

        text = "".join(json.dumps(row) + "\n" for row in self.history)

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(self._writes(os.path.join(self.output_dir, METRICS_FILE)), write)

    def _finish(self, interrupted: bool) -> Dict[str, str]:
        """The plot and (with `fuse`) the deploy model, on rank 0; returns the files of the run."""
        self._plot()
        if self.config.fuse and not interrupted:
            self._write_deploy_model()
        files = {}
        for key, name in (("config", CONFIG_FILE), ("log", LOG_FILE), ("metrics", METRICS_FILE), ("plot", PLOT_FILE),
                          ("last", LAST_FILE), ("best", BEST_FILE), ("state", STATE_FILE), ("deploy", DEPLOY_FILE)):
            path = self._path(name)
            if os.path.exists(path):
                files[key] = path
        if not interrupted:
            self.log(f"done: best val acc {100 * self.best['val_acc']:.2f}% at epoch {self.best['epoch']}; "
                     f"outputs in {self.output_dir}")
            if self.best["epoch"] == 0:
                self.log("warning: no epoch beat the model as it started, so the best model"
                         + (" (and the deploy model)" if self.config.fuse else "")
                         + " is the input model; try a lower --lr / lr= or more epochs")
        return files

    def _plot(self) -> None:
        try:
            # the Figure API, not pyplot: no global backend or figure state changes under a notebook's feet
            from matplotlib.figure import Figure
        except ImportError:
            self.log("note: matplotlib is not installed (pip install 'reparam-zoo[plot]'); no metrics.png")
            return
        rows = [r for r in self.history if "train_loss" in r]
        epochs_val = [r["epoch"] for r in self.history]
        fig = Figure(figsize=(10, 4))
        ax_loss, ax_acc = fig.subplots(1, 2)
        ax_loss.plot([r["epoch"] for r in rows], [r["train_loss"] for r in rows], "o-", label="train")
        ax_loss.plot(epochs_val, [r["val_loss"] for r in self.history], "s-", label="val")
        ax_acc.plot([r["epoch"] for r in rows], [100 * r["train_acc"] for r in rows], "o-", label="train")
        ax_acc.plot(epochs_val, [100 * r["val_acc"] for r in self.history], "s-", label="val")
        for ax, what in ((ax_loss, "cross-entropy loss"), (ax_acc, "top-1 accuracy (%)")):
            ax.set_xlabel("epoch (0 = before training)")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"refocus training: {self.config.model}")
        fig.tight_layout()
        from .modelfile import atomic_write

        atomic_write(self._writes(os.path.join(self.output_dir, PLOT_FILE)),
                     lambda tmp: fig.savefig(tmp, format="png", dpi=100))

    def _write_deploy_model(self) -> None:
        """Fuse the best model into the deploy structure, verified against it, as deploy.safetensors (deploy.pt
        for a model without an architecture)."""
        best = copy.deepcopy(self.model).cpu().float().eval()
        tensors, _ = self._read_model_file(self._path(BEST_FILE))
        best.load_state_dict(tensors, strict=True)
        example = torch.randn(1, *self.input_size, generator=torch.Generator().manual_seed(0))
        deployed = fuse_model(best, example_inputs=example)
        report = deployed.fuse_report
        self._save_model(deployed, self._path(DEPLOY_FILE),
                         {"train": {"epoch": self.best["epoch"], "val_acc": self.best["val_acc"]}})
        self.log(f"deploy model (best, epoch {self.best['epoch']}): {len(report.folded)} RefConvs folded, "
                 f"{len(report.fused)} conv+BN fused, verified (max abs error {report.max_abs_error:.2g}) -> "
                 f"{os.path.basename(self._path(DEPLOY_FILE))}")


# -- helpers --------------------------------------------------------------------------------------------------------

def _logits(outputs) -> torch.Tensor:
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
        what = type(outputs).__name__ if not isinstance(outputs, torch.Tensor) else f"a {outputs.dim()}-d tensor"
        raise TrainError(f"the model returns {what}, not (batch, classes) logits; cannot train it")
    return outputs


def _num_outputs(model: nn.Module, input_size: Tuple[int, ...]) -> int:
    """How many classes `model` predicts."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for attr in ("out_features", "out_channels"):
        if isinstance(getattr(head, attr, None), int):
            return getattr(head, attr)
    # no timm interface: ask the model itself
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *input_size))
    except Exception as e:
        raise TrainError(f"{type(model).__name__} fails on a {'x'.join(map(str, input_size))} input "
                         f"({first_line(e)}); check --input-size / input_size=") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise TrainError(f"{type(model).__name__} does not output (batch, classes) logits; cannot train it")
    return out.shape[1]


def _sig3(value: float) -> str:
    """3 significant digits without an exponent (0.36, 12.3, 491; large numbers keep all their digits)."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:.0f}" if math.isfinite(value) else str(value)
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}"


def _absolute_if_file(path) -> str:
    """Paths are saved absolute, so that a run resumes from any working directory."""
    path = os.fspath(path)
    return os.path.abspath(path) if os.path.exists(path) else path


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return ((((seed * 1_000_003) + epoch) * 1_000_033 + step) * 1_009 + rank) % (2 ** 63)


def _train_tag(meta: Dict[str, str]) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(meta["extra"])["train"]
    except (KeyError, ValueError, TypeError):
        return None


def _as_random_state(value):
    """random.setstate wants the nested tuples back (torch.load returns what torch.save got, but be strict)."""
    version, internal, gauss = value
    return int(version), tuple(int(v) for v in internal), gauss


def _write_json(path: str, value: Any) -> None:
    from .modelfile import atomic_write

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


if __name__ == "__main__":  # `python -m reparam_zoo.train` is not an entry point: say which one is
    raise SystemExit("error: run `reparam train ...` (under torchrun: torchrun --no-python reparam train ...)")
