"""Object storage for the volume (`LORA_STORAGE_URL=s3://bucket/prefix`): hosts that share no disk.

The bucket holds what the volume holds, under the same layout relative to the base path: `<prefix>/datasets/
<id>.jsonl`, `<prefix>/<output>/adapter_model.safetensors`, `<prefix>/.state/<job>/step-000120/...`. Every host
keeps its own local base path as a working copy: the API writes an upload there and pushes it; a worker stages
what a job reads (`pull_file`, `pull_tree`) and pushes what it writes (`push_tree`) before the job is recorded.

A folder (an adapter, a checkpoint, a saved state) is complete in the store only once its manifest,
`.lora-complete.json`, is there: it is written last, lists every file with its size, and a reader takes the
folder only through it. So an upload that failed half-way leaves nothing a reader takes for an adapter, and a
retry writes the same keys again. Files are sent in parts by boto3's managed transfer (parts retried on their
own; large files in parallel parts).

boto3 reads the standard AWS settings itself (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
`AWS_REGION`/`AWS_DEFAULT_REGION`, profiles), so S3, MinIO, Ceph and R2 all work. Calls time out and retry a
bounded number of times: a store that is down fails the job with a clear `StorageUnavailable`, never hangs it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_UPLOAD_TICKET = re.compile(r"^\..+\.upload$")  # an unfinished upload's id, beside its file (`_push_parts`)
MANIFEST = ".lora-complete.json"  # written last: the folder is complete in the store
PART_BYTES = 16 * 1024 * 1024  # multipart parts (and the size from which a file goes in parts)


class StorageUnavailable(RuntimeError):
    """The store could not be reached or refused a call (after boto3's retries)."""


class OutsideStore(ValueError):
    """A path that is not under the volume's base path, or a key that would leave the prefix."""


@dataclass(frozen=True)
class StorageUrl:
    bucket: str
    prefix: str  # "" or "a/b" (no slashes at either end)

    @classmethod
    def parse(cls, url: str) -> StorageUrl:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"LORA_STORAGE_URL must look like s3://bucket/prefix, not {url!r}")
        prefix = parts.path.strip("/")
        if any(piece in ("", ".", "..") for piece in prefix.split("/")) and prefix:
            raise ValueError(
                f"LORA_STORAGE_URL must look like s3://bucket/prefix, with no empty, '.' or '..' part "
                f"in the prefix, not {url!r}"
            )
        return cls(parts.netloc, prefix)


def _describe(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', type(exc).__name__)}: {error.get('Message', exc)}"
    return f"{type(exc).__name__}: {exc}"


class ObjectStore:
    """The bucket behind a base path. Every method takes local paths under `base`, mapped to keys."""

    def __init__(self, url: str, base: Path, *, client: S3Client | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.url = url
        self.location = StorageUrl.parse(url)
        self.base = base.resolve()
        # Short timeouts and a few retries: a store that is down is a clear error in seconds, not a hang.
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"})
        self.client: S3Client = client or boto3.client("s3", config=config)
        self._local = threading.local()

    # ------------------------------------------------------------------ keys
    def rel(self, path: Path) -> PurePosixPath:
        """`path` relative to the base path (OutsideStore if it is not under it)."""
        try:
            rel = path.resolve().relative_to(self.base)
        except ValueError:
            raise OutsideStore(f"{path} is not under the base path {self.base}") from None
        return PurePosixPath(rel.as_posix())

    def key(self, path: Path | PurePosixPath) -> str:
        rel = self.rel(path) if isinstance(path, Path) else path  # a Path is local; a PurePosixPath is relative
        if rel.is_absolute() or any(part in ("..", "") for part in rel.parts):
            raise OutsideStore(f"{rel} leaves the store's prefix")
        text = rel.as_posix().strip("/")
        text = "" if text == "." else text
        return "/".join(part for part in (self.location.prefix, text) if part)

    def _folder_key(self, path: Path | PurePosixPath) -> str:
        key = self.key(path)
        return f"{key}/" if key else ""

    # ------------------------------------------------------------------ calls
    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        # Boto3Error: the managed transfer rewraps a ClientError as S3UploadFailedError, exhausted download
        # retries as RetriesExceededError; neither is a BotoCoreError or ClientError.
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            raise StorageUnavailable(f"object store {self.url}: {what} failed: {_describe(exc)}") from exc

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=4)

    def exists(self, path: Path | PurePosixPath) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self._calling(f"checking {self.key(path)}"):
                self.client.head_object(Bucket=self.location.bucket, Key=self.key(path))
        except StorageUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise
        return True

    def push_file(self, path: Path) -> None:
        """Upload one file to its key: in one request up to PART_BYTES, else in parts, resumably (`_push_parts`)."""
        key = self.key(path)
        if path.stat().st_size <= PART_BYTES:
            with self._calling(f"uploading {key}"):
                self.client.upload_file(str(path), self.location.bucket, key, Config=self._transfer())
            return
        self._push_parts(path, key)

    def _push_parts(self, path: Path, key: str) -> None:
        """A multipart upload that a retry resumes: its upload id is kept beside the file (`.<name>.upload`, with
        the file's size and mtime), and a later call, in this process or the next (a worker restarted mid-upload),
        asks the store which parts it has and sends only the others. The parts become the object only when the
        upload is completed, so a reader never sees a partial file."""
        st = path.stat()
        ticket = path.with_name(f".{path.name}.upload")
        bucket = self.location.bucket
        upload_id = self._resumable_upload(ticket, key, st)
        done: dict[int, str] = {}
        if upload_id is not None:
            try:
                with self._calling(f"listing the parts of {key}"):
                    pages = self.client.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id)
                    for page in pages:
                        for part in page.get("Parts", []):
                            if part.get("Size") == min(PART_BYTES, st.st_size - (part["PartNumber"] - 1) * PART_BYTES):
                                done[part["PartNumber"]] = part["ETag"]
            except StorageUnavailable:
                upload_id = None  # expired or aborted: start again
        if upload_id is None:
            with self._calling(f"starting the upload of {key}"):
                upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
            ticket.write_text(json.dumps({"key": key, "upload_id": upload_id, "size": st.st_size,
                                          "mtime_ns": st.st_mtime_ns}))  # fmt: skip
            done = {}
        count = (st.st_size + PART_BYTES - 1) // PART_BYTES
        with path.open("rb") as fh:
            for number in range(1, count + 1):
                if number in done:
                    continue
                fh.seek((number - 1) * PART_BYTES)
                body = fh.read(PART_BYTES)
                with self._calling(f"uploading part {number}/{count} of {key}"):
                    done[number] = self.client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                                           PartNumber=number, Body=body)["ETag"]  # fmt: skip
        parts = [{"PartNumber": n, "ETag": done[n]} for n in range(1, count + 1)]
        with self._calling(f"completing the upload of {key}"):
            self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})  # type: ignore[typeddict-item]  # fmt: skip
        ticket.unlink(missing_ok=True)

    @staticmethod
    def _resumable_upload(ticket: Path, key: str, st: os.stat_result) -> str | None:
        """The upload id an earlier call left for this very file (same key, size and mtime), else None."""
        try:
            kept = json.loads(ticket.read_text())
        except (OSError, ValueError):
            return None
        same = kept.get("key") == key and kept.get("size") == st.st_size and kept.get("mtime_ns") == st.st_mtime_ns
        return str(kept["upload_id"]) if same and kept.get("upload_id") else None

    def pull_file(self, path: Path) -> bool:
        """Download `path`'s key to `path` (through a hidden sibling, renamed into place); False when the store
        has no such key. A file already there is taken as it is: keys are written once."""
        if path.exists():
            return True
        if not self.exists(path):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with self._calling(f"downloading {self.key(path)}"):
                self.client.download_file(self.location.bucket, self.key(path), str(part), Config=self._transfer())
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        return True

    def list_tree(self, path: Path | PurePosixPath) -> dict[str, int]:
        """Every object under `path`'s folder key: its path relative to the folder -> its size."""
        prefix = self._folder_key(path)
        found: dict[str, int] = {}
        with self._calling(f"listing {prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    found[item["Key"][len(prefix) :]] = int(item["Size"])
        return found

    def manifest(self, path: Path | PurePosixPath) -> dict[str, int] | None:
        """The complete folder's files and sizes, or None when the store has no complete folder there."""
        from botocore.exceptions import ClientError

        key = self._folder_key(path) + MANIFEST
        try:
            with self._calling(f"reading {key}"):
                body = self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"].read()
        except StorageUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        files = json.loads(body)["files"]
        return {str(name): int(size) for name, size in files.items()}

    def push_tree(self, folder: Path) -> dict[str, int]:
        """Upload every file under `folder`, then its manifest (last: only then is the folder complete). Keys
        the folder had in the store but no longer has are removed after the manifest, so a reader never sees
        a complete folder with a file missing."""
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
                 if p.is_file() and not _UPLOAD_TICKET.match(p.name)}  # fmt: skip
        files.pop(MANIFEST, None)
        before = self.list_tree(folder)
        if MANIFEST in before:  # replaced: the old manifest goes first, so no reader mixes old and new files
            self.delete_keys([self._folder_key(folder) + MANIFEST])
        for name in files:
            self.push_file(folder / name)
        key = self._folder_key(folder) + MANIFEST
        with self._calling(f"writing {key}"):
            self.client.put_object(Bucket=self.location.bucket, Key=key, Body=json.dumps({"files": files}).encode())
        stale = [self._folder_key(folder) + name for name in before if name not in files and name != MANIFEST]
        self.delete_keys(stale)
        return files

    def listed_folder(self, path: Path | PurePosixPath) -> dict[str, int]:
        """A folder put into the store by other means (a base model synced with `aws s3 sync`): every object under
        it, without the manifest our own folders carry."""
        return {name: size for name, size in self.list_tree(path).items() if name and not name.endswith("/")}

    def pull_tree(self, folder: Path, *, listed_ok: bool = False) -> bool:
        """Stage the complete folder at `folder` (downloaded beside it, renamed into place); False when the store
        has none there. With `listed_ok`, a folder without a manifest (one a user synced there) is taken as listed.
        A local folder already complete (the same files and sizes) is kept as it is."""
        files = self.manifest(folder)
        if files is None and listed_ok:
            files = self.listed_folder(folder) or None
        if files is None:
            return False
        if folder.is_dir() and all(
            (folder / n).is_file() and (folder / n).stat().st_size == s for n, s in files.items()
        ):
            return True
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.pull")
        try:
            for name, size in files.items():
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                key = self._folder_key(folder) + name
                with self._calling(f"downloading {key}"):
                    self.client.download_file(self.location.bucket, key, str(dest), Config=self._transfer())
                if dest.stat().st_size != size:
                    raise StorageUnavailable(f"object store {self.url}: {key} is {dest.stat().st_size} bytes, "
                                             f"its manifest says {size}")  # fmt: skip
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True

    def delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            with self._calling(f"deleting {len(batch)} keys"):
                self.client.delete_objects(Bucket=self.location.bucket,
                                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})  # fmt: skip

    def delete_tree(self, folder: Path | PurePosixPath) -> None:
        """Remove the folder's keys, its manifest first (it stops being complete before any file goes)."""
        prefix = self._folder_key(folder)
        names = self.list_tree(folder)
        if MANIFEST in names:
            self.delete_keys([prefix + MANIFEST])
        self.delete_keys([prefix + name for name in names if name != MANIFEST])

    def delete_file(self, path: Path | PurePosixPath) -> None:
        self.delete_keys([self.key(path)])

    def stream(self, path: Path | PurePosixPath, *, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes in chunks, read from the store as they are sent (never the whole file at once)."""
        key = self.key(path)
        with self._calling(f"reading {key}"):
            body = self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
        try:
            with self._calling(f"reading {key}"):
                yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def presign(self, path: Path | PurePosixPath, *, expires_s: int, filename: str | None = None) -> str:
        params: dict[str, Any] = {"Bucket": self.location.bucket, "Key": self.key(path)}
        if filename:
            params["ResponseContentDisposition"] = f'attachment; filename="{filename}"'
        with self._calling(f"presigning {params['Key']}"):
            return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)

    def check(self) -> None:
        """The bucket is reachable (StorageUnavailable saying why otherwise)."""
        with self._calling(f"reaching bucket {self.location.bucket}"):
            self.client.head_bucket(Bucket=self.location.bucket)


@functools.cache
def _store(url: str, base: str) -> ObjectStore:
    return ObjectStore(url, Path(base))


def object_store(storage_url: str | None, base_path: Path) -> ObjectStore | None:
    """The process's store for these settings (one client, reused), or None with the local folder only."""
    if not storage_url:
        return None
    return _store(storage_url, str(base_path.resolve()))
