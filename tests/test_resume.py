"""Crashes and resume: every mechanism run that touched the data is accounted, outputs are all-or-nothing,
and a run never overwrites another run's folders."""

import json

import pytest
import torch
from torch import nn

from peft_dp_saliency import accounting
from peft_dp_saliency.dp_sgd import DPSGDStep
from peft_dp_saliency.run_state import RunState
from script_runner import ledger_steps, run, training_script, work_dir

pytestmark = pytest.mark.timeout(300)


class Crash(RuntimeError):
    pass


def crash_on_call(monkeypatch, owner, name, call_number):
    """Make owner.name raise Crash on its `call_number`-th call (a kill in the middle of the run)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call_number:
            raise Crash(f"simulated kill in call {call_number} of {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def test_crashes_are_counted_and_resume_finishes_the_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    script = training_script()
    # 1. Killed inside the selection query: it was recorded before it ran, so it counts.
    with monkeypatch.context() as patch:
        crash_on_call(patch, script, "select_target_modules", 1)
        with pytest.raises(Crash):
            run(out, "--max_train_steps", 4, "--checkpointing_steps", 2)
    assert ledger_steps(out) == {"selection": 1}
    # 2. Resumed, then killed in DP-SGD step 3 (one step after checkpoint-2): 3 steps touched data.
    with monkeypatch.context() as patch:
        crash_on_call(patch, DPSGDStep, "__call__", 3)
        with pytest.raises(Crash):
            run(out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")
    assert ledger_steps(out) == {"selection": 2, "dp_sgd": 3}  # the query ran again: it counts twice
    assert [p.name for p in work_dir(out).glob("checkpoint-*")] == ["checkpoint-2"]
    assert not list(out.iterdir())  # nothing released yet
    # 3. Resumed from checkpoint-2: steps 3 and 4 run again; the lost step 3 is not refunded, and
    #    the two remaining steps get more noise so that the total still meets the target.
    run(out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")
    assert ledger_steps(out) == {"selection": 2, "dp_sgd": 5}

    report = accounting.PrivacyReport.load(str(out / "privacy_report.json"))
    plan = json.loads((work_dir(out) / "plan.json").read_text())
    sigma_s = plan["selection_sigma"]
    sgd = [s for s in report.stages if s["name"] == "dp_sgd"]
    assert [(s["name"], s["steps"]) for s in report.stages] == [("selection", 2), ("dp_sgd", 3), ("dp_sgd", 2)]
    # the second query raised sigma for all 4 steps, the lost step 3 raised it again for steps 3-4
    assert plan["noise_multiplier"] < sgd[0]["noise_multiplier"] < sgd[1]["noise_multiplier"]
    assert report.extra == {"planned_dp_sgd_steps": 4, "recorded_dp_sgd_steps": 5}
    stages = [accounting.selection_stage(sigma_s, 1.0, plan["selection_sample_rate"])] * 2 + [
        accounting.dp_sgd_stage(s["noise_multiplier"], plan["sample_rate"], s["steps"], 1.0) for s in sgd]
    assert report.epsilon["pld"] == pytest.approx(accounting.compute_epsilon(stages, report.delta, "pld"))
    assert report.epsilon["pld"] <= report.target_epsilon  # the crashes cost noise, never budget
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_refuses_to_overwrite_another_run(tmp_path):
    out = tmp_path / "run"
    run(out, "--max_train_steps", 1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    ledger = (work_dir(out) / "ledger.json").read_text()
    with pytest.raises(SystemExit, match=r"is not empty \(another run's outputs or other files\): "
                                         r"pass --resume_from_checkpoint latest"):
        run(out, "--max_train_steps", 1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (work_dir(out) / "ledger.json").read_text() == ledger


def test_overwrite_keeps_the_spending_record_of_every_replaced_run(tmp_path):
    work, out = tmp_path / "run-work", tmp_path / "run"
    ledgers = []
    for sigma in (1.0, 2.0):
        state = RunState(work, out, overwrite=True)
        state.record_spending("dp_sgd", sigma, 0.5, 1.0)
        state.plan({"dataset_size": 10}, lambda: {"noise_multiplier": sigma})
        (out / "pytorch_lora_weights.safetensors").write_bytes(b"adapter")
        (work / "checkpoint-1").mkdir()
        ledgers.append((work / "ledger.json").read_text())
    RunState(work, out, overwrite=True)
    assert not list(out.iterdir())  # the replaced release and its checkpoints are gone ...
    assert sorted(p.name for p in work.iterdir()) == ["earlier-runs"]
    for k, ledger in enumerate(ledgers, start=1):  # ... but what each run spent is not
        assert (work / "earlier-runs" / f"run-{k}" / "ledger.json").read_text() == ledger
        assert (work / "earlier-runs" / f"run-{k}" / "plan.json").is_file()
    RunState(tmp_path / "unspent-work", tmp_path / "unspent", overwrite=True)  # nothing spent: nothing kept
    assert not (tmp_path / "unspent-work" / "earlier-runs").exists()


def test_refuses_a_folder_with_someone_elses_files_and_a_resume_without_run(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"not mine to delete")
    with pytest.raises(SystemExit, match="photos is not empty"):
        RunState(tmp_path / "photos-work", mine)
    assert (mine / "holiday.jpg").read_bytes() == b"not mine to delete"
    with pytest.raises(SystemExit, match="no run to resume"):
        RunState(tmp_path / "none-work", tmp_path / "none", resume="latest")


def test_a_failed_checkpoint_write_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    from peft_dp_saliency import run_state

    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    state = RunState(tmp_path / "w", tmp_path / "o")
    state.record_spending("dp_sgd", 1.0, 0.5, 1.0)
    state.save_checkpoint(1, model, optimizer, scheduler)

    def disk_full(tensors, path, *args, **kwargs):
        with open(path, "wb") as file:
            file.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_state, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        state.save_checkpoint(2, model, optimizer, scheduler)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["checkpoint-1", "ledger.json"]
    resumed = RunState(tmp_path / "w", tmp_path / "o", resume="latest")
    assert resumed.load_checkpoint(model, optimizer, scheduler) == 1


def test_sigterm_mid_training_unwinds_and_keeps_the_spending(tmp_path, monkeypatch):
    import os
    import signal

    original = DPSGDStep.__call__
    calls = {"n": 0}

    def killed_in_step_2(self, indices):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what `kill` or a launcher sends
        return original(self, indices)

    monkeypatch.setattr(DPSGDStep, "__call__", killed_in_step_2)
    out = tmp_path / "run"
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="terminated by signal 15"):
        run(out, "--max_train_steps", 3)
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert ledger_steps(out) == {"selection": 1, "dp_sgd": 2}
    assert list(out.iterdir()) == []


def test_sigkill_of_a_real_process_loses_no_spending_and_resume_counts_it(tmp_path):
    """kill -9 of the training process (no handler, no cleanup can run): the ledger already holds
    every step that touched data, nothing is released, and the resumed run's report counts them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from script_runner import SCRIPT, tiny_argv

    out = tmp_path / "run"
    argv = tiny_argv(out, "--checkpointing_steps", 2, steps=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(SCRIPT), *argv], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    try:
        while ledger_steps(out).get("dp_sgd", 0) < 3:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the training process made no progress"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    spent = ledger_steps(out)
    assert spent["selection"] == 1 and 3 <= spent["dp_sgd"] < 40
    assert not out.exists() or list(out.iterdir()) == []  # nothing released by the killed run
    checkpoints = sorted(int(p.name.split("-")[1]) for p in work_dir(out).glob("checkpoint-*"))
    assert checkpoints and max(checkpoints) <= spent["dp_sgd"]


    run(out, "--resume_from_checkpoint", "latest", "--checkpointing_steps", 2, steps=40)
    report = accounting.PrivacyReport.load(str(out / "privacy_report.json"))
    final = ledger_steps(out)
    assert final["dp_sgd"] >= 40 + spent["dp_sgd"] - max(checkpoints)  # lost steps are not refunded
    totals = {}
    for stage in report.stages:
        totals[stage["name"]] = totals.get(stage["name"], 0) + stage["steps"]
    assert totals == {"selection": 1, "dp_sgd": final["dp_sgd"]}
    assert report.epsilon[report.accountant] <= report.target_epsilon  # lost steps cost noise, not budget
