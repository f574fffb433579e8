"""Grain's per-epoch shuffle, element for element, computed one whole epoch at a time.

`grain.MapDataset.shuffle()` maps position i of epoch e to `index_shuffle(i, max_index=n-1, seed=seed+e)`: a
4-round Simon block cipher over at least 16 bits, walked along its cycle until the value is below n
(cycle walking). Below 2**16 elements every call walks about 65536 / n cipher steps, so each element costs
~25 ms / n: 4 ms for the 6 images of a 1 % label fraction, 60 us for 546 (measured, grain 0.2.18, 2 CPU
cores). A fine-tuning run on a few dozen images spent most of its step time shuffling.

`EpochShuffle` gives exactly grain's order (the same permutation of every epoch, the same default seed
derivation, so every stream and every result measured with `.shuffle()` stays identical) by enciphering
the whole block domain once per epoch with NumPy and resolving every cycle walk at once by pointer
doubling: about 3 ms per epoch below 2**16 elements, where the walks are long; larger epochs walk all
their elements at once (a few steps each).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import grain
import numpy as np

MIN_BLOCK_BITS = 16  # grain's kMinBlockSize
MAX_TABLE_BITS = 20  # larger domains walk element by element (their walks are short)
_U32 = 0xFFFFFFFF


def _seed_seq_words(seed: int, count: int) -> list[int]:
    """`std::seed_seq{seed}.generate()` of `count` 32-bit words (C++ [rand.util.seedseq]): grain's round keys."""
    n, s = count, 1
    words = [0x8B8B8B8B] * n
    t = 11 if n >= 623 else 7 if n >= 68 else 5 if n >= 39 else 3 if n >= 7 else (n - 1) // 2
    p = (n - t) // 2
    q = p + t
    m = max(s + 1, n)

    def mix(x):
        return x ^ (x >> 27)

    for k in range(m):
        r1 = (1664525 * mix(words[k % n] ^ words[(k + p) % n] ^ words[(k - 1) % n])) & _U32
        r2 = (r1 + (s if k == 0 else (k % n + seed) if k <= s else k % n)) & _U32
        words[(k + p) % n] = (words[(k + p) % n] + r1) & _U32
        words[(k + q) % n] = (words[(k + q) % n] + r2) & _U32
        words[k % n] = r2
    for k in range(m, m + n):
        r3 = (1566083941 * mix((words[k % n] + words[(k + p) % n] + words[(k - 1) % n]) & _U32)) & _U32
        r4 = (r3 - k % n) & _U32
        words[(k + p) % n] ^= r3
        words[(k + q) % n] ^= r4
        words[k % n] = r4
    return words


def block_bits(max_index: int) -> int:
    """The cipher's block size in bits: enough for `max_index`, made even, at least 16.

    Grain takes ceil(log2(max_index)), which is one bit short when max_index is a power of two: with 4**k + 1
    elements (k >= 8: 65537, 262145, ...) its block cannot hold the last index, so one element is never drawn
    and another is drawn twice in every epoch. The bit length is grain's size everywhere else.
    """
    bits = int(max_index).bit_length()
    return max(bits + bits % 2, MIN_BLOCK_BITS)


def simon_encrypt(values: np.ndarray, *, bits: int, seed: int, rounds: int = 4) -> np.ndarray:
    """Grain's Simon-style cipher of block size `bits` (<= 32) applied to every value (uint32 array)."""
    if not MIN_BLOCK_BITS <= bits <= 32 or bits % 2:
        raise ValueError(f"simon_encrypt: bits={bits} must be even and in [{MIN_BLOCK_BITS}, 32]")
    word = bits // 2
    mask = np.uint32((1 << word) - 1)
    dtype = np.uint32

    def rotl(x, r):
        return ((x << dtype(r)) | (x >> dtype(word - r))) & mask

    def f(x):
        return (rotl(x, 1) & rotl(x, 8)) ^ rotl(x, 2)

    keys = [dtype(k) & mask for k in _seed_seq_words(seed, rounds)]
    values = values.astype(dtype)
    left, right = (values >> dtype(word)) & mask, values & mask
    for i in range(0, rounds, 2):
        left ^= f(right)
        left ^= keys[i]
        right ^= f(left)
        right ^= keys[i + 1]
    return (left << dtype(word)) | right


def epoch_permutation(length: int, seed: int, rounds: int = 4, *, table_bits: int = MAX_TABLE_BITS) -> np.ndarray:
    """[index_shuffle(i, max_index=length-1, seed=seed, rounds=rounds) for i in range(length)] (int64), grain's
    shuffle of one epoch (a permutation also where grain's is not, see `block_bits`)."""
    if length <= 0:
        raise ValueError(f"epoch_permutation: length={length} must be >= 1")
    if rounds < 4 or rounds % 2:
        raise ValueError(f"epoch_permutation: rounds={rounds} must be even and >= 4 (as grain's)")
    max_index = length - 1
    if max_index == 0:
        return np.zeros(1, np.int64)
    bits = block_bits(max_index)
    if bits > 32:
        raise ValueError(f"epoch_permutation: length={length} is larger than 2**32 elements per epoch")
    if bits > table_bits:
        # A domain of at most 4 x length: each walk takes few steps, so walk every element at once.
        out = simon_encrypt(np.arange(length, dtype=np.uint32), bits=bits, seed=seed, rounds=rounds)
        pending = np.flatnonzero(out > max_index)
        while pending.size:
            out[pending] = simon_encrypt(out[pending], bits=bits, seed=seed, rounds=rounds)
            pending = pending[out[pending] > max_index]
        return out.astype(np.int64)
    # Small sets: the walks are long (2**16 / length steps). next_[x] is the cipher of x over the whole block
    # domain; pointer doubling makes it, after k rounds, the first value <= max_index among the next 2**k steps
    # (or the 2**k-th step). A cycle through i < length has at most 2**bits steps: bits + 1 rounds resolve all.
    next_ = simon_encrypt(np.arange(1 << bits, dtype=np.uint32), bits=bits, seed=seed, rounds=rounds).astype(np.int32)
    for _ in range(bits + 1):
        pending = next_ > max_index
        if not pending[:length].any():
            break
        next_ = np.where(pending, next_[next_], next_)
    return next_[:length].astype(np.int64)


class EpochShuffle(grain.MapDataset):
    """`parent.shuffle()` (same seed derivation, same order), each epoch's permutation computed at once.

    Thread-safe (Grain's prefetch threads read it concurrently); the few epochs in flight are cached.
    """

    _CACHED_EPOCHS = 4

    def __init__(self, parent: grain.MapDataset, *, seed: int | None = None):
        super().__init__(parent)
        seed = self._default_seed if seed is None else seed  # exactly how grain's shuffle takes its seed
        if seed is None:
            raise ValueError("EpochShuffle needs a seed: call ds.seed(seed) before it or pass seed=")
        if not 0 <= int(seed) < 2**32:
            raise ValueError(f"EpochShuffle: seed={seed} must be in [0, 2**32)")
        self._seed = int(seed)
        self._epochs: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_epochs"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "EpochShuffle"

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch in self._epochs:
                self._epochs.move_to_end(epoch)
                return self._epochs[epoch]
        permutation = epoch_permutation(len(self._parent), (self._seed + epoch) % 2**32)
        with self._lock:
            self._epochs[epoch] = permutation
            while len(self._epochs) > self._CACHED_EPOCHS:
                self._epochs.popitem(last=False)
        return permutation

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        length = len(self._parent)
        epoch, position = divmod(int(index), length)
        return self._parent[int(self._permutation(epoch)[position]) + epoch * length]
