"""`reparam demo`: the whole job end to end on the built-in example (shortened)."""
import json
import os

import torch
from click.testing import CliRunner

import reparam_zoo
from reparam_cli.main import main
from reparam_zoo.demo import PATTERNS, make_pattern_dataset, run_demo


def test_pattern_dataset_layout_is_deterministic(tmp_path):
    make_pattern_dataset(str(tmp_path / "a"), train_per_class=3, val_per_class=2, seed=1)
    make_pattern_dataset(str(tmp_path / "b"), train_per_class=3, val_per_class=2, seed=1)
    for split, count in (("train", 3), ("val", 2)):
        assert sorted(os.listdir(tmp_path / "a" / split)) == sorted(PATTERNS)
        for pattern in PATTERNS:
            files = sorted(os.listdir(tmp_path / "a" / split / pattern))
            assert len(files) == count
            for f in files:
                assert (tmp_path / "a" / split / pattern / f).read_bytes() == \
                       (tmp_path / "b" / split / pattern / f).read_bytes()


def test_demo_runs_end_to_end_and_writes_every_artifact(tmp_path):
    out = str(tmp_path / "demo")
    lines = []
    result = run_demo(out, pretrain_epochs=1, refocus_epochs=1, images_per_class=8, verbose=False,
                      echo=lines.append)
    for key in ("pretrained", "report", "last", "best", "deploy", "metrics", "log"):
        assert os.path.exists(result.files[key]), key
    report = json.loads(open(result.files["report"]).read())
    assert report["names"] == ["training (RefConv)", "inference (fused)"]
    training, inference = report["models"]
    assert training["stage"] == "refconv" and inference["stage"] == "fused"
    assert training["training"]["trainable_params"] > 0
    assert inference["training"]["transform_macs"] == 0
    assert any("[4/4]" in line for line in lines) and any("training (RefConv)" in line for line in lines)

    deployed = reparam_zoo.load(result.files["deploy"])
    refocused = reparam_zoo.load(result.files["best"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed.eval()(x), refocused.eval()(x), rtol=1e-4, atol=1e-5)
    # the fused model has the original architecture's cost: no RefConv, no BatchNorm left
    assert not any(isinstance(m, (reparam_zoo.RefConvNd, torch.nn.BatchNorm2d)) for m in deployed.modules())


def test_demo_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path), "--quiet"])
    assert result.exit_code == 1
    assert "exists and is not empty" in result.output
    assert os.listdir(tmp_path) == ["keep.txt"]
