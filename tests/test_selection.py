"""The private saliency query: noise scale, planted saliency, data-independent baselines."""

import pytest
import torch

from peft_dp_saliency.candidates import block_order, find_candidates
from peft_dp_saliency.config import SaliencyLoraConfig
from peft_dp_saliency.selection import _noisy_average_gradients, number_selected, select_target_modules
from tiny_models import tiny_encoded_data, tiny_scheduler, tiny_unet


def config(**kwargs):
    base = dict(selection_seed=0, deterministic_noise=True, selection_batch_size=None)
    base.pop("selection_batch_size")
    base.update(kwargs)
    return SaliencyLoraConfig(**base)


def test_noise_std_per_coordinate_is_sigma_c_over_n():
    """Two queries that differ only in the noise seed: difference has std sqrt(2) sigma_s C / N.

    Tolerance: ~20k coordinates, so the sample std is within 3% with overwhelming probability.
    """
    unet, data = tiny_unet(), tiny_encoded_data(n=10)
    candidates = find_candidates(unet)
    sigma, clip = 3.0, 0.5
    first = _noisy_average_gradients(unet, tiny_scheduler(), data, candidates,
                                     config(selection_noise_multiplier=sigma, selection_max_grad_norm=clip,
                                            selection_seed=1), 4, False)
    second = _noisy_average_gradients(unet, tiny_scheduler(), data, candidates,
                                      config(selection_noise_multiplier=sigma, selection_max_grad_norm=clip,
                                             selection_seed=1, deterministic_noise=False), 4, False)
    diff = torch.cat([(first[k] - second[k]).flatten() for k in first])
    expected = 2 ** 0.5 * sigma * clip / len(data)
    assert diff.numel() > 10_000
    assert abs(diff.std().item() / expected - 1) < 0.03
    assert abs(diff.mean().item()) < 4 * expected / diff.numel() ** 0.5


def plant(module, factor=1e4):
    """Same forward, `factor` times larger weight gradient: W -> W / f, input -> f x."""
    module.weight.data /= factor
    module.register_forward_pre_hook(lambda m, args: (args[0] * factor,))


@pytest.mark.parametrize("pool,suffix", [("attn_qkv", "attn2.to_k"), ("attn_qkvo", "attn1.to_out.0")])
def test_planted_salient_matrix_is_found(pool, suffix):
    unet, data = tiny_unet(), tiny_encoded_data()
    target = next(n for n in find_candidates(unet, pool) if n.endswith(suffix))
    plant(unet.get_submodule(target))
    cfg = config(candidate_pool=pool, selection_ratio=0.01, selection_noise_multiplier=1e-6,
                 selection_max_grad_norm=1e6)
    result = select_target_modules(unet, tiny_scheduler(), data, cfg, batch_size=6, show_progress=False)
    assert result.selected == [target]
    assert cfg.target_modules == [target]
    assert result.mechanism == {"name": "selection", "noise_multiplier": 1e-6, "sample_rate": 1.0,
                                "steps": 1, "max_grad_norm": 1e6, "dataset_size": len(data),
                                "deterministic_noise": cfg.deterministic_noise}
    assert set(result.scores) == set(find_candidates(unet, pool))


def test_layer_unit_selects_whole_attention_layers():
    unet, data = tiny_unet(), tiny_encoded_data()
    target = next(n for n in find_candidates(unet) if n.endswith("attn1.to_v"))
    plant(unet.get_submodule(target))
    cfg = config(selection_unit="layer", selection_ratio=0.01, selection_noise_multiplier=1e-6,
                 selection_max_grad_norm=1e6)
    result = select_target_modules(unet, tiny_scheduler(), data, cfg, batch_size=6, show_progress=False)
    layer = target.rsplit(".", 1)[0]
    assert result.selected == [f"{layer}.to_q", f"{layer}.to_k", f"{layer}.to_v"]


def test_random_and_all_do_not_touch_data():
    unet = tiny_unet()
    picks = [select_target_modules(unet, tiny_scheduler(), data, config(selection_strategy="random", selection_seed=7),
                                   show_progress=False).selected
             for data in (None, tiny_encoded_data(seed=1), tiny_encoded_data(seed=2))]
    assert picks[0] == picks[1] == picks[2]
    assert len(picks[0]) == number_selected(len(find_candidates(unet)), 0.3)
    other = select_target_modules(unet, tiny_scheduler(), None, config(selection_strategy="random", selection_seed=8),
                                  show_progress=False).selected
    assert other != picks[0]
    everything = select_target_modules(unet, tiny_scheduler(), None, config(selection_strategy="all"),
                                       show_progress=False)
    assert everything.selected == list(find_candidates(unet)) and everything.mechanism is None


def test_debiased_score_removes_the_size_bias_of_pure_noise():
    """With noise only, E||block||^2 = d s^2: the debiased score has mean ~0 whatever the size."""
    from peft_dp_saliency.selection import unit_scores

    g = torch.Generator().manual_seed(0)
    noisy = {"big": torch.randn(256, 256, generator=g) * 0.1, "small": torch.randn(8, 8, generator=g) * 0.1}
    units = {"big": ["big"], "small": ["small"]}
    plain = unit_scores(noisy, units, "norm", 0.1)
    debiased = unit_scores(noisy, units, "debiased", 0.1)
    assert plain["big"] > 10 * plain["small"]
    assert abs(debiased["big"]) < 5 * 0.01 * (2 * 256 * 256) ** 0.5
    assert abs(debiased["small"]) < 5 * 0.01 * (2 * 64) ** 0.5


def test_selected_names_exist_and_table_lists_blocks():
    unet = tiny_unet()
    result = select_target_modules(unet, tiny_scheduler(), tiny_encoded_data(), config(), batch_size=6,
                                   show_progress=False)
    modules = dict(unet.named_modules())
    assert result.selected and all(name in modules for name in result.selected)
    table = result.table()
    assert table.count("\n") == 1 + len({n.split(".")[0] + n.split(".")[1] for n in result.units_flat()})
    assert "D0" in table and "U1" in table


def test_empty_data_is_refused_before_any_query():
    with pytest.raises(ValueError, match="sensitive dataset"):
        select_target_modules(tiny_unet(), tiny_scheduler(), None, config(), show_progress=False)


def test_a_standalone_query_is_recorded_in_the_ledger_each_time(tmp_path):
    from peft_dp_saliency.accounting import SpendingLedger

    unet = tiny_unet().requires_grad_(False)
    ledger = SpendingLedger(str(tmp_path / "ledger.json"))
    config = SaliencyLoraConfig(selection_noise_multiplier=3.0)
    for _ in range(2):
        select_target_modules(unet, tiny_scheduler(), tiny_encoded_data(), config, ledger=ledger)
    assert [(s.name, s.noise_multiplier, s.steps) for s in ledger.stages()] == [("selection", 3.0, 2)]
    select_target_modules(unet, tiny_scheduler(), None, SaliencyLoraConfig(selection_strategy="all"), ledger=ledger)
    assert ledger.stages()[0].steps == 2  # strategy 'all' reads no data and costs nothing


def test_block_labels_sort_input_to_output_and_the_same_way_whatever_the_order_they_arrive_in():
    """Labels of equal rank (conv_in, time_embedding, conv_out) once sorted in a set's order: the rendered tables
    and reports changed between identical runs."""
    labels = ["U1", "conv_out", "D0", "time_embedding", "Mid", "conv_in", "D2", "U0"]
    expected = ["D0", "D2", "Mid", "U0", "U1", "conv_in", "conv_out", "time_embedding"]
    assert sorted(labels, key=block_order) == expected
    assert sorted(reversed(labels), key=block_order) == expected
