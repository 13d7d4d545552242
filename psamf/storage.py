"""The one storage layer: URI -> filesystem, S3 endpoint and region, atomic writes.

Every psamf module that reads or writes outside the process goes through here, so a URI means the same
thing to Ray Train (run storage), Ray Data (shard reads), `psamf prepare` (shard writes, through fsspec)
and the run outputs:

    resolve(uri, s3_endpoint=None) -> Location   one resolution of a local path, s3://, gs://, ... URI
    s3_endpoint(explicit=None)                   the custom S3 endpoint: explicit, else AWS_ENDPOINT_URL_S3,
                                                 else AWS_ENDPOINT_URL, else None (AWS itself)
    s3_region()                                  AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1
    write_bytes / read_bytes / exists / write_json / read_json / json_safe   on a pyarrow (or fsspec) filesystem
    atomic_open(path)                            a local file that appears only once completely written

Why one resolver: with a custom endpoint (MinIO, moto, Ceph) pyarrow's `S3FileSystem` must get the
endpoint, path-style addressing (`force_virtual_addressing=False`: virtual-host style would put the bucket
name into the host name, which a bare IP endpoint cannot serve) and an explicit region (no lookup against
AWS). Ray Train then wants the scheme dropped (`RunConfig(storage_path=<bucket/prefix>,
storage_filesystem=fs)`; see docs/ray-operations.md). Without a custom endpoint, `s3://` goes to AWS
through pyarrow's own resolution and the standard AWS credential chain, in every process.

Atomic writes: local files are written under a temporary name in the same directory and renamed (POSIX
rename is atomic); object stores publish an object only when its single PUT completes, so a reader sees
the old object or the new one, never a half.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping
from urllib.parse import urlparse

__all__ = [
    "Location",
    "resolve",
    "s3_endpoint",
    "s3_region",
    "s3_filesystem",
    "write_bytes",
    "move_dir",
    "read_bytes",
    "exists",
    "write_json",
    "read_json",
    "json_safe",
    "atomic_open",
]

DEFAULT_REGION = "us-east-1"


# --------------------------------------------------------------------------------------------
# S3 endpoint and region: read from the environment here and nowhere else
# --------------------------------------------------------------------------------------------


def s3_endpoint(explicit: str | None = None) -> str | None:
    """The custom S3 endpoint: `explicit` (a config field), else the standard AWS variables, else None (AWS)."""
    return _endpoint_or_env(explicit)


def _endpoint_or_env(explicit: str | None) -> str | None:
    # separate from s3_endpoint() because resolve()'s parameter of that name shadows it
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    """The region sent to a custom endpoint; explicit so that nothing looks it up against AWS."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def _split_endpoint(endpoint: str) -> tuple[str, str]:
    """'http://127.0.0.1:9000' -> ('127.0.0.1:9000', 'http'); a bare host:port means https."""
    if "://" in endpoint:
        u = urlparse(endpoint)
        return u.netloc, u.scheme or "https"
    return endpoint, "https"


def s3_filesystem(endpoint: str | None = None):
    """A pyarrow S3FileSystem; with `endpoint`, pointed at it (path-style, explicit region: no lookups)."""
    import pyarrow.fs as pafs

    if not endpoint:
        return pafs.S3FileSystem()
    host, scheme = _split_endpoint(endpoint)
    return pafs.S3FileSystem(endpoint_override=host, scheme=scheme, region=s3_region(),
                             force_virtual_addressing=False)


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


@dataclass
class Location:
    """One resolved storage URI, in the forms each consumer needs.

    storage_path:        what to pass as `RunConfig(storage_path=...)` or as the base of `read_parquet`
                         paths (scheme dropped when `storage_filesystem` is set)
    storage_filesystem:  a pyarrow filesystem for `RunConfig(storage_filesystem=...)` / `read_parquet(
                         filesystem=...)`, or None (Ray / pyarrow infer it from the scheme)
    fs, root:            the pyarrow filesystem and scheme-less path psamf itself reads and writes with
                         (fs is None for a scheme only fsspec knows; `fsspec()` still works there)
    uri:                 the URI as the user wrote it (for messages), absolute when local
    endpoint:            the custom S3 endpoint in use, or None
    """

    storage_path: str
    storage_filesystem: Any
    fs: Any
    root: str
    uri: str
    endpoint: str | None = None

    def join(self, *parts: str) -> str:
        """A scheme-less path under `root` on `fs`."""
        return "/".join([self.root.rstrip("/"), *(p.strip("/") for p in parts)]) if parts else self.root

    def run_dir(self, name: str) -> str:
        """The scheme-less path of a run's directory on `self.fs`."""
        return self.join(name)

    def run_uri(self, name: str) -> str:
        """A run's directory as a URI, for messages."""
        return f"{self.uri.rstrip('/')}/{name}"

    def fsspec(self, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
        """(fsspec filesystem, scheme-less path) for code that writes through fsspec (`psamf prepare`).

        Same resolution as `fs`: for `s3://` with a custom endpoint, the same endpoint, path-style
        addressing and region; `storage_options` (fsspec's own, e.g. `endpoint_url`) win where given.
        """
        import fsspec

        opts = dict(storage_options or {})
        if "://" not in self.uri:
            return fsspec.filesystem("file"), self.root
        if self.uri.startswith(("s3://", "s3a://")) and self.endpoint:
            client = dict(opts.get("client_kwargs") or {})
            if "endpoint_url" not in opts and "endpoint_url" not in client:
                opts["endpoint_url"] = self.endpoint
            client.setdefault("region_name", s3_region())
            opts["client_kwargs"] = client
            config = dict(opts.get("config_kwargs") or {})
            config.setdefault("s3", {"addressing_style": "path"})
            opts["config_kwargs"] = config
        fs, path = fsspec.core.url_to_fs(self.uri, **opts)
        return fs, path.rstrip("/")


def resolve(uri: str, s3_endpoint: str | None = None) -> Location:
    """Resolve a local path, `s3://bucket/prefix` (`s3a://` alike) or any URI pyarrow understands.

    `s3_endpoint`: a custom S3 endpoint (config field); else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`.
    Local paths are made absolute here, on the driver: Ray workers run in other working directories.
    """
    import pyarrow.fs as pafs

    if not uri:
        raise ValueError("storage URI must not be empty")
    if "://" not in uri:
        root = os.path.abspath(os.path.expanduser(uri)).rstrip("/") or "/"
        return Location(storage_path=root, storage_filesystem=None, fs=pafs.LocalFileSystem(), root=root, uri=root)
    if uri.startswith(("s3://", "s3a://")) and "?" not in uri:
        root = uri.split("://", 1)[1].rstrip("/")
        endpoint = _endpoint_or_env(s3_endpoint)
        if endpoint:
            fs = s3_filesystem(endpoint)
            return Location(storage_path=root, storage_filesystem=fs, fs=fs, root=root, uri=uri, endpoint=endpoint)
        return Location(storage_path=f"s3://{root}", storage_filesystem=None, fs=pafs.S3FileSystem(), root=root,
                        uri=uri)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (ValueError, NotImplementedError) as e:  # a scheme only fsspec knows (memory://, az://, ...)
        fs, root = None, uri.split("://", 1)[1]
        reason = str(e)
        if not _fsspec_knows(uri):
            raise ValueError(f"{uri}: neither pyarrow nor fsspec can open this URI ({reason})") from None
    return Location(storage_path=uri, storage_filesystem=None, fs=fs, root=root.rstrip("/"), uri=uri)


def _fsspec_knows(uri: str) -> bool:
    import fsspec

    return uri.split("://", 1)[0] in fsspec.available_protocols()


# --------------------------------------------------------------------------------------------
# Atomic file primitives
# --------------------------------------------------------------------------------------------


def _is_fsspec(fs: Any) -> bool:
    return hasattr(fs, "pipe_file")


def _is_local(fs: Any) -> bool:
    if _is_fsspec(fs):
        proto = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        return "file" in proto or "local" in proto
    import pyarrow.fs as pafs

    return isinstance(fs, pafs.LocalFileSystem)


def write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: temp name + rename on local disks, one PUT on object stores.

    `fs` is a pyarrow filesystem or an fsspec one (prepare's manifest). On failure the temporary file is
    removed and an existing `path` is left as it was.
    """
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if _is_fsspec(fs):
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if not _is_local(fs):
            fs.pipe_file(path, bytes(data))
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.pipe_file(tmp, bytes(data))
            fs.mv(tmp, path)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
        return
    if parent:
        fs.create_dir(parent, recursive=True)
    if not _is_local(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    finally:
        if exists(fs, tmp):
            fs.delete_file(tmp)


def move_dir(fs: Any, src: str, dst: str) -> None:
    """Move a directory on a pyarrow filesystem: a rename on a local disk; on an object store, where there are no
    directories to rename (pyarrow's S3 `move` copies a single object and fails on a prefix), every object is
    copied under `dst`, then `src` is deleted, so a failure half way leaves `src` whole."""
    import pyarrow.fs as pafs

    if _is_local(fs):
        fs.move(src, dst)
        return
    pafs.copy_files(src, dst, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(src)


def read_bytes(fs: Any, path: str) -> bytes:
    """The whole object at `path` (pyarrow filesystem)."""
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(fs: Any, path: str) -> bool:
    """Whether `path` exists on a pyarrow filesystem."""
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type != pafs.FileType.NotFound


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, numpy scalars -> Python, tuples -> lists: standard JSON (strict readers choke on NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(fs: Any, path: str, obj: Any) -> None:
    """Indented, strict JSON (see `json_safe`), written atomically."""
    write_bytes(fs, path, (json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n").encode())


def read_json(fs: Any, path: str) -> Any:
    """Parse the JSON object at `path` (pyarrow filesystem)."""
    return json.loads(read_bytes(fs, path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """A local file that appears at `path` only once it is completely written (temp name + fsync + rename).

    Used where a local file is streamed (synth's large pickles) or written in one piece (`Config.to_yaml`).
    If the block raises, the temporary file is removed and an existing `path` keeps its old content.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def absolute_model_paths(cfg: Any) -> Any:
    """`cfg` (a Config) with `model.text_model` / `model.personality_model` made absolute where they name an
    existing local directory relative to this process's working directory. Hub names (`bert-base-uncased`) and
    `psamf:` names are left alone. For configs handed to Ray workers and Tune trials, whose working directories
    differ: there a relative directory would be taken for a hub name and fail to download."""
    items = {}
    for key in ("text_model", "personality_model"):
        v = getattr(cfg.model, key, None)
        if isinstance(v, str) and v and "://" not in v and not v.startswith("psamf:") and not os.path.isabs(v) \
                and os.path.isdir(os.path.expanduser(v)):
            items[f"model.{key}"] = os.path.abspath(os.path.expanduser(v))
    return cfg.replace(items, source="config (local model directories made absolute)") if items else cfg


def unreachable_store(e: BaseException) -> str | None:
    """A one-line message when `e` says the object store could not be used at all (no connection to the endpoint,
    no credentials: botocore's own errors, which s3fs passes through untranslated, and pyarrow's NETWORK_CONNECTION
    error), else None. The message names the endpoint URL that was tried, never a credential."""
    # pyarrow's S3 filesystem reports the same as an OSError naming the AWS error and curl's code
    pyarrow_says = isinstance(e, OSError) and "AWS Error NETWORK_CONNECTION" in str(e)
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:  # no s3fs installed: nothing of botocore's can be raised
        BotoCoreError = ()  # noqa: N806
    if not (pyarrow_says or isinstance(e, BotoCoreError)):
        return None
    return (f"the object store could not be used: {e} (check data.s3_endpoint / run.s3_endpoint / --s3-endpoint or "
            "AWS_ENDPOINT_URL_S3, and the AWS credentials in the environment)")


def same_model_name(a: str | None, b: str | None) -> bool:
    """Whether two model or tokenizer names (hub names, `psamf:` names, local directories or files) name the same
    thing: equal strings, or local paths that resolve to one path (a relative one against this process's working
    directory). `psamf prepare` records names as given, while configs handed to workers carry absolute
    directories (`absolute_model_paths`): `encoders/persona` and `/home/me/encoders/persona` are one encoder."""
    if a == b:
        return True

    def norm(v: str | None) -> str | None:
        if isinstance(v, str) and v and "://" not in v and not v.startswith("psamf:") \
                and os.path.exists(os.path.expanduser(v)):
            return os.path.realpath(os.path.expanduser(v))
        return v

    return norm(a) == norm(b)


def absolute_local(uri: str) -> str:
    """A local path made absolute (against this process's working directory); URIs with a scheme unchanged.

    For configs handed to other processes: a Ray Tune trial runs in its own working directory (its trial
    directory), where a relative `data.uri` or `run.storage_path` would name another place."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
