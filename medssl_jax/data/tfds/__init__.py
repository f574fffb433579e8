"""TFDS builders for public chest X-ray datasets (manual download, ArrayRecord output, no TF).

Importing this package registers the builders with TFDS::

    import tensorflow_datasets as tfds
    from medssl_jax.data import tfds as cxr_tfds
    b = cxr_tfds.MedsslChexpert(config="224", data_dir=DATA_DIR, file_format="array_record")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))
    source = tfds.data_source("medssl_chexpert/224", data_dir=DATA_DIR, split="train")

Each element: image (size x size uint8, uint16 for VinDr), bits_stored, labels (float32,
Tayebi Arasteh et al. 2024 use, listed in each builder's LABELS; names in info.metadata['label_names']), patient_id, study_id, view,
image_id.
"""

from medssl_jax.data.tfds.chexpert import MedsslChexpert
from medssl_jax.data.tfds.common import CxrConfig
from medssl_jax.data.tfds.mimic_cxr_jpg import MedsslMimicCxrJpg
from medssl_jax.data.tfds.nih_chestxray14 import MedsslNihChestxray14
from medssl_jax.data.tfds.vindr_cxr import MedsslVindrCxr

__all__ = ["CxrConfig", "MedsslChexpert", "MedsslMimicCxrJpg", "MedsslNihChestxray14",
           "MedsslVindrCxr"]
