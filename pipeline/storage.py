"""Where a store lives: a local path or a URL that fsspec knows (SPEC "Where a store lives").

    loc = location("s3://bucket/train.zarr", {"endpoint_url": "http://127.0.0.1:9000"})
    loc = location("train.zarr")                      # a pathlib.Path, exactly as before

This is the one place where a disk and an object store differ. `location` gives a `pathlib.Path`
for a local path (everything below then does what the store always did, byte for byte) or an
`ObjectPath` for a URL: the few `Path` operations the store uses (`/`, `name`, `is_file`,
`iterdir`, `read_bytes`, `unlink`, ...) on an fsspec file system. Zarr metadata goes through zarr's
own `FsspecStore` (`zarr_store`); the chunks and records the store encodes itself go through the
primitives here:

- `read(loc)` / `write(loc, payload, durable=)`: one object's bytes. On a disk a write is a temporary
  file (fsynced when durable) renamed into place; on an object store one PUT, which is atomic (an
  object is all there or not at all) and durable once it returns, and reads after it see it
  (S3 and GCS are strongly consistent). So "a record after its block's chunks" is the order of the
  calls on both: the store writes every chunk, then the record.
- `list_names(folder)`: the names in a folder (records are listed); object listings are strongly
  consistent too, and are never cached here (`use_listings_cache=False`).
- `create_once(target, build)`: make a store, or a teacher in one, so that racing creators end with
  one valid store. On a disk: built in a hidden staging folder and renamed into place (staging.py).
  An object store has no rename: the tree is built the same way in a local temporary folder (so its
  bytes are those a disk store gets) and uploaded object by object, the group's own `zarr.json`
  last, which is what makes it exist for every reader. Everything a creator writes is a
  deterministic function of what it was asked to make (data, class count, chunk rows; a teacher's
  spec, weights and layout), so two creators of the same store write identical bytes and any
  interleaving of their uploads leaves the same objects. Each upload is create-only
  (`If-None-Match: *` where the service has it, as S3 does; fsspec's exists-then-write elsewhere):
  an object already there is accepted only if it holds the same bytes, so a racer making a
  *different* store at the same URL (or the leftovers of one killed) is refused by name instead of
  being overwritten or mixed; the final `zarr.json` already there means another creator won
  (`create_once` returns False, as a lost rename does) and the caller checks that store is the one
  it would have made.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

from mtkd.pipeline.errors import BadInputError, StoreMismatchError
from mtkd.pipeline.staging import remove_stale, staging_dir

CLOUD_EXTRA = "pip install 'mtkd[cloud]'"


def is_url(spec: Any) -> bool:
    """Whether `spec` names a location by URL (`s3://...`, `memory://...`) rather than a local path."""
    return isinstance(spec, ObjectPath) or (isinstance(spec, str) and "://" in spec and not spec.startswith("file://"))


def parse_options(pairs: Iterable[str] | None) -> dict[str, Any]:
    """`--storage-option KEY=VALUE` (repeatable) -> fsspec keyword arguments. A value reads as JSON
    when it is JSON (`anon=true`, `max_concurrency=8`), else as the string given."""
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInputError(f"--storage-option {pair!r}: expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def location(spec: str | os.PathLike | ObjectPath, options: dict[str, Any] | None = None) -> Path | ObjectPath:
    """A local path as a `Path`, a URL as an `ObjectPath` on its fsspec file system (opened with
    `options`, credentials as the backend reads them). BadInputError (one line) for options given to
    a local path, a scheme without its installed backend, or a bucket that cannot be reached."""
    if isinstance(spec, ObjectPath):
        return spec
    if not is_url(spec):
        if options:
            raise BadInputError(f"--storage-option {', '.join(sorted(options))}: {str(spec)!r} is a local path, not a URL")
        text = os.fspath(spec)
        return Path(text[len("file://"):] if text.startswith("file://") else text)
    protocol, _, rest = str(spec).partition("://")
    root = ObjectPath(protocol, rest.strip("/"), dict(options or {}))
    root.probe()
    return root


def is_remote(loc: Any) -> bool:
    return isinstance(loc, ObjectPath)


def _filesystem(protocol: str, options: dict[str, Any], url: str):
    try:
        import fsspec
    except ImportError:
        raise BadInputError(f"{url!r}: stores at URLs need fsspec and its backend: {CLOUD_EXTRA}") from None

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise BadInputError(f"{url!r}: no fsspec backend for {protocol}:// is installed ({why}); "
                            f"s3:// comes with the cloud extra: {CLOUD_EXTRA}") from None
    kwargs = dict(options)
    if protocol in ("s3", "s3a", "gs", "gcs", "abfs", "az"):
        kwargs.setdefault("use_listings_cache", False)  # records are listed: a cached listing would hide a racer's
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise BadInputError(f"{url!r}: --storage-option not understood by {protocol}:// ({e})") from None


class ObjectPath:
    """A key (or key prefix: a "folder") on an fsspec file system, with the `pathlib.Path`
    operations the store uses. `str()` is its URL."""

    def __init__(self, protocol: str, key: str, options: dict[str, Any], fs: Any = None):
        self.protocol, self.key, self.options = protocol, key.strip("/"), options
        self._fs = fs

    # pickled for DataLoader workers and subprocesses: the file system is made again on the other side
    def __getstate__(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "key": self.key, "options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["protocol"], state["key"], state["options"])

    @property
    def fs(self):
        if self._fs is None:
            self._fs = _filesystem(self.protocol, self.options, self.url)
        return self._fs

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __fspath__(self) -> str:  # noqa: D105 - not a local path: refuse, rather than open a file named "s3:/..."
        raise TypeError(f"{self.url} is an object-store URL, not a local path")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (self.protocol, self.key) == (other.protocol, other.key)

    def __lt__(self, other: ObjectPath) -> bool:
        return self.key < other.key

    def __hash__(self) -> int:
        return hash((self.protocol, self.key))

    def __truediv__(self, part: str | os.PathLike) -> ObjectPath:
        return ObjectPath(self.protocol, posixpath.join(self.key, str(part)), self.options, self._fs)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.protocol, posixpath.dirname(self.key), self.options, self._fs)

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def as_posix(self) -> str:
        return self.url

    def resolve(self) -> ObjectPath:
        return self

    def exists(self) -> bool:
        return self.fs.exists(self.key)

    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    def iterdir(self) -> Iterator[ObjectPath]:
        for entry in self._listing():
            yield self / posixpath.basename(entry.rstrip("/"))

    def _listing(self) -> list[str]:
        try:
            return sorted(self.fs.ls(self.key, detail=False, refresh=True) if _takes_refresh(self.fs) else self.fs.ls(self.key, detail=False))
        except FileNotFoundError:
            return []

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        for key in self.fs.find(self.key):
            if fnmatch(posixpath.basename(key), pattern):
                yield ObjectPath(self.protocol, key, self.options, self._fs)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        pass  # an object store has no folders: a key's prefix exists once an object is under it

    def probe(self) -> None:
        """Reach the bucket (the URL's first part) once, so that a wrong endpoint, bucket or credentials
        is one line naming the URL before anything runs (BadInputError)."""
        bucket = self.key.split("/", 1)[0]
        try:
            if self.protocol in ("memory", "file", "local"):
                return
            self.fs.ls(bucket, detail=False)
        except BadInputError:
            raise
        except FileNotFoundError:
            raise BadInputError(f"{self.url!r}: bucket {bucket!r} does not exist (or these credentials cannot see it)") from None
        except TypeError as e:  # s3fs hands unknown options to its client session, which refuses them on first use
            raise BadInputError(f"{self.url!r}: --storage-option not understood by {self.protocol}:// ({_first_line(e)})") from None
        except PermissionError as e:
            raise BadInputError(f"{self.url!r}: access to bucket {bucket!r} denied ({_first_line(e)}); check the credentials "
                                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) and --storage-option") from None
        except Exception as e:  # noqa: BLE001 - an endpoint that does not answer raises the client's own types
            raise BadInputError(f"{self.url!r}: cannot reach {self.protocol}:// ({type(e).__name__}: {_first_line(e)}); "
                                "check --storage-option endpoint_url and the network") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _takes_refresh(fs: Any) -> bool:
    return type(fs).__module__.split(".")[0] in ("s3fs", "gcsfs", "adlfs")


# -- zarr's own store for metadata ------------------------------------------------------------------


def zarr_store(loc: Path | ObjectPath, mode: str = "r") -> Any:
    """What zarr.open_group / open_array take for `loc`: the local path itself (zarr's LocalStore, as
    always), or zarr's FsspecStore on the URL with the location's options."""
    if not isinstance(loc, ObjectPath):
        return loc
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(loc.url, storage_options=loc.options, read_only=mode == "r")


# -- the primitives the store's guarantees rest on --------------------------------------------------


def read(loc: Path | ObjectPath) -> bytearray:
    """One file's or object's bytes, writable (a chunk stored uncompressed decodes to a view of them,
    which torch takes as is). FileNotFoundError when there is none."""
    if isinstance(loc, ObjectPath):
        return bytearray(loc.read_bytes())
    with open(loc, "rb") as f:
        raw = bytearray(os.fstat(f.fileno()).st_size)
        f.readinto(raw)
    return raw


def read_many(locs: list[Path | ObjectPath]) -> dict[Path | ObjectPath, bytearray]:
    """Several objects' bytes, requested concurrently on an object store (one after the other on a
    disk); those that do not exist are left out."""
    out: dict[Path | ObjectPath, bytearray] = {}
    remote = [loc for loc in locs if isinstance(loc, ObjectPath)]
    for loc in locs:
        if not isinstance(loc, ObjectPath):
            try:
                out[loc] = read(loc)
            except FileNotFoundError:
                pass
    if remote:
        fs = remote[0].fs
        by_key = {fs._strip_protocol(loc.key): loc for loc in remote}
        got = fs.cat(list(by_key), on_error="return")
        for key, value in (got.items() if isinstance(got, dict) else [(next(iter(by_key)), got)]):
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):
                raise value
            out[by_key[fs._strip_protocol(key)]] = bytearray(value)
    return out


def write(loc: Path | ObjectPath, payload: bytes | memoryview, *, durable: bool) -> None:
    """Replace `loc` atomically: a killed process leaves the old bytes or the new, never half.

    Disk: a temporary file, then a rename, like zarr's LocalStore. durable: the bytes are on disk
    before the rename. The folder is not synced: journaling file systems commit renames in order, so
    a later record's rename never survives a crash that this one does not, and a lost pair only
    means the block is computed again. Object store: one PUT (atomic, and durable once it returns).
    """
    if isinstance(loc, ObjectPath):
        loc.fs.pipe_file(loc.key, bytes(payload))
        return

    def write_file() -> None:
        loc.parent.mkdir(parents=True, exist_ok=True)
        tmp = loc.with_name(f"{loc.name}.{uuid.uuid4().hex}.partial")  # zarr's naming for the same
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, loc)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if e.filename is None and e.errno in (errno.ENOSPC, errno.EDQUOT):  # os.fsync's error names no file: name the one being written
                raise OSError(e.errno, e.strerror, str(loc)) from e
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    retry_if_vanished(write_file)


def retry_if_vanished(write_fn: Callable[[], None], attempts: int = 3) -> None:
    """Run a write again if its temporary file was removed under it (see LogitStore.mark_complete)."""
    for attempt in range(attempts):
        try:
            return write_fn()
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


def list_names(folder: Path | ObjectPath) -> list[str]:
    """The names directly in `folder` ([] when there is none)."""
    if isinstance(folder, ObjectPath):
        return [posixpath.basename(k.rstrip("/")) for k in folder._listing()]
    try:
        return os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []


def total_bytes(folder: Path | ObjectPath) -> int:
    """The bytes of every file (object) under `folder`, but a disk's unfinished temporary files."""
    if isinstance(folder, ObjectPath):
        keys = folder.fs.find(folder.key)
        return int(sum(folder.fs.sizes(keys))) if keys else 0
    total = 0
    for root, _, files in os.walk(folder):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if not f.endswith(".partial"))
    return total


def create_once(target: Path | ObjectPath, build: Callable[[Path], None], *, beside: Path | ObjectPath) -> bool:
    """Make the Zarr group `target` with `build(folder)` (which writes the whole tree into a local
    folder) so that it appears whole or not at all; False when another creator made it first.

    `beside`: the store, next to which a disk's staging folder goes (the same file system, so the
    rename is atomic). See the module's docstring for how an object store does without rename."""
    if not isinstance(target, ObjectPath):
        remove_stale(beside)  # before making a new one, remove those of creators that were killed (staging.py)
        tmp = staging_dir(beside)
        try:
            build(tmp)
            return _publish(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if (target / "zarr.json").is_file():
        return False
    with tempfile.TemporaryDirectory(prefix="mtkd-create-") as tmp:
        folder = Path(tmp) / "tree"
        build(folder)
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        for rel in [f for f in files if f != "zarr.json"] + ["zarr.json"]:  # the group's own metadata last
            if not _put_once(target / rel, (folder / rel).read_bytes()):
                if rel == "zarr.json":
                    return False  # another creator finished first: the caller checks its store
                raise StoreMismatchError(
                    f"{(target / rel).url!r} already holds other bytes than this creator writes: {target.url!r} is "
                    "being made by another creator (of other data, another teacher of that name, other options), "
                    "or one was left half-made there; remove that prefix or choose another location or name"
                )
    return True


def _put_once(loc: ObjectPath, payload: bytes) -> bool:
    """Create `loc` with `payload` unless it exists; True when it now holds these bytes (written
    here, or by a racer that wrote the same), False when it holds others."""
    try:
        loc.fs.pipe_file(loc.key, payload, mode="create")
        return True
    except FileExistsError:
        pass
    except OSError as e:  # a service without conditional writes (S3's 501 NotImplemented): exists, then write
        if e.errno != errno.ENOSYS:
            raise
        if not loc.fs.exists(loc.key):  # racers of one store write the same bytes: a lost race costs nothing
            loc.fs.pipe_file(loc.key, payload)
            return True
    try:
        return bytes(loc.fs.cat_file(loc.key)) == payload
    except FileNotFoundError:  # removed between the two calls: write it again
        loc.fs.pipe_file(loc.key, payload)
        return True


def _publish(tmp: Path, target: Path) -> bool:
    """Rename `tmp` onto `target`; False if another process got there first (target not empty)."""
    try:
        os.rename(tmp, target)
    except OSError:
        if target.is_dir() and any(target.iterdir()):
            return False
        raise
    return True
