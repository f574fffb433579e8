"""The ConvNeXt encoder (DINOv3's convnets) trains with every pretraining method through the one train loop
(no BatchNorm: like the ViT it has no batch statistics), and its export reloads for evaluation. Output
equality with transformers' DINOv3ConvNextModel is tested in test_convert.py."""

import jax
import numpy as np
import pytest
from helpers import set_fields, shrink_to_tiny

from medssl_jax import checkpoint, config_lib, models, train
from medssl_jax.data import phantoms
from medssl_jax.models import convnext

TINY = {"size": "", "depths": (1, 1, 1, 1), "dims": (8, 8, 16, 16), "in_chans": 1}


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("phantoms")
    phantoms.ensure_phantom_store(str(cache), num_patients=64, image_size=32, seed=0)
    return str(cache)


# The three method modules: micle runs methods/simclr.py (SimCLR's code with patient-grouped pairs), hybrid
# runs methods/swav.py (SwAV's code plus the NT-Xent term), dino methods/dino.py; simclr and swav alone
# would add compile time, not code paths.
@pytest.mark.parametrize("method", ["micle", "hybrid", "dino"])
def test_every_method_trains_a_convnext_and_exports_it(phantom_cache, tmp_path, method):
    choice = "variant=convnext_tiny" if method == "micle" else "encoder=convnext_tiny"
    c = config_lib.load_config(method, f"runlocal,{choice}")
    assert (c.model.name, c.model.size, c.model.in_chans) == ("convnext", "tiny", 1)
    assert min([c.data.image_size] + [c[g].local_image_size for g in ("swav", "dino") if g in c]) >= 32
    c = shrink_to_tiny(c, phantom_cache)
    c.model = models.model_config("convnext", **TINY)  # ConvNeXt-T's 28M parameters would be most of the time
    c.data.image_size = 32  # the ConvNeXt's total stride: every crop is at least 32 px
    for group in ("swav", "dino"):
        if group in c:
            c[group].update(local_image_size=32, num_local_crops=1)
    if method == "dino":
        set_fields(c, {"dino.num_prototypes": 16, "dino.hidden_dim": 16, "dino.bottleneck_dim": 8})
    if method in ("swav", "hybrid"):
        set_fields(c, {"swav.num_prototypes": 10, "swav.queue_length": 0})
    c.total_steps, c.log_every, c.probe.enabled = 2, 1, False
    result = train.pretrain(c, str(tmp_path / method))
    assert result.steps_done == 2 and result.export_dir
    variables, config = checkpoint.load_export(result.export_dir)
    assert config["model"]["name"] == "convnext" and "batch_stats" not in variables
    init = models.build_encoder({**c.model.to_dict(), "dtype": "float32"}).init(
        jax.random.PRNGKey(c.seed), np.zeros((1, 32, 32, 1), np.float32))
    assert jax.tree.structure(init["params"]) == jax.tree.structure(variables["params"])
    features, _ = models.build_encoder({**config["model"], "dtype": "float32"}).apply(
        variables, np.random.default_rng(0).uniform(size=(2, 40, 40, 1)).astype(np.float32))
    assert features.shape == (2, 16) and np.all(np.isfinite(features))


def test_convnext_sizes_and_bad_configs_fail_in_one_line():
    assert convnext.SIZES["base"] == {"depths": (3, 3, 27, 3), "dims": (128, 256, 512, 1024)}
    tiny = models.build_encoder({"name": "convnext", "size": "tiny", "dtype": "float32"})
    shapes = jax.eval_shape(lambda: tiny.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 27_820_128  # DINOv3 ConvNeXt-T
    for config, arg in (("simclr", "variant=convnext_base"), ("swav", "encoder=convnext_small")):
        assert config_lib.load_config(config, arg).model.size == arg.split("_")[1]
    with pytest.raises(ValueError, match="convnext_huge"):
        config_lib.load_config("swav", "encoder=convnext_huge")
    for fields, message in (({"size": "huge"}, "size='huge'"), ({"size": "", "depths": (1, 1)}, "four stages")):
        with pytest.raises(ValueError, match=message):
            models.build_encoder({"name": "convnext", "dtype": "float32", **fields}).init(
                jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="smaller than its total stride 32"):
        tiny.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
