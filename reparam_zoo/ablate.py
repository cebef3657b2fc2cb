"""Refocus or fine-tune? Arms trained from the same pretrained model on the same data, compared seed by seed.

    ablate(model, data_dir, output_dir, arms=("refocus", "finetune"), lr=..., lr_grid=..., seeds=...)
    resume_ablation(output_dir)          continues an interrupted ablation where it stopped

Arms (ARMS): `refocus` (RefConv, only the `train_scope` trains), `finetune` (the plain model, every weight),
`continue` (the plain model at the pretraining learning rate), `random-base` (RefConv over a re-initialised
frozen base: does the pretrained base matter?). Every arm is one `reparam_zoo.train` run per seed, with the
same data, data order and augmentation (the run seed), epochs, batch size, schedule shape and validation;
only what trains and the learning rate differ. The plain arms are train's `train_scope="all"`.

OUT holds ablation_config.json (the settings), OUT/<arm>/seed<k>/ (the run folders, each with its verified
deploy model, and arm.json once the run finished), OUT/grid/<arm>/lr<v>/ (learning-rate trials), and the
results: ablation.json, ablation.md, ablation.png. An interrupted ablation resumes: finished runs are read
back from their arm.json, an interrupted run continues through `reparam_zoo.resume`. Runs under torchrun as
`train` does (rank 0 writes). Nothing read from OUT runs code: JSON, and train's weights-only state.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

from .ablate_config import (ARMS, BASELINE, CONFIG_FILE, DEFAULT_ARMS, REFCONV_ARMS, AblationConfig,  # noqa: F401
                            AblationError, parse_arms, parse_lr_grid, parse_lrs, read_ablation_config)
from .errors import ConversionError, first_line
from .module_attrs import extra_of, fuse_report_of, set_extra
from .options import DEFAULT_MAP_K
from .train.config import PLAIN_SCOPE, default_warmup_epochs

__all__ = ["ARMS", "DEFAULT_ARMS", "BASELINE", "AblationConfig", "AblationError", "AblationResult", "ablate",
           "resume_ablation", "parse_arms", "parse_lrs", "parse_lr_grid", "read_ablation_config"]

RESULTS_FILE, REPORT_FILE, PLOT_FILE = "ablation.json", "ablation.md", "ablation.png"
RECORD_FILE = "arm.json"  # in a run folder: the run finished, and what it measured
# what train may leave in a run folder that died before its first checkpoint (nothing to resume from)
_RUN_FILES = {"config.json", "train.log", "metrics.jsonl", "metrics.png", "best.safetensors", "last.safetensors",
              "deploy.safetensors", "best.pt", "last.pt", "deploy.pt"}
# the input model file's record of how it was pretrained: metadata extra {"pretraining": {"lr": ...}}
PRETRAINING_KEY = "pretraining"


# -- the API ---------------------------------------------------------------------------------------------------

@dataclass
class AblationResult:
    output_dir: str
    results: Dict[str, Any]  # what ablation.json holds (empty when interrupted)
    records: Dict[str, List[Dict[str, Any]]]  # per arm, per seed: what each run measured
    files: Dict[str, str]  # empty on ranks other than 0 under torchrun
    interrupted: bool = False


def ablate(model, data_dir, output_dir, *, arms: Sequence[str] = DEFAULT_ARMS,
           lr: Union[None, float, Mapping[str, float]] = None, lr_grid: Optional[Sequence[float]] = None,
           grid_epochs: Optional[int] = None, seeds: int = 1, epochs: int = 10, batch_size: int = 64,
           optimizer: str = "sgd", momentum: Optional[float] = None, weight_decay: float = 4e-5,
           warmup_epochs: Optional[int] = None, input_size: Optional[int] = None, num_classes: Optional[int] = None,
           train_scope: str = "transforms", map_k: Optional[int] = None, amp: bool = False,
           channels_last: bool = False, workers: int = 2, seed: int = 0, arch: Optional[str] = None,
           checkpoint=None, pretrained: bool = False, trust_pickle: bool = False, device=None,
           verbose: bool = True, echo: Optional[Callable[[str], None]] = None) -> AblationResult:
    """Train every arm from `model` on `data_dir` for `seeds` seeds into `output_dir` (new or empty) and compare.

    `model`: an nn.Module (never modified) or anything `reparam convert` accepts. `lr`: one rate for every
    arm but `continue`, or a rate per arm; `lr_grid`: rates tried per arm without a given rate (`continue`
    excepted) for `grid_epochs` epochs (default a third of `epochs`, at least 1) on the validation split, the
    best one used. `continue` trains at the pretraining rate: the given one, else the one the model records
    (model file metadata extra {"pretraining": {"lr": ...}}). Seed k of every arm trains with seed `seed + k`.
    Arms without a rate train at train's default (0.01). Returns the summary; see the module docstring for
    the files."""
    from .train.config import check_momentum

    arms = list(arms)
    given_lrs = dict(lr) if isinstance(lr, Mapping) else (
        {} if lr is None else {a: lr for a in arms if a != "continue"})
    spec = model if _is_module(model) else _absolute_if_file(model)
    config = AblationConfig(
        model=f"<in-memory {type(spec).__name__}>" if _is_module(spec) else spec,
        data_dir=os.path.abspath(data_dir), arms=arms, lrs=given_lrs, lr_grid=sorted(set(lr_grid or [])),
        grid_epochs=grid_epochs, seeds=seeds, epochs=epochs, batch_size=batch_size, optimizer=optimizer,
        momentum=check_momentum(optimizer, momentum), weight_decay=weight_decay,
        warmup_epochs=default_warmup_epochs(epochs) if warmup_epochs is None else warmup_epochs,
        input_size=input_size, num_classes=num_classes, train_scope=train_scope, map_k=map_k, amp=amp,
        channels_last=channels_last, workers=workers, seed=seed, arch=arch,
        checkpoint=None if checkpoint is None else _absolute_if_file(checkpoint), pretrained=pretrained,
        trust_pickle=trust_pickle)
    return _Ablation(config, os.fspath(output_dir), spec if _is_module(spec) else None, resuming=False,
                     device=device, verbose=verbose, echo=echo).run()


def resume_ablation(output_dir, *, model=None, workers: Optional[int] = None, device=None, verbose: bool = True,
                    echo: Optional[Callable[[str], None]] = None) -> AblationResult:
    """Continue the ablation in `output_dir` with its saved settings: finished runs are read back, an
    interrupted run resumes exactly, the rest start. `model`: the same nn.Module, for an ablation of an
    in-memory model (its MODEL cannot be named again)."""
    output_dir = os.fspath(output_dir)
    config = read_ablation_config(output_dir)
    if workers is not None:
        config.workers = workers
    if config.model.startswith("<in-memory") and model is None:
        raise AblationError(f"{output_dir}: the ablation trained an in-memory model ({config.model.strip('<>')}); "
                            "pass the same model to resume_ablation(model=...)")
    return _Ablation(config, output_dir, model, resuming=True, device=device, verbose=verbose, echo=echo).run()


class _Interrupted(Exception):
    pass


class _Ablation:
    def __init__(self, config: AblationConfig, output_dir: str, given, *, resuming: bool, device, verbose: bool,
                 echo):
        from .processes import Processes

        self.config, self.out, self.given, self.resuming = config, output_dir, given, resuming
        self.device, self.verbose = device, verbose
        self.procs = Processes.from_env(device)  # one process group for every run (train joins it)
        self.echo = echo or _tqdm_write
        self.notes: List[str] = []
        self.made_output_dir = self.wrote_config = False

    def say(self, line: str) -> None:
        if self.verbose and self.procs.is_main:
            self.echo(line)

    def run(self) -> AblationResult:
        try:
            return self._run()
        except _Interrupted:
            self.say(f"interrupted: continue with: reparam ablate --resume {self.out}")
            return AblationResult(self.out, {}, {}, {}, interrupted=True)
        except BaseException:
            if self.procs.is_main and not self.resuming:
                self._remove_unstarted()
            raise
        finally:
            self.procs.close()

    def _run(self) -> AblationResult:
        from .data import check_data_dir
        from .train.tasks import get_task

        config = self.config
        config.check()
        check_data_dir(config.data_dir)
        if not self.resuming:
            self._check_new_output()
        self.task = get_task("classification")
        self.source = self._plain_source()
        self.pretraining_lr = self._continue_lr()
        if not self.resuming:
            self.procs.on_main(self._write_config)
        lrs = {arm: self._choose_lr(arm) for arm in config.arms}
        records: Dict[str, List[Dict[str, Any]]] = {arm: [] for arm in config.arms}
        for k in range(config.seeds):
            for arm in config.arms:
                run_dir = os.path.join(self.out, arm, f"seed{k}")
                self.say(f"[ablate] {arm}, seed {k + 1}/{config.seeds} (run seed {config.seed + k}), lr "
                         f"{lrs[arm]['lr']:g} -> {run_dir}")
                record = self._train(arm, run_dir, lrs[arm]["lr"], config.epochs, config.seed + k, fuse=True)
                records[arm].append(record)
                self.say(f"[ablate] {arm}, seed {k + 1}: {self.metric_label} {record['metric']:.2f} at the last epoch, "
                         f"{record['best_metric']:.2f} at the best (epoch {record['best']['epoch']}), "
                         f"{record['train_time_s']:.1f} s training")
        results = self._results(records, lrs)
        files = self.procs.on_main(lambda: self._write_results(results, records))
        self.procs.barrier()
        # files: on rank 0 only, which speaks for every rank
        return AblationResult(self.out, results, records, files if self.procs.is_main else {})

    # -- setting up ----------------------------------------------------------------------------------------
    def _check_new_output(self) -> None:
        out = self.out
        if os.path.exists(out) and not os.path.isdir(out):
            raise AblationError(f"{out}: is a file, expected an output folder")
        if os.path.isdir(out) and os.listdir(out):
            hint = (f"; continue it with --resume {out} / resume_ablation()"
                    if os.path.exists(os.path.join(out, CONFIG_FILE)) else "")
            raise AblationError(f"{out}: output folder is not empty; choose a new one{hint}")

    def _write_config(self) -> None:
        from .train.run_dir import write_json

        if not os.path.isdir(self.out):
            os.makedirs(self.out)
            self.made_output_dir = True
        write_json(os.path.join(self.out, CONFIG_FILE), asdict(self.config))
        self.wrote_config = True

    def _remove_unstarted(self) -> None:
        """A fresh ablation that failed before any run could be resumed leaves nothing behind (only what it
        wrote itself is removed)."""
        if not self.wrote_config:
            return
        for root, _, files in os.walk(self.out):
            if "train_state.pt" in files or RECORD_FILE in files:
                return
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.out, CONFIG_FILE))
        if self.made_output_dir:
            for root, dirs, files in sorted(os.walk(self.out), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(root)

    def _plain_source(self):
        """The plain model every arm starts from, checked that the arms can be compared from it."""
        import torch

        from .deploy import fold
        from .surgery import convert, refconv_layers

        config = self.config
        if self.given is not None:
            model = copy.deepcopy(self.given)
        else:
            from .resolve import resolve_model

            model = resolve_model(config.model, arch=config.arch, checkpoint=config.checkpoint,
                                  pretrained=config.pretrained, trust_pickle=config.trust_pickle).model
        layers = refconv_layers(model)
        if layers:
            if any(bool(m.transform_weight.any()) for _, m in layers):
                raise AblationError(
                    f"{config.model} is already refocused (its RefConv transforms are trained): it has no plain "
                    "counterpart the arms could start from alike; pass the model from before refocusing")
            own = sorted({m.map_k for _, m in layers})
            if config.map_k is not None and own != [config.map_k]:
                raise AblationError(f"map_k {config.map_k} was asked for, but {config.model} is converted with map_k="
                                    f"{','.join(map(str, own))}")
            config.map_k = own[0]
            extra = extra_of(model)
            model = fold(model)  # zero transforms: exactly its base kernels, the plain model
            if extra is not None:
                set_extra(model, extra)
            self.notes.append(f"{config.model} was converted but never refocused (zero transforms); its folded form, "
                              "the plain model, is what every arm starts from")
        if any(arm in REFCONV_ARMS for arm in config.arms):
            try:
                with torch.random.fork_rng():
                    converted = convert(model, map_k=config.map_k or DEFAULT_MAP_K)
            except ConversionError as e:
                converted, why = None, f" ({e})"
            else:
                why = ""
            if converted is None or not refconv_layers(converted):
                raise AblationError(f"{config.model} has no convolution RefConv can refocus: the refocus arms would "
                                    "train nothing" + why)
        return model.eval()

    def _continue_lr(self) -> Optional[float]:
        if "continue" not in self.config.arms:
            return None
        if "continue" in self.config.lrs:
            return self.config.lrs["continue"]
        extra = extra_of(self.source)
        recorded = extra.get(PRETRAINING_KEY) if extra is not None else None
        lr = recorded.get("lr") if isinstance(recorded, dict) else None
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0:
            self.notes.append(f"continue trains at the pretraining learning rate the model file records ({lr:g})")
            return float(lr)
        raise AblationError(f"the continue arm trains at the pretraining learning rate, which {self.config.model} "
                            f"does not record (metadata extra {{\"{PRETRAINING_KEY}\": {{\"lr\": ...}}}}); "
                            "give it: --lr continue=RATE / lr={'continue': RATE}")

    def arm_model(self, arm: str, run_seed: int):
        """The model arm `arm` starts from for the run seeded `run_seed` (as train will train it)."""
        import torch

        from .surgery import convert, refconv_layers

        if arm not in REFCONV_ARMS:
            return copy.deepcopy(self.source)
        with torch.random.fork_rng():
            converted = convert(self.source, map_k=self.config.map_k or 3, train_scope=self.config.train_scope)
        if arm == "random-base":
            # the paper's prior check: the same transforms over kernels that never saw the data
            generator = torch.Generator().manual_seed(1_000_003 + run_seed)
            with torch.no_grad():
                for _, layer in refconv_layers(converted):
                    fresh = torch.empty_like(layer.weight_base, dtype=torch.float32)
                    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                    layer.weight_base.copy_(fresh)
        return converted

    @property
    def metric_label(self) -> str:
        return getattr(self.task, "comparison_metric", ("validation metric", 1.0))[0]

    def score(self, metrics: Dict[str, Any]) -> float:
        """The task's best-model metric (the first of its best_key), on its display scale."""
        scale = getattr(self.task, "comparison_metric", ("", 1.0))[1]
        return float(self.task.best_key(metrics)[0]) * scale

    # -- learning rates ------------------------------------------------------------------------------------
    def _choose_lr(self, arm: str) -> Dict[str, Any]:
        config = self.config
        if arm == "continue":
            return {"lr": self.pretraining_lr, "source": "given" if "continue" in config.lrs else "pretraining"}
        if arm in config.lrs:
            return {"lr": config.lrs[arm], "source": "given"}
        if not config.lr_grid:
            return {"lr": config.default_lr, "source": "default"}
        epochs = config.grid_epochs or max(1, config.epochs // 3)
        tried = {}
        for lr in config.lr_grid:
            run_dir = os.path.join(self.out, "grid", arm, f"lr{lr:g}")
            self.say(f"[ablate] lr grid: {arm} at lr {lr:g}, {epochs} epoch(s) -> {run_dir}")
            record = self._train(arm, run_dir, lr, epochs, config.seed, fuse=False)
            tried[lr] = record
        best = max(config.lr_grid, key=lambda lr: self.task.best_key(tried[lr]["final"]))
        self.say(f"[ablate] lr grid: {arm} chooses lr {best:g} ("
                 + ", ".join(f"{lr:g}: {tried[lr]['metric']:.2f}" for lr in config.lr_grid) + ")")
        return {"lr": best, "source": "grid", "tried": {lr: tried[lr]["metric"] for lr in config.lr_grid},
                "grid_epochs": epochs}

    # -- one run -------------------------------------------------------------------------------------------
    def _train(self, arm: str, run_dir: str, lr: float, epochs: int, run_seed: int, *, fuse: bool) -> Dict[str, Any]:
        """The record of one run: read back when it finished, else resumed or started."""
        from .train import resume, train
        from .train.state import read_state

        record_path = os.path.join(run_dir, RECORD_FILE)
        if os.path.exists(record_path):
            return _read_record(record_path)
        state_path = os.path.join(run_dir, "train_state.pt")
        start = time.perf_counter()
        with _PeakRss() as rss:
            if os.path.exists(state_path):
                state = read_state(state_path)
                if state["step"] == 0 and state["epoch"] >= epochs:  # finished, killed before its record
                    result = None
                    history, best = json.loads(state["history"]), json.loads(state["best"])
                else:
                    self.say(f"[ablate] resuming the interrupted run in {run_dir}")
                    result = resume(run_dir, model=self.arm_model(arm, run_seed), workers=self.config.workers,
                                    device=self.device, verbose=self.verbose)
            else:
                self.procs.on_main(lambda: _clear_dead_start(run_dir))
                scope = self.config.train_scope if arm in REFCONV_ARMS else PLAIN_SCOPE
                result = train(self.arm_model(arm, run_seed), self.config.data_dir, output_dir=run_dir,
                               epochs=epochs, lr=lr, warmup_epochs=min(self.config.warmup_epochs, epochs - 1),
                               train_scope=scope, seed=run_seed, fuse=fuse, device=self.device,
                               verbose=self.verbose, **self.config.run_settings())
        if result is not None:
            if result.interrupted:
                raise _Interrupted()
            history, best = result.history, result.best
        record = {
            "arm": arm, "lr": lr, "epochs": epochs, "run_seed": run_seed, "output_dir": run_dir,
            # the last epoch: every arm the same budget, no epoch picked on the validation split
            "metric": self.score(history[-1]), "best_metric": self.score(best), "final": history[-1],
            "curve": [self.score(row) for row in history], "best": best, "history": history,
            "train_time_s": sum(row.get("epoch_time_s", 0.0) for row in history),
            "wall_s": time.perf_counter() - start if result is not None else None,
            "peak_rss_mib": rss.mib if result is not None else None,
            "peak_rss_scope": rss.scope,
            "trainable_params": None if result is None or result.model is None else
            sum(p.numel() for p in result.model.parameters() if p.requires_grad),
        }
        from .train.run_dir import write_json

        self.procs.on_main(lambda: write_json(record_path, record))
        return record

    # -- results -------------------------------------------------------------------------------------------
    def _results(self, records, lrs) -> Dict[str, Any]:
        from .ablate_summary import reading, summarize

        config = self.config
        summary = summarize(records, BASELINE)
        cost, cost_note, input_size = self._deploy_costs()
        results = {
            "model": config.model, "data_dir": config.data_dir, "arms": config.arms, "baseline": BASELINE,
            "metric": {"label": self.metric_label, "at": "last epoch, validation split"},
            "settings": {**asdict(config), "grid_epochs": config.grid_epochs or max(1, config.epochs // 3)},
            "lrs": {arm: {k: v for k, v in lrs[arm].items()} for arm in config.arms},
            "lr_grid": {arm: lrs[arm]["tried"] for arm in config.arms if "tried" in lrs[arm]},
            "summary": summary, "deploy_cost": cost, "deploy_cost_note": cost_note, "input_size": input_size,
            "notes": self.notes + [
                "the validation split measures the arms"
                + (" and picked the learning rates from the grid" if config.lr_grid else "")
                + "; hold out a test split of your own for an unbiased final number",
                "peak RSS is this process's resident memory (data-loading workers not included)"],
        }
        results["reading"] = reading(results)
        return results

    def _deploy_costs(self):
        """Each arm's deployed cost, from fusing (with verification) the model it starts from: the structure a
        trained run deploys does not depend on the weights."""
        import torch

        from .deploy import fuse
        from .model_info import cfg_input_size
        from .report import report

        size = self.config.input_size
        input_size = (3, size, size) if size else tuple(cfg_input_size(self.source) or (3, 224, 224))
        costs, shapes = {}, {}
        for arm in self.config.arms:
            model = self.arm_model(arm, self.config.seed)
            if self.config.num_classes is not None:
                from .architectures import set_num_classes
                from .train.tasks.classification import num_outputs

                if num_outputs(model, input_size) != self.config.num_classes:
                    set_num_classes(model, self.config.num_classes)
            example = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
            deployed = fuse(model.eval(), example_inputs=example)
            counted = report(deployed, input_size, depth=0)
            fused = fuse_report_of(deployed)
            costs[arm] = {"params": counted.inference["params"], "macs": counted.inference["macs"],
                          "folded": len(fused.folded), "fused": len(fused.fused),
                          "max_abs_error": fused.max_abs_error}
            shapes[arm] = [(k, tuple(v.shape)) for k, v in deployed.state_dict().items()]
        same = [arm for arm in self.config.arms if arm != BASELINE and shapes[arm] == shapes[BASELINE]]
        if "refocus" in self.config.arms:
            c = costs["refocus"]
            note = (f"refocus and {BASELINE} deploy at identical cost: the fused models hold the same "
                    f"{len(shapes[BASELINE])} tensors with the same shapes ({c['params']:,} params, {c['macs']:,} MACs)"
                    if "refocus" in same else
                    f"refocus and {BASELINE} deploy with different structures (see the table)")
        else:
            note = ", ".join(same) + f" deploy{'s' if len(same) == 1 else ''} at {BASELINE}'s cost" if same else ""
        return costs, note, list(input_size)

    def _write_results(self, results, records) -> Dict[str, str]:
        from .ablate_summary import markdown, plot
        from .fileio import atomic_write
        from .train.run_dir import write_json

        files = {"results": os.path.join(self.out, RESULTS_FILE), "report": os.path.join(self.out, REPORT_FILE)}
        write_json(files["results"], {**results, "runs": {arm: [{k: v for k, v in r.items() if k != "history"}
                                                                 for r in runs] for arm, runs in records.items()}})
        text = markdown(results)

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)

        atomic_write(files["report"], write)
        curves = {arm: [r["curve"] for r in runs] for arm, runs in records.items()}
        if plot(results, curves, os.path.join(self.out, PLOT_FILE), self.say):
            files["plot"] = os.path.join(self.out, PLOT_FILE)
        self.say("")
        self.say(text)
        self.say(f"wrote {', '.join(files.values())}")
        return files


class _PeakRss:
    """This process's peak resident memory during a block: Linux lets a process reset its high-water mark
    (write 5 to /proc/self/clear_refs); elsewhere the peak since the process started."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.scope = "this run"
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc):
        self.mib = None
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.mib = int(line.split()[1]) / 1024
        except OSError:
            import resource
            import sys

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.mib = peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
        return False


def _clear_dead_start(run_dir: str) -> None:
    """A run killed before its first checkpoint leaves files nothing can resume from; only train's own."""
    if not os.path.isdir(run_dir):
        return
    entries = os.listdir(run_dir)
    strangers = [e for e in entries if e not in _RUN_FILES]
    if strangers:
        raise AblationError(f"{run_dir}: holds files that are not a training run's ({strangers[0]}, ...) and no "
                            "checkpoint; move them away to continue the ablation")
    for entry in entries:
        os.remove(os.path.join(run_dir, entry))


def _read_record(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict) or not isinstance(record.get("best"), dict):
            raise ValueError("not a run record")
        for key in ("metric", "best_metric", "lr"):
            if not isinstance(record.get(key), (int, float)):
                raise ValueError(f"no {key}")
        return record
    except (OSError, ValueError, TypeError, RecursionError) as e:
        raise AblationError(f"{path}: unreadable run record ({first_line(e)}); remove it to rerun that run's "
                            "summary from its checkpoint") from None


def _is_module(value) -> bool:
    import torch.nn as nn

    return isinstance(value, nn.Module)


def _absolute_if_file(path) -> str:
    path = os.fspath(path)
    return os.path.abspath(path) if os.path.exists(path) else path


def _tqdm_write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line)
