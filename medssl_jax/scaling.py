"""A paper model of data-parallel scaling: per-step communication, its predicted share of the step time
on 8, 64 and 256 chips, and the largest NT-Xent batch whose logits fit on a device.

  python -m medssl_jax.scaling            # the Markdown tables of BENCHMARKS.md, "Scaling"

What is measured here and what is assumed:
- parameters: counted from this codebase's encoders (jax.eval_shape, nothing allocated);
- NT-Xent memory: XLA's memory analysis of the compiled loss + gradient on this machine's devices (rows
  of the logits stay sharded over the batch; bytes per logit entry measured, not assumed);
- training FLOPs per view: 6 x the published multiply-accumulates of a 224 px forward pass (ResNet-50
  4.1 G, ViT-B/16 17.6 G, ViT-L/14 77.8 G: torchvision / timm model cards), run at an assumed 40 % MFU;
- links: published per-chip bandwidths (LINKS). A ring all-reduce moves 2 (n - 1) / n of the gradient
  per device; across H100 nodes it is hierarchical (NVLink inside the node, each GPU's own 400 Gb/s NIC
  for its 1/8 of the gradient between nodes). No overlap of communication with the backward pass is
  assumed, so the shares are upper bounds (XLA overlaps asynchronous collectives with compute).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medssl_jax import losses, models, sharding

# Published per-chip figures, bytes/s in ONE direction (bidirectional figures halved), and bf16 dense peak.
LINKS = {
    # NVIDIA H100 SXM datasheet: NVLink 900 GB/s bidirectional, 989 TFLOP/s bf16 dense; DGX H100: one
    # ConnectX-7 400 Gb/s InfiniBand NIC per GPU, 8 GPUs per node.
    "H100 (NVLink + 400G IB)": {"intra": 450e9, "inter": 50e9, "node": 8, "peak": 989e12},
    # Cloud TPU v5p docs: 1200 GB/s bidirectional ICI per chip, 3D torus (one slice up to 6144 chips).
    "TPU v5p (ICI)": {"intra": 600e9, "inter": 600e9, "node": 1 << 30, "peak": 459e12},
}
TRAIN_FLOPS_PER_VIEW = {"ResNet-50": 6 * 4.1e9, "ViT-B/16": 6 * 17.6e9, "ViT-L/14": 6 * 77.8e9}
ENCODERS = {
    "ResNet-50": models.model_config("resnet", depth=50, width=1),
    "ViT-B/16": models.model_config("vit", variant="B/16", image_size=224, in_chans=1),
    "ViT-L/14": models.model_config("vit", variant="L/14", image_size=224, in_chans=1),
}
MFU = 0.4
CHIPS = (8, 64, 256)
GLOBAL_VIEWS = 8192  # SimCLR's batch of 4096 images x 2 views, fixed as the chip count grows
PROJECTION_DIM = 128


def parameter_count(model_config) -> int:
    encoder = models.build_encoder(model_config.to_dict())
    image = jax.ShapeDtypeStruct((1, 224, 224, 1), jnp.float32)
    variables = jax.eval_shape(lambda x: encoder.init(jax.random.PRNGKey(0), x, train=False), image)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def allreduce_seconds(nbytes: float, chips: int, link: dict) -> float:
    """Ring all-reduce; hierarchical across nodes (intra-node reduce-scatter/all-gather, then each chip's
    1/node share over its own network link)."""
    inside = min(chips, link["node"])
    t = 2 * (inside - 1) / inside * nbytes / link["intra"]
    nodes = chips // inside
    if nodes > 1:
        t += 2 * (nodes - 1) / nodes * (nbytes / inside) / link["inter"]
    return t


def ntxent_bytes_per_logit(views: int = 8192) -> float:
    """Per-device temporary bytes of NT-Xent's value and gradient per entry of the [views, views] logits
    times the device count, measured from the compiled loss on this machine's devices."""
    mesh = sharding.make_mesh()
    devices = mesh.devices.size
    z = jax.ShapeDtypeStruct((views // 2, PROJECTION_DIM), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    loss = jax.value_and_grad(lambda a, b: losses.ntxent(z1=a, z2=b, temperature=0.1), argnums=(0, 1))
    stats = jax.jit(loss).lower(z, z).compile().memory_analysis()
    return stats.temp_size_in_bytes * devices / views**2


def communication_table() -> str:
    rows = ["| encoder | params | fp32 gradient | chips | link | compute ms/step | all-reduce ms | NT-Xent gather ms "
            "| communication share |", "|---|---|---|---|---|---|---|---|---|"]
    for name, model_config in ENCODERS.items():
        params = parameter_count(model_config)
        grad_bytes = 4 * params
        for chips in CHIPS:
            for link_name, link in LINKS.items():
                compute = GLOBAL_VIEWS / chips * TRAIN_FLOPS_PER_VIEW[name] / (MFU * link["peak"])
                reduce = allreduce_seconds(grad_bytes, chips, link)
                # Forward all-gather of the projections and the backward reduce-scatter of their gradient.
                gathered = 2 * (chips - 1) / chips * GLOBAL_VIEWS * PROJECTION_DIM * 4
                slowest = link["intra"] if chips <= link["node"] else link["inter"]
                gather = gathered / slowest
                share = (reduce + gather) / (compute + reduce + gather)
                rows.append(f"| {name} | {params / 1e6:.1f} M | {grad_bytes / 1e6:.0f} MB | {chips} | {link_name} | "
                            f"{compute * 1e3:.1f} | {reduce * 1e3:.2f} | {gather * 1e3:.3f} | {share:.1%} |")
    return "\n".join(rows)


def ntxent_table(bytes_per_logit: float, free_bytes=(16e9, 40e9, 80e9), devices=(1, 8, 64)) -> str:
    rows = ["| free memory per device | devices | largest global batch (views) |", "|---|---|---|"]
    for free in free_bytes:
        for d in devices:
            views = int(np.sqrt(free * d / bytes_per_logit))
            rows.append(f"| {free / 1e9:.0f} GB | {d} | {views:,} |")
    return "\n".join(rows)


def main() -> None:
    per_logit = ntxent_bytes_per_logit()
    print(communication_table())
    print()
    print(f"NT-Xent value + gradient: {per_logit:.2f} bytes per logit entry per device x devices "
          f"(measured on {jax.device_count()} {jax.devices()[0].platform} device(s))")
    print()
    print(ntxent_table(per_logit))


if __name__ == "__main__":
    main()
