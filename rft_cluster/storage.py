"""Where a run's outputs live: a local path or any URI that `pyarrow.fs` understands.

    runs/my-job                                   a local directory
    file:///data/runs/my-job                      the same, as a URI
    s3://bucket/runs/my-job                       S3 (credentials from the usual AWS variables)
    s3://bucket/runs/my-job?endpoint_override=127.0.0.1:9000&scheme=http    an S3-compatible server
    gs://bucket/runs/my-job, hdfs://namenode/runs/my-job

No two actors are assumed to share a disk: whichever actor holds the data writes it through
its own `RunStorage` (the driver: Parquet and metrics; the learner: checkpoints and `final/`).
A `RunStorage` pickles as its URI (a plain path made absolute), so it can be handed to an actor
on another node. Relative names use `/` whatever the filesystem.

Atomic, here, means per file: a reader sees a file's old content or its new content, never a
part (a local file is written beside its name and renamed; an object store makes one upload
atomic). Object stores have no atomic rename of a directory, so a multi-file output (a
checkpoint) is complete once the small file that names it (index.json, driver.json) is written.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs


class RunStorage:
    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        if "://" in self.uri:
            self.fs, root = pafs.FileSystem.from_uri(self.uri)
        else:  # a plain path: made absolute here, where the user meant it (actors run elsewhere)
            self.fs, root = pafs.LocalFileSystem(), str(Path(self.uri).expanduser().resolve())
            self.uri = root
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __reduce__(self):
        return (RunStorage, (self.uri,))

    def __repr__(self) -> str:
        return f"RunStorage({self.uri!r})"

    def local_path(self, rel: str = "") -> Path | None:
        """The local path of `rel` when the storage is a local filesystem, else None."""
        return Path(self.path(rel)) if self.is_local else None

    def path(self, rel: str = "") -> str:
        """`rel` inside the run, as the filesystem names it."""
        return posixpath.join(self.root, rel) if rel else self.root

    def uri_for(self, rel: str = "") -> str:
        """Where `rel` is, for people and files: a local path, or the URI without the parts
        that may hold credentials or local settings (`user:secret@`, the query)."""
        if self.is_local:
            return self.path(rel)
        parts = urlsplit(self.uri)
        base = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}".rstrip("/")
        return f"{base}/{rel}" if rel else base

    # ---------------------------------------------------------------- files

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a reader sees the old content or the new, never a part. Object stores make
        one upload atomic; a local file is written beside its name and renamed."""
        path = self.path(rel)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        target = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp") if self.is_local else path
        with self.fs.open_output_stream(target) as f:
            f.write(data)
        if self.is_local:
            os.replace(target, path)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under `rel`, sorted; empty when it does not exist.
        Dot-prefixed names (temporary files) are left out."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(n for info in self.fs.get_file_info(selector) if not (n := info.base_name).startswith("."))

    def delete(self, rel: str) -> None:
        """Removes a file or a directory tree; a missing one is not an error."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    # ---------------------------------------------------------------- directories

    def upload_dir(self, local: str | Path, rel: str, *, replace: bool = True) -> None:
        """Copies a local directory tree to `rel`, replacing what was there; with
        `replace=False` it is merged in (same names overwritten, other files kept), so several
        writers (the ranks of a learner) can each upload their own files to one place."""
        if replace:
            self.delete(rel)
        self.fs.create_dir(self.path(rel), recursive=True)
        pafs.copy_files(str(Path(local).resolve()), self.path(rel), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_dir(self, rel: str, local: str | Path) -> Path:
        """Copies the tree at `rel` into a local directory; returns it."""
        Path(local).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(rel), str(Path(local).resolve()), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return Path(local)

    @contextmanager
    def staged_dir(self, rel: str, *, replace: bool = True) -> Iterator[Path]:
        """A local directory to write `rel`'s files into: `rel` itself when the storage is
        local (written in place, nothing deleted), else a temporary directory uploaded (see
        `upload_dir`) when the block ends without an error, then removed."""
        if self.is_local:
            out = Path(self.path(rel))
            out.mkdir(parents=True, exist_ok=True)
            yield out
            return
        with tempfile.TemporaryDirectory(prefix="rft-upload-") as tmp:
            yield Path(tmp)
            self.upload_dir(tmp, rel, replace=replace)

    @contextmanager
    def fetched_dir(self, rel: str) -> Iterator[Path]:
        """`rel` as a local directory for the block: itself when the storage is local, else a
        temporary download of the same name, removed afterwards. A missing `rel` is a
        FileNotFoundError."""
        if not self.exists(rel):
            raise FileNotFoundError(f"{self.uri_for(rel)}: not found")
        if self.is_local:
            yield Path(self.path(rel))
            return
        with tempfile.TemporaryDirectory(prefix="rft-download-") as tmp:
            yield self.download_dir(rel, Path(tmp, posixpath.basename(rel)))
