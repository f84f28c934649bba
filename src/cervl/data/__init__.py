"""Data: the manifest format (``manifest``: records, validation, the landmark frame), one ``Reader`` per dataset
(``READERS``), ``prepare``, training mixtures (``mixture``), the SynthCE generator (``synth``), composed
compound faces (``compose``) and aligned-face datasets from photos and videos (``aligned``, ``cervl align``).

Imports: ``cervl.core``, ``cervl.faces``."""

from __future__ import annotations

from cervl.data.affwild2 import AffWild2Reader
from cervl.data.base import BadInputs, Reader
from cervl.data.cexprdb import CexprdbReader
from cervl.data.csvfile import CsvReader
from cervl.data.folder import FolderReader
from cervl.data.manifest import Manifest, ManifestError, Record, read_manifest, write_manifest
from cervl.data.rafdb import RafdbReader
from cervl.core.registry import lookup

READERS = {cls.name: cls for cls in (RafdbReader, AffWild2Reader, CexprdbReader, FolderReader, CsvReader)}


def make_reader(dataset: str, root, **options):
    """Build the reader registered as ``dataset``; options are the reader's keyword arguments."""
    cls = lookup(READERS, dataset, "dataset")
    common = {k: options.pop(k) for k in ("check_images", "bad") if k in options}
    given = {k: v for k, v in options.items() if v is not None}  # None: the flag was not given
    cls.check_options(given)
    return cls(root, **given, **common)


__all__ = ["READERS", "Reader", "make_reader", "BadInputs", "Manifest", "ManifestError", "Record", "read_manifest",
           "write_manifest"]
