"""Local and ``s3://`` paths behind one small API (fsspec; s3fs for S3).

Why: the same job runs on a laptop (``./artifacts``) and on a cluster (``s3://bucket/...``).
Everything that touches storage goes through here, so a path is just a string and the
filesystem object that serves it is built in one place:

- ``s3://`` uses s3fs with ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) honoured, so a
  MinIO / moto endpoint works like AWS. Credentials present in the environment
  (``AWS_ACCESS_KEY_ID`` ...) are put into the filesystem object: Ray pickles it into its
  workers, which then need no environment of their own. Without them, boto's default
  chain (instance role, profile) applies on each worker.
- local paths (and ``file://``) are made absolute, because Ray workers may run in another
  working directory.

Directory listings are never cached: shards written by Ray workers must be visible to the
driver that lists them a moment later.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any, Iterable

import fsspec

_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
S3_SCHEMES = ("s3", "s3a")


class StorageError(OSError):
    """A path that cannot be served (unknown scheme, malformed URI)."""


def scheme(path: str) -> str:
    """The URI scheme in lower case ("s3", "file"), or "" for a plain local path."""
    m = _SCHEME_RE.match(str(path))
    return m.group(1).lower() if m else ""


def is_remote(path: str) -> bool:
    """True for object-store URIs (s3://); False for local paths and file://."""
    return scheme(path) not in ("", "file")


def normalize(path: str | os.PathLike) -> str:
    """A canonical string: absolute local path, or ``s3://bucket/key`` without a trailing slash."""
    path = os.fspath(path)
    sch = scheme(path)
    if sch in ("", "file"):
        local = path[len("file://"):] if sch == "file" else path
        return os.path.abspath(os.path.expanduser(local))
    if sch in S3_SCHEMES:
        rest = path.split("://", 1)[1].strip("/")
        if not rest:
            raise StorageError(f"{path!r} names no bucket")
        return f"s3://{rest}"
    raise StorageError(f"unsupported storage scheme {sch!r} in {path!r}; use a local path or s3://")


def s3_options() -> dict[str, Any]:
    """s3fs constructor options from the environment (endpoint, credentials, region)."""
    client: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        client["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client["region_name"] = region
    options: dict[str, Any] = {"client_kwargs": client, "use_listings_cache": False}
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options.update(key=key, secret=secret, token=os.environ.get("AWS_SESSION_TOKEN") or None)
    return options


def s3_configured() -> bool:
    """True when the environment names an S3 endpoint or credentials (worth shipping to workers)."""
    return any(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID"))


def s3_filesystem() -> fsspec.AbstractFileSystem:
    """An s3fs filesystem configured from the environment (see :func:`s3_options`)."""
    try:
        import s3fs
    except ImportError as exc:  # pragma: no cover - s3fs is a project dependency
        raise StorageError("s3:// paths need the 's3fs' package") from exc
    return s3fs.S3FileSystem(**s3_options())


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path as that filesystem spells it) for a local path or URI.

    S3 paths become ``bucket/key`` (s3fs's own spelling); local paths become absolute.
    """
    norm = normalize(path)
    if norm.startswith("s3://"):
        return s3_filesystem(), norm[len("s3://"):]
    return fsspec.filesystem("file"), norm


def to_uri(fs: fsspec.AbstractFileSystem, fs_path: str) -> str:
    """Inverse of :func:`filesystem`: the user-facing string of a filesystem path."""
    return fs_path if _is_local(fs) else "s3://" + fs_path.lstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for local paths and URIs alike (POSIX separators in URIs)."""
    if is_remote(base):
        return posixpath.join(normalize(base), *parts)
    return os.path.join(normalize(base), *parts)


def parent(path: str) -> str:
    """The directory that holds ``path``."""
    norm = normalize(path)
    if norm.startswith("s3://"):
        head = posixpath.dirname(norm[len("s3://"):])
        if not head:
            raise StorageError(f"{path!r} is a bucket; it has no parent directory")
        return "s3://" + head
    return os.path.dirname(norm)


def resolve(ref: str, base_dir: str) -> str:
    """Where a manifest's ``image`` field points: URIs and absolute paths stay, relative
    paths are joined to the manifest's directory (local or s3)."""
    ref = str(ref)
    if scheme(ref):
        return normalize(ref)
    if os.path.isabs(ref):
        if is_remote(base_dir):
            raise StorageError(f"absolute local path {ref!r} in a manifest stored at {base_dir}; "
                               "use a path relative to the manifest or an s3:// URI")
        return os.path.normpath(ref)
    if is_remote(base_dir):
        joined = posixpath.normpath(posixpath.join(normalize(base_dir)[len("s3://"):], ref))
        return "s3://" + joined
    return os.path.normpath(os.path.join(normalize(base_dir), ref))


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def is_dir(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.isdir(p)


def read_bytes(path: str, max_bytes: int | None = None, fs: fsspec.AbstractFileSystem | None = None) -> bytes:
    """The content of a file; ``FileNotFoundError`` if absent, ``ValueError`` over ``max_bytes``.

    ``fs`` (with ``path`` in that filesystem's spelling) skips building a filesystem per call.
    """
    if fs is None:
        fs, path = filesystem(path)
    with fs.open(path, "rb") as fh:
        size = getattr(fh, "size", None)
        if max_bytes is not None and size is not None and size > max_bytes:
            raise ValueError(f"{path}: {size} bytes exceeds the limit of {max_bytes} bytes")
        data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"{path}: more than {max_bytes} bytes")
    return data


def write_bytes(path: str, data: bytes) -> str:
    """Write (replace) a file, creating local parent directories; returns the normalized path."""
    fs, p = filesystem(path)
    if _is_local(fs):
        fs.makedirs(os.path.dirname(p), exist_ok=True)
    with fs.open(p, "wb") as fh:
        fh.write(data)
    return normalize(path)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_text(path: str, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def makedirs(path: str) -> None:
    """Create a local directory tree; a no-op for object stores (prefixes need no creation)."""
    fs, p = filesystem(path)
    if _is_local(fs):
        fs.makedirs(p, exist_ok=True)


def list_files(directory: str, suffix: str | None = None, recursive: bool = False) -> list[str]:
    """Sorted files directly in ``directory`` (or below it with ``recursive``), as URIs/paths.

    A missing directory lists as empty.
    """
    fs, p = filesystem(directory)
    if not fs.exists(p):
        return []
    if recursive:
        names = fs.find(p)
    else:
        names = [e["name"] for e in fs.ls(p, detail=True) if e.get("type") == "file"]
    out = [to_uri(fs, n) for n in names if suffix is None or n.endswith(suffix)]
    return sorted(out)


def remove(paths: Iterable[str]) -> int:
    """Delete files (missing ones are ignored); returns how many were deleted."""
    n = 0
    for path in paths:
        fs, p = filesystem(path)
        if fs.exists(p):
            fs.rm(p)
            n += 1
    return n


def size(path: str) -> int:
    fs, p = filesystem(path)
    return int(fs.size(p))


def upload_dir(local_dir: str | os.PathLike, dst: str) -> str:
    """Copy a local directory's files to ``dst`` (local or s3://), replacing what is there."""
    local_dir = os.fspath(local_dir)
    if not os.path.isdir(local_dir):
        raise StorageError(f"upload_dir: {local_dir} is not a directory")
    fs, target = filesystem(dst)
    if fs.exists(target):
        fs.rm(target, recursive=True)
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            fs.makedirs(os.path.dirname(f"{target}/{rel}"), exist_ok=True)
            fs.put_file(src, f"{target}/{rel}")
    return normalize(dst)


def localize_dir(src: str, cache_root: str | os.PathLike | None = None) -> str:
    """A local directory holding ``src``: itself when local, else a cached download of it.

    Checkpoints on S3 are read this way by training (``init_from``) and Serve replicas.
    """
    if not is_remote(src):
        path = normalize(src)
        if not os.path.isdir(path):
            raise StorageError(f"{path} is not a directory")
        return path
    import hashlib

    norm = normalize(src)
    root = os.fspath(cache_root or os.path.join(os.path.expanduser("~"), ".cache", "nano-deepseek-ocr"))
    local = os.path.join(root, hashlib.sha1(norm.encode()).hexdigest()[:16])
    fs, remote = filesystem(norm)
    if not fs.exists(remote):
        raise StorageError(f"{norm} does not exist")
    tmp = local + ".partial"
    if os.path.isdir(tmp):
        import shutil

        shutil.rmtree(tmp)
    for path in fs.find(remote):
        rel = path[len(remote):].lstrip("/")
        os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
        fs.get_file(path, os.path.join(tmp, rel))
    if os.path.isdir(local):
        import shutil

        shutil.rmtree(local)
    os.replace(tmp, local)
    return local
