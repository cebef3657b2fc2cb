"""`train` and `resume`: one run, in order. Set up (settings, state, model, data, loaders, optimizer), check
(sanity), make the folder, train, finish (plot, deploy model); clean up after a failed start."""
from __future__ import annotations

import copy
import os
import random
import signal
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..deploy import fuse as fuse_model
from ..processes import Processes, StopRequest
from .config import RunStopped, TrainConfig, TrainError, check_momentum, default_warmup_epochs
from .loop import Trainer
from .run_dir import BEST_FILE, DEPLOY_FILE, LAST_FILE, LOG_FILE, Log, RunDir, default_output_dir, read_config
from .setup import (Reference, build_loaders, build_optimizer, describe_start, float32, load_input_model,
                    prepare_model)
from .state import (Progress, check_can_continue, load_weights, read_model_file, read_state, restore_progress,
                    restore_rank_state, save_model, set_trainable)
from .tasks import Task, TaskData, get_task, infer_task

__all__ = ["train", "resume", "TrainResult"]


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
    resume_command: str = ""  # the command line that continues the run
    task: str = "classification"

    @property
    def final(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}


def train(
    model: Union[nn.Module, str, os.PathLike],
    data_dir: Union[str, os.PathLike],
    *,
    output_dir: Optional[Union[str, os.PathLike]] = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.01,
    optimizer: str = "sgd",
    momentum: Optional[float] = None,
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
    task: Optional[str] = None,
    ignore_index: int = 255,
) -> TrainResult:
    """Refocus-train `model` on the image folders `data_dir/train/<class>/*`, `data_dir/val/<class>/*`.

    `model` is an `nn.Module` (never modified; a copy trains) or anything `reparam convert` accepts (a timm or
    zoo name, a reparam file, a state_dict checkpoint with `arch`, a pickle with `trust_pickle`). A model
    without RefConv layers is converted first (`map_k`, default 3, zero init); an already converted model
    keeps its own map_k (asking for another one is an error). `input_size` is needed when the model has no
    timm config to take it from. `train_scope` says what trains; None (the default) keeps the scope of an
    already converted model (its `refconv_summary.train_scope`) and is "transforms" for a model converted
    here. A head of the wrong size is replaced only when `num_classes` says so (the new head then trains too).

    Defaults follow the RefConv recipe: SGD with momentum 0.9 (`momentum` applies to sgd only), weight decay
    4e-5, linear warmup (None: 1 epoch when there are at least 2, else none) then cosine decay per step.
    `batch_size` is per process. Writes into `output_dir` (new or empty; default `runs/<model>-<time>`):
    config.json (the settings as used, scope and warmup resolved), train.log, metrics.jsonl, metrics.png,
    last/best.safetensors, train_state.pt, and with `fuse` the verified deploy model (deploy.safetensors). A
    model without a rebuildable architecture is written as whole-module pickles (last.pt, best.pt, deploy.pt;
    read them with `trust_pickle=True` / --trust-pickle) when `trust_pickle` is set (a pickled MODEL needs it
    anyway), else as bare safetensors state_dicts. The model files record the class names in output index
    order (`read_info(path).extra["classes"]`, `reparam_extra["classes"]` of a loaded model). Ctrl-C / SIGTERM
    stops after the current step with a checkpoint; `resume(output_dir)` continues it. A run that fails
    before its first checkpoint removes the files it wrote (and the folder it made).

    `task` is what is learnt: "classification" (the image folders above), "detection" (COCO-format data,
    torchvision detectors; metric COCO mAP) or "segmentation" (images and index masks; metric mIoU, with
    `ignore_index` the mask value that does not count); None infers it from the model (a torchvision detector
    or segmenter, else classification). See `reparam_zoo.train.tasks`.
    """
    spec = model if isinstance(model, nn.Module) else _absolute_if_file(model)
    if warmup_epochs is None:
        warmup_epochs = default_warmup_epochs(epochs)
    config = TrainConfig(
        model=f"<in-memory {type(spec).__name__}>" if isinstance(spec, nn.Module) else spec,
        data_dir=os.path.abspath(data_dir), epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        momentum=check_momentum(optimizer, momentum), weight_decay=weight_decay, warmup_epochs=warmup_epochs,
        input_size=input_size, num_classes=num_classes, train_scope=train_scope, map_k=map_k, amp=amp,
        channels_last=channels_last, workers=workers, seed=seed, fuse=fuse, arch=arch,
        checkpoint=None if checkpoint is None else _absolute_if_file(checkpoint), pretrained=pretrained,
        trust_pickle=trust_pickle, task=infer_task(spec) if task is None else task, ignore_index=ignore_index,
    )
    given = spec if isinstance(spec, nn.Module) else None
    return _Run(config, None if output_dir is None else os.fspath(output_dir), given, resuming=False,
                device=device, verbose=verbose).run()


def resume(
    output_dir: Union[str, os.PathLike],
    *,
    model: Optional[nn.Module] = None,
    epochs: Optional[int] = None,
    workers: Optional[int] = None,
    fuse: Optional[bool] = None,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    trust_pickle: bool = False,
    device: Optional[Union[str, torch.device]] = None,
    verbose: bool = True,
) -> TrainResult:
    """Continue the run in `output_dir` from its last checkpoint, with its saved settings.

    On CPU with the same number of processes the result is bit-identical to an uninterrupted run. `epochs`
    extends (or shortens) the run; `model` is needed only when the run trained an in-memory model whose
    architecture cannot be rebuilt from its files (pass the same model as to `train`). A run of a model
    without an architecture tag (a trusted pickle) re-loads its MODEL as the run did and then the last
    checkpoint's weights, both pickles: that needs `trust_pickle=True` here, every time (a run folder is
    data, its config.json cannot grant that). `data_dir` follows a data set that moved: it must hold the same
    images (the same paths within it) as the run's. train_state.pt is read with `weights_only=True`.
    """
    output_dir = os.fspath(output_dir)
    config = read_config(output_dir)
    for name, value in (("epochs", epochs), ("workers", workers), ("fuse", fuse)):
        if value is not None:
            setattr(config, name, value)
    if data_dir is not None:
        config.data_dir = os.path.abspath(data_dir)
    config.trust_pickle = bool(trust_pickle)  # the caller's permission, whatever the folder says
    return _Run(config, output_dir, model, resuming=True, device=device, verbose=verbose).run()


class _Run:
    """One call of `train` / `resume`: the order of the steps, and what they hand each other."""

    def __init__(self, config: TrainConfig, output_dir: Optional[str], given: Optional[nn.Module], *, resuming: bool,
                 device, verbose: bool):
        self.config, self.given, self.resuming = config, given, resuming
        self.verbose = verbose
        self.task: Optional[Task] = None  # known once the settings are checked
        self.procs = Processes.from_env(device)
        self.log = Log(enabled=self.procs.is_main, verbose=verbose)
        self.notes: List[str] = []
        self.run_dir = RunDir(output_dir or "", model_files=config.model_files, resuming=resuming)

    def run(self) -> TrainResult:
        devices = [self.procs.device] if self.procs.device.type == "cuda" else []
        python_rng = random.getstate()
        try:
            # the run seeds the global generators (exact resumption); the caller's streams go on afterwards
            with torch.random.fork_rng(devices=devices), StopRequest(on_expire=self._abandon) as stop:
                return self._run(stop)
        except BaseException:  # a graceful stop returns, with a checkpoint; anything else lands here
            if self.procs.is_main:
                self.log.close()  # nothing more goes to a file being removed
                self.run_dir.remove_unresumable()
            raise
        finally:
            random.setstate(python_rng)
            self.run_dir.unlock()
            self.procs.close()

    def _abandon(self, signum: int) -> str:
        """The stop watchdog's last act before the process ends: what a fresh run wrote goes (nothing could
        resume it), and the line says what is left."""
        if not self.procs.is_main:
            return ""
        self.log.close()
        self.run_dir.remove_unresumable()
        if self.run_dir.checkpointed or self.resuming:
            return f"continue from the last checkpoint with: {self.run_dir.resume_command()}"
        return "nothing was kept"

    def _run(self, stop) -> TrainResult:
        config, procs, run_dir = self.config, self.procs, self.run_dir
        if self.resuming:  # refused at once when another run is using the folder
            procs.on_main(run_dir.lock)
        # resuming: the epochs already trained first, they explain a too small --epochs better than the
        # warmup check would
        state = self._read_state() if self.resuming else None
        if state is not None and config.model_files == "pickle" and not config.trust_pickle:
            last = os.path.basename(run_dir.file(LAST_FILE))
            raise TrainError(f"{run_dir.path}: the run wrote whole-module pickles ({last}, ...); resuming unpickles "
                             "them, which runs code from the run folder: pass --trust-pickle / trust_pickle=True to "
                             "resume it, only if you trust it")
        config.check()
        self.task = get_task(config.task, config)
        self.task.check_data_dir(config.data_dir)  # before loading what may be a large model
        if not self.resuming:
            config.world_size = procs.world_size
        # checked first, created only once the model and the data have passed their checks: a run that cannot
        # start leaves no folder behind that would block the corrected command
        run_dir.path = procs.on_main(self._output_dir)
        if state is not None and config.world_size != procs.world_size:
            self.log(f"warning: resuming on {procs.world_size} processes, the run used {config.world_size}: "
                     "data order differs, so the result is not bit-identical to an uninterrupted run")

        torch.manual_seed(config.seed)  # random inits (a new head) are part of the run
        random.seed(config.seed)
        reference, model, data = self._build_model(state)
        for warning in data.warnings:
            self.log(f"warning: {warning}")
        if procs.max([float(stop.requested)])[0]:  # a stop point: set up, nothing trained, nothing written
            stop.acknowledge()
            raise RunStopped(f"stopped by {signal.Signals(stop.signal).name if stop.signal else 'a signal'} before "
                             "training started; nothing was kept")
        float32(model, None if reference is None else reference.model, self.log)
        model = model.to(procs.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        loaders = build_loaders(data, config, procs)
        optimization = build_optimizer(model, config, loaders.steps_per_epoch, procs.device)
        progress = Progress()
        if state is not None:
            progress = restore_progress(state, classes=data.classes, digest=data.digest, data_dir=config.data_dir)
            optimization.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                optimization.scaler.load_state_dict(state["scaler"])
            optimization.scheduler.step_update(progress.global_step)
            where = f"epoch {progress.epoch + 1}" + (f", step {progress.step}" if progress.step else "")
            self.log(f"resuming {run_dir.path} at {where} (global step {progress.global_step})")
        train_model = model
        if procs.distributed:
            # Buffers are not broadcast on every forward (the frozen base kernels are buffers, as large as the
            # model); BatchNorm statistics are averaged over the ranks at the end of every epoch instead.
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        if state is not None:
            restore_rank_state(state, procs, model, progress)  # after DDP's start, which copies rank 0's buffers
        describe_start(model, data, config, loaders.steps_per_epoch, procs, fresh=state is None, log=self.log)
        trainer = Trainer(task=self.task, config=config, model=model, train_model=train_model, data=data,
                          loaders=loaders, optimization=optimization, progress=progress, procs=procs, stop=stop,
                          run_dir=run_dir, log=self.log, notes=self.notes, resuming=self.resuming, verbose=self.verbose)
        if state is None:
            trainer.sanity_check(reference)
        del reference
        # only a run that could start gets its folder (and the log lines so far)
        procs.on_main(lambda: run_dir.create(config))
        if procs.is_main:
            self.log.open(run_dir.writes(os.path.join(run_dir.path, LOG_FILE)))
        if state is None:  # the state before training: best model (epoch 0) and metrics
            metrics = {k: v for k, v in progress.best.items() if k != "epoch"}
            procs.on_main(lambda: trainer.save_best({"epoch": 0, **metrics}))
            procs.on_main(lambda: run_dir.write_metrics(progress.history))
        model.train()

        interrupted = trainer.train_epochs()
        model.eval()
        files = procs.on_main(lambda: self._finish(model, data, progress, interrupted, stop))
        procs.barrier()
        return TrainResult(
            output_dir=run_dir.path, history=progress.history, best=progress.best, sanity=progress.sanity,
            files=files, classes=data.classes, model=model if procs.is_main else None, interrupted=interrupted,
            unreadable_images=progress.unreadable, notes=self.notes, resume_command=run_dir.resume_command(),
            task=config.task,
        )

    def _read_state(self) -> Dict[str, Any]:
        from .run_dir import STATE_FILE

        state = read_state(os.path.join(self.run_dir.path, STATE_FILE))
        best = self.run_dir.file(BEST_FILE) if self.config.fuse else None
        check_can_continue(state, self.config.epochs, self.run_dir.path, best)
        return state

    def _output_dir(self) -> str:
        if self.resuming:
            return self.run_dir.path
        if not self.run_dir.path:
            self.run_dir.path = default_output_dir(self.config.model)
        self.run_dir.check_new()
        self.run_dir.lock()  # an existing (empty) folder: claimed now; a new one when it is made
        return self.run_dir.path

    def _build_model(self, state) -> Tuple[Optional[Reference], nn.Module, TaskData]:
        """(what the sanity check compares with, None when resuming; the model that trains; the data, whose
        transforms follow the input model's preprocessing config)."""
        config, fresh = self.config, state is None
        last = self.run_dir.file(LAST_FILE)
        if not fresh and self.given is None:
            if config.model_files == "safetensors" and _describes_architecture(last):
                from ..modelfile import load

                model = load(last)
                self.log(f"model: {last}")
                data = self.task.build_data(config.data_dir, model, config.input_size, resuming=True)
                set_trainable(model, state["trainable"])
                return None, model, data
            if config.model.startswith("<in-memory"):
                raise TrainError(
                    f"{last} does not describe its architecture (the run trained an in-memory model, "
                    f"{config.model.strip('<>').split()[-1]}); pass the same model to resume(model=...)"
                )
            # no architecture in the file (a pickled MODEL): rebuild the model as the run did, then load the
            # last weights into it
        source = load_input_model(config, self.given, self.log)
        data = self.task.build_data(config.data_dir, source, config.input_size, resuming=not fresh)
        head, notes = self.task.fit_model(source, data, config.num_classes, config.data_dir)
        for note in notes:
            self.notes.append(note)
            self.log(note)
        model, reference = prepare_model(source, config, head, fresh=fresh, log=self.log)
        if fresh:
            from ..module_attrs import architecture_of

            # no safetensors file can rebuild a model without an architecture tag: a trusted pickle's run
            # writes whole-module pickles, which reparam's commands read back with --trust-pickle
            config.model_files = "pickle" if architecture_of(model) is None and config.trust_pickle else "safetensors"
            self.run_dir.model_files = config.model_files
            return reference, model, data
        set_trainable(model, state["trainable"])
        load_weights(model, last, state, config.model_files, config.trust_pickle)
        return None, model, data

    def _finish(self, model: nn.Module, data: TaskData, progress: Progress, interrupted: bool, stop) -> Dict[str, str]:
        """The plot and (with `fuse`) the deploy model, on rank 0; returns the files of the run."""
        config, best = self.config, progress.best
        self.run_dir.plot(progress.history, self.task.plot_panels, f"refocus training: {config.model}", self.log)
        if config.fuse and not interrupted:
            if stop.requested:  # training is complete and saved; fusing could outlast the stop's grace
                stop.acknowledge()
                self.log(f"stopped before writing the deploy model; write it with: reparam fuse "
                         f"{self.run_dir.file(BEST_FILE)}")
            else:
                self._write_deploy_model(model, data, best)
        if not interrupted:
            self.log(f"done: best {self.task.headline(best)} at epoch {best['epoch']}; outputs in {self.run_dir.path}")
            if best["epoch"] == 0:
                self.log("warning: no epoch beat the model as it started, so the best model"
                         + (" (and the deploy model)" if config.fuse else "")
                         + " is the input model; try a lower --lr / lr= or more epochs")
        return self.run_dir.existing_files()

    def _write_deploy_model(self, model: nn.Module, data: TaskData, best: Dict[str, Any]) -> None:
        """Fuse the best model into the deploy structure, verified against it, as deploy.safetensors (deploy.pt
        for a model without an architecture)."""
        run_dir = self.run_dir
        best_model = copy.deepcopy(model).cpu().float().eval()
        tensors, _ = read_model_file(run_dir.file(BEST_FILE), run_dir.model_files, self.config.trust_pickle)
        best_model.load_state_dict(tensors, strict=True)
        example = torch.randn(1, *data.input_size, generator=torch.Generator().manual_seed(0))
        from ..torchvision_models import example_inputs

        deployed = fuse_model(best_model, example_inputs=example_inputs(best_model, example))
        from ..module_attrs import fuse_report_of

        report = fuse_report_of(deployed)
        save_model(run_dir, deployed, run_dir.file(DEPLOY_FILE), {"train": dict(best), **data.metadata},
                   data.classes, self.notes, self.log)
        self.log(f"deploy model (best, epoch {best['epoch']}): {len(report.folded)} RefConvs folded, "
                 f"{len(report.fused)} conv+BN fused, verified (max abs error {report.max_abs_error:.2g}) -> "
                 f"{os.path.basename(run_dir.file(DEPLOY_FILE))}")


def _describes_architecture(path: str) -> bool:
    from ..modelfile import read_info

    return read_info(path) is not None


def _absolute_if_file(path) -> str:
    """Paths are saved absolute, so that a run resumes from any working directory."""
    path = os.fspath(path)
    return os.path.abspath(path) if os.path.exists(path) else path
