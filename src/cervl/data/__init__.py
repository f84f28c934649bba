"""Dataset readers (one file per dataset), the manifest format and the SynthCE generator.

``READERS`` is the registry used by ``cervl prepare DATASET``; :func:`make_reader` is its factory.
"""

from __future__ import annotations

from cervl.data.affwild2 import AffWild2Reader
from cervl.data.base import BadInputs
from cervl.data.cexprdb import CexprdbReader
from cervl.data.csvfile import CsvReader
from cervl.data.folder import FolderReader
from cervl.data.manifest import Manifest, ManifestError, Record, read_manifest, write_manifest
from cervl.data.rafdb import RafdbReader

READERS = {cls.name: cls for cls in (RafdbReader, AffWild2Reader, CexprdbReader, FolderReader, CsvReader)}


def make_reader(dataset: str, root, **options):
    """Build the reader registered as ``dataset``; options are the reader's keyword arguments."""
    try:
        cls = READERS[dataset]
    except KeyError:
        raise KeyError(f"unknown dataset {dataset!r} (available: {sorted(READERS)})") from None
    return cls(root, **options)


__all__ = ["READERS", "make_reader", "BadInputs", "Manifest", "ManifestError", "Record", "read_manifest",
           "write_manifest"]
