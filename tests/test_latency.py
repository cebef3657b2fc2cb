"""Measured latency: rows for every form and batch size, the statistics consistent with the timings, a
known delay measured as at least that delay, and the command line's --latency sections."""
import json
import time

import pytest
import torch
import torch.nn as nn

from reparam_zoo import convert, create_model, save
from reparam_zoo.errors import ReparamError
from reparam_zoo.latency import measure_latency

from test_cli import fails, ok

SIZE = (3, 32, 32)


class Sleeper(nn.Module):
    """A model that takes a known time per call: what the timer must see."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.proj = nn.Linear(3, 2)

    def forward(self, x):
        time.sleep(self.seconds)
        return self.proj(x.mean((2, 3)))


def test_a_known_delay_is_measured_and_ratios_follow_the_medians():
    report = measure_latency({"fast": Sleeper(0.0), "slow": Sleeper(0.02)}, SIZE, batch=3, warmup=1, repeats=5,
                             threads=1)
    assert [(r.model, r.batch) for r in report.rows] == [("fast", 1), ("slow", 1), ("fast", 3), ("slow", 3)]
    for row in report.rows:
        assert 0 < row.min_ms <= row.p25_ms <= row.median_ms <= row.p75_ms
        assert row.per_image_ms == pytest.approx(row.median_ms / row.batch)
        assert (row.form, row.runtime) == ("eval", "eager")
    fast1, slow1, fast3, slow3 = report.rows
    assert slow1.min_ms >= 20.0 and slow3.min_ms >= 20.0  # time.sleep(0.02) never returns early
    assert fast1.ratio == 1.0 and slow1.ratio == pytest.approx(slow1.median_ms / fast1.median_ms)
    assert slow1.ratio > 1 and slow3.ratio == pytest.approx(slow3.median_ms / fast3.median_ms)
    assert report.threads == 1 and report.repeats == 5
    assert torch.get_num_threads() >= 1


def test_refconv_model_times_training_forward_and_fused_deploy_model_and_exports():
    pytest.importorskip("onnxruntime", reason="onnxruntime timing needs onnxruntime")
    refconv = convert(create_model("resnet10t", num_classes=4))
    threads = torch.get_num_threads()
    report = measure_latency(refconv, SIZE, batch=2, warmup=0, repeats=2, threads=1,
                             runtimes=("eager", "onnxruntime", "torch.export"))
    assert torch.get_num_threads() == threads  # restored
    at2 = [(r.form, r.runtime) for r in report.rows if r.batch == 2]
    assert at2 == [("train-mode forward", "eager"), ("deploy (fused)", "eager"), ("deploy (fused)", "onnxruntime"),
                   ("deploy (fused)", "torch.export")]
    assert all(r.median_ms > 0 and r.min_ms > 0 for r in report.rows)
    # batch 1: a train-mode BatchNorm cannot normalize a single 1x1 sample; said, not silently dropped
    at1 = [(r.form, r.runtime) for r in report.rows if r.batch == 1]
    assert ("train-mode forward", "eager") not in at1 and len(at1) == 3
    assert any("train-mode forward (eager) not timed at batch 1" in s for s in report.skipped)
    assert "skipped: " in report.render("table")
    parsed = json.loads(report.render("json"))
    assert len(parsed["rows"]) == 7 and parsed["threads"] == 1
    assert report.render("csv").splitlines()[0] == "model,form,runtime,batch,median_ms,p25_ms,p75_ms,min_ms," \
                                                   "per_image_ms,ratio"


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ReparamError, match="unknown runtime 'tensorrt'"):
        measure_latency(Sleeper(0), SIZE, runtimes=("tensorrt",))
    with pytest.raises(ReparamError, match="repeats must be an integer >= 1"):
        measure_latency(Sleeper(0), SIZE, repeats=0)
    with pytest.raises(ReparamError, match="cannot tell the input size"):
        measure_latency(Sleeper(0))
    with pytest.raises(ReparamError, match="takes an nn.Module"):
        measure_latency({"a": "resnet18"}, SIZE)


def test_cli_report_and_compare_latency(tmp_path):
    plain = tmp_path / "plain.safetensors"
    refconv = tmp_path / "r.refconv.safetensors"
    save(create_model("resnet10t", num_classes=4), plain)
    save(convert(create_model("resnet10t", num_classes=4)), refconv)
    result = ok("report", refconv, "--input-size", "32", "--depth", "0", "--latency", "--batch", 2, "--warmup", 0,
                "--repeats", 2, "--threads", 1, "--format", "json")
    parsed = json.loads(result.stdout)
    assert parsed["report"]["stage"] == "refconv"
    forms = {(r["form"], r["batch"]) for r in parsed["latency"]["rows"]}
    assert {("train-mode forward", 2), ("deploy (fused)", 1), ("deploy (fused)", 2)} <= forms
    table = ok("compare", plain, refconv, "--input-size", "32", "--latency", "--batch", 2, "--warmup", 0,
               "--repeats", 2, "--threads", 1).stdout
    assert "1 thread(s)" in table and "train-mode forward" in table and "plain" in table
    fails(tmp_path, 2, r"--batch is for --latency", "report", plain, "--batch", 4)
    fails(tmp_path, 2, r"--runtime is for --latency", "report", plain, "--runtime", "onnxruntime")
    fails(tmp_path, 2, r"Invalid value for '--runtime'", "report", plain, "--latency", "--runtime", "tensorrt")
