"""SimCLR's TensorFlow checkpoints without TensorFlow: the tensor-bundle reader and `--format=simclr-tf`.

tests/data/simclr_tf/ holds the .index that TensorFlow 2.21 (tf.compat.v1.train.Saver) wrote for
google-research/simclr's own TF1 ResNet-50 1x, built by tests/data/make_simclr_tf_fixture.py with every
variable set to `fixture_value(name, ...)`, and the features TF computed for a fixed batch. The data shard
(100 MB) is rebuilt here from fixture_value at the offsets the index records; the index's CRC-32C of every
tensor then proves the bytes are the ones TensorFlow wrote, and the converted encoder must give TF's
features.
"""
import os
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from medssl_jax import checkpoint, models
from medssl_jax import convert as convert_cli
from medssl_jax.models import convert, tf_bundle

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
sys.path.insert(0, DATA)
from make_simclr_tf_fixture import fixture_images, fixture_value  # noqa: E402

FIXTURE = os.path.join(DATA, "simclr_tf")
PREFIX_NAME = "model.ckpt-123"


@pytest.fixture(scope="module")
def simclr_checkpoint(tmp_path_factory):
    """The fixture checkpoint with its data shard rebuilt: a prefix as SimCLR's buckets hold it."""
    directory = tmp_path_factory.mktemp("simclr_r50_1x")
    prefix = str(directory / PREFIX_NAME)
    shutil.copy(os.path.join(FIXTURE, PREFIX_NAME + ".index"), prefix + ".index")
    reader = tf_bundle.CheckpointReader(prefix)
    entries = {name: reader.entry(name) for name in reader.names()}
    data = bytearray(max(e["offset"] + e["size"] for e in entries.values()))
    for name, e in entries.items():
        value = fixture_value(name, e["shape"], tf_bundle.DTYPES[e["dtype"]])
        data[e["offset"]:e["offset"] + e["size"]] = value.astype(value.dtype.newbyteorder("<")).tobytes()
    with open(prefix + ".data-00000-of-00001", "wb") as f:
        f.write(data)
    return prefix


def test_crc32c_matches_the_standard_check_value_and_the_chunked_path():
    assert tf_bundle.crc32c(b"123456789") == 0xE3069283  # CRC-32C (Castagnoli) check value
    data = np.random.default_rng(0).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    assert tf_bundle.crc32c(data) == tf_bundle._crc32c_small(data)  # numpy chunks + combine == byte loop


def test_reader_gives_tensorflows_tensors(simclr_checkpoint):
    reader = tf_bundle.CheckpointReader(os.path.dirname(simclr_checkpoint))  # a folder works too
    names = reader.names()
    assert "base_model/conv2d/kernel" in names and "global_step" in names and len(names) == 268
    kernel = reader.tensor("base_model/conv2d/kernel")  # its CRC-32C (TensorFlow's) was checked
    assert kernel.shape == (7, 7, 3, 64) and kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, fixture_value("base_model/conv2d/kernel", (7, 7, 3, 64), np.float32))
    assert reader.tensor("global_step").dtype == np.int64


def test_simclr_tf_resnet50_converts_and_gives_tensorflows_features(simclr_checkpoint, tmp_path):
    out = tmp_path / "export"
    assert convert_cli.main(["--format=simclr-tf", f"--input={simclr_checkpoint}", f"--output={out}"]) == 0
    variables, config = checkpoint.load_export(out)
    model_fields = {k: config["model"][k] for k in ("name", "depth", "width", "base_width", "stem_pool")}
    assert model_fields == {"name": "resnet", "depth": 50, "width": 1, "base_width": 64, "stem_pool": "same"}
    assert config["input"]["normalization"]["mean"] == []  # SimCLR feeds RGB in [0, 1] as it is
    model = models.build_encoder({**config["model"], "dtype": "float32"})
    features, _ = model.apply(variables, jnp.asarray(fixture_images()), train=False)
    want = np.load(os.path.join(FIXTURE, "expected.npz"))["features"]
    assert np.max(np.abs(np.asarray(features) - want)) / np.max(np.abs(want)) < 1e-5


def test_damage_is_named(simclr_checkpoint, tmp_path):
    prefix = str(tmp_path / PREFIX_NAME)
    shutil.copy(simclr_checkpoint + ".index", prefix + ".index")
    shutil.copy(simclr_checkpoint + ".data-00000-of-00001", prefix + ".data-00000-of-00001")
    reader = tf_bundle.CheckpointReader(prefix)
    where = reader.entry("base_model/conv2d_5/kernel")
    with open(prefix + ".data-00000-of-00001", "r+b") as f:  # one flipped byte inside that tensor
        f.seek(where["offset"] + 17)
        byte = f.read(1)
        f.seek(where["offset"] + 17)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(convert.ConvertError, match=r"'base_model/conv2d_5/kernel' fails its CRC-32C check"):
        convert.convert("simclr-tf", prefix)
    with open(prefix + ".data-00000-of-00001", "r+b") as f:  # a download cut short
        f.truncate(1000)
    with pytest.raises(convert.ConvertError, match="ends inside tensor"):
        convert.convert("simclr-tf", prefix)
    index = bytearray(open(prefix + ".index", "rb").read())
    index[100] ^= 0xFF
    open(prefix + ".index", "wb").write(bytes(index))
    with pytest.raises(convert.ConvertError, match="checksum mismatch"):
        convert.convert("simclr-tf", prefix)
    with pytest.raises(convert.ConvertError, match="no checkpoint index"):
        convert.convert("simclr-tf", str(tmp_path / "model.ckpt-999"))
