"""The dense demos' own pieces: the BatchNorm statistics recomputed after pretraining, and the last line."""
import dataclasses

import torch
import torch.nn as nn

from reparam_zoo import demo_dense


def _batches(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 8, 8, generator=generator) * 3 + 1 for _ in range(count)]


def test_precise_bn_gives_the_running_statistics_of_the_training_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.01), nn.ReLU(), nn.Conv2d(4, 2, 1))
    batches = _batches(5, seed=1)
    with torch.no_grad():  # what the first BatchNorm sees over all batches, from the (fixed) conv weights
        seen = torch.cat([model[0](b) for b in batches]).transpose(0, 1).flatten(1)
    mean, biased_var = seen.mean(1), seen.var(1, unbiased=False)
    per_batch = seen.shape[1] // len(batches)  # values per channel in one batch
    calls = []

    def loss_of(batch):
        calls.append(batch)
        return model(batch).sum()

    demo_dense._precise_bn(model, batches, loss_of)
    bn = model[1]
    assert len(calls) == len(batches) and not model.training
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    # the population variance, from per-batch unbiased variances: between the biased and the per-batch
    # unbiased estimate of the whole
    assert (bn.running_var >= biased_var * (1 - 1e-5)).all()
    assert (bn.running_var <= biased_var * per_batch / (per_batch - 1) * (1 + 1e-5)).all()
    assert bn.momentum == 0.01  # restored
    # with momentum 0.01, a few training steps leave the running mean near its initial 0
    assert (mean.abs() > 0.1).any()


def test_the_last_line_states_what_was_measured():
    demo = dataclasses.replace(demo_dense.DENSE_DEMOS["segmentation"], val_images=16)
    line = demo_dense._verdict(demo, 0.50, {"epoch": 2, "val_miou": 0.512, "val_images": 16})
    assert line.startswith("Refocusing moved val mIoU by +1.2 points here, on one seed and 16 validation images")
    assert "not a gain" in line
    line = demo_dense._verdict(demo, 0.50, {"epoch": 1, "val_miou": 0.49, "val_images": 16})
    assert line.startswith("Refocusing moved val mIoU by -1.0 points here")
    line = demo_dense._verdict(demo, 0.50, {"epoch": 0, "val_miou": 0.50, "val_images": 16})
    assert line.startswith("No refocus epoch beat the pretrained model here (the deploy model is the pretrained one)")
