"""A reader of TensorFlow's checkpoint format (the tensor bundle), without TensorFlow.

A checkpoint `PREFIX` is `PREFIX.index` and `PREFIX.data-0000i-of-0000n`. The index is a LevelDB table
(sorted key -> value blocks, a block index and a 48-byte footer); the key "" holds a BundleHeaderProto and
every other key is a tensor name whose value is a BundleEntryProto: dtype, shape, shard, offset, size and
the masked CRC-32C of the tensor's bytes, which lie raw (little-endian, row-major) in the data shard.
What is read is checked: block checksums, the footer's magic number, entry sizes against dtype x shape,
and every tensor's CRC-32C, so a truncated or damaged download stops with a message naming the tensor.

Only what SimCLR's checkpoints need is supported: numeric dtypes, one or more shards, no partitioned
(sliced) variables, no string tensors; the protobuf messages are decoded by hand (their fields are
varints, fixed32 and nested messages), so neither TensorFlow nor protobuf classes are required.
"""

from __future__ import annotations

import os
import struct

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5  # compression type byte + masked crc32c
_NO_COMPRESSION, _SNAPPY = 0, 1

# tensorflow/core/framework/types.proto DataType -> numpy dtype (little-endian).
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
          10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
_DT_STRING = 7


class BundleError(ValueError):
    """A file that is not a readable TensorFlow checkpoint; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------- CRC-32C

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected


def _crc_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _crc_table()


def _crc32c_small(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = int(table[(crc ^ byte) & 0xFF]) ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, matrix[n]) for n in range(32)]


def _zeros_operator(length: int) -> list[int]:
    """The linear map crc -> crc of (data + `length` zero bytes), as zlib's crc32_combine builds it."""
    odd = [_CRC32C_POLY] + [1 << n for n in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    result = None  # identity
    while length:
        even = _gf2_square(odd)  # first pass: one zero byte
        if length & 1:
            result = even if result is None else [_gf2_times(even, col) for col in result]
        length >>= 1
        if not length:
            break
        odd = _gf2_square(even)
        if length & 1:
            result = odd if result is None else [_gf2_times(odd, col) for col in result]
        length >>= 1
    return result if result is not None else [1 << n for n in range(32)]


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object. Long inputs are cut into equal chunks whose CRCs run side by side
    in numpy (one table lookup per byte and chunk) and are joined with zlib's crc32_combine algorithm."""
    view = np.frombuffer(memoryview(data), np.uint8)
    n = view.size
    if n < 1 << 16:
        return _crc32c_small(view.tobytes())
    chunks = min(1 << 15, max(256, n >> 12))
    length = n // chunks
    rows = np.ascontiguousarray(view[: length * chunks].reshape(chunks, length).T)  # [length, chunks]
    crc = np.full(chunks, 0xFFFFFFFF, np.uint32)
    eight = np.uint32(8)
    for row in rows:
        crc = _TABLE[(crc ^ row) & 0xFF] ^ (crc >> eight)
    crc ^= np.uint32(0xFFFFFFFF)
    shift = _zeros_operator(length)
    total = int(crc[0])
    for value in crc[1:].tolist():
        total = _gf2_times(shift, total) ^ value
    return _crc32c_small(view[length * chunks:].tobytes(), total)


def unmask(masked: int) -> int:
    """LevelDB/TensorFlow store CRCs masked (rotated right by 15 bits plus a constant)."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------- decoding


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise IndexError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 64 bits")


def _fields(message: bytes):
    """(field number, wire type, value) of a protobuf message: ints for varint/fixed, bytes otherwise."""
    pos = 0
    while pos < len(message):
        key, pos = _varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(message, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", message, pos)[0], pos + 8
        elif wire == 2:
            size, pos = _varint(message, pos)
            value, pos = message[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack_from("<I", message, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _entry(value: bytes) -> dict:
    """BundleEntryProto -> {dtype, shape, shard_id, offset, size, crc32c, sliced}."""
    entry = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0, "crc32c": None, "sliced": False}
    for number, _, field in _fields(value):
        if number == 1:
            entry["dtype"] = field
        elif number == 2:  # TensorShapeProto: repeated Dim dim = 2 {int64 size = 1}
            for dim_number, _, dim in _fields(field):
                if dim_number == 2:
                    size = next((v for n, _, v in _fields(dim) if n == 1), 0)
                    entry["shape"].append(size - (1 << 64) if size >= 1 << 63 else size)
        elif number in (3, 4, 5):
            entry[{3: "shard_id", 4: "offset", 5: "size"}[number]] = field
        elif number == 6:
            entry["crc32c"] = field
        elif number == 7:
            entry["sliced"] = True
    return entry


def _snappy_decompress(data: bytes) -> bytes:
    """Raw snappy (what LevelDB tables compress blocks with)."""
    size, pos = _varint(data, 0)
    out = bytearray()
    while pos < len(data):
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(data[pos:pos + extra], "little")
                pos += extra
            length += 1
            out += data[pos:pos + length]
            pos += length
            continue
        if kind == 1:
            length = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | data[pos]
            pos += 1
        elif kind == 2:
            length, offset = (tag >> 2) + 1, int.from_bytes(data[pos:pos + 2], "little")
            pos += 2
        else:
            length, offset = (tag >> 2) + 1, int.from_bytes(data[pos:pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise ValueError("bad snappy back-reference")
        for _ in range(length):  # copies may overlap their own output
            out.append(out[-offset])
    if len(out) != size:
        raise ValueError(f"snappy block decoded to {len(out)} bytes, header says {size}")
    return bytes(out)


# ------------------------------------------------------------------------------------------- reader


class CheckpointReader:
    """Tensors of a TensorFlow checkpoint: `names()`, `shape(name)`, `dtype(name)`, `tensor(name)`.

    `prefix` is the checkpoint path without its suffixes (`model.ckpt-225206`); a path to the `.index`
    file or to a folder with one checkpoint (a `checkpoint` state file or a single `*.index`) works too.
    """

    def __init__(self, prefix: str):
        self.prefix = resolve_prefix(prefix)
        self._where = os.path.basename(self.prefix)
        with open(self.prefix + ".index", "rb") as f:
            index = f.read()
        self._entries, header = self._read_table(index)
        self._num_shards = 1
        for number, _, value in _fields(header):
            if number == 1:
                self._num_shards = value
            elif number == 2 and value != 0:
                raise BundleError(f"{self._where}: big-endian checkpoint, not supported")

    # -- the index table
    def _fail(self, problem: str):
        raise BundleError(f"{self._where}.index: {problem} (not a TensorFlow checkpoint index, or damaged)")

    def _block(self, table: bytes, offset: int, size: int) -> bytes:
        end = offset + size
        if end + BLOCK_TRAILER_SIZE > len(table):
            self._fail(f"block at byte {offset} runs past the end of the file")
        data, kind = table[offset:end], table[end]
        stored = struct.unpack_from("<I", table, end + 1)[0]
        if unmask(stored) != _crc32c_small(table[offset:end + 1]):
            self._fail(f"checksum mismatch in the block at byte {offset}")
        if kind == _SNAPPY:
            try:
                return _snappy_decompress(data)
            except (ValueError, IndexError) as error:
                self._fail(f"bad snappy block at byte {offset}: {error}")
        if kind != _NO_COMPRESSION:
            self._fail(f"unknown block compression {kind}")
        return data

    def _block_entries(self, block: bytes):
        if len(block) < 4:
            self._fail("block too short")
        num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
        limit = len(block) - 4 * (num_restarts + 1)
        if limit < 0:
            self._fail("bad restart array")
        pos, key = 0, b""
        while pos < limit:
            shared, pos = _varint(block, pos)
            unshared, pos = _varint(block, pos)
            value_size, pos = _varint(block, pos)
            key = key[:shared] + block[pos:pos + unshared]
            pos += unshared
            yield key, block[pos:pos + value_size]
            pos += value_size

    def _read_table(self, table: bytes) -> tuple[dict, bytes]:
        if len(table) < FOOTER_SIZE:
            self._fail(f"{len(table)} bytes, shorter than a table footer")
        footer = table[-FOOTER_SIZE:]
        if struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)[0] != TABLE_MAGIC:
            self._fail("no table magic number at the end")
        try:
            _, pos = _varint(footer, 0)  # metaindex handle (unused)
            _, pos = _varint(footer, pos)
            index_offset, pos = _varint(footer, pos)
            index_size, pos = _varint(footer, pos)
            entries, header = {}, None
            for _, handle in self._block_entries(self._block(table, index_offset, index_size)):
                offset, p = _varint(handle, 0)
                size, _ = _varint(handle, p)
                for key, value in self._block_entries(self._block(table, offset, size)):
                    if key == b"":
                        header = value
                    else:
                        entries[key.decode("utf-8", "replace")] = value
        except (IndexError, ValueError, struct.error) as error:
            self._fail(str(error))
        if header is None:
            self._fail("no bundle header")
        return entries, header

    # -- tensors
    def names(self) -> list[str]:
        return sorted(self._entries)

    def _entry(self, name: str) -> dict:
        if name not in self._entries:
            raise BundleError(f"{self._where}: no tensor {name!r}")
        try:
            return _entry(self._entries[name])
        except (IndexError, ValueError, struct.error) as error:
            raise BundleError(f"{self._where}: tensor {name!r} has an unreadable index entry ({error})") from None

    def entry(self, name: str) -> dict:
        """Where and what tensor `name` is: dtype (TensorFlow's code), shape, shard_id, offset, size, crc32c."""
        return dict(self._entry(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str):
        code = self._entry(name)["dtype"]
        return DTYPES.get(code)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as a numpy array, after checking its size and CRC-32C."""
        entry = self._entry(name)
        if entry["sliced"]:
            raise BundleError(f"{self._where}: tensor {name!r} is a partitioned variable (not supported)")
        if entry["dtype"] == _DT_STRING or entry["dtype"] not in DTYPES:
            raise BundleError(f"{self._where}: tensor {name!r} has dtype code {entry['dtype']} (not numeric)")
        dtype = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<")
        count = int(np.prod(entry["shape"], dtype=np.int64)) if entry["shape"] else 1
        if count * dtype.itemsize != entry["size"]:
            raise BundleError(f"{self._where}: tensor {name!r} has {entry['size']} bytes, its dtype and shape "
                              f"{tuple(entry['shape'])} need {count * dtype.itemsize}")
        shard = f"{self.prefix}.data-{entry['shard_id']:05d}-of-{self._num_shards:05d}"
        try:
            with open(shard, "rb") as f:
                f.seek(entry["offset"])
                raw = f.read(entry["size"])
        except FileNotFoundError:
            raise BundleError(f"{self._where}: data shard {os.path.basename(shard)} is missing") from None
        if len(raw) != entry["size"]:
            raise BundleError(f"{self._where}: data shard {os.path.basename(shard)} ends inside tensor {name!r} "
                              "(truncated download?)")
        if entry["crc32c"] is not None and unmask(entry["crc32c"]) != crc32c(raw):
            raise BundleError(f"{self._where}: tensor {name!r} fails its CRC-32C check (damaged data shard)")
        return np.frombuffer(raw, dtype).reshape(entry["shape"]).astype(dtype.newbyteorder("="))


def resolve_prefix(path: str) -> str:
    """The checkpoint prefix for a prefix, a `.index` / `.data-*` file, or a folder holding one checkpoint."""
    path = os.fspath(path)
    if path.endswith(".index"):
        path = path[: -len(".index")]
    elif ".data-" in os.path.basename(path):
        path = path[: path.rindex(".data-")]
    if os.path.isdir(path):
        state = os.path.join(path, "checkpoint")
        if os.path.isfile(state):  # model_checkpoint_path: "model.ckpt-225206"
            with open(state) as f:
                for line in f:
                    if line.startswith("model_checkpoint_path:"):
                        name = line.split(":", 1)[1].strip().strip('"')
                        return resolve_prefix(name if os.path.isabs(name) else os.path.join(path, name))
        indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
        if len(indexes) != 1:
            raise BundleError(f"{os.path.basename(path) or path}: a folder with {len(indexes)} checkpoint .index "
                              "files and no 'checkpoint' state file; give the checkpoint prefix")
        return os.path.join(path, indexes[0][: -len(".index")])
    if not os.path.isfile(path + ".index"):
        raise BundleError(f"{os.path.basename(path) or path}: no checkpoint index {os.path.basename(path)}.index")
    return path
