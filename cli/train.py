"""`reparam train`: refocus training (reparam_zoo.train), single process or under torchrun."""
from __future__ import annotations

import os

import click

from .lazy import leaf

_config = leaf("reparam_zoo.train.config")  # torch-free: the defaults and choices below are the library's
OPTIMIZERS, PLAIN_SCOPE, SGD_MOMENTUM, TrainConfig = (_config.OPTIMIZERS, _config.PLAIN_SCOPE, _config.SGD_MOMENTUM,
                                                      _config.TrainConfig)
TASKS = leaf("reparam_zoo.train.tasks").TASKS

from .common import DEFAULT_MAP_K, TRAIN_SCOPES, check_map_k, flag_name, input_size_option, model_options, output_option

# the library's defaults, so the two cannot drift apart
DEFAULTS = TrainConfig(model="", data_dir="")


def _check_device(ctx, param, value):
    if value is None:
        return None
    from reparam_zoo.errors import ReparamError
    from reparam_zoo.processes import check_device

    try:
        check_device(value)
    except ReparamError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.command("train")
@click.argument("model", metavar="MODEL", required=False)
@click.option("--data", "data_dir", type=click.Path(), metavar="DIR",
              help="classification: image folders DIR/train/<class>/* and DIR/val/<class>/*; detection: COCO "
                   "(DIR/annotations/instances_{train,val}.json and the image folders they name); segmentation: "
                   "DIR/{train,val}/{images,masks}/ and DIR/classes.txt, or Pascal VOC's layout.")
@click.option("--task", type=click.Choice(list(TASKS)),
              help="What is learnt.  [default: detection for a torchvision detector, segmentation for a "
                   "torchvision segmenter, else classification]")
@click.option("--ignore-index", type=click.IntRange(min=0, max=65535), default=DEFAULTS.ignore_index,
              show_default=True, help="segmentation: the mask value that counts neither in the loss nor in the "
                                      "metrics.")
@output_option("Run folder, new or empty (default: runs/<model>-<time>).")
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True,
              help="Per process.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS.lr, show_default=True,
              help="Peak learning rate.")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default=DEFAULTS.optimizer, show_default=True,
              help="sgd: momentum SGD (the RefConv recipe); adamw.")
@click.option("--momentum", type=click.FloatRange(min=0, max=1),
              help=f"SGD momentum (--optimizer sgd only).  [default: {SGD_MOMENTUM}]")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=DEFAULTS.weight_decay, show_default=True,
              help="On the transforms (and a new head); never on biases and norms.")
@click.option("--warmup-epochs", type=click.IntRange(min=0),
              help="Epochs of linear warmup (fewer than --epochs), then cosine decay to 0, stepped per "
                   "update.  [default: 1, or 0 with --epochs 1]")
@input_size_option("Training crop size (default: the model's timm config; needed when the model has none).")
@click.option("--num-classes", type=click.IntRange(min=1), metavar="N",
              help="Replace the classifier head for N classes (must equal the data's classes; for a detector "
                   "the background counts, as in torchvision); the new head trains too.")
@click.option("--train-scope", type=click.Choice([*TRAIN_SCOPES, PLAIN_SCOPE]),
              help="What trains: only the transforms, also norm layers, or everything but the base kernels; "
                   f"{PLAIN_SCOPE}: ordinary training of a plain MODEL (no RefConv conversion, every weight).  "
                   "[default: an already converted MODEL's own scope (what `reparam convert --train-scope` "
                   "saved), else transforms]")
@click.option("--map-k", type=int, callback=check_map_k,
              help="Transform kernel size when MODEL still has to be converted (an already converted MODEL "
                   f"keeps its own; another value is an error).  [default: {DEFAULT_MAP_K}]")
@click.option("--amp", is_flag=True, help="Mixed precision (bfloat16 on CPU, float16 with loss scaling on GPU).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--workers", type=click.IntRange(min=0), default=DEFAULTS.workers, show_default=True,
              help="Data loading processes per training process.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
              help="Fixes data order, augmentation and dropout (an interrupted run resumes exactly).")
@click.option("--resume", metavar="OUTDIR", type=click.Path(),
              help="Continue the run in OUTDIR from its last checkpoint with its saved settings (MODEL, --data "
                   "and the rest may be left out; --epochs, --workers, --fuse may change, and --data may follow "
                   "the same images to a new place). A run that wrote pickles (.pt) resumes only with "
                   "--trust-pickle given again.")
@click.option("--fuse", is_flag=True,
              help="Also write the best model fused for deployment, verified: OUTDIR/deploy.safetensors "
                   "(OUTDIR/deploy.pt for a pickled MODEL).")
@model_options(num_classes=False)
@click.option("--device", metavar="DEV", callback=_check_device,
              help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available, else cpu).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines (OUTDIR/train.log has them).")
def train_command(model, data_dir, output, resume, device, quiet, input_size, **settings):
    """Refocus-train MODEL on an image-folder data set (or, with --task, on COCO-format detection data or
    segmentation masks): only the RefConv transforms learn.

    MODEL is anything `reparam convert` accepts; a model without RefConv layers is converted first (zero
    init: it starts exactly as MODEL). Validates once before training (the converted model must score what
    MODEL scores), then trains with SGD + warmup + cosine, validating every epoch. Writes to OUTDIR:
    config.json, train.log, metrics.jsonl, metrics.png, best.safetensors, last.safetensors,
    train_state.pt (resume state) and, with --fuse, deploy.safetensors; the model files record the class
    names in output index order (metadata extra "classes"). A MODEL without a rebuildable
    architecture (a whole pickled module, with --trust-pickle) is written as pickles instead: best.pt,
    last.pt and deploy.pt (read them with --trust-pickle, e.g. `reparam report OUTDIR/best.pt
    --trust-pickle`).

    Ctrl-C (or SIGTERM) stops after the current step with a checkpoint; continue with --resume OUTDIR. One
    run at a time per OUTDIR: a second one into the same folder is refused.
    Under torchrun (e.g. `torchrun --nproc_per_node 4 --no-python reparam train MODEL --data DIR`) it trains with
    DistributedDataParallel, gloo on CPU and nccl on GPU; --batch-size is per process.
    """
    # the rules about settings first, torch-free (usage errors come back at once); then the library
    check_momentum, check_resume_overrides, check_warmup = (_config.check_momentum, _config.check_resume_overrides,
                                                            _config.check_warmup)
    run_dir = leaf("reparam_zoo.train.run_dir")
    CONFIG_FILE, read_config = run_dir.CONFIG_FILE, run_dir.read_config

    if input_size is not None:
        if input_size[0] != 3 or input_size[1] != input_size[2]:
            raise click.BadParameter("training takes square RGB crops: give N or 3,N,N", param_hint="--input-size")
        input_size = input_size[1]
    settings.update(input_size=input_size)
    ctx = click.get_current_context()
    given = {name for name in settings if _given(ctx, name)} | ({"model"} if model else set()) | (
        {"data_dir"} if data_dir else set())

    try:  # the library's rules about settings, before anything heavy is loaded; flags in the messages
        check_momentum(settings["optimizer"], settings["momentum"])
        if resume:
            if output and os.path.abspath(output) != os.path.abspath(resume):
                raise click.UsageError("--resume OUTDIR continues in OUTDIR; leave out -o/--output")
            requested = {**settings, "model": model, "data_dir": data_dir}
            overrides = check_resume_overrides(read_config(resume), {n: requested[n] for n in given},
                                               os.path.join(resume, CONFIG_FILE))
        else:
            if not model:
                raise click.UsageError("missing MODEL (or --resume OUTDIR)")
            if not data_dir:
                raise click.UsageError("missing --data DIR")
            if settings["warmup_epochs"] is not None:
                check_warmup(settings["warmup_epochs"], settings["epochs"])
    except _config.SettingError as e:  # the others are usage errors of the root group, flags named the same way
        if e.setting == "warmup_epochs":
            raise click.BadParameter(e.problem(flag_name), param_hint=flag_name(e.setting)) from None
        raise

    from reparam_zoo.processes import keep_freed_memory
    from reparam_zoo.train import resume as resume_run, train
    from reparam_zoo.train.config import RunStopped

    keep_freed_memory()  # this process only trains: reuse freed blocks instead of faulting them in every step
    try:
        if resume:
            result = resume_run(resume, device=device, verbose=not quiet, trust_pickle=settings["trust_pickle"],
                                **overrides)
        else:
            result = train(model, data_dir, output_dir=output, device=device, verbose=not quiet, **settings)
    except RunStopped as e:  # a signal before the first checkpoint: as an interrupted command ends
        click.echo(f"interrupted: {e}", err=True)
        raise click.exceptions.Exit(130) from None

    if result.interrupted:
        # without -q the run's own log line has said it already; rank 0 speaks for all
        if quiet and result.model is not None:
            click.echo(f"interrupted: checkpoint in {result.output_dir}; continue with: {result.resume_command}",
                       err=True)
        raise click.exceptions.Exit(130)
    if result.model is None:  # not rank 0: rank 0 reports
        return
    if not quiet:
        from reparam_zoo.train.tasks import get_task

        best = result.best
        loss = f", val loss {best['val_loss']:.4f}" if "val_loss" in best else ""
        click.echo(f"best: epoch {best['epoch']}, {get_task(result.task).headline(best)}{loss}")
        for key in ("best", "last", "deploy", "metrics", "plot", "log"):
            if key in result.files:
                click.echo(f"wrote {result.files[key]}")


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT
