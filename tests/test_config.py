"""SaliencyLoraConfig round-trips and plugs into PEFT and diffusers."""

import pytest
from peft import LoraConfig, get_peft_model

from peft_dp_saliency.config import SaliencyLoraConfig
from tiny_models import tiny_unet


def test_round_trip_keeps_every_field(tmp_path):
    config = SaliencyLoraConfig(r=2, lora_alpha=6, target_modules=["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"],
                                candidate_pool="attn_qkvo", selection_unit="layer", selection_ratio=0.2,
                                selection_strategy="random", saliency_score="debiased",
                                selection_noise_multiplier=7.0, selection_max_grad_norm=0.5, selection_seed=3,
                                selection_result={"selected": ["x"], "scores": {"x": 1.5}})
    config.save_pretrained(tmp_path)
    loaded = SaliencyLoraConfig.from_pretrained(tmp_path)
    assert type(loaded) is SaliencyLoraConfig
    assert loaded.to_dict() == config.to_dict()
    plain = LoraConfig.from_pretrained(tmp_path)  # the trap the subclass exists for
    assert not hasattr(plain, "selection_result")


def test_lora_and_selection_fields_are_split():
    config = SaliencyLoraConfig(r=2)
    assert "selection_ratio" not in config.lora_config_dict() and "r" in config.lora_config_dict()
    assert "selection_ratio" in config.selection_dict() and "r" not in config.selection_dict()


@pytest.mark.parametrize("bad", [dict(selection_ratio=0), dict(selection_ratio=1.5), dict(candidate_pool="mlp"),
                                 dict(selection_unit="block"), dict(selection_strategy="best"),
                                 dict(selection_noise_multiplier=0.0)])
def test_bad_fields_raise(bad):
    with pytest.raises(ValueError):
        SaliencyLoraConfig(**bad)


def test_works_with_add_adapter_and_get_peft_model():
    name = "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"
    config = SaliencyLoraConfig(r=2, target_modules=[name])
    unet = tiny_unet()
    unet.add_adapter(config)
    adapted = [n for n, _ in unet.named_parameters() if "lora_A" in n]
    assert adapted == [f"{name}.lora_A.default.weight"]
    peft_model = get_peft_model(tiny_unet(), SaliencyLoraConfig(r=2, target_modules=[name]))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
