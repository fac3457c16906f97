"""Data layer: on-disk layouts -> one tfds builder (array_record) -> arrays.

Import the submodules: `oneclass` (host arrays for the one-class
semi-supervised setting) and `pipeline` (grain batches over tfds data sources).
"""
