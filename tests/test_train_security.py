"""Run folders and data folders are data: resuming never unpickles without --trust-pickle, a folder walk
ends and reads only regular files, two runs never share a folder, and one SIGTERM always stops a run. Every
hostile input is built on the fly; everything that could hang runs under a timeout (a subprocess's, or an
alarm), so a regression fails instead of blocking."""
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from reparam_zoo.data import DataError, build_datasets, open_regular_file
from reparam_zoo.errors import CheckpointError
from reparam_zoo.train import TrainError, resume, train
from helpers import Payload, deadline
from test_train import FAST, SignalAt, TinyNet, make_dataset, tiny_net

TESTS = os.path.dirname(os.path.abspath(__file__))
REPARAM_SCRIPT = os.path.join(os.path.dirname(sys.executable), "reparam")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), train_per_class=8, val_per_class=4)


def one_line(output):
    return output.strip().splitlines() == [output.strip()]


# -- 2: a run folder cannot make resume unpickle ---------------------------------------------------------------

def test_resuming_a_pickle_run_needs_trust_pickle_every_time(data_dir, tmp_path):
    from reparam_cli.main import main

    torch.save(tiny_net(cls=lambda: SignalAt(at=2)), tmp_path / "m.pt")  # stops during step 2 of 3
    out = str(tmp_path / "run")
    first = CliRunner().invoke(main, ["train", str(tmp_path / "m.pt"), "--trust-pickle", "--data", data_dir,
                                      "--epochs", "1", "--input-size", "32", "--batch-size", "8", "--workers", "0",
                                      "-q", "-o", out])
    assert first.exit_code == 130, first.output
    assert f"reparam train --resume {out} --trust-pickle" in first.output  # the hint says what it takes
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["trust_pickle"] is True  # what the folder says grants nothing
    marker = tmp_path / "payload-ran"
    torch.save(Payload(marker), os.path.join(out, "last.pt"))  # the run folder turned hostile

    refused = CliRunner().invoke(main, ["train", "--resume", out])
    assert refused.exit_code == 1 and one_line(refused.output)
    assert (f"error: {out}: the run wrote whole-module pickles (last.pt, ...); resuming unpickles them, which runs "
            "code from the run folder: pass --trust-pickle / trust_pickle=True to resume it") in refused.output
    with pytest.raises(TrainError, match="resuming unpickles them"):
        resume(out, verbose=False)
    assert not marker.exists()
    assert sorted(os.listdir(out)) == sorted(["config.json", "train.log", "metrics.jsonl", "best.pt", "last.pt",
                                              "train_state.pt", "metrics.png"])


def test_a_hostile_train_state_is_refused_without_running_it(data_dir, tmp_path):
    model = tiny_net(cls=lambda: SignalAt(at=2))
    stopped = train(model, data_dir, output_dir=str(tmp_path / "run"), epochs=1, lr=0.1, **FAST)
    assert stopped.interrupted
    marker = tmp_path / "payload-ran"
    torch.save({"version": 2, "epoch": 0, "step": 1, "global_step": Payload(marker)}, stopped.files["state"])
    with pytest.raises(CheckpointError, match=r"train_state.pt: unreadable training state \(.*Weights only load"):
        resume(stopped.output_dir, model=TinyNet(), trust_pickle=True, verbose=False)
    assert not marker.exists()


def test_a_fifo_in_place_of_a_runs_config_is_refused_without_blocking(data_dir, tmp_path):
    model = tiny_net(cls=lambda: SignalAt(at=2))
    stopped = train(model, data_dir, output_dir=str(tmp_path / "run"), epochs=1, lr=0.1, **FAST)
    config = os.path.join(stopped.output_dir, "config.json")
    os.remove(config)
    os.mkfifo(config)  # nobody will ever write it: opening it for reading would block forever
    with deadline(60), pytest.raises(TrainError, match=r"config.json: unreadable .*not a regular file"):
        resume(stopped.output_dir, model=TinyNet(), verbose=False)


# -- 3: link loops in a data folder ------------------------------------------------------------------------------

def test_link_loops_in_a_data_folder_are_walked_once_and_reported(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=4, val_per_class=2)
    red = tmp_path / "d" / "train" / "red"
    os.symlink(red, red / "again")  # a loop: timm's walk repeats red's images dozens of times
    os.symlink(tmp_path / "d" / "train", red / "up")  # and a second one: that walk never ends
    os.symlink(tmp_path / "d" / "val" / "blue", red / "blues")  # a link to a new folder is followed
    with deadline(60):
        splits = build_datasets(root, TinyNet(), 32)
    files = splits.train.filenames()
    assert len(files) == 3 * 4 + 2 and len(set(files)) == len(files)
    assert sorted(f for f in files if f.startswith(os.path.join("red", "blues"))) == [
        os.path.join("red", "blues", f"{i:03d}.png") for i in range(2)]
    assert splits.skipped == [f"{root}/train: skipped 2 link(s) to a folder already read (a link loop, or a second "
                              "link to one folder): red/again, red/up"]
    with deadline(120):
        result = train(tiny_net(), root, output_dir=str(tmp_path / "out"), epochs=1, lr=0.1, **FAST)
    assert result.history[-1]["train_images"] == (3 * 4 + 2) // 8 * 8
    assert "warning: " + splits.skipped[0] in (tmp_path / "out" / "train.log").read_text()


# -- 5 and 9: only regular files are read; a class needs a readable image ---------------------------------------

def test_fifos_in_class_folders_are_never_opened(tmp_path):
    root = make_dataset(tmp_path / "d", train_per_class=8, val_per_class=4)
    os.mkfifo(os.path.join(root, "train", "red", "pipe.png"))  # opening it for reading would block forever
    os.mkfifo(os.path.join(root, "val", "blue", "pipe.jpg"))
    with deadline(120):
        result = train(tiny_net(), root, output_dir=str(tmp_path / "out"), epochs=1, lr=0.1, **FAST)
    assert result.history[-1]["val_images"] == 3 * 4 and result.unreadable_images == []
    log = (tmp_path / "out" / "train.log").read_text()
    assert (f"warning: {root}/train: skipped 1 non-regular file(s) (FIFOs, sockets, devices are never read): "
            "red/pipe.png") in log
    assert f"warning: {root}/val: skipped 1 non-regular file(s)" in log

    # a FIFO put in place of an image after the folder was listed: unreadable at once, not a blocked read
    splits = build_datasets(root, TinyNet(), 32)
    path = splits.train.filename(0, absolute=True)
    os.remove(path)
    os.mkfifo(path)
    with deadline(10):
        with pytest.raises(OSError, match="not a regular file"):
            open_regular_file(path)
        assert splits.train._load(0) == (None, None)


def test_a_class_folder_without_a_readable_image_is_a_one_line_error(tmp_path):
    from reparam_cli.main import main

    root = make_dataset(tmp_path / "d", train_per_class=3, val_per_class=1)
    for name in os.listdir(os.path.join(root, "train", "blue")):
        with open(os.path.join(root, "train", "blue", name), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError) as error:
        build_datasets(root, TinyNet(), 32)
    assert str(error.value) == f"{root}/train: no readable image in class folder(s) blue (e.g. 000.png)"
    result = CliRunner().invoke(main, ["train", "test_resnet", "--data", root, "--num-classes", "3", "--input-size",
                                       "32", "-q", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and one_line(result.output)
    assert result.output.strip() == f"error: {error.value}"
    assert not os.path.exists(tmp_path / "out")


# -- 4: one run per folder ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def folder_locked(path):
    """What a running `reparam train` holds on its folder."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield
    finally:
        os.close(fd)


def test_a_folder_in_use_by_another_run_is_refused_at_once(data_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    busy = "another run is using this folder (a reparam train still running?); wait for it to end"
    with folder_locked(out):
        start = time.perf_counter()
        with pytest.raises(TrainError) as error:
            train(tiny_net(), data_dir, output_dir=str(out), epochs=1, **FAST)
        assert str(error.value) == f"{out}: {busy}, or choose another folder"
        assert time.perf_counter() - start < 5  # before the model or the data are even looked at
    assert os.listdir(out) == []

    stopped = train(tiny_net(cls=lambda: SignalAt(at=2)), data_dir, output_dir=str(tmp_path / "run"), epochs=1,
                    lr=0.1, **FAST)
    before = {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")}
    with folder_locked(tmp_path / "run"):
        with pytest.raises(TrainError, match="another run is using this folder"):
            resume(stopped.output_dir, model=TinyNet(), verbose=False)
    assert {name: (tmp_path / "run" / name).read_bytes() for name in os.listdir(tmp_path / "run")} == before
    assert not resume(stopped.output_dir, model=TinyNet(), verbose=False).interrupted  # the lock went with its run


def test_a_crashed_runs_lock_is_not_stale(data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainError, match="another run is using this folder"):
            train(tiny_net(), data_dir, output_dir=str(out), epochs=1, **FAST)
    finally:
        holder.kill()  # a crash: no clean-up code runs
        holder.wait(timeout=30)
    result = train(tiny_net(), data_dir, output_dir=str(out), epochs=1, lr=0.1, **FAST)
    assert not result.interrupted and "train_state.pt" in os.listdir(out)


def test_two_cli_runs_started_together_into_one_folder_one_refused(data_dir, tmp_path):
    out = str(tmp_path / "shared")
    cmd = [REPARAM_SCRIPT, "train", "test_resnet", "--data", data_dir, "--num-classes", "3", "--input-size", "32",
           "--epochs", "1", "--batch-size", "8", "--workers", "0", "--lr", "0.05", "-q", "-o", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1).strip()
    assert one_line(refused) and ("another run is using this folder" in refused
                                  or "output folder is not empty" in refused), refused
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]  # one run's rows, not two interleaved
    assert (tmp_path / "shared" / "train.log").read_text().count("sanity:") == 1


# -- 5: one SIGTERM always stops a run ---------------------------------------------------------------------------

STUCK_DRIVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
import reparam_zoo, reparam_zoo.processes
from test_train import TinyNet

reparam_zoo.processes.STOP_GRACE_S = 2.0  # the watchdog's grace, short for the test


class Stuck(TinyNet):
    calls = 0

    def forward(self, x):
        if self.training:
            Stuck.calls += 1
            if Stuck.calls == 6 + 2:  # 6 steps per epoch: stuck in step 2 of epoch 2, as on a read that hangs
                print("stuck", flush=True)
                time.sleep(600)
        return super().forward(x)


reparam_zoo.train(Stuck(), sys.argv[2], output_dir=sys.argv[3], epochs=2, lr=0.1, input_size=32, batch_size=4,
                  workers=0, warmup_epochs=0, verbose=False)
"""


def test_one_sigterm_stops_a_stuck_run_within_seconds_and_it_resumes(data_dir, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(STUCK_DRIVER)
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, str(driver), TESTS, data_dir, out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "stuck"
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.perf_counter() - start
    finally:
        proc.kill()
    stderr = proc.stderr.read()
    assert code == 128 + signal.SIGTERM, stderr
    assert took < 20, took  # 2 s of grace plus three (short) steps, and the exit
    assert one_line(stderr) and stderr.startswith("error: SIGTERM: the run did not reach a stop point within")
    assert f"continue from the last checkpoint with: reparam train --resume {out}" in stderr
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 0)  # the end of epoch 1: intact
    assert not [name for name in os.listdir(out) if name.startswith(".")]
    torch.manual_seed(0)
    resumed = resume(out, model=TinyNet(), verbose=False)
    assert not resumed.interrupted and [r["epoch"] for r in resumed.history] == [0, 1, 2]


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return f.read().split()
    except OSError:
        return []


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"), reason="needs Linux /proc")
def test_sigterm_to_the_process_group_with_loader_workers_stops_with_a_checkpoint(data_dir, tmp_path):
    torch.save(tiny_net(cls=lambda: SignalAt()), tmp_path / "m.pt")
    out = str(tmp_path / "run")
    cmd = [REPARAM_SCRIPT, "train", str(tmp_path / "m.pt"), "--trust-pickle", "--data", data_dir, "--epochs", "50",
           "--input-size", "32", "--batch-size", "4", "--workers", "2", "--lr", "0.01", "-o", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a job scheduler's
    try:
        deadline_at = time.time() + 180
        # past the first checkpoint, and while the loader workers run (they live as long as an epoch's loop)
        while not (os.path.exists(os.path.join(out, "train_state.pt")) and len(_children(proc.pid)) >= 2):
            assert time.time() < deadline_at and proc.poll() is None, "the run never had its loader workers running"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)  # the training process and its loader workers
        code = proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
    assert code == 130, stdout[-2000:] + stderr[-2000:]
    assert "DataLoader worker" not in stderr
    assert f"continue with: reparam train --resume {out} --trust-pickle" in stdout + stderr
    state = torch.load(os.path.join(out, "train_state.pt"), weights_only=True)
    assert state["global_step"] >= 6


class SignalInValidation(TinyNet):
    """Sends itself SIGTERM during the validation that follows its 6th training step (the end of epoch 1)."""

    def __init__(self):
        super().__init__()
        self.calls, self.armed = 0, False

    def forward(self, x):
        if self.training:
            self.calls += 1
            self.armed = self.calls == 6
        elif self.armed:
            self.armed = False
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


def test_a_stop_during_validation_checkpoints_the_trained_epoch_and_resumes_bit_identical(data_dir, tmp_path):
    from reparam_zoo.checkpoint import read_state_dict

    settings = dict(epochs=2, lr=0.5, **{**FAST, "batch_size": 4})  # 6 steps per epoch
    straight = train(tiny_net(), data_dir, output_dir=str(tmp_path / "straight"), **settings)
    stopped = train(tiny_net(cls=SignalInValidation), data_dir, output_dir=str(tmp_path / "stopped"), **settings)
    assert stopped.interrupted and [r["epoch"] for r in stopped.history] == [0]
    state = torch.load(stopped.files["state"], weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 6, 6)
    assert "interrupted in the validation of epoch 1: checkpoint saved" in (tmp_path / "stopped" / "train.log").read_text()
    resumed = resume(stopped.output_dir, model=TinyNet(), verbose=False)
    a, _ = read_state_dict(straight.files["last"])
    b, _ = read_state_dict(resumed.files["last"])
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    timing = ("images_per_s", "epoch_time_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == \
           [{k: v for k, v in r.items() if k not in timing} for r in straight.history]


class SignalInSanityCheck(TinyNet):
    """Sends itself SIGTERM during the first validation forward of any of its copies (the sanity check runs the
    input model and its converted copy; a second signal would act as usual and end the process)."""

    sent = False

    def forward(self, x):
        if not self.training and not SignalInSanityCheck.sent:
            SignalInSanityCheck.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


def test_a_stop_before_training_leaves_nothing_and_the_cli_exits_130(data_dir, tmp_path):
    from reparam_cli.main import main
    from reparam_zoo.train.config import RunStopped

    SignalInSanityCheck.sent = False
    with pytest.raises(RunStopped, match="^stopped by SIGTERM before training started; nothing was kept$"):
        train(tiny_net(cls=SignalInSanityCheck), data_dir, output_dir=str(tmp_path / "out"), epochs=1, **FAST)
    assert not os.path.exists(tmp_path / "out")
    torch.save(tiny_net(cls=SignalInSanityCheck), tmp_path / "m.pt")
    SignalInSanityCheck.sent = False
    result = CliRunner().invoke(main, ["train", str(tmp_path / "m.pt"), "--trust-pickle", "--data", data_dir,
                                       "--input-size", "32", "--batch-size", "8", "--workers", "0", "-q", "-o",
                                       str(tmp_path / "cli")])
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted: stopped by SIGTERM before training started; nothing was kept"
    assert not os.path.exists(tmp_path / "cli")
