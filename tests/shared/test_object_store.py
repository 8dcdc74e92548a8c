"""The object store against a real S3-compatible server (moto's server mode, over HTTP): keys, folders that are
complete only through their manifest, two hosts with no shared disk, and a store that is down or wrong."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path, PurePosixPath

import httpx
import pytest

from shared.object_store import MANIFEST, PART_BYTES, ObjectStore, OutsideStore, StorageUnavailable, StorageUrl
from tests.fixtures.s3_server import S3Server

BIG = PART_BYTES + 1024 * 1024  # past the multipart threshold: goes in two parts


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter(folder: Path, *, big: bool = False) -> dict[str, bytes]:
    """A small adapter folder (a nested file, optionally one that goes in parts); its files' contents."""
    write(folder / "adapter_config.json", b'{"r": 8}')
    write(folder / "weights" / "nested.bin", bytes(range(256)) * 40)
    if big:
        write(folder / "big.bin", bytes(range(251)) * (BIG // 251))
    return files_under(folder)


@pytest.fixture
def hosts(s3_bucket: str, tmp_path: Path) -> tuple[ObjectStore, ObjectStore]:
    """Two hosts with no shared disk: the same bucket and prefix, each with its own local base path."""
    url = f"s3://{s3_bucket}/pre"
    return ObjectStore(url, tmp_path / "host-a"), ObjectStore(url, tmp_path / "host-b")


@pytest.mark.parametrize(
    ("url", "expected"), [("s3://bucket", StorageUrl("bucket", "")), ("s3://bucket/a/b/", StorageUrl("bucket", "a/b"))]
)
def test_storage_url_takes_a_bucket_and_an_optional_prefix(url: str, expected: StorageUrl) -> None:
    assert StorageUrl.parse(url) == expected


@pytest.mark.parametrize("url", ["http://bucket/x", "s3:///x", "s3://b/a/../c", "s3://b/a//c", "bucket"])
def test_storage_url_refuses_other_forms_naming_the_expected_one(url: str) -> None:
    with pytest.raises(ValueError, match=re.escape("s3://bucket/prefix")) as raised:
        StorageUrl.parse(url)
    assert repr(url) in str(raised.value)


def test_keys_carry_the_prefix_and_never_leave_the_base(s3_bucket: str, tmp_path: Path) -> None:
    base = tmp_path / "base"
    store = ObjectStore(f"s3://{s3_bucket}/pre", base)
    assert store.key(base / "datasets" / "x.jsonl") == "pre/datasets/x.jsonl"
    assert store.key(PurePosixPath("datasets/x.jsonl")) == "pre/datasets/x.jsonl"
    assert store.key(base) == "pre"
    assert ObjectStore(f"s3://{s3_bucket}", base).key(base / "a" / "b") == "a/b"
    (tmp_path / "elsewhere").mkdir()
    base.mkdir()
    (base / "link").symlink_to(tmp_path / "elsewhere")
    for outside in (tmp_path / "elsewhere" / "x", base / ".." / "x", base / "link" / "x"):
        with pytest.raises(OutsideStore):
            store.key(outside)
    for escaping in ("../x", "a/../../x", "/etc/passwd"):
        with pytest.raises(OutsideStore):
            store.key(PurePosixPath(escaping))


def test_a_pushed_folder_is_pulled_whole_on_another_host(
    hosts: tuple[ObjectStore, ObjectStore], s3_server: S3Server
) -> None:
    a, b = hosts
    sent = adapter(a.base / "adapters" / "mine", big=True)
    assert a.push_tree(a.base / "adapters" / "mine") == {name: len(data) for name, data in sent.items()}
    assert b.manifest(PurePosixPath("adapters/mine")) == {name: len(data) for name, data in sent.items()}
    assert b.pull_tree(b.base / "adapters" / "mine") is True
    assert files_under(b.base / "adapters" / "mine") == sent
    assert not [p for p in b.base.rglob("*") if p.name.startswith(".") and p.name != MANIFEST]  # no staging left
    head = s3_server.client().head_object(Bucket=a.location.bucket, Key="pre/adapters/mine/big.bin")
    assert head["ContentLength"] == len(sent["big.bin"])
    assert re.fullmatch(r'"[0-9a-f]+-2"', head["ETag"]), head["ETag"]  # went in two parts


def test_files_without_a_manifest_are_no_folder(hosts: tuple[ObjectStore, ObjectStore]) -> None:
    a, b = hosts
    sent = adapter(a.base / "out")
    for name in sent:
        a.push_file(a.base / "out" / name)
    assert set(a.list_tree(a.base / "out")) == set(sent)  # the files are there...
    assert b.manifest(b.base / "out") is None  # ...but the folder is not complete
    assert b.pull_tree(b.base / "out") is False
    assert not b.base.exists() or not any(b.base.iterdir())


def test_pushing_a_smaller_folder_removes_the_dropped_files(hosts: tuple[ObjectStore, ObjectStore]) -> None:
    a, b = hosts
    folder = a.base / "out"
    adapter(folder)
    write(folder / "dropped.bin", b"old" * 100)
    a.push_tree(folder)
    assert "dropped.bin" in a.list_tree(folder)
    (folder / "dropped.bin").unlink()
    write(folder / "adapter_config.json", b'{"r": 16, "alpha": 32}')
    sent = files_under(folder)
    a.push_tree(folder)
    sizes = {name: len(data) for name, data in sent.items()}
    assert a.list_tree(folder) == {**sizes, MANIFEST: a.list_tree(folder)[MANIFEST]}
    assert a.manifest(folder) == sizes
    assert b.pull_tree(b.base / "out") and files_under(b.base / "out") == sent


def test_delete_tree_removes_every_key_of_that_folder_only(
    hosts: tuple[ObjectStore, ObjectStore], s3_server: S3Server
) -> None:
    a, _ = hosts
    adapter(a.base / "mine")
    kept = adapter(a.base / "mine-2")
    a.push_tree(a.base / "mine")
    a.push_tree(a.base / "mine-2")
    a.delete_tree(PurePosixPath("mine"))
    assert a.list_tree(a.base / "mine") == {}
    assert a.manifest(a.base / "mine") is None
    listed = s3_server.client().list_objects_v2(Bucket=a.location.bucket, Prefix="pre/")
    assert sorted(item["Key"] for item in listed["Contents"]) == sorted(f"pre/mine-2/{n}" for n in [*kept, MANIFEST])


def test_pull_file_downloads_a_key_or_says_there_is_none(hosts: tuple[ObjectStore, ObjectStore]) -> None:
    a, b = hosts
    missing = b.base / "datasets" / "none.jsonl"
    assert b.pull_file(missing) is False
    assert not missing.exists()
    data = b'{"messages": []}\n' * 500
    a.push_file(write(a.base / "datasets" / "x.jsonl", data))
    assert b.exists(PurePosixPath("datasets/x.jsonl")) and not b.exists(PurePosixPath("datasets/none.jsonl"))
    assert b.pull_file(b.base / "datasets" / "x.jsonl") is True
    assert (b.base / "datasets" / "x.jsonl").read_bytes() == data
    assert [p.name for p in b.base.rglob("*") if p.is_file()] == ["x.jsonl"]  # no .part left behind


def test_stream_sends_the_bytes_in_chunks(hosts: tuple[ObjectStore, ObjectStore]) -> None:
    a, b = hosts
    data = bytes(range(256)) * 14  # 3584 bytes
    a.push_file(write(a.base / "out" / "model.bin", data))
    chunks = list(b.stream(PurePosixPath("out/model.bin"), chunk_size=1000))
    assert len(chunks) >= 4 and all(len(chunk) <= 1000 for chunk in chunks)
    assert b"".join(chunks) == data


def test_a_presigned_url_serves_the_object(hosts: tuple[ObjectStore, ObjectStore]) -> None:
    a, b = hosts
    data = b"adapter weights " * 300
    a.push_file(write(a.base / "out" / "adapter_model.safetensors", data))
    url = b.presign(PurePosixPath("out/adapter_model.safetensors"), expires_s=60, filename="mine.safetensors")
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200 and response.content == data
    assert 'filename="mine.safetensors"' in response.headers["content-disposition"]


def test_a_store_that_is_down_fails_clearly_and_soon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    down = S3Server(tmp_path / "moto.log").start()
    try:
        bucket = down.create_bucket("lora-down")
    finally:
        down.stop()
    for name, value in down.env.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{bucket}/pre"
    store = ObjectStore(url, tmp_path / "base")
    upload = write(store.base / "datasets" / "x.jsonl", b"{}\n")
    for call in (lambda: store.push_file(upload), lambda: store.pull_tree(store.base / "out")):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match=re.escape(f"object store {url}:")):
            call()
        assert time.monotonic() - started < 30
    assert not (store.base / "out").exists()


def test_a_bucket_that_does_not_exist_is_unavailable(s3_bucket: str, tmp_path: Path) -> None:
    url = f"s3://{s3_bucket}-missing/pre"
    store = ObjectStore(url, tmp_path / "base")
    with pytest.raises(StorageUnavailable, match=re.escape(f"object store {url}: reaching bucket")):
        store.check()
    ObjectStore(f"s3://{s3_bucket}", tmp_path / "base").check()  # the bucket that exists is reachable
    with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
        store.push_file(write(store.base / "datasets" / "x.jsonl", b"{}\n"))
    with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
        store.pull_tree(store.base / "out")


def test_a_multipart_upload_cut_off_resumes_with_the_parts_it_lacks(tmp_path: Path, s3_bucket: str) -> None:
    """A worker restarted mid-upload: the upload id kept beside the file lets the next push send only the
    parts the store does not have (counted on the client's own request events), and no object exists before."""
    base = tmp_path / "host"
    big = base / "out" / "adapter_model.safetensors"
    big.parent.mkdir(parents=True)
    data = os.urandom(2 * PART_BYTES + 1000)  # three parts
    big.write_bytes(data)
    first = ObjectStore(f"s3://{s3_bucket}/pre", base)
    key = first.key(big)
    upload_id = first.client.create_multipart_upload(Bucket=s3_bucket, Key=key)["UploadId"]
    first.client.upload_part(Bucket=s3_bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=data[:PART_BYTES])
    st = big.stat()
    (big.parent / f".{big.name}.upload").write_text(
        json.dumps({"key": key, "upload_id": upload_id, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    )
    assert not first.exists(big)  # the parts sent are no object yet

    again = ObjectStore(f"s3://{s3_bucket}/pre", base)  # the restarted process
    sent: list[int] = []
    again.client.meta.events.register(
        "provide-client-params.s3.UploadPart", lambda params, **_: sent.append(params["PartNumber"])
    )
    assert again.push_tree(big.parent) == {"adapter_model.safetensors": len(data)}  # the ticket is no file of it
    assert sent == [2, 3]
    assert b"".join(again.stream(big)) == data
    assert not (big.parent / f".{big.name}.upload").exists()
