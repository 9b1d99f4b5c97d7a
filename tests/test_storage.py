"""Run, sweep and store folders at a storage URI (cube/data/storage.py), without Ray: a file:// URI
goes through the same pyarrow filesystem calls as s3:// or gs:// would."""

from __future__ import annotations

import pytest

from cube.data.storage import LOG, Storage, StorageError, is_uri


def test_a_plain_path_is_used_in_place(tmp_path):
    store = Storage.of(tmp_path / "run")
    assert not store.remote and store.local == tmp_path / "run"
    assert store.ray_storage() == str((tmp_path / "run" / "ray").resolve())
    store.push()  # nothing to copy
    assert store.snapshot() == tmp_path / "run"


def test_a_uri_is_staged_and_copied_both_ways(tmp_path):
    target = tmp_path / "bucket" / "run"
    store = Storage.of(f"file://{target}")
    assert store.remote and is_uri(store.target) and store.local != target
    assert store.ray_storage() == f"file://{target}/ray"
    assert not store.exists("config.yaml")

    (store.local / "model").mkdir()
    (store.local / "config.yaml").write_text("a: 1\n")
    (store.local / "model" / "weights.bin").write_bytes(b"\x00\x01")
    (store.local / ".eval.json.tmp123").write_text("half-written")
    (store.local / "ray").mkdir()
    (store.local / "ray" / "local-only").write_text("Ray writes its own storage itself")
    store.push()
    assert (target / "config.yaml").read_text() == "a: 1\n"
    assert (target / "model" / "weights.bin").read_bytes() == b"\x00\x01"
    assert not (target / ".eval.json.tmp123").exists() and not (target / "ray").exists()
    assert store.exists("config.yaml")

    # Another machine (or a later job) pulls into a fresh staging folder.
    (target / "metrics.csv").write_text("epoch\n1\n")
    (target / LOG).write_text("the earlier job's log")
    again = Storage.of(f"file://{target}/")
    (again.local / "stale.txt").write_text("from an older job")
    again.pull()
    assert (again.local / "metrics.csv").read_text() == "epoch\n1\n"
    assert not (again.local / "stale.txt").exists() and not (again.local / LOG).exists()

    snap = again.snapshot()
    assert snap != again.local and (snap / "model" / "weights.bin").read_bytes() == b"\x00\x01"
    with again.reading() as copy:
        assert copy not in (snap, again.local) and (copy / "config.yaml").read_text() == "a: 1\n"
    assert not copy.exists()  # a reading copy goes when the block ends


def test_a_uri_no_filesystem_opens_is_a_clear_error():
    with pytest.raises(StorageError, match="cannot open storage URI 'nosuchscheme://x/run'"):
        Storage.of("nosuchscheme://x/run")
