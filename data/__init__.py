"""Data for each modality: an embedded synthetic set (no download) and a reader for real files."""


class DataError(ValueError):
    """Bad input data; the message names the file or the flag."""
