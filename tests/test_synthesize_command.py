"""examples/synthesize.py's command line (peft_dp_saliency.commands.synthesize) on the embedded public model."""

import pytest
from PIL import Image

from peft_dp_saliency import synthesis
from peft_dp_saliency.commands import synthesize


def test_image_mode_from_the_command_line_reaches_every_saved_image_and_the_card(tmp_path):
    synthesize.main(["--output_dir", str(tmp_path), "--class_names", "t-shirt", "dress",
                     "--prompts", "an image of a t-shirt", "an image of a dress", "--images_per_class", "2",
                     "--num_inference_steps", "2", "--image_mode", "L", "--device", "cpu"])
    images = sorted((tmp_path / synthesis.IMAGES_SUBDIR).rglob("*.png"))
    assert len(images) == 4
    assert {Image.open(path).mode for path in images} == {"L"}
    assert "| image_mode | L |" in (tmp_path / "README.md").read_text()  # the dataset card states it


def test_an_unknown_image_mode_is_refused_before_anything_is_loaded(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synthesize.parse_args(["--output_dir", str(tmp_path), "--image_mode", "CMYK"])
    assert "--image_mode" in capsys.readouterr().err
    assert not tmp_path.joinpath(synthesis.IMAGES_SUBDIR).exists()
