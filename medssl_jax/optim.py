"""Optimisers and learning-rate schedules, in steps.

`make_optimizer(cfg, total_steps=..., batch_size=...)` returns an optax transformation and the schedule.

LARS is `optax.lars`, which is the ordering of google-research/simclr's `LARSOptimizer` with its default
`classic_momentum=True`: weight decay is added to the gradient (g + wd*w), the trust ratio
eta*||w||/||g + wd*w|| (1 where either norm is 0) is taken of that sum, the learning rate is applied and
only then does momentum accumulate (v = m*v + lr*ratio*g; w -= v). BYOL's LARS applies the learning rate
after momentum instead; the two differ whenever the learning rate changes (warm-up, decay).
tests/test_optim.py checks one-to-one agreement with a NumPy port of the SimCLR update.

LARC is SwAV's optimiser (`apex.parallel.LARC` around `torch.optim.SGD`, main_swav.py), and differs from
SimCLR's LARS in four ways: it adapts EVERY parameter (BatchNorm and biases included, and weight decay
applies to all of them too); its ratio eta*||w|| / (||g|| + wd*||w|| + 1e-8) puts the decay in the
denominator instead of taking the norm of g + wd*w; with `larc_clip` the ratio is divided by the current
learning rate and clipped at 1 (apex `clip=True`; SwAV runs `clip=False`); and PyTorch's SGD applies the
learning rate after momentum (v = m*v + ratio*(g + wd*w); w -= lr*v). A parameter or gradient of norm 0
passes unchanged, without decay, as in apex.

Which parameters get weight decay and LARS adaptation (`param_labels`, a rule on the parameter path,
the equivalent of SimCLR's exclusion list ['batch_normalization', 'bias']): a parameter is 'no_decay'
if its own name is 'bias', or if any module on its path is a normalisation layer, i.e. its name starts
with 'bn' or contains 'norm' (case-insensitive: our `bn*` BatchNorms, Flax's auto-named 'BatchNorm_0'/
'LayerNorm_0', ViT 'norm1'/'encoder_norm'); everything else is 'decay'. The same mask is used for AdamW
and SGD weight decay.

Weight decay is constant, or (`weight_decay_end` >= 0) follows a cosine from `weight_decay` at step 0
to `weight_decay_end` at `total_steps`, as DINO's `wd_schedule` (0.04 -> 0.4); the decay is then a
schedule inside the optimiser (optax counts its own updates), so the optimiser state gains a counter.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medssl_jax import sharding

DECAY = "decay"
NO_DECAY = "no_decay"

LR_SCALINGS = ("linear", "sqrt", "none")
SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("lars", "larc", "adamw", "sgd")


def default_config(name: str = "lars") -> ml_collections.ConfigDict:
    """Every field `make_optimizer` reads, with SimCLR's pretraining defaults (adamw/sgd fields unused by lars)."""
    return ml_collections.ConfigDict({
        "name": name,
        "base_lr": 0.3,  # per 256 images with 'linear' scaling (SimCLR v1 flag default)
        "lr_scaling": "linear",
        "warmup_steps": 0,
        "schedule": "cosine",
        "end_lr_factor": 0.0,  # cosine decays to base_lr * scale * end_lr_factor
        "weight_decay": 1e-6,
        "weight_decay_end": -1.0,  # >= 0: cosine from weight_decay to this at total_steps (DINO); -1: constant
        "momentum": 0.9,  # lars and sgd
        "nesterov": False,  # sgd (SimCLR fine-tuning uses Nesterov momentum)
        "eta": 1e-3,  # LARS/LARC trust coefficient
        "larc_clip": False,  # larc: apex's clip=True (ratio / lr, at most 1); SwAV uses False
        "b1": 0.9,  # adamw
        "b2": 0.999,
        "eps": 1e-8,
    })


def add_encoder_update_fields(cfg: ml_collections.ConfigDict) -> None:
    """The pretraining optimiser's encoder update factors (`scale_encoder_updates`), neutral by default:
    DINOv2's layer-wise lr decay and patch-embedding lr multiplier for ViTs, and a frozen encoder for the
    first updates. Not in `default_config`, which fine-tuning shares (it has its own grid for these)."""
    cfg.layer_decay = 1.0
    cfg.patch_embed_lr_mult = 1.0
    cfg.frozen_encoder_steps = 0


def _is_decayed(path) -> bool:
    *modules, leaf = sharding.path_names(path)
    if leaf == "bias":
        return False
    return not any(m.lower().startswith("bn") or "norm" in m.lower() for m in modules)


def param_labels(params: Any) -> Any:
    """Tree like `params` with 'decay' or 'no_decay' per leaf (the rule is in the module docstring)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: DECAY if _is_decayed(path) else NO_DECAY, params)


def decay_mask(params: Any) -> Any:
    """Boolean tree: True where weight decay and LARS adaptation apply."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_decayed(path), params)


def _field(cfg, name: str):
    if name not in cfg:
        raise ValueError(f"optimizer config has no field {name!r} (see medssl_jax.optim.default_config)")
    return cfg[name]


def _choice(cfg, name: str, allowed: tuple[str, ...]) -> str:
    value = _field(cfg, name)
    if value not in allowed:
        raise ValueError(f"optimizer config {name}={value!r} is not one of {list(allowed)}")
    return value


def scaled_lr(cfg, batch_size: int) -> float:
    """Peak learning rate: SimCLR's 'linear' base_lr*B/256, 'sqrt' base_lr*sqrt(B) (SimCLR v2), or base_lr."""
    scaling = _choice(cfg, "lr_scaling", LR_SCALINGS)
    base_lr = float(_field(cfg, "base_lr"))
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    return base_lr


def make_schedule(cfg, *, total_steps: int, batch_size: int) -> Callable[[Any], Any]:
    """Linear warm-up from 0 over `warmup_steps`, then cosine to end_lr_factor*peak at `total_steps`, or constant."""
    kind = _choice(cfg, "schedule", SCHEDULES)
    warmup_steps = int(_field(cfg, "warmup_steps"))
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be at least 1")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"optimizer config warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    peak = scaled_lr(cfg, batch_size)
    if kind == "cosine":
        end_value = peak * float(cfg.get("end_lr_factor", 0.0))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1),  # optax needs a non-empty cosine part
            end_value=end_value)
    if warmup_steps == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)], [warmup_steps])


def make_weight_decay(cfg, *, total_steps: int):
    """The weight decay: a float, or a schedule `wd(step)` when `weight_decay_end` >= 0 (see the docstring)."""
    start = float(_field(cfg, "weight_decay"))
    end = float(cfg.get("weight_decay_end", -1.0))
    if end < 0:
        return start
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be at least 1")

    def schedule(step):
        progress = jnp.minimum(jnp.asarray(step, jnp.float32) / total_steps, 1.0)
        return end + 0.5 * (start - end) * (1.0 + jnp.cos(jnp.pi * progress))

    return schedule


class LarcState(NamedTuple):
    count: jax.Array  # updates applied so far (the step at which the clip reads the learning rate)


def scale_by_larc(*, trust_coefficient: float, weight_decay, clip: bool = False,
                  learning_rate: Callable | None = None, eps: float = 1e-8) -> optax.GradientTransformation:
    """apex's LARC step before SGD: g <- ratio * (g + wd*w) per parameter (see the module docstring).

    `weight_decay` is a float or a schedule of the step; `learning_rate` (a schedule) is needed only by
    `clip`. Followed by momentum and the learning rate, this is SwAV's update (`make_optimizer('larc')`).
    """
    if clip and learning_rate is None:
        raise ValueError("scale_by_larc(clip=True) needs the learning_rate schedule")

    def init(params):
        del params
        return LarcState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_larc needs the parameters (tx.update(grads, state, params))")
        wd = weight_decay(state.count) if callable(weight_decay) else weight_decay

        def one(g, w):
            w_norm, g_norm = jnp.linalg.norm(w), jnp.linalg.norm(g)
            ratio = trust_coefficient * w_norm / (g_norm + w_norm * wd + eps)
            if clip:
                ratio = jnp.minimum(ratio / learning_rate(state.count), 1.0)
            adapted = ratio * (g + wd * w)
            return jnp.where((w_norm > 0) & (g_norm > 0), adapted, g).astype(g.dtype)

        return jax.tree.map(one, updates, params), LarcState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg, *, total_steps: int, batch_size: int) -> tuple[optax.GradientTransformation, Callable]:
    """The optimiser named by `cfg.name` ('lars', 'larc', 'adamw', 'sgd') driven by `make_schedule`.

    Returns (tx, schedule): `schedule(step)` is the learning rate used at update number `step` (0-based),
    for logging.
    """
    name = _choice(cfg, "name", OPTIMIZERS)
    schedule = make_schedule(cfg, total_steps=total_steps, batch_size=batch_size)
    weight_decay = make_weight_decay(cfg, total_steps=total_steps)
    if name == "lars":
        tx = optax.lars(
            schedule,
            weight_decay=weight_decay,
            weight_decay_mask=decay_mask,
            trust_coefficient=float(_field(cfg, "eta")),
            eps=0.0,
            trust_ratio_mask=decay_mask,
            momentum=float(_field(cfg, "momentum")),
        )
    elif name == "larc":
        tx = optax.chain(
            scale_by_larc(trust_coefficient=float(_field(cfg, "eta")), weight_decay=weight_decay,
                          clip=bool(cfg.get("larc_clip", False)), learning_rate=schedule),
            optax.trace(decay=float(_field(cfg, "momentum"))),
            optax.scale_by_learning_rate(schedule),
        )
    elif name == "adamw":
        tx = optax.adamw(
            schedule, b1=float(_field(cfg, "b1")), b2=float(_field(cfg, "b2")), eps=float(_field(cfg, "eps")),
            weight_decay=weight_decay, mask=decay_mask)
    else:
        momentum = float(_field(cfg, "momentum"))
        tx = optax.chain(
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.sgd(schedule, momentum=momentum or None, nesterov=bool(cfg.get("nesterov", False))),
        )
    layer_decay = float(cfg.get("layer_decay", 1.0))
    patch_embed_mult = float(cfg.get("patch_embed_lr_mult", 1.0))
    frozen = int(cfg.get("frozen_encoder_steps", 0))
    if not 0 < layer_decay <= 1:
        raise ValueError(f"optim.layer_decay={layer_decay}: must be in (0, 1] (1 = no layer-wise decay)")
    if patch_embed_mult <= 0:
        raise ValueError(f"optim.patch_embed_lr_mult={patch_embed_mult}: must be > 0")
    if not 0 <= frozen < total_steps:
        raise ValueError(f"optim.frozen_encoder_steps={frozen}: must be >= 0 and below the run's {total_steps} steps")
    if (layer_decay, patch_embed_mult, frozen) != (1.0, 1.0, 0):
        tx = optax.chain(tx, scale_encoder_updates(layer_decay=layer_decay, patch_embed_mult=patch_embed_mult,
                                                   frozen_steps=frozen))
    return tx, schedule


class FrozenCountState(NamedTuple):
    count: jax.Array  # updates seen so far


def scale_encoder_updates(*, layer_decay: float = 1.0, patch_embed_mult: float = 1.0, frozen_steps: int = 0,
                          encoder_key: str = "encoder") -> optax.GradientTransformation:
    """Multiplies the final update of every encoder parameter by DINOv2's pretraining lr factors: layer-wise
    decay (`lr_multipliers`: layer_decay ** (L + 1 - layer id) for a ViT of L blocks) times
    `patch_embed_mult` for the patch embedding; and by 0 for the first `frozen_steps` updates. Placed after
    the whole optimiser, so weight decay is frozen too, while the optimiser's moments of the encoder keep
    accumulating its real gradients: the encoder starts moving with warm statistics (continued pretraining
    trains fresh heads on a frozen backbone first; configs/dino.py). Constant factors after a linear
    momentum/lr stage are exactly per-parameter learning rates."""

    def factors(updates):
        base = lr_multipliers(updates, layer_decay=layer_decay, encoder_key=encoder_key)
        return jax.tree_util.tree_map_with_path(
            lambda path, f: f * (patch_embed_mult if "patch_embed" in sharding.path_names(path) else 1.0), base)

    def init(params):
        del params
        return FrozenCountState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        frozen = state.count < frozen_steps

        def one(path, u, f):
            if encoder_key not in sharding.path_names(path):
                return u
            return jnp.where(frozen, jnp.zeros_like(u), u * jnp.asarray(f, u.dtype))

        updates = jax.tree_util.tree_map_with_path(one, updates, factors(updates))
        return updates, FrozenCountState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------ fine-tuning
# A transfer study trains one model many times (a learning-rate grid, budgets, seeds, label fractions). The
# peak lr, warm-up, budget and per-parameter lr factors live in the optimiser STATE, not in the compiled
# step, so every run of a study shares one compiled program (XLA's persistent cache serves it to each new
# run) instead of compiling once per grid point.

FINETUNE_OPTIMIZERS = ("sgd", "adamw")


def warmup_cosine(step, *, peak, warmup, total, end_factor=0.0):
    """optax.warmup_cosine_decay_schedule(0, peak, warmup, total, peak * end_factor) with array arguments:
    linear warm-up from 0 over `warmup` steps, then cosine to peak * end_factor at `total`."""
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.asarray(warmup, jnp.float32)
    total = jnp.asarray(total, jnp.float32)
    ramp = peak * step / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    decay = peak * (end_factor + (1.0 - end_factor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return jnp.where(step < warmup, ramp, decay)


class RuntimeScheduleState(NamedTuple):
    count: jax.Array
    peak_lr: jax.Array
    warmup_steps: jax.Array
    total_steps: jax.Array
    end_factor: jax.Array
    multipliers: Any  # per-parameter lr factor (lower backbone lr, layer-wise decay); 1 = the peak lr


def _check_schedule(*, warmup_steps: int, total_steps: int) -> None:
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"fine-tuning schedule: total_steps={total_steps} must be >= 1 and warmup_steps="
                         f"{warmup_steps} in [0, total_steps]")


def scale_by_runtime_schedule(*, peak_lr: float, warmup_steps: int, total_steps: int, end_factor: float = 0.0,
                              multiplier_fn: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """updates * warmup_cosine(count) * multiplier of the parameter (`multiplier_fn(params)`, a tree of
    factors, e.g. `lr_multipliers`), every value held in the state."""
    _check_schedule(warmup_steps=warmup_steps, total_steps=total_steps)

    def init(params):
        factors = multiplier_fn(params) if multiplier_fn else jax.tree.map(lambda _: 1.0, params)
        return RuntimeScheduleState(
            count=jnp.zeros((), jnp.int32), peak_lr=jnp.asarray(peak_lr, jnp.float32),
            warmup_steps=jnp.asarray(warmup_steps, jnp.float32), total_steps=jnp.asarray(total_steps, jnp.float32),
            end_factor=jnp.asarray(end_factor, jnp.float32),
            multipliers=jax.tree.map(lambda f: jnp.asarray(f, jnp.float32), factors))

    def update(updates, state, params=None):
        del params
        lr = runtime_lr(state)
        updates = jax.tree.map(lambda u, m: (u * (lr * m)).astype(u.dtype), updates, state.multipliers)
        return updates, state._replace(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def runtime_lr(state: RuntimeScheduleState):
    """The peak-relative learning rate the next update uses (multiplier 1)."""
    return warmup_cosine(state.count, peak=state.peak_lr, warmup=state.warmup_steps, total=state.total_steps,
                         end_factor=state.end_factor)


def find_runtime_schedule(opt_state) -> RuntimeScheduleState | None:
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, RuntimeScheduleState)):
        if isinstance(node, RuntimeScheduleState):
            return node
    return None


def make_finetune_optimizer(cfg, *, peak_lr: float, warmup_steps: int, total_steps: int,
                            multiplier_fn: Callable[[Any], Any] | None = None):
    """SGD (Nesterov) or AdamW at unit lr, then `scale_by_runtime_schedule`. Both apply the learning rate
    last (after momentum / Adam and weight decay), so a per-parameter factor on the update is exactly a
    per-parameter learning rate, as PyTorch parameter groups give it; `lr_of` reads the lr from the state."""
    _choice(cfg, "name", FINETUNE_OPTIMIZERS)
    if float(cfg.get("weight_decay_end", -1.0)) >= 0:
        raise ValueError("fine-tuning: optim.weight_decay_end must be -1 (a constant weight decay)")
    unit = ml_collections.ConfigDict(cfg.to_dict())
    unit.update(base_lr=1.0, lr_scaling="none", schedule="constant", warmup_steps=0)
    base, _ = make_optimizer(unit, total_steps=max(total_steps, 1), batch_size=256)
    return optax.chain(base, scale_by_runtime_schedule(peak_lr=peak_lr, warmup_steps=warmup_steps,
                                                       total_steps=total_steps, multiplier_fn=multiplier_fn,
                                                       end_factor=float(cfg.get("end_lr_factor", 0.0))))


def lr_of(opt_state, schedule: Callable | None, step):
    """The learning rate of update `step` (for logging): from the state's runtime schedule if it has one."""
    runtime = find_runtime_schedule(opt_state)
    if runtime is not None:
        return runtime_lr(runtime)
    return schedule(step)


def vit_layer_id(path, num_blocks: int) -> int:
    """BEiT/MAE layer id of a ViT encoder parameter: embeddings (patch, cls, positions, registers) 0,
    block_i i + 1, everything after the blocks (final norm) num_blocks + 1."""
    for name in sharding.path_names(path):
        if name.startswith("block_") and name[len("block_"):].isdigit():
            return int(name[len("block_"):]) + 1
        if name in ("patch_embed", "cls_token", "pos_embed", "register_tokens", "mask_token"):
            return 0
    return num_blocks + 1


def decay_depths(params, *, encoder_key: str = "encoder") -> Any:
    """Per parameter (a tree like `params`): -1 outside `encoder_key` (the head); for an encoder parameter
    its layer-wise decay exponent, L + 1 - layer id in a ViT encoder of L blocks, 0 in a ResNet."""
    blocks = {name for path, _ in jax.tree_util.tree_leaves_with_path(params) for name in sharding.path_names(path)
              if name.startswith("block_") and name[len("block_"):].isdigit()}
    num_blocks = len(blocks)

    def depth(path, _):
        if encoder_key not in sharding.path_names(path):
            return -1
        return 0 if num_blocks == 0 else num_blocks + 1 - vit_layer_id(path, num_blocks)

    return jax.tree_util.tree_map_with_path(depth, params)


def lr_multipliers(params, *, backbone_mult: float = 1.0, layer_decay: float = 1.0,
                   encoder_key: str = "encoder") -> Any:
    """Per-parameter lr factors (a tree like `params`) of an encoder + head model: the head (anything outside
    `encoder_key`) 1; encoder parameters backbone_mult, times layer_decay ** (L + 1 - layer id) when the
    encoder is a ViT of L blocks (MAE/BEiT layer-wise decay: the last block gets layer_decay, the patch
    embedding layer_decay ** (L + 1)); layer_decay 1 (or a ResNet) leaves the encoder at backbone_mult."""
    return jax.tree.map(lambda depth: 1.0 if depth < 0 else _encoder_factor(backbone_mult, layer_decay, depth),
                        decay_depths(params, encoder_key=encoder_key))


def _encoder_factor(backbone_mult: float, layer_decay: float, depth: int) -> float:
    return float(backbone_mult) * float(layer_decay) ** depth


# Deeper than any ViT's decay exponent (L + 1 for L blocks).
MAX_DECAY_DEPTH = 256


def runtime_schedule_inputs(*, peak_lr: float, warmup_steps: int, total_steps: int, end_factor: float = 0.0,
                            backbone_mult: float = 1.0, layer_decay: float = 1.0) -> dict:
    """One fine-tuning run's schedule as arrays, for `with_runtime_schedule`: the values
    `scale_by_runtime_schedule` holds in its state, and the encoder's lr factor at every decay depth
    (backbone_mult * layer_decay ** depth, computed as `lr_multipliers` computes it)."""
    _check_schedule(warmup_steps=warmup_steps, total_steps=total_steps)
    factors = [_encoder_factor(backbone_mult, layer_decay, depth) for depth in range(MAX_DECAY_DEPTH)]
    return {"peak_lr": np.float32(peak_lr), "warmup_steps": np.float32(warmup_steps),
            "total_steps": np.float32(total_steps), "end_factor": np.float32(end_factor),
            "encoder_factors": np.asarray(factors, np.float32)}


def with_runtime_schedule(opt_state, params, inputs: dict):
    """`opt_state` with its RuntimeScheduleState's values taken from `inputs` (`runtime_schedule_inputs`).
    Under jit the values are arguments, not constants, so every lr, budget and lr factor of a transfer
    study compiles to one init program (the step already reads them from the state)."""
    depths = decay_depths(params)
    deepest = max(jax.tree.leaves(depths), default=-1)
    if deepest >= MAX_DECAY_DEPTH:
        raise ValueError(f"layer-wise decay depth {deepest} exceeds optim.MAX_DECAY_DEPTH={MAX_DECAY_DEPTH}")
    factors = inputs["encoder_factors"]
    multipliers = jax.tree.map(lambda depth: jnp.ones((), jnp.float32) if depth < 0 else factors[depth], depths)

    def fill(node):
        if not isinstance(node, RuntimeScheduleState):
            return node
        return node._replace(peak_lr=inputs["peak_lr"], warmup_steps=inputs["warmup_steps"],
                             total_steps=inputs["total_steps"], end_factor=inputs["end_factor"],
                             multipliers=multipliers)

    return jax.tree.map(fill, opt_state, is_leaf=lambda x: isinstance(x, RuntimeScheduleState))
