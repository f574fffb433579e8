"""Data: the image store (ArrayRecord shards + index), the embedded phantom dataset, Grain pipelines."""
