"""`reparam demo`: the whole job end to end on the built-in example (shortened)."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

import reparam_zoo
import reparam_zoo.modelfile
from reparam_zoo.checkpoint import read_state_dict
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


def _best(run_dir):
    """Independently: the best epoch of a run's metrics.jsonl by train's rule (accuracy, then lowest loss)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return max((json.loads(line) for line in f), key=lambda r: (r["val_acc"], -r["val_loss"]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One shortened demo (the whole job twice over: refocus and fine-tune) for the tests below."""
    out = str(tmp_path_factory.mktemp("demo") / "demo")
    lines = []
    result = run_demo(out, pretrain_epochs=1, refocus_epochs=2, images_per_class=8, verbose=False,
                      echo=lines.append)
    return out, lines, result


def test_demo_runs_end_to_end_and_writes_every_artifact(demo):
    out, lines, result = demo
    for key in ("pretrained", "report", "last", "best", "deploy", "metrics", "log", "finetune_deploy",
                "finetune_best"):
        assert os.path.exists(result.files[key]), key
    report = json.loads(open(result.files["report"]).read())
    assert report["names"] == ["training (RefConv)", "inference (fused)"]
    training, inference = report["models"]
    assert training["stage"] == "refconv" and inference["stage"] == "fused"
    assert training["training"]["trainable_params"] > 0
    assert inference["training"]["transform_macs"] == 0
    assert any("[5/5]" in line for line in lines) and any("training (RefConv)" in line for line in lines)

    deployed = reparam_zoo.load(result.files["deploy"])
    refocused = reparam_zoo.load(result.files["best"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed.eval()(x), refocused.eval()(x), rtol=1e-4, atol=1e-5)
    # the fused model has the original architecture's cost: no RefConv, no BatchNorm left
    assert not any(isinstance(m, (reparam_zoo.RefConvNd, torch.nn.BatchNorm2d)) for m in deployed.modules())
    # the pretrained file records its rate for `reparam ablate`'s continue arm
    assert reparam_zoo.modelfile.read_info(result.files["pretrained"]).extra["pretraining"]["lr"] == 0.01


def test_demo_shows_the_fine_tune_baseline_trained_alike_and_words_its_last_line_from_the_numbers(demo):
    out, lines, result = demo
    configs = {}
    for run in ("refocus", "finetune"):
        with open(os.path.join(out, run, "config.json")) as f:
            configs[run] = json.load(f)
    differing = {k for k in configs["refocus"] if configs["refocus"][k] != configs["finetune"][k]}
    assert differing <= {"lr", "train_scope", "map_k"}
    assert configs["finetune"]["train_scope"] == "all" and configs["refocus"]["train_scope"] == "transforms"
    assert configs["refocus"]["epochs"] == configs["finetune"]["epochs"] == 2

    refocused, finetuned = _best(os.path.join(out, "refocus")), _best(os.path.join(out, "finetune"))
    assert (result.refocused_val_acc, result.finetuned_val_acc) == (refocused["val_acc"], finetuned["val_acc"])
    images = refocused["val_images"]
    ahead = round((refocused["val_acc"] - finetuned["val_acc"]) * images)
    last = lines[-1]
    assert last == result.verdict
    if ahead == 0:
        assert last.startswith("Refocusing and fine-tuning scored the same here")
    else:
        points = 100 * abs(refocused["val_acc"] - finetuned["val_acc"])
        side = "above" if ahead > 0 else "below"
        assert last.startswith(f"Refocusing scored {points:.1f} points {side} fine-tuning here "
                               f"({abs(ahead)} of {images} validation images)")
    assert f"on one seed and {images} validation images" in last and "reparam ablate" in last
    step5 = next(line for line in lines if line.startswith("[5/5]"))
    assert f"refocused {100 * refocused['val_acc']:.1f}%, fine-tuned {100 * finetuned['val_acc']:.1f}%" in step5
    # the two deploy models have the same tensors and shapes: the cost the last line states as equal
    a, _ = read_state_dict(result.files["deploy"])
    b, _ = read_state_dict(result.files["finetune_deploy"])
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    params = sum(v.numel() for v in a.values())
    assert f"both deploy at the same cost ({params:,} params" in last


def test_demo_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path), "--quiet"])
    assert result.exit_code == 1
    assert "exists and is not empty" in result.output
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_demo_refuses_a_file_as_its_folder(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("mine")
    with pytest.raises(reparam_zoo.ReparamError, match=rf"{target} exists and is not a folder"):
        run_demo(str(target), verbose=False)  # (the command line refuses it earlier, as a usage error)
    assert target.read_text() == "mine"


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_demo_refuses_a_folder_another_demo_is_writing(tmp_path, task):
    """Two demos started into the same new folder: the one that finds the folder locked stops at once, before
    writing anything (the lock is what a running demo holds; taken here by the test)."""
    from reparam_zoo.fileio import lock_folder

    fd = lock_folder(str(tmp_path))
    try:
        result = CliRunner().invoke(main, ["demo", "-o", str(tmp_path), "--quiet", "--task", task])
    finally:
        os.close(fd)
    assert result.exit_code == 1
    assert "another demo is writing into this folder" in result.output
    assert os.listdir(tmp_path) == []
