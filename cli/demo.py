"""`reparam demo`: the main job end to end on the built-in example."""
from __future__ import annotations

import click


@click.command("demo")
@click.option("-o", "--output", "output_dir", default="reparam-demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for every artifact (must be new or empty).")
@click.option("--seed", default=0, show_default=True, help="Seed for data generation and training.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--task", type=click.Choice(["classification", "detection", "segmentation"]), default="classification",
              show_default=True, help="detection: a torchvision SSDlite on generated COCO-format shapes "
                                      "(mAP); segmentation: a torchvision LR-ASPP on generated masks (mIoU).")
def demo_command(output_dir, seed, quiet, task):
    """Run convert -> refocus-train -> fuse -> report on a built-in example, offline, in under a minute on 2 idle cores,
    beside the baseline: fine-tuning the same model for the same epochs.

    Generates a small 4-class texture data set, pretrains mobilenetv3_small_050 on it briefly, converts every
    spatial conv to RefConv and trains only the transforms (with progress bars), then fine-tunes every weight
    of the plain pretrained model for the same epochs with the same data order and schedule. Writes both
    verified fused deploy models, prints the training-vs-inference table and a last line that says what was
    measured (one seed, one small validation set; `reparam ablate` answers it with seeds on your data).

    --task detection / segmentation runs convert -> refocus-train -> fuse -> report for a torchvision
    detector (SSDlite, mAP) or segmenter (LR-ASPP, mIoU) pretrained from scratch on generated shapes (COCO
    JSON / index masks), printing the metric before and after refocusing, without a fine-tuning baseline.
    """
    from reparam_zoo.demo import run_demo
    from reparam_zoo.processes import keep_freed_memory

    keep_freed_memory()  # as `reparam train` does
    if task != "classification":
        from reparam_zoo.demo_dense import run_dense_demo

        dense = run_dense_demo(task, output_dir, seed=seed, verbose=not quiet, echo=click.echo)
        click.echo(f"\ndone in {dense.seconds:.0f} s; artifacts in {dense.output_dir}")
        return
    result = run_demo(output_dir, seed=seed, verbose=not quiet, echo=click.echo)
    click.echo(f"\ndone in {result.seconds:.0f} s; artifacts in {result.output_dir}")
