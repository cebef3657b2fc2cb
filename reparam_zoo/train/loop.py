"""The training loop: epochs of steps, validation after each, the sanity check before the first, a stop on
request with a checkpoint, and divergence caught before it is saved. Task-agnostic: the task computes the
loss and the metrics (see `tasks`)."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from ..errors import preview
from ..model_info import save_modes
from .config import RunStopped, TrainConfig, TrainError
from .run_dir import BEST_FILE, Log, RunDir, sig3
from .setup import Loaders, Optimization, Reference
from .state import Progress, rank_states, save_checkpoint, save_model, step_seed
from .tasks import Task, TaskData

__all__ = ["Trainer"]


class Trainer:
    """Trains `model` (wrapped as `train_model`, e.g. in DDP) through `progress` until the last epoch or a stop."""

    def __init__(self, *, task: Task, config: TrainConfig, model: nn.Module, train_model: nn.Module, data: TaskData,
                 loaders: Loaders, optimization: Optimization, progress: Progress, procs, stop, run_dir: RunDir,
                 log: Log, notes: List[str], resuming: bool, verbose: bool):
        self.task, self.config, self.model, self.train_model = task, config, model, train_model
        self.data, self.loaders, self.opt, self.progress = data, loaders, optimization, progress
        self.procs, self.stop, self.run_dir, self.log, self.notes = procs, stop, run_dir, log, notes
        self.resuming, self.verbose = resuming, verbose

    # -- evaluation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, models: Sequence[nn.Module]) -> Optional[Tuple[List[Dict[str, float]], float, float]]:
        """The task's validation metrics of each model over the whole val split (all ranks), the largest output
        difference between the first two and the largest output magnitude of the first. None when a stop was
        requested meanwhile (on any rank: every rank then returns None)."""
        evaluators = [self.task.evaluator() for _ in models]
        max_diff = scale = 0.0
        unreadable: List[int] = []
        restore_modes = save_modes(*models)
        for m in models:
            m.eval()
        started = time.perf_counter()
        for inputs, targets, bad in self.loaders.val:
            self.stop.step_took(time.perf_counter() - started)
            if self.stop.requested:  # a stop point; ranks agree below (their shards differ in batch count)
                break
            unreadable += bad
            inputs, targets = self.task.to_device(inputs, targets, self.procs.device, self.config.channels_last)
            outputs = [self.task.predict(m, inputs, self.opt.autocast) for m in models]
            for evaluator, out in zip(evaluators, outputs):
                evaluator.update(out, targets)
            diff, magnitude = self.task.compare(outputs[0], outputs[-1])
            scale = max(scale, magnitude)
            if len(outputs) > 1:
                max_diff = max(max_diff, diff)
            started = time.perf_counter()
        restore_modes()
        if self.procs.max([float(self.stop.requested)])[0]:
            self.stop.acknowledge()
            return None
        metrics = [evaluator.result(self.procs) for evaluator in evaluators]
        max_diff, scale = self.procs.max([max_diff, scale])
        self.note_unreadable(self.data.val, unreadable)
        return metrics, max_diff, scale

    def sanity_check(self, reference: Reference) -> None:
        """Validate once before training: the converted model must score what its plain form scores, exactly
        for a zero-init conversion."""
        ref = reference.model.to(self.procs.device)
        if self.config.channels_last:
            ref.to(memory_format=torch.channels_last)
        evaluated = self.evaluate([ref, self.model])
        ref.cpu()
        if evaluated is None:
            raise RunStopped(f"stopped by {self.stop_name()} before training started; nothing was kept")
        (before, after), diff, scale = evaluated
        equal = self.task.sanity_equal(before, after, diff, scale, reference.exact)
        p = self.progress
        p.sanity = {"checked": True, "equal": equal, "exact": reference.exact, "compared_with": reference.name,
                    "max_abs_logit_diff": diff, "input": before, "converted": after}
        line = (f"sanity: {reference.name} {self.task.describe(before, 'val', 6)} | converted "
                f"{self.task.describe(after, 'val', 6)} | max |logit diff| {diff:.3g}")
        if equal:
            self.log(line + (" -> identical" if reference.exact else " -> consistent"))
        else:
            self.log("!" * 100)
            self.log(f"WARNING: the converted model does not score what the {reference.name} scores:")
            self.log(line)
            self.log("WARNING: the conversion is not an exact re-parameterization here; check the init and the model")
            self.log("!" * 100)
            self.notes.append(f"sanity check failed: the converted model differs from the {reference.name}")
        p.history = [{"epoch": 0, **after}]
        p.best = {"epoch": 0, **after}

    # -- training ----------------------------------------------------------------------------------------------
    def train_epochs(self) -> bool:
        """Train until the last epoch or a stop signal; returns whether it was interrupted."""
        config, p, steps = self.config, self.progress, self.loaders.steps_per_epoch
        while p.epoch < config.epochs:
            self.loaders.sampler.set_epoch(p.epoch, skip=p.step * config.batch_size)
            self.model.train()
            show = self.verbose and self.procs.is_main
            # disable=None: no bar when the output is not a terminal (logs, CI); the epoch lines remain
            bar = tqdm(total=steps, initial=p.step, disable=None if show else True, leave=False,
                       desc=f"epoch {p.epoch + 1}/{config.epochs}", dynamic_ncols=True)
            start, images_seen = time.perf_counter(), 0
            step_start = start
            unreadable: List[int] = []
            for inputs, targets, bad in self.loaders.train:
                unreadable += bad
                inputs, targets = self.task.to_device(inputs, targets, self.procs.device, config.channels_last)
                # dropout / drop-path draw from the global generator: seed it per step for exact resumption
                torch.manual_seed(step_seed(config.seed, p.epoch, p.step, self.procs.rank))
                loss, sums = self._step(inputs, targets)
                loss_value = loss.item()
                for key, value in sums.items():
                    p.partial[key] = p.partial.get(key, 0.0) + value
                images_seen += len(inputs)
                bar.update(1)
                bar.set_postfix(**self.task.progress(p.partial),
                                img_s=sig3(images_seen / max(time.perf_counter() - start, 1e-9)))
                self.stop.step_took(time.perf_counter() - step_start)
                stop, nonfinite = self.procs.max([float(self.stop.requested), float(not math.isfinite(loss_value))])
                if nonfinite:
                    bar.close()
                    value = loss_value if not math.isfinite(loss_value) else "NaN/Inf on another process"
                    raise self.diverged(f"the loss became {value} in epoch {p.epoch + 1}, step {p.step}")
                if stop and p.step < steps:
                    bar.close()
                    self.stop.acknowledge()
                    self.note_unreadable(self.data.train, unreadable)
                    self.check_finite()
                    self.save_interrupted(f"at epoch {p.epoch + 1}, step {p.step}")
                    return True
                step_start = time.perf_counter()
            bar.close()
            if not self.end_epoch(time.perf_counter() - start, images_seen, unreadable):
                self.save_interrupted(f"in the validation of epoch {p.epoch + 1}")
                return True
            # all ranks must agree, or one would wait forever in the next epoch's collectives
            if self.procs.max([float(self.stop.requested)])[0] and p.epoch < config.epochs:
                self.stop.acknowledge()
                self.log(f"interrupted after epoch {p.epoch}: checkpoint saved; "
                         f"continue with: {self.run_dir.resume_command()}")
                return True
        return False

    def _step(self, inputs, targets):
        p, opt = self.progress, self.opt
        try:
            loss, sums = self.task.training_step(self.train_model, inputs, targets, opt.autocast)
        except ValueError as e:
            # BatchNorm in training mode needs more than one value per channel; after global pooling (or at
            # a 1x1 feature map) one image gives it exactly one
            if "Expected more than 1 value per channel" not in str(e):
                raise
            raise TrainError("a batch of 1 image per process cannot train BatchNorm (it needs more than 1 value per "
                             "channel); use --batch-size / batch_size= 2 or more") from None
        opt.optimizer.zero_grad(set_to_none=True)
        opt.scaler.scale(loss).backward()
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        p.step += 1
        p.global_step += 1
        opt.scheduler.step_update(p.global_step)
        return loss, sums

    def check_finite(self) -> None:
        """Stop a diverged run before it saves anything: NaN/Inf weights or BatchNorm statistics can come with a
        finite loss, and would otherwise fail every later save and every resume."""
        from ..checkpoint import non_finite

        bad = self.procs.union(non_finite(self.model.state_dict()))  # every rank stops, or the others would wait
        if bad:
            raise self.diverged(f"training diverged in epoch {self.progress.epoch + 1}: non-finite (NaN/Inf) values "
                                f"in {preview(bad, 3)}")

    def diverged(self, what: str) -> TrainError:
        # every epoch ends with a checkpoint, and a resumed run started from one
        if self.resuming or self.progress.epoch > 0:
            return TrainError(f"{what}; the last good checkpoint is kept, but the learning rate cannot change on "
                              "resume: start a new run with a lower --lr / lr=")
        return TrainError(f"{what}; nothing was kept: run again with a lower --lr / lr=")

    def save_interrupted(self, where: str) -> None:
        """A checkpoint of the epoch in progress (every rank's own partial sums and buffers with it)."""
        ranks = rank_states(self.procs, self.model, self.progress)  # collective
        self.procs.on_main(lambda: self.save_checkpoint(ranks))
        self.log(f"interrupted {where}: checkpoint saved; continue with: {self.run_dir.resume_command()}")

    def stop_name(self) -> str:
        import signal

        return signal.Signals(self.stop.signal).name if self.stop.signal else "a stop request on another process"

    def end_epoch(self, elapsed: float, images_seen: int, unreadable: List[int]) -> bool:
        """Validate, record and checkpoint the epoch just trained; False when a stop request cut the validation
        short (the epoch's training is then checkpointed as complete, its validation runs on resume)."""
        p = self.progress
        if self.procs.distributed:
            from timm.utils import distribute_bn

            distribute_bn(self.model, self.procs.world_size, reduce=True)
        self.check_finite()  # before anything of this epoch is saved: the previous epoch's files stay intact
        keys = sorted(p.partial)
        sums = dict(zip(keys, self.procs.sum([p.partial[k] for k in keys])))
        rate = self.procs.sum([images_seen / max(elapsed, 1e-9)])[0]
        self.note_unreadable(self.data.train, unreadable)
        evaluated = self.evaluate([self.model])
        if evaluated is None:
            return False
        (val,), _, _ = evaluated
        row = {"epoch": p.epoch + 1, **self.task.train_metrics(sums), **val,
               "lr": self.opt.optimizer.param_groups[0]["lr"], "images_per_s": rate, "epoch_time_s": elapsed,
               "unreadable_images": len(p.unreadable)}
        p.history.append(row)
        self.log(f"epoch {row['epoch']}/{self.config.epochs}: {self.task.describe(row, 'train')} | "
                 f"{self.task.describe(row, 'val')} | lr {row['lr']:.3g} | {sig3(rate)} img/s")
        p.epoch += 1
        p.step = 0
        p.partial = {}
        if self.task.best_key(val) > self.task.best_key(p.best):
            p.best = {"epoch": row["epoch"], **val}
            self.procs.on_main(lambda: self.save_best({"epoch": row["epoch"], **val}))
        self.procs.on_main(self.save_checkpoint)
        self.procs.on_main(lambda: self.run_dir.write_metrics(p.history))
        return True

    def note_unreadable(self, dataset, indices: List[int]) -> None:
        names = [self.task.sample_name(dataset, i) for i in set(indices)]
        p = self.progress
        new = sorted(set(self.procs.union(names)) - set(p.unreadable))
        if new:
            p.unreadable = sorted(set(p.unreadable) | set(new))
            self.log(f"warning: skipped {len(new)} unreadable image(s) ({preview(new, 3)}); {len(p.unreadable)} so far")

    # -- files (rank 0) --------------------------------------------------------------------------------------------
    def save_best(self, tag: Dict[str, Any]) -> None:
        save_model(self.run_dir, self.model, self.run_dir.file(BEST_FILE), {"train": tag, **self.data.metadata},
                   self.data.classes,
                   self.notes, self.log)

    def save_checkpoint(self, ranks=None) -> None:
        save_checkpoint(self.run_dir, self.model, self.progress, optimizer=self.opt.optimizer, scaler=self.opt.scaler,
                        trainable=self.opt.trainable, classes=self.data.classes, digest=self.data.digest,
                        notes=self.notes, log=self.log, ranks=ranks, metadata=self.data.metadata)
