"""Shared test helpers: tiny configs on a tiny phantom store (8 fake CPU devices, see conftest.py)."""

from medssl_jax import config_lib


def set_fields(config, overrides: dict):
    """config with dotted-path fields set, e.g. {"data.image_size": 24}."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def shrink_to_tiny(c, cache_dir):
    """A :runlocal pretraining config cut to test size: a 4-wide ResNet-18 on 24 px crops of a 64-patient,
    32 px phantom store, 6 steps of 16, checkpoints at 3 and 6, no online monitor."""
    c.data.cache_dir = cache_dir
    c.data.phantom_patients = 64
    c.data.phantom_size = 32
    c.data.image_size = 24
    c.model.depth, c.model.base_width = 18, 4
    if "head" in c:  # SimCLR's and SwAV's projection head (DINO's head is config.dino's)
        c.head.hidden_dim = 16
        c.head.out_dim = 8
    c.batch_size = 16
    c.total_steps = 6
    c.optim.warmup_steps = 2
    c.checkpoint_every = 3
    c.monitor.every = 0  # the online monitor has its own tests (test_monitor.py)
    return c


def tiny_pretrain_config(cache_dir, method="micle", **overrides):
    """A MICLe/SimCLR run at test size (shrink_to_tiny) with a quick end-of-pretraining probe."""
    c = shrink_to_tiny(config_lib.load_config(method, "runlocal"), cache_dir)
    c.log_every = 2
    c.probe.image_size = 24
    c.probe.batch_size = 32
    c.probe.c_grid = (0.1, 1.0)
    return set_fields(c, overrides)


# The random-init encoder of the evaluation tests (a 4-wide ResNet-18).
TINY_RESNET = {"name": "resnet", "depth": 18, "width": 1, "base_width": 4}


def tiny_eval_config(reference, cache_dir, init, **overrides):
    """An evaluation config (`reference`: linear_probe or finetune's reference_config()) on the 64-patient,
    32 px phantom store in cache_dir, 24 px images, TINY_RESNET for init='random'; dotted-path overrides."""
    c = reference
    c.init = init
    c.model = dict(TINY_RESNET)
    c.data.cache_dir = cache_dir
    c.data.phantom_patients = 64
    c.data.phantom_size = 32
    c.image_size = 24
    return set_fields(c, overrides)


def digital_xray_dataset():
    """An empty pydicom Dataset of a Digital X-Ray image (explicit VR little endian, new UIDs) to fill in."""
    from medssl_jax.data.dicom import new_image_dataset

    return new_image_dataset("1.2.840.10008.5.1.4.1.1.1.1")


def final_state(workdir):
    """(step, train state as host arrays) of the newest checkpoint in WORKDIR/checkpoints."""
    import os

    import orbax.checkpoint as ocp

    from medssl_jax import checkpoint

    ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, "checkpoints"))
    step = ckpt.latest_step()
    ckpt.close()
    with ocp.StandardCheckpointer() as c:
        return step, c.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
