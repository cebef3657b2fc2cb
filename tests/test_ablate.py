"""`reparam ablate`: the arms differ only in what trains and the learning rate (same data, order, schedule),
the paired table against independent arithmetic, resuming an interrupted ablation, refusals, the command."""
import json
import os
import signal
import statistics
import sys

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import reparam_zoo
from reparam_cli.main import main
from reparam_zoo.ablate import AblationError, resume_ablation
from reparam_zoo.checkpoint import read_state_dict
from reparam_zoo.surgery import refconv_layers
from reparam_zoo.train.config import SettingError
from test_train import make_dataset, tiny_net

ablate_module = sys.modules["reparam_zoo.ablate"]
FAST = dict(input_size=32, batch_size=8, workers=0, verbose=False)
ALL_ARMS = ["refocus", "finetune", "continue", "random-base"]
LRS = {"refocus": 0.5, "finetune": 0.05, "continue": 0.2, "random-base": 0.5}
STEPS = 2 * (3 * 16 // 8)  # epochs x steps per epoch of every run (3 classes x 16 train images, batch 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ablated(data_dir, tmp_path_factory):
    """Every arm, 2 seeds, 2 epochs; every training batch recorded as it went into a model."""
    from reparam_zoo.train.tasks.classification import ClassificationTask

    seen = []
    step = ClassificationTask.training_step

    def recording(self, model, inputs, targets, autocast):
        seen.append((inputs.clone(), targets.clone()))
        return step(self, model, inputs, targets, autocast)

    out = str(tmp_path_factory.mktemp("ablation") / "out")
    ClassificationTask.training_step = recording
    try:
        result = reparam_zoo.ablate(tiny_net(), data_dir, out, arms=ALL_ARMS, lr=LRS, seeds=2, epochs=2, **FAST)
    finally:
        ClassificationTask.training_step = step
    return result, seen, out


def _run_config(out, arm, seed):
    with open(os.path.join(out, arm, f"seed{seed}", "config.json")) as f:
        return json.load(f)


def test_arms_differ_only_in_what_trains_and_the_learning_rate(ablated):
    result, _, out = ablated
    plain = {n for n, _ in tiny_net().named_parameters()}
    transforms = {f"{name}.transform_weight" for name, _ in refconv_layers(reparam_zoo.convert(tiny_net()))}
    for seed in range(2):
        configs = {arm: _run_config(out, arm, seed) for arm in ALL_ARMS}
        for arm, config in configs.items():
            differing = {k for k in config if config[k] != configs["finetune"][k]}
            assert differing <= {"lr", "train_scope", "map_k"}, (arm, differing)
            assert config["lr"] == LRS[arm] and config["seed"] == seed
        assert {a: c["train_scope"] for a, c in configs.items()} == {
            "refocus": "transforms", "finetune": "all", "continue": "all", "random-base": "transforms"}
        trainable = {arm: set(torch.load(os.path.join(out, arm, f"seed{seed}", "train_state.pt"),
                                         weights_only=True)["trainable"]) for arm in ALL_ARMS}
        assert trainable["finetune"] == trainable["continue"] == plain
        assert trainable["refocus"] == trainable["random-base"] == transforms
    # refocus refocuses the pretrained kernels; random-base re-initialised ones, differently per seed
    source = tiny_net().state_dict()
    bases = {(arm, s): read_state_dict(os.path.join(out, arm, f"seed{s}", "last.safetensors"))[0]
             for arm in ("refocus", "random-base") for s in range(2)}
    for name in ("stem", "dw"):
        key = f"{name}.weight_base"
        assert torch.equal(bases["refocus", 0][key], source[f"{name}.weight"])
        assert not torch.allclose(bases["random-base", 0][key], source[f"{name}.weight"])
        assert not torch.equal(bases["random-base", 0][key], bases["random-base", 1][key])


def test_every_arm_sees_the_same_batches_in_the_same_order_per_seed(ablated):
    _, seen, _ = ablated
    assert len(seen) == 2 * len(ALL_ARMS) * STEPS
    runs = [seen[i:i + STEPS] for i in range(0, len(seen), STEPS)]  # seed 0: every arm, then seed 1
    for seed in range(2):
        first, *others = runs[seed * len(ALL_ARMS):(seed + 1) * len(ALL_ARMS)]
        for other in others:
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, other))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(runs[0], runs[len(ALL_ARMS)]))  # seeds differ


def _rows(out, arm, seed):
    with open(os.path.join(out, arm, f"seed{seed}", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _last_top1(out, arm, seed):
    return 100 * _rows(out, arm, seed)[-1]["val_acc"]


def _best_top1(out, arm, seed):
    """Independently: the best epoch of metrics.jsonl by train's rule (highest accuracy, then lowest loss)."""
    return 100 * max(_rows(out, arm, seed), key=lambda r: (r["val_acc"], -r["val_loss"]))["val_acc"]


def test_paired_table_agrees_with_an_independent_computation_from_the_per_seed_numbers(ablated):
    result, _, out = ablated
    summary = result.results["summary"]
    values = {arm: [_last_top1(out, arm, s) for s in range(2)] for arm in ALL_ARMS}
    for arm in ALL_ARMS:
        got = summary[arm]
        best = [_best_top1(out, arm, s) for s in range(2)]
        assert got["best_metric"]["mean"] == pytest.approx(sum(best) / 2)
        assert got["per_seed"] == pytest.approx(values[arm])
        assert got["metric"]["mean"] == pytest.approx(sum(values[arm]) / 2)
        assert got["metric"]["std"] == pytest.approx(abs(values[arm][0] - values[arm][1]) / 2 ** 0.5)
        if arm == "finetune":
            assert got["vs_baseline"] is None
            continue
        diffs = [a - b for a, b in zip(values[arm], values["finetune"])]
        assert got["vs_baseline"]["mean"] == pytest.approx(sum(diffs) / 2)
        assert got["vs_baseline"]["std"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2 ** 0.5)
        assert got["vs_baseline"]["wins"] == sum(d > 0 for d in diffs)
        assert got["vs_baseline"]["ties"] == sum(d == 0 for d in diffs)
        with open(os.path.join(out, arm, "seed0", "metrics.jsonl")) as f:
            epochs = [json.loads(line).get("epoch_time_s") for line in f][1:]
        assert result.records[arm][0]["train_time_s"] == pytest.approx(sum(epochs))
        assert result.records[arm][0]["peak_rss_mib"] > 10
    report = open(os.path.join(out, "ablation.md")).read()
    row = next(line for line in report.splitlines() if line.startswith("| refocus |"))
    mean, std = statistics.mean(values["refocus"]), statistics.stdev(values["refocus"])
    assert f"{mean:.2f} ± {std:.2f}" in row
    assert f"| {sum(d > 0 for d in (a - b for a, b in zip(values['refocus'], values['finetune'])))}/2" in row
    saved = json.load(open(os.path.join(out, "ablation.json")))
    assert saved["summary"] == json.loads(json.dumps(summary))
    assert os.path.getsize(os.path.join(out, "ablation.png")) > 1000


def test_every_run_keeps_its_verified_deploy_model_and_refocus_deploys_at_finetunes_cost(ablated):
    result, _, out = ablated
    for arm in ALL_ARMS:
        for seed in range(2):
            assert os.path.exists(os.path.join(out, arm, f"seed{seed}", "deploy.safetensors"))
    shapes = {arm: {k: tuple(v.shape) for k, v in
                    read_state_dict(os.path.join(out, arm, "seed0", "deploy.safetensors"))[0].items()}
              for arm in ("refocus", "finetune")}
    assert shapes["refocus"] == shapes["finetune"]
    cost = result.results["deploy_cost"]
    assert cost["refocus"]["params"] == cost["finetune"]["params"] == sum(
        int(torch.tensor(s).prod()) for s in shapes["finetune"].values())
    assert cost["refocus"]["macs"] == cost["finetune"]["macs"]
    assert cost["refocus"]["folded"] == 2 and cost["finetune"]["folded"] == 0
    assert result.results["deploy_cost_note"].startswith("refocus and finetune deploy at identical cost")


class _StopOnce:
    """Sends SIGINT when training reaches (epoch, step) for the `nth` time (a Ctrl-C in one arm's run)."""

    def __init__(self, epoch, step, nth):
        self.at, self.nth, self.count = (epoch, step), nth, 0
        self.step_seed = sys.modules["reparam_zoo.train.loop"].step_seed

    def __call__(self, seed, epoch, step, rank):
        if (epoch, step) == self.at:
            self.count += 1
            if self.count == self.nth:
                os.kill(os.getpid(), signal.SIGINT)
        return self.step_seed(seed, epoch, step, rank)


def test_an_interrupted_ablation_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(data_dir, tmp_path,
                                                                                           monkeypatch):
    settings = dict(arms=["refocus", "finetune"], lr={"refocus": 0.5, "finetune": 0.05}, seeds=1, epochs=2, **FAST)
    straight = reparam_zoo.ablate(tiny_net(), data_dir, str(tmp_path / "straight"), **settings)
    out = str(tmp_path / "stopped")
    loop = sys.modules["reparam_zoo.train.loop"]
    monkeypatch.setattr(loop, "step_seed", _StopOnce(0, 2, nth=2))  # in the second run: finetune
    stopped = reparam_zoo.ablate(tiny_net(), data_dir, out, **settings)
    assert stopped.interrupted
    assert os.path.exists(os.path.join(out, "refocus", "seed0", "arm.json"))
    assert not os.path.exists(os.path.join(out, "finetune", "seed0", "arm.json"))
    state = torch.load(os.path.join(out, "finetune", "seed0", "train_state.pt"), weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 3)
    monkeypatch.setattr(loop, "step_seed", loop.step_seed.step_seed)

    calls = {"train": 0, "resume": 0}
    train_package = sys.modules["reparam_zoo.train"]
    for name in calls:
        original = getattr(train_package, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(train_package, name, counted)
    resumed = resume_ablation(out, model=tiny_net(), verbose=False)
    assert calls == {"train": 0, "resume": 1}  # refocus read back, finetune resumed
    assert not resumed.interrupted
    for arm in ("refocus", "finetune"):
        a, _ = read_state_dict(tmp_path / "straight" / arm / "seed0" / "last.safetensors")
        b, _ = read_state_dict(tmp_path / "stopped" / arm / "seed0" / "last.safetensors")
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert resumed.results["summary"] == straight.results["summary"] | {
        arm: {**straight.results["summary"][arm], "train_time_s": resumed.results["summary"][arm]["train_time_s"],
              "peak_rss_mib": resumed.results["summary"][arm]["peak_rss_mib"]} for arm in ("refocus", "finetune")}
    # a finished ablation resumed again reads everything back and trains nothing
    calls.update(train=0, resume=0)
    resume_ablation(out, model=tiny_net(), verbose=False)
    assert calls == {"train": 0, "resume": 0}


class _NoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("model, kwargs, error, message", [
    (lambda: _refocused(), {}, AblationError, "is already refocused (its RefConv transforms are trained)"),
    (lambda: _NoConv(), {}, AblationError, "has no convolution RefConv can refocus"),
    (lambda: tiny_net(), dict(arms=["refocus", "continue"]), SettingError, "arms must include finetune"),
    (lambda: tiny_net(), dict(arms=["refocus", "finetune", "refocus"]), SettingError, "names an arm twice"),
    (lambda: tiny_net(), dict(arms=["refocus", "finetune", "distill"]), SettingError, "unknown arm 'distill'"),
    (lambda: tiny_net(), dict(lr={"continue": 0.1}), SettingError, "names the arm continue, which is not in"),
    (lambda: tiny_net(), dict(arms=["finetune", "continue"]), AblationError, "does not record"),
    (lambda: tiny_net(), dict(lr={"finetune": -1.0}), SettingError, "rates must be positive"),
    (lambda: tiny_net(), dict(grid_epochs=2), SettingError, "grid-epochs applies with"),
])
def test_arms_that_could_not_be_compared_are_refused_before_anything_is_written(data_dir, tmp_path, model, kwargs,
                                                                                 error, message):
    out = tmp_path / "out"
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        reparam_zoo.ablate(model(), data_dir, str(out), epochs=1, **{**FAST, **kwargs})
    assert "\n" not in str(e.value)
    assert not out.exists()


def _refocused():
    model = reparam_zoo.convert(tiny_net())
    with torch.no_grad():
        refconv_layers(model)[0][1].transform_weight.add_(0.01)
    return model


def test_a_converted_but_never_refocused_model_starts_every_arm_from_its_folded_form(data_dir, tmp_path):
    result = reparam_zoo.ablate(reparam_zoo.convert(tiny_net()), data_dir, str(tmp_path / "out"), epochs=1,
                                lr=0.05, **FAST)
    assert any("zero transforms" in note for note in result.results["notes"])
    source = tiny_net().state_dict()
    finetune_start = read_state_dict(tmp_path / "out" / "finetune" / "seed0" / "best.safetensors")
    # best epoch 0 or 1: at least the structure is the plain model's
    assert set(finetune_start[0]) == set(source)


def test_a_non_empty_output_folder_is_refused_and_left_alone(data_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / "ablation_config.json").write_text("{}")  # an earlier ablation's: never removed
    with pytest.raises(AblationError, match="not empty; choose a new one; continue it with --resume"):
        reparam_zoo.ablate(tiny_net(), data_dir, str(tmp_path), epochs=1, **FAST)
    assert sorted(os.listdir(tmp_path)) == ["ablation_config.json", "keep.txt"]


def test_cli_grid_continue_from_the_recorded_pretraining_rate_and_resume(data_dir, tmp_path):
    model = reparam_zoo.create_model("test_resnet", num_classes=3)
    path = str(tmp_path / "pretrained.safetensors")
    reparam_zoo.save(model, path, extra_metadata={"pretraining": {"lr": 0.2, "epochs": 3}})
    out = str(tmp_path / "out")
    args = ["ablate", path, "--data", data_dir, "-o", out, "--arms", "refocus,finetune,continue", "--lr-grid",
            "0.01,0.1", "--grid-epochs", "1", "--lr", "refocus=0.3", "--epochs", "1", "--batch-size", "8",
            "--workers", "0", "--input-size", "32", "-q"]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert f"wrote {os.path.join(out, 'ablation.md')}" in run.output
    results = json.load(open(os.path.join(out, "ablation.json")))
    assert results["lrs"]["refocus"] == {"lr": 0.3, "source": "given"}
    assert results["lrs"]["continue"] == {"lr": 0.2, "source": "pretraining"}
    tried = results["lrs"]["finetune"]["tried"]
    assert set(tried) == {"0.01", "0.1"} and results["lrs"]["finetune"]["source"] == "grid"
    best = {}
    for lr in ("0.01", "0.1"):  # independently: each trial's last epoch, ranked as train ranks epochs
        with open(os.path.join(out, "grid", "finetune", f"lr{lr}", "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]
        best[lr] = (last["val_acc"], -last["val_loss"])
        assert tried[lr] == pytest.approx(100 * best[lr][0])
    assert results["lrs"]["finetune"]["lr"] == float(max(best, key=best.get))
    assert sorted(os.listdir(os.path.join(out, "grid", "finetune"))) == ["lr0.01", "lr0.1"]
    assert _run_config(out, "continue", 0)["lr"] == 0.2
    again = CliRunner().invoke(main, ["ablate", "--resume", out, "-q"])
    assert again.exit_code == 0, again.output
    assert json.load(open(os.path.join(out, "ablation.json")))["summary"] == results["summary"]


@pytest.mark.parametrize("args, message", [
    (["--lr", "refocus=abc"], "--lr: 'abc' is not a number"),
    (["--lr", "distill=0.1"], "--lr takes ARM=RATE pairs"),
    (["--arms", "refocus"], "--arms must include finetune"),
    (["--grid-epochs", "2"], "--grid-epochs applies with --lr-grid"),
    (["--lr-grid", "0.1,-1"], "--lr-grid rates must be positive"),
])
def test_cli_usage_errors_are_one_line_exit_2(data_dir, tmp_path, args, message):
    run = CliRunner().invoke(main, ["ablate", "test_resnet", "--data", data_dir, "-o", str(tmp_path / "o"), *args])
    assert run.exit_code == 2, run.output
    assert message in run.output and len(run.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_resume_takes_no_other_settings_and_needs_an_ablation_folder(tmp_path):
    run = CliRunner().invoke(main, ["ablate", "--resume", str(tmp_path), "--epochs", "3"])
    assert run.exit_code == 2 and "leave out --epochs" in run.output
    run = CliRunner().invoke(main, ["ablate", "--resume", str(tmp_path)])
    assert run.exit_code == 1 and "not an ablation folder" in run.output


def test_two_process_ablation_under_torchrun(data_dir, tmp_path):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = str(tmp_path / "pretrained.safetensors")
    reparam_zoo.save(reparam_zoo.create_model("test_resnet", num_classes=3), path)
    out = str(tmp_path / "out")
    script = os.path.join(os.path.dirname(sys.executable), "reparam")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "--no-python", script, "ablate", path, "--data", data_dir, "-o", out, "--epochs", "1", "--batch-size", "4",
           "--workers", "0", "--input-size", "32", "--lr", "0.05", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count(f"wrote {os.path.join(out, 'ablation.md')}") == 1  # rank 0 speaks
    for arm in ("refocus", "finetune"):
        with open(os.path.join(out, arm, "seed0", "config.json")) as f:
            assert json.load(f)["world_size"] == 2
        assert os.path.exists(os.path.join(out, arm, "seed0", "deploy.safetensors"))
    results = json.load(open(os.path.join(out, "ablation.json")))
    assert results["summary"]["refocus"]["per_seed"] == [pytest.approx(_last_top1(out, "refocus", 0))]


def test_an_ablation_whose_first_run_cannot_start_leaves_nothing_behind(data_dir, tmp_path):
    from reparam_zoo.train import TrainError

    out = tmp_path / "new" / "out"
    with pytest.raises(TrainError, match="has 4 outputs but .* has 3 classes; pass --num-classes 3"):
        reparam_zoo.ablate(tiny_net().__class__(num_classes=4), data_dir, str(out), epochs=1, **FAST)
    assert not out.exists()


def test_train_scope_all_is_plain_training_and_refuses_refconv_models_and_map_k(data_dir, tmp_path):
    from reparam_zoo.train import TrainError, train

    with pytest.raises(TrainError, match="train scope all trains a plain model's weights, but the model has 2 RefConv"):
        train(reparam_zoo.convert(tiny_net()), data_dir, output_dir=str(tmp_path / "a"), epochs=1, train_scope="all",
              **FAST)
    with pytest.raises(SettingError, match="map-k applies to RefConv training, not train-scope all"):
        train(tiny_net(), data_dir, output_dir=str(tmp_path / "b"), epochs=1, train_scope="all", map_k=3, **FAST)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    model = tiny_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data_dir, output_dir=str(tmp_path / "c"), epochs=1, lr=0.1, train_scope="all", **FAST)
    assert not refconv_layers(result.model)
    last, _ = read_state_dict(tmp_path / "c" / "last.safetensors")
    moved = {k for k in before if k in last and not torch.equal(before[k], last[k])}
    assert {n for n, _ in tiny_net().named_parameters()} <= moved  # every weight trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
