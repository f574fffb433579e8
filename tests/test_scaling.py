"""The paper scaling model (medssl_jax/scaling.py): the all-reduce formula, and NT-Xent's logits staying
sharded by rows on 8 devices (what its largest-batch table relies on)."""

import pytest

from medssl_jax import scaling


def test_allreduce_is_a_ring_inside_a_node_and_hierarchical_across_nodes():
    h100 = scaling.LINKS["H100 (NVLink + 400G IB)"]
    assert scaling.allreduce_seconds(1e9, 8, h100) == pytest.approx(2 * 7 / 8 * 1e9 / 450e9)
    # 8 nodes: the node's ring, then each GPU's 1/8 of the gradient over its own 50 GB/s NIC.
    assert scaling.allreduce_seconds(1e9, 64, h100) == pytest.approx(2 * 7 / 8 * 1e9 / 450e9 + 2 * 7 / 8 * 1.25e8 / 50e9)


def test_ntxent_logits_stay_sharded_by_rows_on_8_devices():
    # The figure is per-device bytes x 8 devices per entry of the [V, V] logits: one replicated float32 copy
    # alone would make it 4 x 8 = 32; rows split over the devices cost a few bytes per entry (value, softmax,
    # gradient; 7 at V = 8192, more at this small V where fixed buffers weigh in).
    per_logit = scaling.ntxent_bytes_per_logit(views=1024)
    assert 4.0 <= per_logit < 32.0, per_logit
