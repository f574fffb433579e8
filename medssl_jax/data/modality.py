"""The modality ids shared by the host pipeline, which labels every record with one, and the device-side
intensity code (medssl_jax/intensity.py), which windows CT, normalises MR by percentiles and leaves
X-ray, ultrasound and everything else as stored."""

MODALITY_OTHER, MODALITY_CT, MODALITY_MR = 0, 1, 2
_MODALITY_IDS = {"CT": MODALITY_CT, "MR": MODALITY_MR}


def modality_id(code: str) -> int:
    """The integer id of a record's DICOM modality code ('CT', 'MR', anything else -> other)."""
    return _MODALITY_IDS.get(str(code).upper(), MODALITY_OTHER)
