"""The six defects of the independent privacy review (issue 11), each pinned by a test."""

import json
import math
import os
import shutil
import stat

import datasets
import dp_accounting
import pytest
import torch
from accelerate.tracking import GeneralTracker
from PIL import Image

from peft_dp_saliency import accounting, diffusion, dp_sgd, families
from peft_dp_saliency.data import load_sensitive_dataset
from peft_dp_saliency.dp_sgd import PoissonSampler
from peft_dp_saliency.per_sample import PerSampleClipper
from script_runner import ledger_steps, run, training_script, work_dir

pytestmark = pytest.mark.timeout(600)

PUBLIC_SEED = 389423247


def released_text(out) -> str:
    return " ".join(p.read_text(errors="ignore") for p in out.iterdir() if p.suffix in {".json", ".md"})


# 1. The diffusion randomness is secret ------------------------------------------------------------

def recording_diffusion_inputs(monkeypatch):
    """Record every (noise, generator seed) the selection query and DP-SGD draw."""
    drawn = []
    original = diffusion.draw_diffusion_inputs

    def recording(num_examples, latent_shape, noise_scheduler, generator, device, dtype=torch.float32, **options):
        noise, timesteps = original(num_examples, latent_shape, noise_scheduler, generator, device, dtype, **options)
        drawn.append((noise.clone(), timesteps.clone(), generator.initial_seed()))
        return noise, timesteps

    monkeypatch.setattr(families.unet, "draw_diffusion_inputs", recording)  # SD's draws, in both stages
    return drawn


def test_a_known_seed_does_not_fix_the_diffusion_randomness_and_no_seed_is_released(tmp_path, monkeypatch):
    draws = []
    for name in ("a", "b"):
        drawn = recording_diffusion_inputs(monkeypatch)
        # the whole set is queried (rate 1): a Poisson subsample of 16 can be empty and draw nothing
        run(tmp_path / name, "--seed", PUBLIC_SEED, "--selection_sample_rate", 1, samples=16, steps=2, batch=8)
        draws.append(drawn)
        text = released_text(tmp_path / name)
        for _, _, seed in drawn:
            assert str(seed) not in text  # the secret seeds are never written
        assert str(PUBLIC_SEED) not in text  # nor the public one, which seeds nothing of the query
    a, b = draws
    assert len(a) == len(b) >= 3  # the selection batch and the DP-SGD steps
    assert not torch.equal(a[0][0], b[0][0])  # the selection query's noise differs
    assert all(not torch.equal(x[0], y[0]) for x, y in zip(a[1:], b[1:]) if len(x[0]) and len(y[0]))


def test_deterministic_noise_seeds_the_diffusion_randomness_from_the_seed(tmp_path, monkeypatch):
    draws = []
    for name in ("a", "b"):
        drawn = recording_diffusion_inputs(monkeypatch)
        run(tmp_path / name, "--seed", 5, "--deterministic_noise", samples=16, steps=2, batch=8)
        draws.append(drawn)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(*draws))


def test_deterministic_noise_without_a_seed_is_refused():
    with pytest.raises(SystemExit, match="--deterministic_noise needs --seed"):
        training_script().check_args(training_script().parse_args(["--deterministic_noise"]))


# 2. Class names are public input -------------------------------------------------------------------

def string_labelled(tmp_path, name, labels):
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(len(labels))]
    path = tmp_path / name
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(path)
    return str(path)


def test_class_list_does_not_depend_on_which_examples_are_present(tmp_path):
    with_one = string_labelled(tmp_path, "with", ["cat", "cat", "alice_hiv_positive"])
    without = string_labelled(tmp_path, "without", ["cat", "cat"])
    for source in (with_one, without):
        with pytest.raises(ValueError, match="--class_names"):
            load_sensitive_dataset(source)
    names = ["cat", "alice_hiv_positive"]
    a, b = (load_sensitive_dataset(source, class_names=names) for source in (with_one, without))
    assert a.class_names == b.class_names == names and a.prompts == b.prompts
    assert a.labels.tolist() == [0, 0, 1] and b.labels.tolist() == [0, 0]
    assert "class_names" in a.class_names_source
    with pytest.raises(ValueError, match="not in class_names"):
        load_sensitive_dataset(with_one, class_names=["cat"])


def test_an_empty_class_folder_is_a_class(tmp_path):
    root = tmp_path / "folder"
    for name in ("cat", "dog", "rare"):
        (root / name).mkdir(parents=True)
    for index in range(2):
        Image.new("RGB", (8, 8)).save(root / "cat" / f"{index}.png")
        Image.new("RGB", (8, 8)).save(root / "dog" / f"{index}.png")
    dataset = load_sensitive_dataset(str(root), resolution=8)
    assert dataset.class_names == ["cat", "dog", "rare"] and len(dataset) == 4
    assert dataset.class_names_source == "the imagefolder's class folder names"


def test_training_without_a_public_class_list_fails_before_spending(tmp_path):
    source = string_labelled(tmp_path, "data", ["cat", "dog"] * 8)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="--class_names"):
        run(out, "--dataset_name", source, samples=16, steps=1, batch=8)
    assert ledger_steps(out) == {} and not out.exists()
    run(out, "--dataset_name", source, "--class_names", "cat", "dog", samples=16, steps=1, batch=8)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["class_names"] == "public: the class_names argument (--class_names)"
    assert "class_names argument" in (out / "README.md").read_text()


# 3. The adjacency is zero-out (N public), replace-one on request ----------------------------------

N, Q, T = 60_000, 256 / 60_000, 200
STAGES = [accounting.selection_stage(5.0, 1.0), accounting.dp_sgd_stage(1.1, Q, T, 1.0)]


def dp_accounting_pld(relation, delta):
    acc = dp_accounting.pld.PLDAccountant(relation, value_discretization_interval=1e-3)
    acc.compose(dp_accounting.GaussianDpEvent(5.0))
    acc.compose(dp_accounting.PoissonSampledDpEvent(Q, dp_accounting.GaussianDpEvent(1.1)), T)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("adjacency, relation", [
    ("zero_out", dp_accounting.NeighboringRelation.REPLACE_SPECIAL),
    ("replace_one", dp_accounting.NeighboringRelation.REPLACE_ONE)])
def test_report_adjacency_and_epsilon_agree_with_dp_accounting(adjacency, relation):
    delta = accounting.default_delta(N)
    report = accounting.PrivacyReport.build(STAGES, N, delta, 10.0, "pld", adjacency=adjacency)
    assert report.adjacency == adjacency and relation.name in report.adjacency_definition
    assert report.epsilon["pld"] == pytest.approx(dp_accounting_pld(relation, delta), abs=1e-6)
    if adjacency == "replace_one":
        assert "rdp" not in report.epsilon  # no replace-one RDP analysis of Poisson sampling here
        assert report.epsilon["pld"] > accounting.compute_epsilon(STAGES, delta, "pld")
    else:
        assert "add/remove" not in report.adjacency_definition


def test_replace_one_calibration_meets_the_target_under_replace_one():
    delta = accounting.default_delta(N)
    sigma = accounting.calibrate_noise_multiplier(10.0, delta, Q, T, STAGES[:1], "pld", adjacency="replace_one")
    spent = accounting.compute_epsilon([STAGES[0], accounting.dp_sgd_stage(sigma, Q, T, 1.0)], delta, "pld",
                                       adjacency="replace_one")
    assert 9.9 <= spent <= 10.0
    with pytest.raises(ValueError, match="pld"):
        accounting.calibrate_noise_multiplier(10.0, delta, Q, T, STAGES[:1], "rdp", adjacency="replace_one")


def test_budget_shares_use_the_calibration_accountant():
    delta = accounting.default_delta(N)
    report = accounting.PrivacyReport.build(STAGES, N, delta, 10.0, "pld")
    alone = [accounting.compute_epsilon([stage], delta, "pld") for stage in STAGES]
    assert report.budget_shares_accountant == "pld"
    assert report.budget_shares["selection"] == pytest.approx(alone[0] / sum(alone))
    rdp = accounting.PrivacyReport.build(STAGES, N, delta, 10.0, "rdp")
    assert rdp.budget_shares == accounting.budget_shares(STAGES, delta, "rdp")


def test_default_delta_passes_its_own_check_at_every_small_n():
    for n in range(2, 50):
        accounting.check_delta(accounting.default_delta(n), n)


# 4. Trackers see no token, no path and no un-noised loss -------------------------------------------

class FakeTracker(GeneralTracker):
    name, requires_logging_directory = "fake", False
    seen = {"config": None, "metrics": []}

    def __init__(self):
        super().__init__()

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        FakeTracker.seen["config"] = dict(values)

    def log(self, values, step=None, **kwargs):
        FakeTracker.seen["metrics"].append(dict(values))


def run_with_fake_tracker(tmp_path, monkeypatch, name, *flags):
    script = training_script()
    original = script.Accelerator
    monkeypatch.setattr(script, "Accelerator", lambda **kw: original(**{**kw, "log_with": [FakeTracker()]}))
    FakeTracker.seen = {"config": None, "metrics": []}
    run(tmp_path / name, "--report_to", "tensorboard", "--hub_token", "hf_SECRET", *flags,
        samples=16, steps=2, batch=8)
    return FakeTracker.seen


def test_trackers_get_no_token_no_local_path_and_no_unnoised_loss(tmp_path, monkeypatch):
    seen = run_with_fake_tracker(tmp_path, monkeypatch, "a")
    config = json.dumps(seen["config"])
    assert "hf_SECRET" not in config and str(tmp_path) not in config
    assert "learning_rate" in seen["config"]
    assert not set(seen["config"]) & training_script().TRACKER_EXCLUDED_FLAGS
    assert len(seen["metrics"]) == 2 and not any("loss" in key for m in seen["metrics"] for key in m)
    lines = (work_dir(tmp_path / "a") / "train_loss.csv").read_text().splitlines()
    assert lines[0].startswith("step,train_loss_not_private") and len(lines) == 3  # local file only
    seen = run_with_fake_tracker(tmp_path, monkeypatch, "b", "--report_nonprivate_training_loss")
    assert all("train_loss_NOT_PRIVATE" in m for m in seen["metrics"])


def test_wandb_with_a_hub_token_is_refused():
    script = training_script()
    with pytest.raises(SystemExit, match="--hub_token"):
        script.check_args(script.parse_args(["--report_to", "wandb", "--hub_token", "hf_x"]))


# 5. A resume must be the same run; the budget is never exceeded silently ---------------------------

@pytest.mark.parametrize("changed, message", [
    (["--max_train_samples", "20"], "different run.*dataset_size: was"),
    (["--max_train_steps", "1"], "different run.*max_train_steps: was"),
    (["--max_grad_norm", "0.5"], "different run.*max_grad_norm: was"),
    (["--accountant", "rdp"], "different run.*accountant: was"),
    # the resumed run keeps its paid selection: flags naming another pool or score would be printed on the card
    # over the matrices actually trained
    (["--candidate_pool", "attn_qkvo"], "--candidate_pool 'attn_qkv' \\(this command: 'attn_qkvo'\\)"),
    (["--saliency_score", "debiased"], "--saliency_score 'norm' \\(this command: 'debiased'\\)")])
def test_resume_with_other_data_or_flags_is_refused_before_spending(tmp_path, changed, message):
    out = tmp_path / "run"
    from test_resume import Crash, crash_on_call
    with pytest.MonkeyPatch.context() as patch:
        crash_on_call(patch, dp_sgd.DPSGDStep, "__call__", 2)
        with pytest.raises(Crash):
            run(out, "--max_train_steps", 3, samples=16, batch=8)
    before = ledger_steps(out)
    with pytest.raises(SystemExit, match=message):
        run(out, "--max_train_steps", 3, "--resume_from_checkpoint", "latest", *changed, samples=16, batch=8)
    assert ledger_steps(out) == before


def test_a_resume_cannot_drop_deterministic_noise_and_the_report_keeps_it(tmp_path):
    """Steps already run with seeded noise stay seeded: resuming them without the flag would call them private."""
    from test_resume import Crash, crash_on_call

    out, seeded = tmp_path / "run", ["--seed", 5, "--deterministic_noise", "--max_train_steps", 3]
    with pytest.MonkeyPatch.context() as patch:
        crash_on_call(patch, dp_sgd.DPSGDStep, "__call__", 2)
        with pytest.raises(Crash):
            run(out, *seeded, samples=16, batch=8)
    before = ledger_steps(out)
    with pytest.raises(SystemExit, match="different run.*deterministic_noise: was True, now False"):
        run(out, "--seed", 5, "--max_train_steps", 3, "--resume_from_checkpoint", "latest", samples=16, batch=8)
    assert ledger_steps(out) == before
    run(out, *seeded, "--resume_from_checkpoint", "latest", samples=16, batch=8)
    report = accounting.PrivacyReport.load(str(out / "privacy_report.json"))
    assert not report.private and report.noise_source == accounting.NOISE_DETERMINISTIC


def test_a_query_made_with_deterministic_noise_is_not_reused(tmp_path):
    """Its noise can be regenerated from the public seed and subtracted from the released scores."""
    seeded = tmp_path / "seeded"
    run(seeded, "--seed", 5, "--deterministic_noise", "--max_train_steps", 1, samples=16, batch=8)
    assert json.loads((seeded / "selection.json").read_text())["mechanism"]["deterministic_noise"] is True
    reused = tmp_path / "reused"
    with pytest.raises(SystemExit, match="deterministic .*NOT PRIVATE"):
        run(reused, "--selection_json", seeded / "selection.json", samples=16, batch=8)
    assert ledger_steps(reused) == {}


def test_a_checkpoint_is_resumed_only_from_this_runs_folder_and_within_its_ledger(tmp_path):
    """Another run's checkpoint (or one ahead of this ledger) would start at steps this run never accounted."""
    from peft_dp_saliency.run_state import RunState

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    other = RunState(tmp_path / "other-work", tmp_path / "other")
    for _ in range(3):
        other.record_spending("dp_sgd", 1.0, 0.5, 1.0)
    other.save_checkpoint(3, model, optimizer, scheduler)
    mine = RunState(tmp_path / "mine-work", tmp_path / "mine")
    mine.record_spending("dp_sgd", 1.0, 0.5, 1.0)
    mine.save_checkpoint(1, model, optimizer, scheduler)
    borrowed = RunState(tmp_path / "mine-work", tmp_path / "mine", resume=str(tmp_path / "other-work" / "checkpoint-3"))
    with pytest.raises(SystemExit, match="not a checkpoint of this run"):
        borrowed.load_checkpoint(model, optimizer, scheduler)
    shutil.copytree(tmp_path / "other-work" / "checkpoint-3", tmp_path / "mine-work" / "checkpoint-3")
    ahead = RunState(tmp_path / "mine-work", tmp_path / "mine", resume=str(tmp_path / "mine-work" / "checkpoint-3"))
    with pytest.raises(SystemExit, match="records only 1 DP-SGD steps"):
        ahead.load_checkpoint(model, optimizer, scheduler)
    named = RunState(tmp_path / "mine-work", tmp_path / "mine", resume=str(tmp_path / "mine-work" / "checkpoint-1"))
    assert named.load_checkpoint(model, optimizer, scheduler) == 1


def test_a_denoiser_with_dropout_is_refused_before_spending(tmp_path):
    """Dropout masks come from torch's global generator, which the public --seed seeds."""
    from peft_dp_saliency.public_model import load_public_pipeline
    from peft_dp_saliency.train import fit

    pipe = load_public_pipeline()
    dropouts = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0 for m in dropouts)
    dropouts[0].p = 0.1
    with pytest.raises(SystemExit, match="dropout.*p > 0.*publicly seeded"):
        fit(pipe, output_dir=tmp_path / "out", max_train_samples=16, max_train_steps=1, expected_batch_size=8)
    assert ledger_steps(tmp_path / "out") == {}


def test_a_resume_that_cannot_fit_the_budget_stops_unless_allowed(tmp_path, monkeypatch):
    """The selection query is killed once and must run again; at sigma_s = 0.8 one query costs eps 2.7 and two 4.45 > 4."""
    from test_resume import Crash, crash_on_call

    out = tmp_path / "run"
    flags = ["--selection_noise_multiplier", 0.8, "--selection_sample_rate", 1, "--target_epsilon", 4,
             "--max_train_steps", 2]
    with monkeypatch.context() as patch:
        crash_on_call(patch, training_script(), "select_target_modules", 1)
        with pytest.raises(Crash):
            run(out, *flags, samples=16, batch=8)
    with pytest.raises(SystemExit, match="cannot stay within the privacy budget"):
        run(out, *flags, "--resume_from_checkpoint", "latest", samples=16, batch=8)
    assert ledger_steps(out) == {"selection": 1} and not list(out.iterdir())
    run(out, *flags, "--resume_from_checkpoint", "latest", "--allow_over_budget_release", samples=16, batch=8)
    report = accounting.PrivacyReport.load(str(out / "privacy_report.json"))
    assert report.guarantee_epsilon > 4 and ledger_steps(out) == {"selection": 2, "dp_sgd": 2}
    assert "Over budget" in (out / "README.md").read_text()


# 6. A non-finite example cannot spoil the release -------------------------------------------------

def test_a_nonfinite_example_is_dropped_and_the_rest_is_summed_exactly():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    modules = {"0": model[0], "2": model[2]}
    x = torch.randn(5, 4)
    x[2, 1] = math.inf

    def clipped(inputs):
        clipper = PerSampleClipper(modules, 0.5)
        with clipper.capture():
            return clipper.clipped_sums(model(inputs).pow(2).sum(1))

    result = clipped(x)
    others = clipped(x[[0, 1, 3, 4]])
    assert result.nonfinite == 1
    for name, value in result.sums.items():
        assert torch.isfinite(value).all()
        torch.testing.assert_close(value, others.sums[name], rtol=1e-6, atol=1e-7)


# Also: float64 Poisson sampling, directory fsync ----------------------------------------------------

def test_poisson_sampler_draws_in_float64():
    n, q = 1000, 256 / 60_000
    batches = list(PoissonSampler(n, q, 3, torch.Generator().manual_seed(7)))
    g = torch.Generator().manual_seed(7)
    expected = [torch.arange(n)[torch.rand(n, generator=g, dtype=torch.float64) < q] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(batches, expected))


def test_atomic_json_writes_fsync_the_directory(tmp_path, monkeypatch):
    synced = []
    original = os.fsync

    def recording(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return original(fd)

    monkeypatch.setattr(accounting.os, "fsync", recording)
    accounting.write_json_atomic(str(tmp_path / "ledger.json"), {"stages": []})
    assert synced == [False, True]  # the file, then the directory holding the rename
