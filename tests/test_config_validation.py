"""Configs that make no sense are refused in one line naming the field, before any data or device work."""

import os
import subprocess
import sys

import pytest

from helpers import tiny_pretrain_config
from medssl_jax import main
from medssl_jax.data import phantoms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("phantoms"))
    phantoms.ensure_phantom_store(path, num_patients=64, image_size=32, seed=0)
    return path


@pytest.mark.parametrize("field, value, message", [
    ("checkpoint_every", 0, "config.checkpoint_every=0: must be > 0"),
    ("log_every", 0, "config.log_every=0: must be > 0"),
    ("optim.base_lr", -0.1, "config.optim.base_lr=-0.1: must be > 0"),
    ("optim.base_lr", 0.0, "config.optim.base_lr=0.0: must be > 0"),
    ("total_steps", -5, "config.total_steps=-5: must be >= 1"),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0: must be > 0"),
    ("batch_size", 0, "config.batch_size=0: must be > 0"),
    ("data.image_size", 256, "config.data.image_size=256 is larger than the images of store"),
    ("probe.image_size", 100, "config.probe.image_size=100 is larger than the images of store"),
    ("loss.scale", "sum", "config.loss.scale='sum': is not 'paper' or 'official'"),
])
def test_nonsense_value_is_refused_before_training(cache, tmp_path, field, value, message):
    config = tiny_pretrain_config(cache, **{field: value})
    with pytest.raises(ValueError) as error:
        main.run(config, str(tmp_path / "w"))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # nothing was trained


def cli(*args):
    return subprocess.run([sys.executable, "-m", "medssl_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_a_typo_is_blamed_on_the_flag_that_has_it_and_a_bad_config_argument_is_one_line(tmp_path):
    out = cli("--config=configs/micle.py:runlocal", f"--workdir={tmp_path}", "--config.checkpoint_every=10",
              "--config.batch_sizee=3")
    assert out.returncode == 1 and out.stderr.startswith("error: unknown config field in --config.batch_sizee:")
    out = cli("--config=configs/micle.py:runlocal,foo=1", f"--workdir={tmp_path}")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "config argument 'foo' is not one of" in out.stderr and "Traceback" not in out.stderr


def test_durations_in_epochs_become_steps_and_nonsense_is_one_line():
    from medssl_jax import config_lib
    from medssl_jax.methods import swav

    config = config_lib.pretrain_config()
    config.method = "swav"
    swav.extend_config(config)
    config.update(total_steps=-1, total_epochs=2.0, batch_size=10)
    config.swav.queue_start_epochs = 0.5
    resolved = config_lib.resolve_durations(config, epoch_size=95, batch_size=10)
    # ceil(epochs * 95 / 10): 2 epochs = 19 steps, warm-up 10 epochs = 95, queue 0.5 epoch = 5, freeze 1 = 10
    assert (resolved.total_steps, resolved.optim.warmup_steps) == (19, 95)
    assert (resolved.swav.queue_start_steps, resolved.swav.freeze_prototypes_steps) == (5, 10)
    config.swav.queue_start_steps = 3  # a step count wins over the epochs
    assert config_lib.resolve_durations(config, epoch_size=95, batch_size=10).swav.queue_start_steps == 3
    for value, epochs in ((-2, 1.0), (-1, -1.0)):
        config.swav.queue_start_steps, config.swav.queue_start_epochs = value, epochs
        with pytest.raises(ValueError) as error:
            config_lib.resolve_durations(config, epoch_size=95, batch_size=10)
        assert str(error.value).startswith(f"config.swav.queue_start_steps={value}: give a step count >= 0")


@pytest.mark.parametrize("arg", [None, "method=simclr,variant=r50x4", "runlocal"])
def test_dermatology_recipe_is_simclrs_augmentation_with_blur(arg):
    from medssl_jax import config_lib

    config = config_lib.load_config("derm", arg)
    config_lib.check_known_keys(config, main.reference_config(config))
    a = config.augment
    # Azizi et al. 2021: colour strength 1.0 with p 0.8, grayscale 0.2, blur p 0.5 (the CXR recipe has none).
    assert (a.brightness, a.contrast, a.saturation, a.hue, a.color_p, a.grayscale_p, a.blur_p) == (
        0.8, 0.8, 0.8, 0.2, 0.8, 0.2, 0.5)
    assert config.method == ("simclr" if arg and "simclr" in arg else "micle")
    if arg is None:
        assert config.data.crop_scale == (0.08, 1.0) and config.batch_size == 512 and config.total_steps == 150_000
    with pytest.raises(ValueError, match="method='byol' is not one of"):
        config_lib.load_config("derm", "method=byol")
