"""A run's private working folder: spending ledger, privacy plan, selection, checkpoints.

Lives next to (never inside) the published output_dir. Spending is recorded before each
mechanism runs, so a crash never refunds budget; a resumed run reuses the plan (sigma, q, delta)
and the selection, and continues the ledger. Checkpoints are written to a temporary folder and
renamed, so a half-written checkpoint is never picked up. ``--overwrite_output_dir`` deletes the
replaced run's files but keeps its spending record (ledger and plan) under ``earlier-runs/``: releases
made from the same data compose, so what they spent must not vanish with their folders.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .accounting import DP_SGD, SpendingLedger, write_json_atomic
from .selection import SelectionResult

logger = logging.getLogger(__name__)

EARLIER_RUNS = "earlier-runs"  # spending records of the runs an --overwrite_output_dir replaced here


class RunState:
    """work_dir holds ledger.json, plan.json, selection.json and checkpoint-<step>/ folders."""

    def __init__(self, work_dir: Path, output_dir: Path, resume: str | None = None,
                 overwrite: bool = False, is_main: bool = True, keep_checkpoints: int = 2):
        self.work_dir, self.output_dir, self.is_main = Path(work_dir), Path(output_dir), is_main
        self.resume, self.keep = resume, keep_checkpoints
        self.created: list[Path] = []  # folders this run created (removed again if it fails unspent)
        if is_main:
            self._claim_folders(overwrite)
        self.ledger = SpendingLedger(str(self.work_dir / "ledger.json")) if is_main else None

    def _claim_folders(self, overwrite: bool) -> None:
        """Refuse to silently overwrite another run's outputs; check both folders are writable."""
        used = [d for d in (self.output_dir, self.work_dir) if d.exists() and any(d.iterdir())]
        if used and not self.resume:
            if not overwrite:
                raise SystemExit(f"{', '.join(map(str, used))} is not empty (another run's outputs or other "
                                 "files): pass --resume_from_checkpoint latest to continue that run, "
                                 "--overwrite_output_dir to delete and replace the contents, or choose "
                                 "another --output_dir")
            for folder in used:
                self._delete_keeping_spending(folder)
        if self.resume and not (self.work_dir / "ledger.json").exists():
            raise SystemExit(f"--resume_from_checkpoint: no run to resume in {self.work_dir}")
        for folder in (self.output_dir, self.work_dir):
            try:
                if not folder.exists():
                    folder.mkdir(parents=True)
                    self.created.append(folder)
                _probe_write(folder)  # os.access is no proof (root, read-only mounts, ACLs)
            except OSError as error:
                self.discard_if_unspent()
                raise SystemExit(f"{folder} is not writable ({error.strerror or error}): choose another "
                                 "folder or fix its permissions") from None

    def _delete_keeping_spending(self, folder: Path) -> None:
        """Empty `folder`, except <work_dir>/earlier-runs/; the replaced run's ledger.json and plan.json move
        into it as run-<k>/ (k = 1 for the oldest)."""
        earlier = self.work_dir / EARLIER_RUNS
        if folder == self.work_dir and (folder / "ledger.json").exists():
            taken = [int(path.name[4:]) for path in earlier.glob("run-*") if path.name[4:].isdigit()]
            kept = earlier / f"run-{max(taken, default=0) + 1}"  # after the newest, even if older ones were removed
            kept.mkdir(parents=True)
            for name in ("ledger.json", "plan.json"):
                if (folder / name).exists():
                    os.replace(folder / name, kept / name)
            logger.warning("--overwrite_output_dir: the replaced run's spending record is kept in %s. Releases "
                           "made from the same data compose: count what it spent toward this data's total.", kept)
        for entry in folder.iterdir():
            if entry == earlier:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def spent(self) -> bool:
        """Whether any mechanism has been recorded (by this run or the one it resumes)."""
        return (self.work_dir / "ledger.json").exists()

    def discard_if_unspent(self) -> None:
        """After a failure before any spending: remove the folders this run created, leaving no trace."""
        if self.is_main and not self.spent():
            (self.work_dir / "plan.json").unlink(missing_ok=True)
            for folder in reversed(self.created):
                shutil.rmtree(folder, ignore_errors=True)
            self.created = []

    @contextmanager
    def timed(self, stage: str):
        """Record a stage's wall seconds and the process's peak RSS (MB) so far in timings.json."""
        start = time.time()
        yield
        if self.is_main:
            path = self.work_dir / "timings.json"
            timings = json.loads(path.read_text()) if path.exists() else {}
            timings[f"{stage}_seconds"] = round(timings.get(f"{stage}_seconds", 0) + time.time() - start, 2)
            timings[f"{stage}_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            write_json_atomic(str(path), timings)

    def record_spending(self, name: str, noise_multiplier: float, sample_rate: float,
                        max_grad_norm: float) -> None:
        """One application of a mechanism, persisted before it runs (main process only)."""
        if self.ledger is not None:
            self.ledger.record(name, noise_multiplier, sample_rate, max_grad_norm)

    def plan(self, inputs: dict, calibrate) -> dict:
        """The privacy plan: `inputs` (what it depends on) plus calibrate()'s results, saved in plan.json.

        A resumed run loads the saved plan and must have the same inputs (dataset size and fingerprint,
        steps, batch, clipping norm, accountant, adjacency, target, ...): any difference exits naming
        the changed fields, before anything is spent.
        """
        path = self.work_dir / "plan.json"
        if self.resume and path.exists():
            saved = _plan_from_json(json.loads(path.read_text()))
            changed = [f"{key}: was {saved.get(key, '(not recorded)')!r}, now {value!r}"
                       for key, value in _plan_from_json(_plan_to_json(inputs)).items() if saved.get(key) != value]
            if changed:
                raise SystemExit(f"--resume_from_checkpoint: {self.work_dir} holds a different run ("
                                 + "; ".join(changed) + "). Resume with the data and flags it was started with, "
                                 "or start a new run in another --output_dir. Nothing was spent.")
            return saved
        plan = {**inputs, **calibrate()}
        if self.is_main:
            write_json_atomic(str(path), _plan_to_json(plan))
        return plan

    def log_training_loss(self, step: int, loss: float, nonfinite_examples: int) -> None:
        """Append the un-noised training loss to <work_dir>/train_loss.csv (never released)."""
        if not self.is_main:
            return
        path = self.work_dir / "train_loss.csv"
        new = not path.exists()
        with path.open("a", encoding="utf-8") as file:
            if new:
                file.write("step,train_loss_not_private,nonfinite_examples_so_far\n")
            file.write(f"{step},{loss:.6g},{nonfinite_examples}\n")

    def selection(self) -> SelectionResult | None:
        path = self.work_dir / "selection.json"
        if self.resume and path.exists():
            return SelectionResult(**json.loads(path.read_text()))
        return None

    def save_selection(self, selection: SelectionResult) -> None:
        if self.is_main:
            write_json_atomic(str(self.work_dir / "selection.json"), selection.to_dict())

    def checkpoints(self) -> list[Path]:
        found = [p for p in self.work_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, step: int, model, optimizer, lr_scheduler, ema=None) -> None:
        """Trainable parameters (safetensors), optimizer, scheduler and EMA state, atomically."""
        if not self.is_main:
            return
        final = self.work_dir / f"checkpoint-{step}"
        tmp = self.work_dir / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None, "step": step},
                       tmp / "training_state.pt")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old)

    def load_checkpoint(self, model, optimizer, lr_scheduler, ema=None) -> int:
        """Restore the latest (or named) checkpoint; returns its step, 0 without one."""
        if not self.resume:
            return 0
        path = self.checkpoints()[-1] if self.resume == "latest" and self.checkpoints() else None
        if self.resume != "latest":
            path = Path(self.resume)
            if path.resolve().parent != self.work_dir.resolve():  # another run's steps are not in this ledger
                raise SystemExit(f"--resume_from_checkpoint {path}: not a checkpoint of this run (its folder is "
                                 f"{self.work_dir}); pass 'latest' or one of {[str(p) for p in self.checkpoints()]}")
        if path is None:
            return 0
        saved = torch.load(path / "training_state.pt", weights_only=False)
        recorded = self.ledger.steps_of(DP_SGD) if self.ledger is not None else None
        if recorded is not None and recorded < int(saved["step"]):  # checked before any weight is touched
            raise SystemExit(f"{path} is at step {saved['step']} but this run's ledger records only {recorded} "
                             "DP-SGD steps: its steps were not accounted here, so it cannot be resumed from")
        trainable = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        for name, value in trainable.items():
            params[name].data.copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        if ema is not None:
            if saved.get("ema") is None:
                raise SystemExit(f"{path} has no EMA state: resume with the flags the run started with")
            ema.load_state_dict(saved["ema"])
        return int(saved["step"])


def _plan_to_json(plan: dict) -> dict:
    return {k: ("inf" if isinstance(v, float) and v == float("inf") else v) for k, v in plan.items()}


def _plan_from_json(plan: dict) -> dict:
    return {k: (float("inf") if v == "inf" else v) for k, v in plan.items()}


def _probe_write(folder: Path) -> None:
    """Create and delete a file in `folder`: raises OSError if it cannot be written."""
    handle, path = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
    os.close(handle)
    os.remove(path)
