"""Reading sources into the canonical table (readers, format detection), atomic writers and the
feature store (``curate.io.store``)."""

from __future__ import annotations

from curate.io.detect import detect_format
from curate.io.formats import FORMATS, FormatInfo
from curate.io.readers import ReadResult, expand_inputs, read_source
from curate.io.sources import read_sources  # files, URIs, save_to_disk folders and in-memory data

__all__ = ["FORMATS", "FormatInfo", "ReadResult", "detect_format", "expand_inputs", "read_source", "read_sources"]
