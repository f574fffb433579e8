"""Command line: convert a downloaded checkpoint into a medssl_jax export directory.

    python -m medssl_jax.convert --format=dinov2 --input=dinov2_vitb14_pretrain.pth --output=inits/dinov2_b14
    python -m medssl_jax.convert --format=hf-dinov2 --input=DIR_WITH_model.safetensors --output=inits/hf_b14
    python -m medssl_jax.convert --format=dinov3 --input=dinov3_vitb16_pretrain_lvd1689m.pth --output=inits/dinov3_b16
    python -m medssl_jax.convert --format=hf-dinov3 --input=DIR_WITH_model.safetensors --output=inits/hf3_b16
    python -m medssl_jax.convert --format=timm-npz \
        --input=B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz --output=inits/in21k_b16
    python -m medssl_jax.convert --format=torchvision-resnet --input=resnet50-11ad3fa6.pth --output=inits/tv_r50
    python -m medssl_jax.convert --format=timm --input=vit_small.safetensors --output=inits/timm_s16
    python -m medssl_jax.convert --format=simclr-tf --input=r50_1x_sk0 --output=inits/simclr_imagenet_r50
        # a google-research/simclr TF1 checkpoint: its folder (with the `checkpoint` file), prefix or .index

The output directory (config.json + variables/, medssl_jax.checkpoint's export layout) can be given to any
pretraining or evaluation config as `--config.init=DIR`. Formats and what is checked:
medssl_jax.models.convert. Loading never unpickles code (torch.load(weights_only=True), safetensors,
np.load(allow_pickle=False), a TensorFlow checkpoint reader without TensorFlow).
"""

from __future__ import annotations

import argparse
import os
import sys

from medssl_jax import checkpoint
from medssl_jax.models import convert as convert_lib
from medssl_jax.models import interpolate


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m medssl_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=convert_lib.FORMATS)
    parser.add_argument("--input", required=True, help="checkpoint file (hf-dinov2: the model directory; simclr-tf: "
                        "the checkpoint prefix, its .index file or its folder)")
    parser.add_argument("--output", required=True, help="export directory to write")
    parser.add_argument("--variant", help="check against this architecture, e.g. B/14 (default: inferred)")
    parser.add_argument("--num_heads", type=int, help="heads, for widths the released models do not use")
    parser.add_argument("--pos_interp", choices=interpolate.POS_INTERP_MODES,
                        help="pos-embed interpolation semantics (default: the source's own)")
    parser.add_argument("--in_chans", type=int, choices=(1, 3),
                        help="1: sum the first layer over RGB for grey inputs (default: keep the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.path.exists(os.path.join(args.output, "config.json")) and not args.overwrite:
        print(f"convert: error: {args.output} already holds an export (pass --overwrite to replace it)",
              file=sys.stderr)
        return 2
    arch = {"variant": args.variant} if args.variant else None
    try:
        variables, config = convert_lib.convert(args.format, args.input, arch=arch, num_heads=args.num_heads,
                                                pos_interp=args.pos_interp, in_chans=args.in_chans)
        checkpoint.save_export(args.output, variables, config)
    except (convert_lib.ConvertError, checkpoint.CheckpointError) as error:
        print(f"convert: error: {error}", file=sys.stderr)
        return 2
    model = config["model"]
    desc = ", ".join(f"{k}={model[k]}" for k in ("name", "variant", "depth", "image_size", "num_registers",
                                                  "pos_interp") if k in model)
    norm = config["input"]["normalization"]
    print(f"wrote {args.output}: {desc}; {convert_lib.num_parameters(variables):,} parameters "
          f"from {config['source']['file']}; input normalisation mean {norm['mean']} std {norm['std']} "
          f"({norm['from']}; probe and fine-tune apply it unless --config.input_normalization=none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
