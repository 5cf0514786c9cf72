"""TrainingConfig is the single source of the flags; fit() takes in-memory pipelines and datasets."""

import dataclasses
import typing

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from peft_dp_saliency import TrainingConfig, TrainingResult, fit
from peft_dp_saliency.public_model import load_public_pipeline
from peft_dp_saliency.select import SelectArguments
from peft_dp_saliency.training_config import HELP_SECTIONS, help_section, parser, parse_args
from script_runner import training_script

pytestmark = pytest.mark.timeout(600)

# Every flag of the command line before TrainingConfig existed (names users' scripts already pass).
FLAGS_BEFORE = """pretrained_model_name_or_path revision variant dataset_name train_data_dir image_column label_column
prompt_template class_names class_prompts max_train_samples resolution max_sequence_length output_dir checkpoint_dir
overwrite_output_dir rank lora_alpha no_lora adapter learning_rate lr_scheduler lr_warmup_steps adam_beta1 adam_beta2
adam_weight_decay adam_epsilon max_train_steps train_batch_size mixed_precision checkpointing_steps
resume_from_checkpoint seed report_to report_nonprivate_training_loss validation_prompt num_validation_images
push_to_hub hub_model_id hub_token hub_private license target_epsilon target_delta max_grad_norm clipping
noise_multiplicity use_ema ema_decay expected_batch_size accountant adjacency allow_over_budget_release
deterministic_noise selection_json selection_strategy candidate_pool selection_unit selection_ratio saliency_score
selection_noise_multiplier selection_budget_fraction selection_max_grad_norm selection_sample_rate selection_clipping
selection_noise_multiplicity selection_batch_size""".split()


def other_value(field: dataclasses.Field, hint):
    """A value of the field's type that differs from its default (every flag gets exercised)."""
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    if "choices" in field.metadata:
        return next(c for c in field.metadata["choices"] if c != default)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is bool:
        return not default
    if typing.get_origin(base) is list:
        return ["A", "B"]
    if base is int:
        return (default or 0) + 3
    if base is float:
        return (default or 0.0) + 0.25
    return f"value-of-{field.name}"


def to_argv(config) -> list[str]:
    argv = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool):
            argv += [f"--{field.name}" if value else f"--no_{field.name}"] if value != field.default else []
        elif isinstance(value, list):
            argv += [f"--{field.name}", *value]
        elif value is not None:
            argv += [f"--{field.name}", str(value)]
    return argv


def test_every_field_has_help_and_every_old_flag_survives():
    names = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert set(FLAGS_BEFORE) <= names, set(FLAGS_BEFORE) - names
    for field in dataclasses.fields(TrainingConfig):
        assert len(field.metadata.get("help", "")) > 10, f"{field.name} has no help"
    text = parser().format_help()
    assert all(f"--{name}" in text for name in names)


def test_command_line_round_trips_every_field():
    assert parse_args([]) == TrainingConfig()
    hints = typing.get_type_hints(TrainingConfig)
    changed = TrainingConfig(**{f.name: other_value(f, hints[f.name]) for f in dataclasses.fields(TrainingConfig)})
    assert all(getattr(changed, f.name) != getattr(TrainingConfig(), f.name) for f in dataclasses.fields(changed))
    assert parse_args(to_argv(changed)) == changed


def test_switches_lists_and_choices_parse_as_before():
    config = parse_args(["--no_lora", "--class_names", "a", "b", "--target_epsilon", "inf", "--clipping", "flat"])
    assert config.no_lora is True and config.class_names == ["a", "b"] and config.target_epsilon == float("inf")
    with pytest.raises(SystemExit):
        parse_args(["--clipping", "automatc"])
    with pytest.raises(SystemExit):
        parse_args(["--max_grad_nrom", "1"])


def test_help_groups_every_flag_under_its_section_in_field_order():
    p = parser()
    groups = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups}
    assert [t for t in groups if t in HELP_SECTIONS] == list(HELP_SECTIONS)
    fields = [f.name for f in dataclasses.fields(TrainingConfig)]
    assert {d for t in HELP_SECTIONS for d in groups[t]} == set(fields)  # every field (and its --no_ switch)
    assert sum(len(set(groups[t])) for t in HELP_SECTIONS) == len(fields)  # each in one section
    assert groups["options"] == ["help"]
    assert help_section("target_epsilon") == "differential privacy" and help_section("max_train_steps") == "training"
    assert help_section("selection_batch_size") == "saliency selection" and help_section("not_a_field") is None
    text = p.format_help()
    body = text[text.index("\noptions:"):]  # after the usage line, which names every flag
    assert body.index("differential privacy:") < body.index("--target_epsilon") < body.index("saliency selection:")
    # the select command's subset: its fields keep their sections
    select_groups = {g.title: [a.dest for a in g._group_actions] for g in parser(SelectArguments)._action_groups}
    assert "selection_ratio" in select_groups["saliency selection"]


def test_select_command_uses_the_same_fields():
    own = {f.name: f for f in dataclasses.fields(TrainingConfig)}
    shared = [f for f in dataclasses.fields(SelectArguments) if f.name != "output_json"]
    assert {f.name for f in shared} >= {"selection_ratio", "selection_unit", "target_epsilon", "class_names"}
    for field in shared:
        assert field.metadata == own[field.name].metadata and field.default == own[field.name].default


def small_fashion_dataset(n=24) -> datasets.Dataset:
    """The first n Fashion-MNIST training images as a `datasets.Dataset` (image, ClassLabel label)."""
    from peft_dp_saliency.data import FASHION_MNIST_CLASSES, load_sensitive_dataset

    source = load_sensitive_dataset(max_examples=n)
    images = [source._images[i] for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES)})
    return datasets.Dataset.from_dict({"image": images, "label": source.labels.tolist()}, features=features)


TINY_RUN = dict(max_train_steps=2, expected_batch_size=8, train_batch_size=8, selection_batch_size=24,
                num_validation_images=1, validation_prompt="An image of a Bag", checkpointing_steps=1, seed=0,
                deterministic_noise=True, rank=2)


def test_fit_with_pipeline_and_dataset_objects_gives_the_scripts_artefacts(tmp_path):
    dataset = small_fashion_dataset()
    dataset.save_to_disk(str(tmp_path / "data"))
    script_out = tmp_path / "script"
    script_argv = to_argv(TrainingConfig(output_dir=str(script_out), dataset_name=str(tmp_path / "data"), **TINY_RUN))
    training_script().main(script_argv)

    pipe = load_public_pipeline()
    config = TrainingConfig(output_dir=str(tmp_path / "api"), **TINY_RUN)
    result = fit(pipe, dataset, config)
    assert isinstance(result, TrainingResult) and result.unet is pipe.unet and pipe.unet.peft_config
    assert {p.name for p in result.output_dir.iterdir()} == {p.name for p in script_out.iterdir()}
    ours, theirs = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (result.output_dir, script_out))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert result.selection.selected == TrainingResult.load(script_out).selection.selected
    assert result.report.epsilon == TrainingResult.load(script_out).report.epsilon

    copy = result.save(tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in result.output_dir.iterdir())
    with pytest.raises(FileExistsError):
        result.save(copy)
    with pytest.raises(SystemExit, match="already has adapters"):  # refused before anything is spent
        fit(pipe, dataset, config, output_dir=str(tmp_path / "again"))
    assert not (tmp_path / "again-work" / "ledger.json").exists()


def test_fit_rejects_unknown_options_before_running(tmp_path):
    with pytest.raises(TypeError, match="unknown training options"):
        fit(output_dir=tmp_path / "x", max_grad_nrom=1.0)
    assert not (tmp_path / "x").exists()


def test_a_datasets_object_loads_like_its_saved_folder(tmp_path):
    from peft_dp_saliency.data import load_sensitive_dataset

    dataset = small_fashion_dataset(6)
    dataset.save_to_disk(str(tmp_path / "data"))
    loaded, saved = load_sensitive_dataset(dataset), load_sensitive_dataset(str(tmp_path / "data"))
    assert loaded.class_names == saved.class_names and torch.equal(loaded.labels, saved.labels)
    assert all(np.array_equal(loaded[i][0], saved[i][0]) for i in range(6))
