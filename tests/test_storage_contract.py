"""The storage contract (storage/base.py), run against every driver: the filesystem and S3 (a
moto server, tests/s3.py). A driver is done when this suite passes."""
from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest

from registry.config import load
from registry.digest import new_hasher, parse_digest
from registry.storage.base import InvalidOffset, NotFound, WriteInterrupted
from registry.storage.filesystem import FilesystemStorage
from registry.storage.s3 import S3Storage

MiB = 1 << 20
PART = 5 * MiB  # the S3 driver's part size here: multi-MiB uploads cross part boundaries


@pytest.fixture(params=["filesystem", "s3"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Any]]]:
    """Opens a driver on the same data (each call: as another process would)."""
    opened: list[Any] = []
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        cfg = load(None, environ={}, overrides={"storage": {
            "rootDirectory": str(tmp_path / "data"),
            "storageDriver": s3.file_driver(chunksize=PART, partConcurrency=2, rootdirectory="reg")}})

        async def make() -> Any:
            st = S3Storage(cfg.storage.storage_driver, dedupe=True, spool_dir=tmp_path / "spool")
            await st.open()
            opened.append(st)
            return st
    else:
        async def make() -> Any:
            st = FilesystemStorage(tmp_path / "data", commit=False)
            opened.append(st)
            return st
    yield make
    for st in opened:
        if hasattr(st, "close"):
            await st.close()


@pytest.fixture
async def store(opener: Callable[[], Awaitable[Any]]) -> Any:
    return await opener()


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def broken(data: bytes, size: int) -> AsyncIterator[bytes]:
    """A request body that breaks off after ``data``."""
    async for c in chunks(data, size):
        yield c
    raise ConnectionResetError("client went away")


async def collect(it: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in it])


def digest_of(data: bytes) -> Any:
    return parse_digest("sha256:" + hashlib.sha256(data).hexdigest())


# ----------------------------------------------------------------------------- objects

async def test_write_read_stat_delete(store):
    with pytest.raises(NotFound):
        await store.stat("r/index.json")
    with pytest.raises(NotFound):
        await store.read("r/index.json")
    await store.write("r/index.json", b"one")
    assert await store.stat("r/index.json") == 3
    assert await store.read("r/index.json") == b"one"
    await store.write("r/index.json", b"second")  # replaced whole
    assert await store.read("r/index.json") == b"second"
    assert await store.delete("r/index.json") is True
    assert await store.delete("r/index.json") is False
    with pytest.raises(NotFound):
        await store.stat("r/index.json")


async def test_bad_keys_are_refused(store):
    from registry.storage.base import StorageError
    for key in ("/abs", "a/../b"):
        with pytest.raises(StorageError):
            await store.write(key, b"x")


async def test_link(store):
    await store.write("a/blobs/sha256/aa", b"content")
    await store.link("a/blobs/sha256/aa", "b/blobs/sha256/aa")
    assert await store.read("b/blobs/sha256/aa") == b"content"
    await store.link("a/blobs/sha256/aa", "b/blobs/sha256/aa")  # already there: nothing to do
    with pytest.raises(NotFound):
        await store.link("a/blobs/sha256/missing", "b/blobs/sha256/missing")
    assert await store.delete("a/blobs/sha256/aa")
    assert await store.read("b/blobs/sha256/aa") == b"content"  # a link is a copy of its own


async def test_set_aside_restore_discard(store):
    assert await store.set_aside("a/blobs/sha256/none") is None
    await store.write("a/blobs/sha256/bb", b"bytes")
    aside = await store.set_aside("a/blobs/sha256/bb")
    assert aside is not None
    with pytest.raises(NotFound):
        await store.stat("a/blobs/sha256/bb")
    await store.restore(aside, "a/blobs/sha256/bb")
    assert await store.read("a/blobs/sha256/bb") == b"bytes"
    await store.discard(aside)
    # restore never overwrites a newer object under the key
    aside = await store.set_aside("a/blobs/sha256/bb")
    await store.write("a/blobs/sha256/bb", b"bytes")  # a re-push meanwhile
    await store.restore(aside, "a/blobs/sha256/bb")
    assert await store.read("a/blobs/sha256/bb") == b"bytes"
    await store.discard(aside)
    await store.discard(aside)  # twice is fine


async def test_walk_and_list_dirs(store):
    for key in ("x/one/index.json", "x/one/blobs/sha256/aa", "x/two/oci-layout", "xy/other"):
        await store.write(key, b"12345")
    found = sorted([item async for item in store.walk("x")])
    assert found == [("x/one/blobs/sha256/aa", 5), ("x/one/index.json", 5), ("x/two/oci-layout", 5)]
    assert list(await store.list_dirs("x")) == ["one", "two"]
    assert [item async for item in store.walk("nothing/here")] == []


async def test_walk_mtime_and_list_dir(store):
    import time
    before = time.time()
    for key in ("y/one/oci-layout", "y/one/blobs/sha256/aa", "y/two/index.json", "y/file"):
        await store.write(key, b"123")
    after = time.time()
    found = sorted([item async for item in store.walk_mtime("y/one")])
    assert [(k, n) for k, n, _ in found] == [("y/one/blobs/sha256/aa", 3), ("y/one/oci-layout", 3)]
    assert all(before - 5 < when < after + 5 for _, _, when in found), found  # S3 keeps whole seconds
    assert await store.list_dir("y") == (["one", "two"], ["file"])
    assert await store.list_dir("y/one") == (["blobs"], ["oci-layout"])
    assert await store.list_dir("y/none") == ([], [])
    dirs, _ = await store.list_dir("")
    assert "y" in dirs


async def test_set_aside_names_carry_their_key(store):
    """A crash between set_aside and restore/discard leaves an object a sweep can finish:
    its name says where it came from, and set_aside_list says when it was set aside."""
    import time
    from registry.storage.base import aside_key
    await store.write("r/app/blobs/sha256/ee", b"set aside")
    t0 = time.time()
    aside = await store.set_aside("r/app/blobs/sha256/ee")
    assert aside.startswith("_trash/") and aside_key(aside) == "r/app/blobs/sha256/ee"
    await store.write("_trash/" + "f" * 32, b"named before keys were kept")
    listed = {name: (key, when) for name, key, when in await store.set_aside_list()}
    assert set(listed) == {aside, "_trash/" + "f" * 32}
    assert listed[aside][0] == "r/app/blobs/sha256/ee" and listed["_trash/" + "f" * 32][0] is None
    assert t0 - 5 < listed[aside][1] < time.time() + 5
    await store.restore(aside, "r/app/blobs/sha256/ee")
    assert await store.read("r/app/blobs/sha256/ee") == b"set aside"
    await store.discard(aside)
    await store.discard("_trash/" + "f" * 32)
    assert await store.set_aside_list() == []
    if store.local_path("") is not None:  # no empty directories left behind either
        assert list((store.local_path("") / "_trash").iterdir()) == []
    with pytest.raises(NotFound):
        await store.restore(aside, "r/app/blobs/sha256/ee2")


async def test_blob_keys(store):
    d = digest_of(b"k")
    if store.shared_blobs:
        assert store.blob_key("a", d) == store.blob_key("b", d) == d.path
    else:
        assert store.blob_key("a", d) == f"a/{d.path}"


# ----------------------------------------------------------------------------- uploads

async def test_upload_write_read_place_delete(store):
    data = os.urandom(300_000)
    h = new_hasher()
    assert await store.upload_write("u1", 0, chunks(data[:100_000], 7000), [h]) == 100_000
    assert await store.upload_size("u1") == 100_000
    assert await store.upload_write("u1", 100_000, chunks(data[100_000:], 65536), [h]) == len(data)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()  # updated with every byte, in order
    assert await collect(store.upload_read("u1", len(data))) == data
    assert await collect(store.upload_read("u1", 1000)) == data[:1000]
    await store.upload_place("u1", "p/blobs/sha256/cc")
    assert await store.read("p/blobs/sha256/cc") == data
    assert await store.upload_size("u1") == len(data)  # the data stays until upload_delete
    ids = [u for u, _ in await store.upload_list()]
    assert "u1" in ids
    await store.upload_delete("u1")
    await store.upload_delete("u1")  # twice is fine
    with pytest.raises(NotFound):
        await store.upload_size("u1")
    assert "u1" not in [u for u, _ in await store.upload_list()]
    assert await store.read("p/blobs/sha256/cc") == data


async def test_upload_place_keeps_an_existing_object_unless_replace(store):
    await store.write("p/blobs/sha256/dd", b"old")
    await store.upload_write("u2", 0, chunks(b"new!", 2), [])
    await store.upload_place("u2", "p/blobs/sha256/dd")
    assert await store.read("p/blobs/sha256/dd") == b"old"
    await store.upload_place("u2", "p/blobs/sha256/dd", replace=True)
    assert await store.read("p/blobs/sha256/dd") == b"new!"
    await store.upload_delete("u2")


async def test_empty_upload(store):
    assert await store.upload_write("u3", 0, chunks(b"", 1), []) == 0
    assert await store.upload_size("u3") == 0
    await store.upload_place("u3", "p/blobs/sha256/empty")
    assert await store.read("p/blobs/sha256/empty") == b""
    await store.upload_delete("u3")


async def test_invalid_offset(store):
    with pytest.raises(InvalidOffset) as e:
        await store.upload_write("u4", 10, chunks(b"x", 1), [])
    assert e.value.size == 0
    await store.upload_write("u4", 0, chunks(b"abcdef", 4), [])
    with pytest.raises(InvalidOffset) as e:
        await store.upload_write("u4", 10, chunks(b"x", 1), [])
    assert e.value.size == 6
    await store.upload_delete("u4")


async def test_write_from_an_earlier_offset_cuts_back(store):
    """Bytes stored but never recorded (a crash before the metadata update) are cut off."""
    await store.upload_write("u5", 0, chunks(b"0123456789", 3), [])
    assert await store.upload_write("u5", 4, chunks(b"XY", 1), []) == 6
    assert await collect(store.upload_read("u5", 6)) == b"0123XY"
    assert await store.upload_write("u5", 2, chunks(b"", 1), []) == 2
    assert await store.upload_size("u5") == 2
    await store.upload_place("u5", "p/blobs/sha256/cut")
    assert await store.read("p/blobs/sha256/cut") == b"01"
    await store.upload_delete("u5")


async def test_write_interrupted_keeps_what_arrived(store):
    data = os.urandom(50_000)
    h = new_hasher()
    with pytest.raises(WriteInterrupted) as e:
        await store.upload_write("u6", 0, broken(data[:30_000], 10_000), [h])
    assert e.value.size == 30_000
    assert await store.upload_size("u6") == 30_000
    assert await store.upload_write("u6", 30_000, chunks(data[30_000:], 10_000), [h]) == len(data)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert await collect(store.upload_read("u6", len(data))) == data
    await store.upload_delete("u6")


async def test_multi_part_upload_continued_by_another_process(store, opener):
    """Several parts' worth, in odd chunks, over several writes, the middle one by another
    process (the spool and parts of the first are not in its memory), read back by a third."""
    data = os.urandom(2 * PART + 1_234_567)
    h = new_hasher()
    a = PART - 100_000
    b = PART + 3 * MiB
    assert await store.upload_write("big", 0, chunks(data[:a], 333_333), [h]) == a
    other = await opener()
    assert await other.upload_size("big") == a
    assert await other.upload_write("big", a, chunks(data[a:b], 1 << 20), []) == b
    assert await store.upload_write("big", b, chunks(data[b:], 777_777), []) == len(data)
    third = await opener()
    got = hashlib.sha256()
    async for c in third.upload_read("big", len(data)):
        got.update(c)
    assert got.hexdigest() == hashlib.sha256(data).hexdigest()
    await third.upload_place("big", "p/blobs/sha256/big")
    assert await store.stat("p/blobs/sha256/big") == len(data)
    # appending after a read-back: the completed object becomes parts again
    more = os.urandom(PART)
    assert await store.upload_write("big", len(data), chunks(more, MiB), []) == len(data) + PART
    assert await collect(store.upload_read("big", len(data) + PART)) == data + more
    await store.upload_delete("big")
    assert "big" not in [u for u, _ in await store.upload_list()]


async def test_cut_back_inside_parts(store):
    data = os.urandom(2 * PART + 10)
    await store.upload_write("cut", 0, chunks(data, MiB), [])
    keep = PART + 123
    assert await store.upload_write("cut", keep, chunks(b"tail", 4), []) == keep + 4
    assert await collect(store.upload_read("cut", keep + 4)) == data[:keep] + b"tail"
    await store.upload_delete("cut")


async def test_concurrent_uploads(store):
    datas = [os.urandom(200_000 + i) for i in range(6)]

    async def one(i: int) -> None:
        await store.upload_write(f"c{i}", 0, chunks(datas[i], 50_000), [])
        await store.upload_place(f"c{i}", f"p/blobs/sha256/c{i}")
        await store.upload_delete(f"c{i}")
    await asyncio.gather(*(one(i) for i in range(6)))
    for i in range(6):
        assert await store.read(f"p/blobs/sha256/c{i}") == datas[i]


async def test_small_writes_continued_by_other_processes(store, opener):
    """Small chunks (on S3 kept inside the upload's state object), each by another process,
    growing past that into pieces and then parts."""
    data = os.urandom(PART + 300_000)
    cuts = [0, 1000, 2000, 200_000, 400_000, PART - 10, len(data)]
    for a, b in zip(cuts, cuts[1:]):
        st = await opener()
        assert await st.upload_size("small") == a if a else True
        assert await st.upload_write("small", a, chunks(data[a:b], 4096), []) == b
    st = await opener()
    assert await collect(st.upload_read("small", len(data))) == data
    await st.upload_place("small", "p/blobs/sha256/small")
    assert await store.read("p/blobs/sha256/small") == data
    await st.upload_delete("small")
