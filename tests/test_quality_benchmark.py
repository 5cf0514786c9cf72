"""benchmarks/quality.py's plan and its real-data calibration rows (the runs themselves are benchmarks, not tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402

from peft_dp_saliency.metrics import load_real, load_synthetic  # noqa: E402
from peft_dp_saliency.public_model import EMBEDDED_MODEL_PATH  # noqa: E402


def test_every_run_has_its_own_result_file():
    names = [*quality.METHODS, *quality.ABLATION, *quality.SYNTHESIS_ABLATION, *quality.REAL_CALIBRATION,
             *quality.CEILING, quality.NON_PRIVATE[0], quality.NON_PRIVATE_400[0], quality.PUBLIC]
    slugs = {quality.slug(name, epsilon, seed) for name in names for epsilon in ("1", "10") for seed in quality.SEEDS}
    assert len(slugs) == len(names) * 2 * len(quality.SEEDS)


def test_the_ablation_reuses_the_tables_defaults_adapter_and_each_synthesis_variant_its_adapter():
    plan = quality.ablation_plan()
    table_adapter = quality.run_key("DP-SAPF (ratio 0.3)", "10", "0")
    assert plan[0] == ("DP-SAPF ablation: defaults", "10", quality.METHODS["DP-SAPF (ratio 0.3)"], "0",
                       "validation", (), table_adapter)
    assert quality.synthetic_folder("ablation-defaults", table_adapter, ()) == quality.RUNS / f"{table_adapter}-synthetic"
    trainings = {item[0].removeprefix("DP-SAPF ablation: "): item for item in plan if not item[5]}
    assert list(trainings) == list(quality.ABLATION)
    synthesis_only = [item for item in plan if item[5]]
    assert len(synthesis_only) == len(quality.SYNTHESIS_ABLATION)
    for method, epsilon, train_flags, seed, split, synthesis_flags, adapter_key in synthesis_only:
        variant, extra = quality.SYNTHESIS_ABLATION[method.removeprefix("DP-SAPF ablation: ")]
        trained = trainings[variant]
        # the same training flags as its variant, so whichever run reaches the adapter first trains the same one
        assert (train_flags, adapter_key) == (trained[2], trained[6]) and synthesis_flags == tuple(extra)
        assert plan.index(trained) < plan.index((method, epsilon, train_flags, seed, split, synthesis_flags,
                                                 adapter_key))
    assert all(item[4] == "validation" for item in plan)  # the ablation never reads the test split
    assert all("--max_train_samples" not in flags or int(flags[flags.index("--max_train_samples") + 1]) <= 50_000
               for flags in quality.ABLATION.values())  # the validation images are train images 50,000-59,999
    assert quality.training_lock(quality.RUNS / table_adapter) is quality.training_lock(quality.RUNS / table_adapter)


def test_a_row_whose_shared_adapter_is_gone_is_refused_rather_than_paired_with_a_retrained_one(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(quality, "RUNS", tmp_path / "runs")
    plan = quality.ablation_plan()
    variant, method, epsilon, flags, seed, split, extra, adapter_key = next(
        (quality.SYNTHESIS_ABLATION[item[0].removeprefix("DP-SAPF ablation: ")][0], *item) for item in plan
        if item[5] and quality.SYNTHESIS_ABLATION[item[0].removeprefix("DP-SAPF ablation: ")][0] != "defaults")
    owner = next(item for item in plan if item[0] == f"DP-SAPF ablation: {variant}" and not item[5])
    assert quality.adapter_result(adapter_key) == (tmp_path / "results" / "ablation"
                                                   / f"{quality.slug(owner[0], epsilon, seed)}.json")
    assert quality.adapter_result(quality.run_key("DP-SAPF (ratio 0.3)", "10", "0")) == (
        tmp_path / "results" / "dp-sapf-ratio-0-3_eps10_seed0.json")
    quality.adapter_result(adapter_key).parent.mkdir(parents=True)
    quality.adapter_result(adapter_key).write_text("{}")  # the owner was scored, in runs/ that are gone
    with pytest.raises(RuntimeError, match="is gone.*other DP noise"):
        quality.run_one(method, epsilon, flags, seed, split, extra, adapter_key)
    assert not (tmp_path / "runs" / adapter_key).exists()  # nothing was trained


def test_real_calibration_subset_is_the_first_images_of_each_class(tmp_path):
    npz = quality.write_real_subset(tmp_path, per_class=3)
    subset = load_synthetic(npz, class_names=load_real("fashion-mnist", split="test").class_names)
    real = load_real("fashion-mnist", split="train")
    assert subset.labels.tolist() == [c for c in range(10) for _ in range(3)]
    first = torch.cat([(real.labels == c).nonzero().flatten()[:3] for c in range(10)])
    assert torch.equal(subset.images, real.images[first])  # bit-exact through gen.npz's float [0, 1]


def _result(tmp_path, method, fingerprint, scale=None):
    path = tmp_path / "run_eps10_seed0.json"
    path.write_text(json.dumps({"method": method, "public_model": fingerprint, "scale": scale or quality.SCALE}))
    return path


def test_a_result_made_with_another_public_model_is_refused(tmp_path):
    current = quality.public_model_fingerprint()
    quality.check_current(_result(tmp_path, "DP-SAPF (ratio 0.3)", current))
    for stale in ("0123456789abcdef", None):  # another model's hash, or a result from before fingerprints
        with pytest.raises(RuntimeError, match="another public model"):
            quality.check_current(_result(tmp_path, "DP-SAPF (ratio 0.3)", stale))
        with pytest.raises(RuntimeError, match="another public model"):
            quality.check_current(_result(tmp_path, quality.AUTOENCODED[0], stale))  # it reads the VAE
    quality.check_current(_result(tmp_path, "Real training images (100 per class)", None))  # no model involved


def test_a_result_made_at_another_scale_is_refused(tmp_path):
    current = quality.public_model_fingerprint()
    fewer_images = dict(quality.SCALE, images_per_class=quality.SCALE["images_per_class"] // 10)
    with pytest.raises(RuntimeError, match="another scale.*images_per_class"):
        quality.check_current(_result(tmp_path, "DP-SAPF (ratio 0.3)", current, fewer_images))
    # a real calibration row synthesizes nothing: only the evaluation's scale matters to it
    real = "Real training images (100 per class)"
    quality.check_current(_result(tmp_path, real, None, fewer_images))
    with pytest.raises(RuntimeError, match="another scale.*classifier_epochs"):
        quality.check_current(_result(tmp_path, real, None, dict(quality.SCALE, classifier_epochs=1)))


def test_the_fingerprint_changes_with_any_weight_file(tmp_path):
    for name in ("unet", "vae"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    before = quality.public_model_fingerprint(tmp_path)
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"weightz")
    assert quality.public_model_fingerprint(tmp_path) != before


def test_the_decoder_comparison_is_paired_and_scored_on_the_validation_split(tmp_path):
    plan = quality.decoder_comparison_plan(tmp_path)
    assert len(plan) == 2 * len(quality.DECODER_COMPARISON)
    for refined, v1 in zip(plan[::2], plan[1::2]):
        # the same adapter (the test-split run's, seed 0) and synthesis seed; only the base model differs
        assert refined[1:4] == v1[1:4] and refined[6] == v1[6] == quality.run_key(refined[0].split(":")[0],
                                                                                 refined[1], "0")
        assert refined[4] == v1[4] == "validation" and refined[7] == v1[7] == "decoder"
        assert refined[5] == () and v1[5] == ("--pretrained_model_name_or_path", str(tmp_path))
        # the refined run resumes the adapter run's own images instead of drawing them again
        assert quality.synthetic_folder("x", refined[6], refined[5]) == quality.RUNS / f"{refined[6]}-synthetic"
        assert quality.synthetic_folder("x", v1[6], v1[5]) != quality.synthetic_folder("x", refined[6], ())


def test_the_guidance_comparison_reuses_the_tables_adapters_and_is_scored_on_the_validation_split():
    plan = quality.guidance_comparison_plan()
    assert len(plan) == len(quality.GUIDANCE_COMPARISON) * len(quality.GUIDANCE_SCALES)
    for method, epsilon, flags, seed, split, extra, adapter, subdir in plan:
        table_method = method.rsplit(": guidance ", 1)[0]
        assert quality.GUIDANCE_COMPARISON[table_method] == epsilon and seed == "0"
        # the test-split run's own adapter and training flags (never retrained), scored on the validation split
        assert adapter == quality.run_key(table_method, epsilon, "0") and split == "validation" and subdir == "guidance"
        assert flags == {**quality.METHODS, **quality.CEILING}[table_method]
        scale = method.rsplit(" ", 1)[1]
        # SCALE's guidance: the table's own images, re-scored, not drawn again
        assert extra == (() if float(scale) == quality.SCALE["guidance_scale"] else ("--guidance_scale", scale))
        assert quality.guidance_of(list(extra), quality.SCALE["guidance_scale"]) == float(scale)
    folders = {quality.synthetic_folder("x", item[6], item[5]) for item in plan}
    assert len(folders) == len(plan) and quality.RUNS / f"{plan[0][6]}-synthetic" in folders


def test_results_from_before_the_guidance_key_count_as_guidance_4(tmp_path):
    current, scale = quality.public_model_fingerprint(), dict(quality.SCALE)
    del scale["guidance_scale"]  # how every result before the key was written (synthesize.py's default, 4)
    assert quality.SCALE["guidance_scale"] != 4.0
    with pytest.raises(RuntimeError, match="another scale.*guidance_scale"):
        quality.check_current(_result(tmp_path, "DP-SAPF (ratio 0.3)", current, scale))
    quality.check_current(_result(tmp_path, quality.AUTOENCODED[0], current, scale))  # it draws nothing
    quality.check_current(_result(tmp_path, "DP-SAPF (ratio 0.3): guidance 4", current, scale))  # made at its name's
    with pytest.raises(RuntimeError, match="guidance_scale"):
        quality.check_current(_result(tmp_path, "DP-SAPF (ratio 0.3): guidance 2", current, scale))
    flagged = tmp_path / "flagged_eps10_seed0.json"
    flagged.write_text(json.dumps({"method": "DP-SAPF (ratio 0.3): guidance 2", "public_model": current,
                                   "scale": scale, "synthesis_flags": ["--guidance_scale", "2"]}))
    quality.check_current(flagged)


def test_public_model_v1_is_the_first_decoder_with_the_same_unet(tmp_path):
    known = subprocess.run(["git", "cat-file", "-e", quality.PUBLIC_MODEL_V1_COMMIT], cwd=quality.ROOT)
    if known.returncode != 0:
        pytest.skip(f"this clone lacks commit {quality.PUBLIC_MODEL_V1_COMMIT} (shallow)")
    v1 = quality.public_model_v1(tmp_path / "v1")
    current = EMBEDDED_MODEL_PATH
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (v1 / unet).read_bytes() == (current / unet).read_bytes()
    v1_vae, vae = (AutoencoderKL.from_pretrained(str(path), subfolder="vae") for path in (v1, current))
    old, new = v1_vae.state_dict(), vae.state_dict()
    decoder = [name for name in new if name.startswith(("decoder.", "post_quant_conv."))]
    assert all(torch.equal(new[name], old[name]) for name in new if name not in decoder)  # encoder: same latents
    assert not all(torch.equal(new[name], old[name]) for name in decoder)  # the decoder is the first one


def test_the_autoencoded_row_is_real_images_through_the_public_vae_as_luma():
    real = load_real("fashion-mnist", split="train").images[:20].float() / 255.0
    out = quality.autoencoded(real)
    assert out.shape == real.shape
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # luma, replicated
    assert torch.equal((out * 255).round(), out * 255)  # 8-bit, like a saved PNG
    error = (out - real).pow(2).mean()
    assert 0 < error < 0.05  # a lossy reconstruction of the image, not the image and not noise
    assert torch.equal(out, quality.autoencoded(real))  # deterministic (the posterior mean)


def test_real_subsets_are_written_in_a_fresh_process_that_keeps_the_benchmark_small():
    assert quality.in_fresh_process(os.getpid) != os.getpid()
    assert quality.in_fresh_process(max, 2, 5) == 5


def test_the_seeded_comparison_is_welch_t_over_the_seeds():
    import render_results

    def run(method, epsilon, seed, acc):
        return {"method": method, "epsilon": epsilon, "seed": seed, "acc": acc, "fid": 1.0 + acc}

    sapf, lora = render_results.CURVE_METHODS
    runs = [run(sapf, "10", s, a) for s, a in (("0", 0.40), ("1", 0.42), ("2", 0.41))]
    runs += [run(lora, "10", s, a) for s, a in (("0", 0.30), ("1", 0.31), ("2", 0.29))]
    runs += [run(sapf, "1", "0", 0.3), run(lora, "1", "0", 0.2)]
    table = render_results.seeded_comparison(runs).splitlines()
    acc10 = next(line for line in table if line.startswith("| 10 | acc"))
    cells = [c.strip() for c in acc10.split("|")[1:-1]]
    assert cells[2:4] == ["40.0, 42.0, 41.0", "30.0, 31.0, 29.0"] and cells[4] == "+11.0"
    assert float(cells[5]) > 10 and float(cells[7]) < 0.01  # three tight seeds 11 points apart: decided
    assert all("needs >= 2 seeds" in line for line in table if line.startswith("| 1 |"))  # one seed: undecided
    only_10 = render_results.seeded_comparison(runs, sapf, lora, ("10",)).splitlines()
    assert only_10[2:] == [line for line in table if line.startswith("| 10 |")]  # the header's two lines, then 10


def test_every_seeded_pair_the_render_compares_is_a_row_quality_runs_with_seeds():
    """A renamed row would otherwise render as "not run" while its results sit in docs/results/."""
    import render_results

    planned = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quality, "run_plan", lambda plan, args: planned.extend(plan))
        patch.setattr(sys, "argv", ["quality.py", "--seeds", "0", "1", "2"])
        quality.main()
    for pair in (render_results.CURVE_METHODS, render_results.MORE_DATA_METHODS, render_results.LR_5E3_METHODS,
                 render_results.ALL_LINEAR_5E3_METHODS, render_results.DEBIASED_ALL_LINEAR_5E3_METHODS,
                 render_results.STEPS_400_METHODS):
        for method in pair:
            for epsilon in ("10", "1"):
                assert {item[3] for item in planned if item[:2] == (method, epsilon)} == {"0", "1", "2"}
    for control in (quality.RANDOM_400, quality.RANDOM_MATCHED_400):
        assert {item[3] for item in planned if item[:2] == (control, "10")} == {"0", "1", "2"}
    # the 400-step pair's curve budgets are seeded too: seed 0 before the random control, the others after it
    first_random = next(i for i, item in enumerate(planned) if item[0] == quality.RANDOM_400)
    for method in render_results.STEPS_400_METHODS:
        for epsilon in quality.CURVE_EPSILONS:
            where = {item[3]: i for i, item in enumerate(planned) if item[:2] == (method, epsilon)}
            assert set(where) == {"0", "1", "2"}
            assert where["0"] < first_random < min(where["1"], where["2"])


def test_the_400_step_pair_has_its_accuracy_vs_epsilon_curve_planned_and_drawn(tmp_path, monkeypatch):
    """Its epsilon-5 and -2 runs, its non-private point and its random-selection control are in the plan, and the
    second plot draws them."""
    import render_results
    from PIL import Image

    planned = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quality, "run_plan", lambda plan, args: planned.extend(plan))
        patch.setattr(sys, "argv", ["quality.py", "--seeds", "0"])
        quality.main()
    for method in render_results.STEPS_400_METHODS:
        assert {item[1] for item in planned if item[0] == method} == {"10", "1", "5", "2"}
    assert (quality.NON_PRIVATE_400[0], "inf", quality.NON_PRIVATE_400[1], "0") in planned
    assert quality.NON_PRIVATE_400[1] == quality.METHODS[render_results.STEPS_400_METHODS[1]]
    # the random-selection control: DP-SAPF's flags with blind picks, at epsilon 10 only, not part of the pair
    for control in (quality.RANDOM_400, quality.RANDOM_MATCHED_400):
        assert [item[1] for item in planned if item[0] == control] == ["10"]
    assert quality.METHODS[quality.RANDOM_400][:-2] == quality.METHODS[render_results.STEPS_400_METHODS[0]]
    assert quality.METHODS[quality.RANDOM_400][-2:] == ["--selection_strategy", "random"]
    assert quality.METHODS[quality.RANDOM_MATCHED_400] == [*quality.METHODS[quality.RANDOM_400],
                                                            "--selection_ratio", "0.55"]

    monkeypatch.setattr(render_results, "RESULTS", tmp_path)
    point = lambda acc, std=0.0: {"acc": acc, "acc_std": std}
    sapf, lora = render_results.STEPS_400_METHODS
    table = {sapf: {"10": point(0.70, 0.02), "1": point(0.63)}, lora: {"5": point(0.67)},
             quality.NON_PRIVATE_400[0]: {"inf": point(0.75)}}
    link = render_results.accuracy_curve(table, render_results.STEPS_400_METHODS, quality.NON_PRIVATE_400[0],
                                         "curve.png")
    assert link.endswith("(results/curve.png)")
    pixels = np.asarray(Image.open(tmp_path / "curve.png").convert("RGB")).reshape(-1, 3)
    blue, red = ((pixels == colour).all(axis=1).sum() for colour in ([0, 0, 255], [255, 0, 0]))
    assert blue > 50 and red > 50  # both methods drawn (DP-SAPF's line, DP-LoRA's point and the shared inf point)


def test_the_selection_table_orders_every_ratio_row_by_its_ratio():
    """Rows named "DP-SAPF (ratio r), N = ..., lr ..." are columns too, ordered by r (not by the name's last word)."""
    import render_results

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
    runs = [{"method": m, "epsilon": "10", "seed": "0", "selected": [name]}
            for m in quality.METHODS if m.startswith("DP-SAPF (ratio")]
    header = render_results.selection_table(runs, "10").splitlines()[0]
    ratios = [float(column.split()[1].rstrip(")").rstrip("),")) for column in header.split(" | ")[1:]]
    assert len(ratios) == len(runs) and ratios == sorted(ratios)
    assert "(ratio 0.5), N = 50,000, batch 512 x 200, lr 5e-3" in header


def test_only_and_epsilons_select_which_planned_runs_start(monkeypatch, capsys):
    """`--only A --epsilons 1` runs the items whose method contains A at epsilon 1 and nothing else."""
    started = []
    monkeypatch.setattr(quality, "run_one", lambda *item: started.append(item[:2]) or "result.json")
    monkeypatch.setattr(sys, "argv", ["quality.py", "--only", "(all linear layers), N = 50,000, batch 512 x 200",
                                      "--seeds", "1", "--epsilons", "1"])
    quality.main()
    assert started == [("DP-LoRA (all linear layers), N = 50,000, batch 512 x 200, lr 5e-3", "1")]
    assert "done: DP-LoRA (all linear layers), N = 50,000" in capsys.readouterr().out


def test_the_side_by_side_grid_titles_each_run_by_its_whole_name(tmp_path, monkeypatch):
    """Two rows that differ only after the 40th character (200 against 400 steps) once got the same cut title."""
    import render_results
    from PIL import Image

    monkeypatch.setattr(render_results, "SAMPLES", tmp_path)
    monkeypatch.setattr(render_results, "RESULTS", tmp_path)
    methods = [f"DP-SAPF (all-linear pool), N = 50,000, batch 512 x {steps}, lr 5e-3" for steps in (200, 400)]
    for method in methods:
        Image.new("RGB", (130, 100), "black").save(tmp_path / f"{quality.slug(method, '10', '0')}.png")
    render_results.side_by_side_samples([{"method": m, "epsilon": "10", "seed": "0"} for m in methods], "10")
    sheet = np.asarray(Image.open(tmp_path / "samples_eps10.png").convert("L"))
    header = sheet.shape[0] - 100
    lines = [row for row in range(header) if (sheet[row, :130] < 128).any()]
    assert header > 24 and max(lines) > 24  # more than the one 12-px line the 40-character title needed
    titles = [sheet[:header, :130], sheet[:header, 138:268]]
    assert not np.array_equal(*titles)  # the names' ends (200, 400) are drawn


@pytest.mark.parametrize("control, low, high",
                         [("RANDOM_400", 20_000, 35_000), ("RANDOM_MATCHED_400", 47_000, 60_000)])
def test_the_random_controls_match_the_querys_matrix_count_or_its_parameter_count(control, low, high):
    """The query's 25 picks at epsilon 10 hold 52,224 LoRA parameters (rank 4); the count control's 25 random picks
    hold about half that, the size control's 46 about as many, seed by seed (seeds 0-2: public, no data)."""
    from peft_dp_saliency.config import SaliencyLoraConfig
    from peft_dp_saliency.public_model.architecture import build_unet
    from peft_dp_saliency.selection import select_target_modules

    flags = quality.METHODS[getattr(quality, control)]
    ratios = [flags[i + 1] for i, flag in enumerate(flags) if flag == "--selection_ratio"]
    ratio = float(ratios[-1]) if ratios else SaliencyLoraConfig().selection_ratio  # the last flag wins
    unet = build_unet()
    modules = dict(unet.named_modules())
    for seed in (0, 1, 2):
        config = SaliencyLoraConfig(candidate_pool="all_linear", selection_strategy="random", selection_ratio=ratio,
                                    selection_seed=seed)
        picked = select_target_modules(unet, None, None, config, show_progress=False).selected
        assert len(picked) == round(ratio * 83)  # of the embedded UNet's 83 Linear matrices
        lora_parameters = sum(quality.SCALE["rank"] * sum(modules[name].weight.shape) for name in picked)
        assert low <= lora_parameters <= high, (seed, lora_parameters)
