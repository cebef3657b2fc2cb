"""Detection training costs, on CPU: the step time of refocusing a torchvision detector vs plain fine-tuning
of the same detector (same batch, same targets), and the COCO evaluator's time per 1,000 images.

    python benchmarks/dense_train.py [--model fasterrcnn_mobilenet_v3_large_320_fpn] [--size 160] [--batch 2]
        [--reps 3] [--eval-images 1000] [--threads 1] [--no-readme]

Step: forward with targets (the detector's own losses) + backward + SGD step + zero_grad, the two variants
interleaved after one warm-up step each; medians of process CPU time and wall time, the ratio as the median
of per-round ratios. refocus = `reparam_zoo.convert(model)` in the "transforms" scope (what `reparam train
--task detection` trains); plain = every parameter trains. Evaluator: `coco_metrics` (pycocotools COCOeval,
bbox) on synthetic ground truth (7 boxes per image, 3 categories) and 100 scored detections per image (the
detectors' default cap), what `reparam train` runs after every epoch.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from reparam_zoo.surgery import convert  # noqa: E402
from reparam_zoo.torchvision_models import create, training_inputs  # noqa: E402
from reparam_zoo.train.tasks.detection import coco_metrics  # noqa: E402

from benchmarks import _common  # noqa: E402


def step_times(model_name: str, size: int, batch: int, reps: int) -> dict:
    torch.manual_seed(0)
    plain = create(model_name, num_classes=4, min_size=size, max_size=size).train()
    refocus = convert(copy.deepcopy(plain), map_k=3, train_scope="transforms").train()
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    inputs = training_inputs(plain, images, torch.Generator().manual_seed(1))
    variants = {}
    for name, model in (("plain", plain), ("refocus", refocus)):
        params = [p for p in model.parameters() if p.requires_grad]
        variants[name] = (model, torch.optim.SGD(params, lr=1e-4, momentum=0.9))

    def step(name):
        model, optimizer = variants[name]
        torch.manual_seed(2)  # the same proposals sampled in both
        loss = sum(model(*copy.deepcopy(inputs)).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {name: {"wall": [], "cpu": []} for name in variants}
    for name in variants:
        step(name)  # warm-up
    for r in range(reps):
        order = list(variants)[r % 2:] + list(variants)[:r % 2]
        for name in order:
            w, c = time.perf_counter(), time.process_time()
            step(name)
            times[name]["wall"].append(time.perf_counter() - w)
            times[name]["cpu"].append(time.process_time() - c)
    ratio = {kind: statistics.median(a / b for a, b in zip(times["refocus"][kind], times["plain"][kind]))
             for kind in ("wall", "cpu")}
    return {"model": model_name, "size": size, "batch": batch, "reps": reps,
            "median_s": {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()},
            "refocus_over_plain": ratio}


def evaluator_time(images: int) -> dict:
    rng = random.Random(0)
    truth = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(images)],
             "annotations": [], "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    results = []
    for i in range(images):
        for _ in range(7):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 350), rng.uniform(8, 140), rng.uniform(8, 130)
            truth["annotations"].append({"id": len(truth["annotations"]) + 1, "image_id": i,
                                         "category_id": rng.choice((1, 2, 3)), "bbox": [x, y, w, h],
                                         "area": w * h, "iscrowd": 0})
        for _ in range(100):
            x, y, w, h = rng.uniform(0, 500), rng.uniform(0, 350), rng.uniform(8, 140), rng.uniform(8, 130)
            results.append({"image_id": i, "category_id": rng.choice((1, 2, 3)), "bbox": [x, y, w, h],
                            "score": rng.random()})
    w, c = time.perf_counter(), time.process_time()
    metrics = coco_metrics(truth, results, list(range(images)), masks=False)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return {"images": images, "detections_per_image": 100, "wall_s": wall, "cpu_s": cpu,
            "wall_s_per_1000": wall * 1000 / images, "cpu_s_per_1000": cpu * 1000 / images,
            "val_map": metrics["val_map"]}


def readme_block(results: dict) -> str:
    s, e = results["step"], results["evaluator"]
    m = s["median_s"]
    table = _common.markdown_table(
        ["detector", "input", "batch", "plain step s (CPU / wall)", "refocus step s (CPU / wall)",
         "refocus / plain (CPU / wall)"],
        [[s["model"], f"{s['size']}x{s['size']}", s["batch"], f"{m['plain']['cpu']:.2f} / {m['plain']['wall']:.2f}",
          f"{m['refocus']['cpu']:.2f} / {m['refocus']['wall']:.2f}",
          f"**{s['refocus_over_plain']['cpu']:.2f}** / {s['refocus_over_plain']['wall']:.2f}"]])
    return (f"## Detection training: refocus vs plain step, COCO evaluation time (`dense_train.py`)\n\n"
            f"```\n{results['command']}\n```\n\n{_common.facts_line(results['machine'])}; {s['reps']} interleaved "
            f"rounds, medians. Measured on a shared, loaded 2-core machine: CPU time is the steadier number.\n\n"
            f"{table}\n\nCOCO evaluator (pycocotools, bbox, {e['detections_per_image']} detections per image): "
            f"**{e['cpu_s_per_1000']:.1f} s CPU per 1,000 images** ({e['wall_s_per_1000']:.1f} s wall), measured on "
            f"{e['images']} images.\n\nGoal: refocus step <= 1.0x plain fine-tuning, as for classifiers: "
            f"{'met' if s['refocus_over_plain']['cpu'] <= 1.0 else 'not met'} (CPU time).\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=1000)
    _common.add_run_options(parser, "dense_train.json")
    args = _common.parse_run_options(parser, argv, models_attr=None)
    results = {"command": _common.command_line("dense_train.py", argv), "machine": _common.machine_facts(),
               "step": step_times(args.model, args.size, args.batch, args.reps),
               "evaluator": evaluator_time(args.eval_images)}
    _common.write_json(args.out, results)
    if not args.no_readme:
        _common.update_readme_block("dense_train", readme_block(results))
    print(readme_block(results))
    return results


if __name__ == "__main__":
    main()
