"""Where a job's output folder lives: a local path, or a URI that pyarrow's filesystems open
(`s3://bucket/runs/a`, `gs://…`, `hdfs://…`, `file:///mnt/nfs/runs/a`).

A job always works in a local folder, because the run folder is read and written with plain
file APIs (safetensors, Parquet, matplotlib). For a URI that folder is a staging copy under
`$CUBE_CACHE/staging/`: `pull` fills it from the URI before the job (a resume, an eval of a
finished run), `push` copies it back after. Ray Train and Ray Tune write their checkpoints
straight to `URI/ray` from whichever node runs a worker or trial (`ray_storage`), so nothing a
worker writes depends on its node's disk. A plain path is used as is: on several nodes it must be
shared storage mounted at the same path everywhere (NFS, EFS, a ReadWriteMany volume).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cube.data.cache import cache_dir

RAY_SUBDIR = "ray"  # Ray Train's / Tune's own storage inside a run or sweep folder
LOG = "ray.log"  # the job's own log, open while the job runs
# Written straight at the target by whoever makes them (Ray Train and Tune, Ray Data's writers,
# the bank writer), never staged or copied: they are as large as the data.
DIRECT = (RAY_SUBDIR, "split", "bank")


class StorageError(RuntimeError):
    """A URI that no pyarrow filesystem can open, or a copy to or from it that failed."""


def is_uri(target: str | Path) -> bool:
    return "://" in str(target)


@dataclass
class Storage:
    target: str  # what the user gave: a path or a URI
    local: Path  # the folder the job reads and writes

    @classmethod
    def of(cls, target: str | Path) -> Storage:
        if not is_uri(target):
            return cls(str(target), Path(target))
        uri = str(target).rstrip("/")
        _filesystem(uri)  # fail now, before any work, on a URI pyarrow cannot open
        return cls(uri, cache_dir("staging", hashlib.sha256(uri.encode()).hexdigest()[:16]))

    @property
    def remote(self) -> bool:
        return is_uri(self.target)

    def uri(self, name: str) -> str:
        """Where `name` (a subfolder written straight at the target: DIRECT) lives: `URI/name`, or
        the local folder's absolute path."""
        return f"{self.target}/{name}" if self.remote else str((self.local / name).resolve())

    def discard(self) -> None:
        """Remove what a job that failed before it began left: the staging folder of a URI (and
        at the URI, the direct subfolders), or a plain folder's own files."""
        import pyarrow.fs as pafs

        if self.remote:
            fs, root = _filesystem(self.target)
            for name in DIRECT:
                if fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound:
                    fs.delete_dir(f"{root}/{name}")
            self.reset()
        elif self.local.is_dir():
            for entry in self.local.iterdir():
                if entry.name != LOG:  # the job's log may still be open, and says what went wrong
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def ray_storage(self) -> str:
        """Ray Train's / Tune's storage_path: `URI/ray`, or the local folder's absolute `ray/`."""
        if self.remote:
            return f"{self.target}/{RAY_SUBDIR}"
        return str((self.local / RAY_SUBDIR).resolve())

    def exists(self, name: str) -> bool:
        """Whether `name` (a file of the folder) exists at the target, without pulling."""
        if not self.remote:
            return (self.local / name).exists()
        import pyarrow.fs as pafs

        fs, root = _filesystem(self.target)
        return fs.get_file_info(f"{root}/{name}").type != pafs.FileType.NotFound

    def reset(self) -> None:
        """Empty the staging folder of a URI before a fresh job (a plain path is left alone)."""
        if self.remote:
            for entry in self.local.iterdir() if self.local.is_dir() else ():
                if entry.name != LOG:  # the job's log may already be open
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def pull(self) -> None:
        """Fill the staging folder from the target (the direct subfolders stay where they are)."""
        if self.remote:
            self.reset()
            _copy_tree(*_filesystem(self.target), _local_fs(), str(self.local.resolve()), skip=(LOG,))

    def snapshot(self) -> Path:
        """A local folder to read the target from: the path itself, or a fresh private copy of
        the URI's folder, without the direct subfolders, which are read where they are (private,
        so that replicas or jobs on one node never share a copy that another is refreshing)."""
        if not self.remote:
            return self.local
        copy = Path(tempfile.mkdtemp(prefix=f"{self.local.name}-", dir=self.local.parent))
        _copy_tree(*_filesystem(self.target), _local_fs(), str(copy.resolve()), skip=(LOG,))
        return copy

    @contextlib.contextmanager
    def reading(self) -> Iterator[Path]:
        """`snapshot()` for the length of a `with` block; a URI's copy is removed after it."""
        path = self.snapshot()
        try:
            yield path
        finally:
            if self.remote:
                shutil.rmtree(path, ignore_errors=True)

    def push(self) -> None:
        """Copy the local folder to the target (nothing to do for a plain path)."""
        if self.remote and self.local.is_dir():
            _copy_tree(_local_fs(), str(self.local.resolve()), *_filesystem(self.target))

    def __str__(self) -> str:
        return self.target


def _local_fs():
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem()


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid / ArrowNotImplementedError / OSError
        raise StorageError(f"cannot open storage URI {uri!r}: {e} (a local path, file://, s3://, gs:// or "
                           "hdfs:// URI that this machine's pyarrow can reach)") from None


def _copy_tree(src_fs, src: str, dst_fs, dst: str, skip: tuple[str, ...] = ()) -> None:
    """Copy the folder `src` to `dst` with pyarrow.fs.copy_files, one top-level entry at a time,
    leaving out the direct subfolders (DIRECT), temporary files and `skip`."""
    import pyarrow.fs as pafs

    try:
        dst_fs.create_dir(dst, recursive=True)
        for info in src_fs.get_file_info(pafs.FileSelector(src, allow_not_found=True)):
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            if name in (*DIRECT, *skip) or ".tmp" in name:
                continue
            if info.type == pafs.FileType.Directory:  # copy_files makes no folders on a local filesystem
                dst_fs.create_dir(f"{dst}/{name}", recursive=True)
                for sub in src_fs.get_file_info(pafs.FileSelector(info.path, recursive=True)):
                    if sub.type == pafs.FileType.Directory:
                        dst_fs.create_dir(f"{dst}/{name}/{sub.path[len(info.path.rstrip('/')) + 1:]}", recursive=True)
            pafs.copy_files(info.path, f"{dst}/{name}", source_filesystem=src_fs, destination_filesystem=dst_fs)
    except OSError as e:
        raise StorageError(f"copying {src} to {dst} failed: {e}") from None
