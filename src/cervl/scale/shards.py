"""The shard store: finished shards on disk, so a run resumes and never writes a row twice.

Work is cut into shards (a run of images, or one whole video). The driver writes each finished
shard atomically (temporary file, then rename) under a key that sorts in input order:
``a-000012`` for the 13th image shard, ``v-000003`` for the 4th video. A re-run with the same
output path skips the shards already there; a shard that arrives twice (a retried task) is
written once. At the end the shards become the output:

* ``jsonl``: ``OUT.parts/<key>.jsonl`` are joined into ``OUT`` in key order, then removed;
* ``parquet``: ``OUT/`` is the Parquet dataset itself, ``part-<key>.parquet`` in key order.

The store refuses a folder it did not write, and a resume whose inputs or settings differ
(its fingerprint is kept in ``_cervl-shards.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cervl.data.manifest import atomic_write_text, new_file_mode
from cervl.core.errors import InvalidInput

MARKER = "_cervl-shards.json"  # a leading "_": Parquet readers skip it
FORMATS = ("jsonl", "parquet")


def fingerprint(obj) -> str:
    """A stable hash of the inputs and settings that decide a run's rows."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_key(kind: str, index: int) -> str:
    """``a-000012`` (image shard 12) or ``v-000003`` (video 3): keys sort in output order."""
    return f"{'a' if kind == 'img' else 'v'}-{index:06d}"


class ShardStore:
    """Finished shards of one output (see the module docstring)."""

    def __init__(self, out: str | Path, fmt: str, fp: str):
        if fmt not in FORMATS:
            raise InvalidInput(f"--format must be one of {FORMATS}, got {fmt!r}")
        self.out, self.fmt, self.fp = Path(out), fmt, fp
        self.dir = self.out if fmt == "parquet" else Path(str(self.out) + ".parts")
        self.suffix = ".parquet" if fmt == "parquet" else ".jsonl"
        if fmt == "jsonl" and self.out.is_dir():
            raise InvalidInput(f"-o {self.out} is a folder; give a file name such as {self.out / 'predictions.jsonl'}")
        self._claim()

    def _claim(self) -> None:
        marker = self.dir / MARKER
        if marker.is_file():
            old = json.loads(marker.read_text())
            if old.get("fingerprint") != self.fp:
                raise InvalidInput(f"{self.dir} holds shards of a run with other inputs or settings "
                                   f"(fingerprint {old.get('fingerprint')} != {self.fp}); use another -o, or "
                                   f"delete that folder to start over")
            return
        if self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise InvalidInput(f"{self.dir} exists and was not written by cervl; refusing to write into it")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"format": "cervl-shards", "fingerprint": self.fp,
                                              "output": self.fmt}, indent=2) + "\n")

    def _path(self, key: str) -> Path:
        return self.dir / (f"part-{key}{self.suffix}" if self.fmt == "parquet" else f"{key}{self.suffix}")

    def done(self) -> set[str]:
        """Keys of the shards already written (by this run or an interrupted one)."""
        n = len("part-") if self.fmt == "parquet" else 0
        return {p.name[n:-len(self.suffix)] for p in self.dir.glob(f"*{self.suffix}") if not p.name.startswith(".")}

    def write(self, key: str, rows: list[dict], schema=None) -> None:
        """Write one shard atomically; writing a key that is already there changes nothing."""
        path = self._path(key)
        if path.exists():
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.dir)
        os.fchmod(fd, new_file_mode())  # shards become the output (Parquet parts): the umask's mode, not 0600
        os.close(fd)
        try:
            if self.fmt == "parquet":
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
            else:
                Path(tmp).write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, key: str) -> list[dict]:
        """The rows of one written shard."""
        path = self._path(key)
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def rows(self, keys: list[str]) -> Iterator[dict]:
        """The rows of the shards ``keys``, in order, one shard in memory at a time."""
        for k in keys:
            yield from self.read(k)

    def finish(self, keys: list[str], meta: dict, rows: Iterable[dict] | None = None) -> Path:
        """Turn the shards into the output, in ``keys`` order (which must all be written).

        ``rows``: :meth:`rows` of ``keys``, possibly wrapped by the caller (to count them); they are
        streamed into the JSONL output, so the driver's memory does not grow with the row count.
        """
        missing = [k for k in keys if not self._path(k).exists()]
        if missing:
            raise RuntimeError(f"shards missing at the end of the run: {missing[:5]}")
        rows = self.rows(keys) if rows is None else rows
        if self.fmt == "parquet":
            for _ in rows:  # the parts are the output; the caller's wrapper still sees every row
                pass
            # the marker stays: a re-run with the same inputs finds every shard done and changes nothing
            atomic_write_text(self.dir / "_cervl.json", json.dumps({**meta, "shards": len(keys)}, indent=2) + "\n")
            return self.out
        from cervl.predict.predictor import write_predictions

        write_predictions(self.out, rows, meta)
        self.cleanup(keys)
        return self.out

    def cleanup(self, keys: list[str]) -> None:
        """Remove the shards (only the files this store wrote) and, if then empty, its folder."""
        for k in keys:
            self._path(k).unlink(missing_ok=True)
        (self.dir / MARKER).unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:  # something else was put there: leave it
            pass
