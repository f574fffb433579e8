"""Ingestion: inputs (DICOM, CSV + images) -> an image store (medssl_jax.data.store).

  tasks.py      what to read and how one input becomes records (worker side, jax-free)
  run.py        the driver: worker pool, partial store, report, atomic rename; verify_store
  benchmark.py  files/s on generated DICOM
  cli.py        `python -m medssl_jax.ingest` (its flags)

MedMNIST .npz files and TFDS datasets have their own writers (data/medmnist.py, data/tfds/).
"""
