"""FSDP (config.sharding_rules over a mesh with an 'fsdp' axis) on 8 fake CPU devices: the same jitted
step as data parallel, equal to it within float tolerance, with about 1/8 of the per-device state memory
(XLA's memory analysis of the compiled step), resuming from its sharded checkpoints, and exports/inits
that move between layouts."""

import jax
import numpy as np
import pytest

from helpers import final_state
from medssl_jax import checkpoint, sharding, train
from medssl_jax import monitor as monitor_lib
from test_dino import NO_BLUR, phantom_cache, tiny_config  # noqa: F401 (phantom_cache: the fixture)

FSDP = {"mesh": (("data", -1), ("fsdp", 8)), "sharding_rules": ((".*", "fsdp"),)}


def _config(cache, **fields):
    config = tiny_config(cache, total_steps=3, checkpoint_every=1, **NO_BLUR)
    # The online monitor at steps 0 and 3 (the FSDP run evaluates step 0, is interrupted, resumes, evaluates 3).
    config.monitor.update(every=3, random_reference=False)
    config.update(fields)
    return config


def _state_bytes_per_device(run) -> int:
    """Bytes of the train state's arguments on one device, from XLA's memory analysis of the compiled step
    minus this device's shard of the batch."""
    batch = {k: jax.ShapeDtypeStruct((run.batch_size, *v.shape[1:]), v.dtype, sharding=sharding.data_sharding(run.mesh))
             for k, v in run.example.items()}
    stats = run.train_step.lower(run.abstract_state, batch).compile().memory_analysis()
    batch_bytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in batch.values()) // run.mesh.devices.size
    return stats.argument_size_in_bytes - batch_bytes


@pytest.fixture(scope="module")
def runs(phantom_cache, tmp_path_factory):
    """Workdirs of 3 data-parallel steps and of the same 3 steps under FSDP, interrupted after 2 and resumed
    from the sharded checkpoint."""
    root = tmp_path_factory.mktemp("fsdp")
    dp, fsdp = str(root / "dp"), str(root / "fsdp")
    assert train.pretrain(_config(phantom_cache), dp).steps_done == 3
    assert train.pretrain(_config(phantom_cache, **FSDP), fsdp, stop_after=2).steps_done == 2
    assert train.pretrain(_config(phantom_cache, **FSDP), fsdp).steps_done == 3
    return dp, fsdp


def test_fsdp_trains_like_data_parallel(runs):
    (step_dp, dp), (step_fsdp, fsdp) = final_state(runs[0]), final_state(runs[1])
    assert step_dp == step_fsdp == 3
    flat_dp = dict(jax.tree_util.tree_flatten_with_path(dp)[0])
    flat_fsdp = dict(jax.tree_util.tree_flatten_with_path(fsdp)[0])
    assert flat_dp.keys() == flat_fsdp.keys()
    # The same math with the reductions split differently (gradient reduce-scatter instead of all-reduce):
    # float32 rounding differs in the last bits, and Adam's m / sqrt(v) passes that on at the lr's scale.
    for key, value in flat_dp.items():
        np.testing.assert_allclose(np.asarray(flat_fsdp[key]), np.asarray(value), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(key))
    # The exports (DINO's teacher backbone) agree too, gathered from the shards into host arrays.
    exported_dp, _ = checkpoint.load_export(f"{runs[0]}/export")
    exported_fsdp, _ = checkpoint.load_export(f"{runs[1]}/export")
    for a, b in zip(jax.tree.leaves(exported_dp), jax.tree.leaves(exported_fsdp)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_the_online_monitor_under_fsdp_equals_data_parallel(runs):
    # Embeddings of the sharded encoder (and DINO's bottleneck projections) over the mesh, gathered: the same
    # values as the replicated run's at every evaluation, written once across the interruption.
    dp, fsdp = (monitor_lib.read_curves(workdir) for workdir in runs)
    assert sorted(dp) == sorted(fsdp) and "monitor/knn_auc" in dp and "monitor/alignment" in dp
    for key, curve in dp.items():
        assert [s for s, _ in fsdp[key]] == [s for s, _ in curve] == [0, 3], key
        np.testing.assert_allclose([v for _, v in fsdp[key]], [v for _, v in curve], rtol=1e-3, atol=1e-4,
                                   err_msg=key)


def test_fsdp_shards_parameters_and_optimiser_state_to_about_an_eighth(phantom_cache):
    replicated, fsdp = train.setup(_config(phantom_cache)), train.setup(_config(phantom_cache, **FSDP))
    leaves = jax.tree_util.tree_flatten_with_path(fsdp.abstract_state)[0]
    qkv = [(sharding.leaf_path(p), x.sharding.spec) for p, x in leaves if "attn/qkv/kernel" in sharding.leaf_path(p)]
    # Student, its two Adam moments and the DINO teacher: every copy of the kernel is split over 'fsdp'.
    assert len(qkv) == 4 and all("fsdp" in spec for _, spec in qkv), qkv
    ratio = _state_bytes_per_device(fsdp) / _state_bytes_per_device(replicated)
    # 1/8 for every leaf with a dimension 8 divides; the few that have none (step counters, scalars) stay
    # whole on every device.
    assert 0.12 < ratio < 0.16, ratio


def test_exports_initialise_a_run_in_any_layout(runs, phantom_cache):
    """A data-parallel run's export initialises an FSDP run (restored into the sharded layout), and the
    FSDP run's export one that replicates."""
    for source, target in ((runs[0], FSDP), (runs[1], {})):
        config = _config(phantom_cache, init=f"{source}/export", **target)
        run = train.setup(config)
        state = run.fresh_state()
        state = train._init_encoder_from(state, config.init, run)
        exported, _ = checkpoint.load_export(config.init)
        for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(state["params"]["encoder"])[0],
                                     jax.tree.leaves(exported["params"])):
            np.testing.assert_array_equal(np.asarray(got), want)
            expected = jax.tree_util.tree_flatten_with_path(run.abstract_state["params"]["encoder"])[0]
            assert got.sharding == dict(expected)[path].sharding


def test_bad_sharding_rules_fail_in_one_line(phantom_cache):
    with pytest.raises(ValueError, match=r"match no parameter"):
        train.setup(_config(phantom_cache, mesh=FSDP["mesh"], sharding_rules=(("encodr/", "fsdp"),)))
    with pytest.raises(ValueError, match=r"no 'fsdp' axis"):
        train.setup(_config(phantom_cache, sharding_rules=((".*", "fsdp"),)))
    with pytest.raises(ValueError, match=r"not a regex"):
        train.setup(_config(phantom_cache, mesh=FSDP["mesh"], sharding_rules=(("(", "fsdp"),)))
    with pytest.raises(ValueError, match=r"does not fit"):
        train.setup(_config(phantom_cache, mesh=FSDP["mesh"],
                            sharding_rules=(("attn/qkv/kernel", ("fsdp", None, None)),)))


def test_vit_l14_and_g14_recipes_shard_their_state_over_8_devices():
    """configs/dino.py:variant=vit_l14 / g/14: FSDP over the 8 devices; the state of the real ViT-L/14 and
    ViT-g/14 (student + AdamW moments + teacher, abstract: nothing is allocated) takes about 1/8 per
    device."""
    import optax

    from medssl_jax import config_lib
    from medssl_jax.methods import dino

    for variant, params_m in (("vit_l14", 304), ("g/14", 1137)):
        config = config_lib.load_config("dino", f"variant={variant}")
        assert config.mesh == (("data", -1), ("fsdp", 8)) and config.sharding_rules == ((".*", "fsdp"),)
        model = dino.build(config)
        crops = (jax.ShapeDtypeStruct((2, 2, 224, 224, 1), np.float32),)
        params = jax.eval_shape(lambda c: model.init({"params": jax.random.PRNGKey(0)}, c, train=False), crops)["params"]
        count = sum(x.size for x in jax.tree.leaves(params["encoder"]))
        assert abs(count / 1e6 - params_m) < 0.01 * params_m, count
        state = {"params": params, "opt_state": jax.eval_shape(optax.adamw(1e-3).init, params), "teacher": params}
        mesh = sharding.make_mesh(config.mesh)
        shardings = sharding.state_shardings(state, mesh, config.sharding_rules)
        whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
        per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                         for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
        assert per_device < whole / 8 * 1.01, (variant, per_device / whole)


def test_fine_tuning_under_fsdp_matches_the_replicated_run(phantom_cache, tmp_path):
    """The dinov2 fine-tune arms' path (evaluate/finetune.py) with `fsdp=8`'s mesh and rules: the same
    selected setting and test predictions as replicated, to float rounding."""
    from medssl_jax import main
    from test_finetune import TINY_VIT, ft_config

    summaries = []
    for name, fields in (("replicated", {}), ("fsdp", FSDP)):
        config = ft_config(phantom_cache, "random", budget_grid=(4,), model=dict(TINY_VIT), **fields)
        config.optim.name, config.optim.lr_scaling = "adamw", "none"
        config.lr_grid = (1e-3, 3e-3)
        summaries.append(main.run(config, str(tmp_path / name)))
    replicated, fsdp = summaries
    assert fsdp["extra"]["setting"]["name"] == replicated["extra"]["setting"]["name"]
    assert fsdp["mean_auc"] == pytest.approx(replicated["mean_auc"], abs=1e-3)
