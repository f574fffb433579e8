"""Writes tests/data/simclr_tf/: a SimCLR TensorFlow checkpoint's index and the features TF computes.

Run once, with TensorFlow installed and a checkout of google-research/simclr (its TF1 `resnet.py`, the code
that wrote the published SimCLR v1/v2 checkpoints):

    python tests/data/make_simclr_tf_fixture.py --simclr=PATH_TO_SIMCLR_CHECKOUT --out=tests/data/simclr_tf

It builds SimCLR's ResNet-50 (1x, no selective kernels) under the `base_model` scope as `model.py` does,
with every variable set to `fixture_value(name, shape, dtype)` (a numpy function of the name, so the test
can rebuild the data shard without TensorFlow), plus a supervised head, a Momentum slot and the global
step as in a real checkpoint; saves it with tf.train.Saver; and records TF's inference features
(is_training=False: BatchNorm on the moving statistics) of a fixed batch. Only the .index (a few KB) is
kept: tests/test_convert.py rewrites the 94 MB data shard from fixture_value, the index's CRC-32Cs prove
the bytes are TensorFlow's, and the converted encoder must reproduce the features.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zlib

import numpy as np

DEPTH, WIDTH, SIZE = 50, 1, 64


def fixture_value(name: str, shape, dtype) -> np.ndarray:
    """The value the fixture gives variable `name` (also used by the test to rebuild the data shard)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shape = tuple(int(s) for s in shape)
    leaf = name.rsplit("/", 1)[-1]
    if np.dtype(dtype).kind in "iu":
        return np.full(shape, 123, dtype)
    if leaf == "kernel" and len(shape) == 4:  # conv HWIO: He-scaled, so activations stay O(1)
        fan_in = shape[0] * shape[1] * shape[2]
        value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif leaf == "gamma":
        value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif leaf == "moving_variance":
        value = 0.5 + rng.random(shape)
    else:  # beta, moving_mean, dense kernels/biases, optimizer slots
        value = 0.1 * rng.standard_normal(shape)
    return value.astype(dtype)


def fixture_images() -> np.ndarray:
    return np.random.default_rng(7).random((2, SIZE, SIZE, 3)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--simclr", required=True, help="checkout of google-research/simclr (TF1 resnet.py)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.simclr))

    from absl import flags
    import tensorflow.compat.v1 as tf

    tf.disable_v2_behavior()
    # The flags run.py defines and resnet.py reads.
    flags.DEFINE_float("batch_norm_decay", 0.9, "")
    flags.DEFINE_boolean("global_bn", True, "")
    flags.DEFINE_float("se_ratio", 0.0, "")
    flags.DEFINE_float("sk_ratio", 0.0, "")
    flags.DEFINE_string("train_mode", "pretrain", "")
    flags.DEFINE_integer("fine_tune_after_block", -1, "")
    flags.FLAGS.mark_as_parsed()
    import resnet  # google-research/simclr/resnet.py

    graph = tf.Graph()
    with graph.as_default():
        images = tf.placeholder(tf.float32, (None, SIZE, SIZE, 3))
        with tf.variable_scope("base_model"):
            features = resnet.resnet_v1(resnet_depth=DEPTH, width_multiplier=WIDTH)(images, is_training=False)
        # What else a SimCLR checkpoint holds: the supervised head, optimizer slots, the step counter.
        with tf.variable_scope("head_supervised/linear_layer/dense"):
            tf.get_variable("kernel", (2048 * WIDTH, 1000))
        tf.get_variable("base_model/conv2d/kernel/Momentum", (7, 7, 3, 64 * WIDTH))
        step = tf.train.get_or_create_global_step()
        assigns = [v.assign(fixture_value(v.op.name, v.shape, v.dtype.as_numpy_dtype)) for v in tf.global_variables()]
        saver = tf.train.Saver()
        with tf.Session() as session:
            session.run(assigns)
            expected = session.run(features, {images: fixture_images()})
            tmp = tempfile.mkdtemp()
            prefix = saver.save(session, os.path.join(tmp, "model.ckpt"), global_step=int(session.run(step)))
    os.makedirs(args.out, exist_ok=True)
    index = os.path.basename(prefix) + ".index"
    shutil.copy(os.path.join(tmp, index), os.path.join(args.out, index))
    np.savez_compressed(os.path.join(args.out, "expected.npz"), features=expected, depth=DEPTH, width=WIDTH,
                        tf_version=tf.__version__)
    shutil.rmtree(tmp)
    print(f"wrote {args.out}/{index} and expected.npz (features {expected.shape}, TF {tf.__version__})")


if __name__ == "__main__":
    main()
