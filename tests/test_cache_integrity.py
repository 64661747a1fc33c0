"""Integrity: every damaged copy is a miss and is repaired; ``verify`` and ``gc`` (library and
CLI) leave rows and blobs agreeing; the int8 codec round-trips within its error bound."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from storage_cases import FP, LAYOUT, consistent, disk_path, get, key, kv, make_store, put
from typer.testing import CliRunner

from ragkv.cache_index import Int8Codec, verify
from ragkv.cache_index.tiers import blob_name, written_at
from ragkv.cli import app
from ragkv.config import RagkvConfig


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-7])


DAMAGE = {"flipped": _flip, "truncated": _truncate, "deleted": lambda p: p.unlink()}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_disk_copy_falls_back_to_remote_and_heals(tmp_path, damage):
    store = make_store(tmp_path, remote=True)
    want = put(store, 3)
    DAMAGE[damage](disk_path(store, 3))
    found = get(store, 3)
    assert found is not None and found.tier == "remote"
    assert torch.equal(found.tensors["k"], want["k"])
    assert store.tiers["disk"].corrupt == 1 and disk_path(store, 3).is_file()
    assert get(store, 3).tier == "disk"  # repaired by promotion


def test_verify_spares_a_put_in_flight_on_a_store_that_keeps_no_times(tmp_path,
                                                                      monkeypatch):
    """Redis reports no modification time: the time a blob's name records tells verify a
    put in flight (its row not yet written) from an orphan; such a blob was deleted."""
    store = make_store(tmp_path)
    info = store.blobs.fs.info
    monkeypatch.setattr(store.blobs.fs, "info", lambda path, **kw: {
        k: v for k, v in info(path, **kw).items() if k not in ("mtime", "created")})
    young, old = blob_name(key(1)), blob_name(key(2), now=time.time() - 3600)
    for name in (young, old):
        store.blobs.put(name, b"a blob whose row is not written yet")
    assert written_at(young) == pytest.approx(time.time(), abs=5)
    report = verify(store)
    assert report.orphans == [("disk", old)]
    assert store.blobs.exists(young) and not store.blobs.exists(old)


def test_verify_finds_and_repairs_everything(tmp_path):
    store = make_store(tmp_path)
    for i in range(6):
        put(store, i)
    _flip(disk_path(store, 0))
    _truncate(disk_path(store, 1))
    disk_path(store, 2).unlink()
    orphan = Path(store.blobs.root) / f"{key(99)[:2]}/{key(99)}.safetensors"  # no row
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a writer killed between blob and row")
    temp = disk_path(store, 3).parent / ".tmp-half-written"
    temp.write_bytes(b"x")
    young = Path(store.blobs.root) / f"{key(98)[:2]}/{key(98)}.0a1b2c3d4e5f.safetensors"
    young.parent.mkdir(parents=True, exist_ok=True)
    young.write_bytes(b"a put in flight")
    old = time.time() - 3600
    for p in (orphan, temp):
        os.utime(p, (old, old))

    dry = verify(store, repair=False)
    assert {k for k, _, _ in dry.bad} == {key(0), key(1), key(2)}
    assert {n for _, n in dry.orphans} == {f"{key(99)[:2]}/{key(99)}.safetensors",
                                           f"{key(3)[:2]}/.tmp-half-written"}
    assert store.index.stats()["kv_entries"] == 6  # a dry run changes nothing

    report = verify(store)
    assert len(report.bad) == 3 and len(report.orphans) == 2
    assert young.exists() and not orphan.exists() and not temp.exists()
    young.unlink()
    assert store.index.stats()["kv_entries"] == 3
    consistent(store)
    assert verify(store).clean
    for i in (0, 1, 2):
        assert get(store, i) is None
        put(store, i)
        assert get(store, i) is not None


def test_verify_leaves_what_it_cannot_read_now_and_goes_on(tmp_path, monkeypatch):
    store = make_store(tmp_path)
    for i in range(4):
        put(store, i)
    blocked = store.index.get_entry(key(1)).blob_name
    real_get = store.blobs.get

    def flaky(name):
        if name == blocked:
            raise OSError(5, "Input/output error")
        return real_get(name)

    monkeypatch.setattr(store.blobs, "get", flaky)
    _flip(disk_path(store, 2))
    gone = disk_path(store, 3)
    gone.unlink()
    gone.mkdir()  # a folder where the blob should be
    report = verify(store)
    assert [(k, t) for k, t, _ in report.unreadable] == [(key(1), "disk")]
    assert "Input/output error" in report.unreadable[0][2] and not report.clean
    assert {k for k, _, _ in report.bad} == {key(2), key(3)}
    assert report.blobs_checked == 4 and report.orphans == []
    assert store.index.get_entry(key(1)) is not None and disk_path(store, 1).is_file()
    monkeypatch.undo()
    assert get(store, 1) is not None and get(store, 0) is not None


def test_verify_reports_progress_over_every_tier(tmp_path):
    store = make_store(tmp_path, remote=True)
    for i in range(4):
        put(store, i)
    _flip(disk_path(store, 1))  # a bad blob is read too, and counts
    seen: list[tuple[int, int]] = []
    report = verify(store, repair=False, progress=lambda done, total: seen.append((done, total)))
    assert report.blobs_checked == 8
    assert seen == [(i, 8) for i in range(1, 9)]


def test_cli_verify_and_gc(tmp_path):
    cfg = RagkvConfig(home=tmp_path)
    from ragkv.cache_index import KVStore

    store = KVStore.from_config(RagkvConfig(home=tmp_path, memory_budget_bytes=0))
    for i in range(5):
        put(store, i, n_tokens=20)
    size = store.index.get_entry(key(0)).nbytes
    disk_path(store, 4).write_bytes(b"garbage")
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "verify", "--home", str(cfg.home), "--grace-s", "0"])
    assert res.exit_code == 0, res.output
    assert "1 bad" in res.output and store.index.get_entry(key(4)) is None
    assert "reading blobs" in res.output and "5/5" in res.output  # the bar, at its end
    budget_mb = 2.5 * size / 2**20
    res = runner.invoke(app, ["cache", "gc", "--home", str(cfg.home),
                              "--disk-budget-mb", str(budget_mb)])
    assert res.exit_code == 0, res.output
    assert store.index.stats()["kv_entries"] == 2
    consistent(store)
    assert runner.invoke(app, ["cache", "gc", "--home", str(cfg.home)]).exit_code == 2


def test_gc_that_could_not_evict_says_so(tmp_path, monkeypatch):
    """An index locked by another process: gc printed an empty table and exit 0, the cache
    still over its budget."""
    from sqlalchemy.exc import OperationalError

    from ragkv.cache_index import KVStore, store

    put(KVStore.from_config(RagkvConfig(home=tmp_path, memory_budget_bytes=0)), 0)

    def locked(*args, **kwargs):
        raise OperationalError("DELETE FROM kv_entries", {}, Exception("database is locked"))

    monkeypatch.setattr(store, "enforce_budget", locked)
    res = CliRunner().invoke(app, ["cache", "gc", "--home", str(tmp_path),
                                   "--disk-budget-mb", "0"])
    assert res.exit_code == 1, res.output
    assert res.output.startswith("error: the cache index could not be read: ") and (
        "database is locked" in res.output and len(res.output.strip().splitlines()) == 1)


def test_cli_cache_commands_take_shared_urls(tmp_path):
    """A shared index and blob store live anywhere: the commands take their URLs."""
    from ragkv.cache_index import KVStore

    shared = RagkvConfig(home=tmp_path / "shared", index_url=f"sqlite:///{tmp_path / 'i.db'}",
                         blob_url=str(tmp_path / "blobs"), memory_budget_bytes=0)
    store = KVStore.from_config(shared)
    for i in range(3):
        put(store, i, n_tokens=20)
    disk_path(store, 2).write_bytes(b"garbage")
    urls = ["--home", str(tmp_path / "elsewhere"), "--index-url", shared.index_url,
            "--blob-url", shared.blob_url]
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "stats", *urls])
    assert res.exit_code == 0 and "kv_entries" in res.output, res.output
    res = runner.invoke(app, ["cache", "verify", "--grace-s", "0", *urls])
    assert res.exit_code == 0 and "1 bad" in res.output, res.output
    assert store.index.get_entry(key(2)) is None and store.index.get_entry(key(0)) is not None


# ---- int8 ------------------------------------------------------------------------------

@pytest.mark.parametrize("k_scales,v_scales", [("channel", "token"), ("token", "channel")])
def test_int8_codec_round_trip(k_scales, v_scales):
    codec = Int8Codec(k_scales, v_scales)
    t = kv(n_tokens=64, seed=1, heads=3, dim=16)
    t["k"][..., 5] *= 20  # an outlier channel, as keys have
    back = codec.roundtrip(t)
    for name in ("k", "v"):
        axis = -2 if codec.granularity(name) == "channel" else -1
        bound = t[name].abs().amax(dim=axis, keepdim=True) / 127 / 2 + 1e-6
        assert ((back[name] - t[name]).abs() <= bound).all()
    enc, meta = codec.encode(t)
    assert enc["k.q8"].dtype == torch.int8 and meta["k.scales"] == k_scales
    assert enc["k.scale"].shape[-2 if k_scales == "channel" else -1] == 1


def test_int8_entries_store_and_fail_safely(tmp_path):
    store = make_store(tmp_path)
    codec = Int8Codec()
    t = kv(n_tokens=32, seed=4)
    assert store.put(key(1), t, model_fp=FP, layout=LAYOUT, n_tokens=32, codec=codec)
    entry = store.index.get_entry(key(1))
    assert entry.dtype == codec.tag
    assert entry.nbytes < sum(x.numel() for x in t.values()) * 2  # below fp16
    got = get(store, 1).tensors
    assert torch.equal(got["k"], codec.roundtrip(t)["k"])
    # A blob that passes its checksum but lacks a scale is still a miss, never an error.
    from ragkv.cache_index import encode_kv

    enc, meta = codec.encode(t)
    del enc["v.scale"]
    data, checksum = encode_kv(enc, {**meta, "key": key(2), "model_fp": FP, "layout": LAYOUT})
    store.blobs.put(f"{key(2)[:2]}/{key(2)}.safetensors", data)
    store.index.upsert_entry(key(2), model_fp=FP, layout=LAYOUT, n_tokens=32, nbytes=len(data),
                             blob_name=f"{key(2)[:2]}/{key(2)}.safetensors", checksum=checksum,
                             dtype=codec.tag)
    assert get(store, 2) is None and store.index.get_entry(key(2)) is None


def test_int8_gets_its_own_cache_keys():
    f16 = RagkvConfig(kv_dtype="float16")
    i8 = RagkvConfig(kv_dtype="int8")
    i8t = RagkvConfig(kv_dtype="int8", int8_key_scales="token")
    assert len({f16.kv_storage, i8.kv_storage, i8t.kv_storage}) == 3
    assert f16.int8_codec is None and i8.int8_codec == Int8Codec("channel", "token")


def test_verify_removes_entries_that_every_read_would_reject(tmp_path):
    """An int8 blob whose scale holds a NaN, or a float blob holding an inf, passes its
    checksum and framing; every read rejects it as non-finite, so verify must too (it said
    "removed 0 bad")."""
    from ragkv.cache_index import encode_kv

    store = make_store(tmp_path)
    codec = Int8Codec()
    enc, meta = codec.encode(kv(n_tokens=8, seed=1))
    enc["v.scale"][..., 0] = float("nan")
    floats = kv(n_tokens=8, seed=2)
    floats["k"][0, 0, 0, 0] = float("inf")
    for i, (tensors, m, dtype) in enumerate([(enc, meta, codec.tag), (floats, {}, "float32")]):
        data, checksum = encode_kv(tensors, {**m, "key": key(i), "model_fp": FP,
                                             "layout": LAYOUT})
        store.blobs.put(f"{key(i)[:2]}/{key(i)}.safetensors", data)
        store.index.upsert_entry(key(i), model_fp=FP, layout=LAYOUT, n_tokens=8,
                                 nbytes=len(data), blob_name=f"{key(i)[:2]}/{key(i)}.safetensors",
                                 checksum=checksum, dtype=dtype)
    put(store, 2)
    dry = verify(store, repair=False)
    assert sorted((k, why) for k, _, why in dry.bad) == [
        (key(0), "non-finite values in v"), (key(1), "non-finite values in k")]
    assert len(verify(store).bad) == 2
    assert store.index.get_entry(key(0)) is None and store.index.get_entry(key(1)) is None
    assert get(store, 2) is not None and verify(store).clean
