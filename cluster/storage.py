"""Local paths and object-store URIs behind one small API (``pyarrow.fs``).

Every place Negatron accepts a path accepts a URI that ``pyarrow.fs.FileSystem.from_uri`` reads —
``s3://bucket/key``, ``gs://``, ``abfs://``, ``hdfs://``, ``file://`` — with its query, e.g.
``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``. ``join`` keeps the query at the
end, so every path derived from a URI reaches the same store: the run folder of that storage path
is ``s3://bucket/runs/NAME?endpoint_override=127.0.0.1:9000&scheme=http``.

Writes are atomic where the store allows: a local file is written beside its target and renamed
over it; an object is one PUT (it appears complete or not at all). A folder on an object store
is replaced file by file (each file atomic), stale files removed after the new ones are in.

Credentials come from the environment or the provider's usual files (``AWS_ACCESS_KEY_ID``,
``~/.aws/credentials``, ``GOOGLE_APPLICATION_CREDENTIALS``, an instance role), never from a URI
in a config: ``check_uri`` refuses ``access_key``/``secret_key``/``session_token`` query keys.
Errors from the store become one ``StorageError`` line naming the URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

from .errors import NegatronError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
SECRET_KEYS = ("access_key", "secret_key", "session_token")


class StorageError(NegatronError, OSError):
    """A store cannot be reached, a bucket or object is missing, or access is denied."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (any URI, ``file://`` included); False for a plain path."""
    return bool(_SCHEME.match(str(path)))


def is_remote(path: str | os.PathLike) -> bool:
    """A URI on a store other than this machine's filesystem."""
    return is_uri(path) and not str(path).lower().startswith("file://")


def _split(uri: str) -> tuple[str, str]:
    base, _, query = str(uri).partition("?")
    return base, query


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...``; for a URI the query stays at the end."""
    if not is_uri(base):
        return str(Path(base, *parts))
    root, query = _split(str(base))
    path = "/".join([root.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return f"{path}?{query}" if query else path


def sub(base: Path | str, *parts: str) -> Path | str:
    """``join`` that keeps the kind of ``base``: a ``Path`` stays a ``Path``, a URI a string."""
    return Path(base, *parts) if isinstance(base, Path) else join(base, *parts)


def folder(path: str | os.PathLike) -> Path | str:
    """A folder as Negatron hands it back: a local absolute ``Path``, or the URI of a remote one."""
    return str(path) if is_remote(path) else Path(resolve(filesystem(path)[1] if is_uri(path) else path))


def name(path: str | os.PathLike) -> str:
    """The last component (``runs/x`` -> ``x``), query dropped."""
    return _split(str(path))[0].rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else Path(path).name


def parent(path: str | os.PathLike) -> str:
    if not is_uri(path):
        return str(Path(path).parent)
    root, query = _split(str(path))
    up = root.rstrip("/").rsplit("/", 1)[0]
    return f"{up}?{query}" if query else up


def uri_on(like: str | os.PathLike, path: str) -> str:
    """The URI of ``path``, a path on the store of the URI ``like`` as pyarrow (and so Ray) names it
    (``bucket/key`` on S3 or GCS), with ``like``'s scheme, host and query; a local ``like`` or a
    ``path`` that is already a URI gives ``path`` unchanged. Ray's ``Checkpoint.path`` on an object
    store has no scheme: this makes it a URI that every process can open."""
    if not is_remote(like) or is_uri(path):
        return str(path)
    root, query = _split(str(like))
    scheme, rest = root.split("://", 1)
    authority, inner = rest.split("/", 1)[0], str(path).lstrip("/")
    # S3 and GCS paths start with the bucket (the URI's authority); HDFS paths do not carry the host
    has_authority = inner == authority or inner.startswith(authority + "/")
    out = f"{scheme}://{inner}" if has_authority else f"{scheme}://{authority}/{inner}"
    return f"{out}?{query}" if query else out


def redact(uri: str | os.PathLike) -> str:
    """The URI as it may be printed: secret query values replaced by ``***``."""
    root, query = _split(str(uri))
    if not any(k in SECRET_KEYS for k, _ in parse_qsl(query, keep_blank_values=True)):
        return str(uri)
    pairs = [f"{k}={'***' if k in SECRET_KEYS else v}" for k, v in parse_qsl(query, keep_blank_values=True)]
    return f"{root}?{'&'.join(pairs)}"


def check_uri(value: str, key: str) -> None:
    """Refuse credentials written into a URI (they would be printed, logged and shipped to
    workers); raises ``ValueError`` naming the config key."""
    if not is_uri(value):
        return
    found = sorted({k for k, _ in parse_qsl(_split(value)[1], keep_blank_values=True)} & set(SECRET_KEYS))
    if found:
        raise ValueError(f"{key}: credentials in the URI ({', '.join(found)}) are not accepted; set them in "
                         "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN) or "
                         "the provider's credential files")


def resolve(path: str | os.PathLike) -> str:
    """An absolute form every process can use: URIs unchanged, local paths made absolute."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


_FS_CACHE: dict[str, Any] = {}


def filesystem(path: str | os.PathLike):
    """``(pyarrow FileSystem, path on it)`` for a URI or a local path."""
    import pyarrow.fs as pafs

    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    root, query = _split(path)
    scheme_host = root.split("/", 3)[:3]  # scheme:, '', bucket-or-host
    key = "/".join(scheme_host) + "?" + query
    try:
        fs = _FS_CACHE.get(key)
        if fs is None:
            fs, inner = pafs.FileSystem.from_uri(path)
            _FS_CACHE[key] = fs
        else:
            inner = pafs.FileSystem.from_uri(path)[1]
    except Exception as e:  # ArrowInvalid for an unknown scheme or a bad query
        raise StorageError(f"{redact(path)}: not a usable URI ({_line(e)})") from None
    return fs, inner


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    out = text[0] if text else type(e).__name__
    # pyarrow repeats the AWS error with curl details: keep the part that names the cause
    return out[:300]


def error(path: str | os.PathLike, e: BaseException, doing: str = "cannot access") -> StorageError:
    """A one-line ``StorageError`` for an exception from the store."""
    if isinstance(e, StorageError):
        return e
    msg = _line(e)
    low = msg.lower()
    if isinstance(e, FileNotFoundError) or "nosuchbucket" in low or "does not exist" in low:
        hint = "not found (check the bucket and key)"
    elif "access denied" in low or "forbidden" in low or "403" in low or isinstance(e, PermissionError):
        hint = "access denied (check the credentials in the environment)"
    elif "connect" in low or "network" in low or "resolve" in low or "timed out" in low:
        hint = "the store cannot be reached (check the endpoint and the network)"
    else:
        hint = msg
    return StorageError(f"{doing} {redact(path)}: {hint}" + (f" [{msg}]" if hint != msg else ""))


def _info(path: str | os.PathLike):
    fs, inner = filesystem(path)
    try:
        return fs.get_file_info(inner)
    except Exception as e:
        raise error(path, e) from None


def exists(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    return _info(path).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    """A folder (on an object store: a prefix holding at least one object)."""
    import pyarrow.fs as pafs

    info = _info(path)
    if info.type == pafs.FileType.Directory:
        return True
    if info.type == pafs.FileType.NotFound and is_remote(path):
        return bool(list_files(path, limit=1))
    return False


def list_files(folder: str | os.PathLike, limit: int | None = None) -> list[tuple[str, int, float]]:
    """``(relative path, size, mtime)`` of every file under ``folder``, sorted; [] if none."""
    import pyarrow.fs as pafs

    fs, inner = filesystem(folder)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    except Exception as e:
        raise error(folder, e, "cannot list") from None
    out = []
    for i in infos:
        if i.type == pafs.FileType.File:
            out.append((i.path[len(inner):].lstrip("/"), int(i.size or 0), i.mtime.timestamp() if i.mtime else 0.0))
            if limit and len(out) >= limit:
                break
    return sorted(out)


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read()
    except Exception as e:
        raise error(path, e, "cannot read") from None


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON at ``path``, or None when there is no such file."""
    if not exists(path):
        return None
    return json.loads(read_bytes(path))


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` atomically (local: temp file + rename; object store: one PUT)."""
    if not is_remote(path):
        from .files import atomic_write

        local = Path(filesystem(path)[1])
        atomic_write(local, lambda tmp: tmp.write_bytes(data))
        return str(local)
    fs, inner = filesystem(path)
    try:
        with fs.open_output_stream(inner) as f:
            f.write(data)
    except Exception as e:
        raise error(path, e, "cannot write") from None
    return str(path)


def check_writable(folder: str | os.PathLike) -> None:
    """Fail early, in one line, when ``folder`` cannot be written (a store that cannot be reached,
    a missing bucket, no permission): put and delete a small probe object."""
    probe = join(folder, f".negatron-probe-{os.getpid()}")
    write_bytes(probe, b"")
    fs, inner = filesystem(probe)
    try:
        fs.delete_file(inner)
    except Exception as e:
        raise error(probe, e, "cannot delete") from None


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> str:
    return write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def write_with(path: str | os.PathLike, write: Callable[[Path], Any], suffix: str = "") -> str:
    """Let ``write(local_file)`` produce a file (a plot, a Parquet table), then store it at
    ``path`` atomically."""
    if not is_remote(path):
        from .files import atomic_write

        return str(atomic_write(Path(filesystem(path)[1]), write))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="negatron-") as tmp:
        local = Path(tmp) / f"out{suffix}"
        write(local)
        if local.exists():
            upload_file(local, path)
    return str(path)


def upload_file(local: Path, path: str | os.PathLike) -> None:
    fs, inner = filesystem(path)
    try:
        with open(local, "rb") as src, fs.open_output_stream(inner) as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    except Exception as e:
        raise error(path, e, "cannot write") from None


def put_folder(local: Path, dst: str | os.PathLike, ignore: tuple[str, ...] = ()) -> str:
    """Make ``dst`` hold exactly the files of the local folder ``local`` (minus top-level names
    in ``ignore``). Local: built beside and swapped in. Object store: every file put (each one
    atomic), then the files no longer present removed."""
    local = Path(local)
    if not is_remote(dst):
        from .files import replace_folder

        return str(replace_folder(Path(filesystem(dst)[1]), lambda tmp: shutil.copytree(
            local, tmp, ignore=lambda d, names: [n for n in names if Path(d) == local and n in ignore])))
    new = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                 if p.is_file() and p.relative_to(local).parts[0] not in ignore)
    for rel in new:
        upload_file(local / rel, join(dst, rel))
    stale = {rel for rel, _, _ in list_files(dst)} - set(new)
    fs, inner = filesystem(dst)
    for rel in sorted(stale):
        try:
            fs.delete_file(f"{inner.rstrip('/')}/{rel}")
        except Exception as e:
            raise error(join(dst, rel), e, "cannot delete") from None
    return str(dst)


def get_folder(src: str | os.PathLike, local: Path) -> Path:
    """Download every file under ``src`` into the local folder ``local`` (created)."""
    files = list_files(src)
    if not files:
        raise StorageError(f"{redact(src)}: no files there")
    for rel, _, _ in files:
        out = Path(local) / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(read_bytes(join(src, rel)))
    return Path(local)


def cache_root() -> Path:
    """Where fetched folders are kept: ``$NEGATRON_CACHE/remote`` or ``~/.cache/negatron/remote``."""
    base = os.environ.get("NEGATRON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "negatron")
    return Path(base) / "remote"


def _content_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def local_folder(src: str | os.PathLike) -> Path:
    """A local copy of the folder ``src`` (a plain path is returned as it is).

    The copy is keyed by its content (a hash of every file's path and bytes), so one model reached
    through two URIs is stored once. A remote folder is fetched once: the URI (without its query)
    and its listing (names, sizes, modification times) point to the content they were fetched as,
    and only a changed listing fetches again. The copy is built beside its final name and renamed
    into place, so concurrent fetches on one machine never see half a folder.
    """
    if not is_uri(src):
        return Path(src)
    if not is_remote(src):
        return Path(filesystem(src)[1])
    files = list_files(src)
    if not files:
        raise StorageError(f"{redact(src)}: no files there (not a model folder)")
    root = cache_root()
    listing = hashlib.sha256(json.dumps([_split(str(src))[0], files]).encode()).hexdigest()[:32]
    pointer = root / "by-listing" / listing
    if pointer.is_file():
        known = root / pointer.read_text().strip()
        if known.is_dir():
            return known
    import tempfile

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        get_folder(src, tmp)
        dst = root / _content_hash(tmp)[:32]
        if not dst.is_dir():
            try:
                os.replace(tmp, dst)
            except OSError:  # another process put the same content there first
                if not dst.is_dir():
                    raise
        pointer.parent.mkdir(parents=True, exist_ok=True)
        from .files import write_text

        write_text(pointer, dst.name + "\n")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
