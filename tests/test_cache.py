"""The on-disk feature cache: round trips, shuffled passes, crash safety, corruption, disk space."""

from __future__ import annotations

import errno
import mmap
import os
import re
import tracemalloc
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetrain.cache import (
    CacheCorruptError,
    CacheManifest,
    CacheWriter,
    FeatureCache,
    cache_is_valid,
    write_cache,
)
from edgetrain.cache import writer as writer_module
from edgetrain.errors import UserInputError

SAMPLE_SHAPE = (3, 4)


def _chunks(features: torch.Tensor, labels: torch.Tensor, size: int):
    for start in range(0, len(features), size):
        yield features[start : start + size], labels[start : start + size]


def _indexed_cache(directory: Path, n: int) -> None:
    """A float32 cache where every value of sample i is i and its label is i: any mix-up of
    rows, or of rows and labels, shows."""
    features = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, *SAMPLE_SHAPE)
    write_cache(directory, _chunks(features, torch.arange(n), 8), SAMPLE_SHAPE, n, "float32")


def _read_ids(cache: FeatureCache, **kwargs) -> tuple[list[int], list[int]]:
    ids, sizes = [], []
    for features, labels in cache.batches(**kwargs):
        sample_ids = features[:, 0, 0].long()
        assert torch.equal(features, sample_ids[:, None, None].float().expand_as(features))
        assert torch.equal(labels, sample_ids), "labels must travel with their rows"
        ids += sample_ids.tolist()
        sizes.append(len(labels))
    return ids, sizes


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_is_exact_after_the_cast(tmp_path: Path, dtype: str) -> None:
    torch.manual_seed(0)
    n = 37
    # float64 input with requires_grad: the writer must detach and cast chunk by chunk.
    features = torch.randn(n, *SAMPLE_SHAPE, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 10, (n,), dtype=torch.int32)
    expected = features.detach().to(getattr(torch, dtype))

    manifest = write_cache(tmp_path, _chunks(features, labels, 8), SAMPLE_SHAPE, n, dtype)

    assert manifest.shape == (n, *SAMPLE_SHAPE) and manifest.count == n
    assert manifest.dtype == dtype
    assert manifest.features_bytes == (tmp_path / "features.npy").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "features.npy",
        "labels.npy",
        "manifest.json",
    ]
    with FeatureCache.open(tmp_path) as cache:
        assert len(cache) == n and cache.manifest == manifest
        assert cache.labels.dtype == torch.int64
        batches = list(cache.batches(batch_size=10, shuffle=False))
    assert [len(b[1]) for b in batches] == [10, 10, 10, 7]
    for batch_features, batch_labels in batches:
        assert batch_features.dtype == getattr(torch, dtype)
        assert batch_features.shape[1:] == SAMPLE_SHAPE
        assert batch_labels.dtype == torch.int64
    assert torch.equal(torch.cat([b[0] for b in batches]), expected)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels.long())

    on_disk = np.load(tmp_path / "features.npy", mmap_mode="r")
    if dtype == "bfloat16":  # stored as raw 16-bit patterns
        on_disk = torch.from_numpy(np.array(on_disk).view(np.int16)).view(torch.bfloat16)
        assert torch.equal(on_disk, expected)
    else:
        np.testing.assert_array_equal(on_disk, expected.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), labels.long().numpy())


@pytest.mark.parametrize("batch_size", [1, 7, 50, 64])
def test_unshuffled_read_follows_the_written_order(tmp_path: Path, batch_size: int) -> None:
    _indexed_cache(tmp_path, 50)
    with FeatureCache.open(tmp_path) as cache:
        ids, sizes = _read_ids(cache, batch_size=batch_size, shuffle=False)
    assert ids == list(range(50))
    assert sum(sizes) == 50 and all(s == batch_size for s in sizes[:-1])


def test_shuffled_pass_covers_every_sample_once_in_randperm_order(tmp_path: Path) -> None:
    n = 50
    _indexed_cache(tmp_path, n)
    with FeatureCache.open(tmp_path) as cache:
        generator = torch.Generator().manual_seed(7)
        first, sizes = _read_ids(cache, batch_size=8, shuffle=True, generator=generator)
        second, _ = _read_ids(cache, batch_size=8, shuffle=True, generator=generator)
        replay, _ = _read_ids(
            cache, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7)
        )

    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert sizes == [8] * 6 + [2]  # 8 does not divide 50: the last batch is short
    assert first != list(range(n))
    assert first == torch.randperm(n, generator=torch.Generator().manual_seed(7)).tolist()
    assert replay == first, "same seed, same order"
    assert second != first, "the next pass draws a new order"


def test_drop_last(tmp_path: Path) -> None:
    _indexed_cache(tmp_path, 50)
    with FeatureCache.open(tmp_path) as cache:
        ids, sizes = _read_ids(
            cache,
            batch_size=8,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(1),
        )
        exact, exact_sizes = _read_ids(cache, batch_size=10, shuffle=False, drop_last=True)
    assert sizes == [8] * 6 and len(set(ids)) == 48
    assert exact_sizes == [10] * 5 and exact == list(range(50))


def test_empty_cache(tmp_path: Path) -> None:
    write_cache(tmp_path, [], SAMPLE_SHAPE, 0, "float16")
    with FeatureCache.open(tmp_path) as cache:
        assert len(cache) == 0
        assert list(cache.batches(batch_size=4, shuffle=True)) == []


def test_wrong_count_leaves_nothing_behind(tmp_path: Path) -> None:
    features, labels = torch.zeros(5, *SAMPLE_SHAPE), torch.zeros(5, dtype=torch.long)
    writer = CacheWriter(tmp_path / "short", SAMPLE_SHAPE, count=6)
    writer.append(features, labels)
    with pytest.raises(ValueError, match="only 5"):
        writer.close()
    assert list((tmp_path / "short").iterdir()) == []

    with pytest.raises(ValueError, match="10 were appended"):
        with CacheWriter(tmp_path / "long", SAMPLE_SHAPE, count=6) as writer:
            writer.append(features, labels)
            writer.append(features, labels)
    assert list((tmp_path / "long").iterdir()) == []
    assert not cache_is_valid(tmp_path / "short") and not cache_is_valid(tmp_path / "long")


def test_exception_inside_with_removes_partial_files(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="module blew up"):
        with CacheWriter(tmp_path, SAMPLE_SHAPE, count=10) as writer:
            writer.append(torch.ones(5, *SAMPLE_SHAPE), torch.zeros(5, dtype=torch.long))
            assert (tmp_path / "features.npy.tmp").exists()
            raise RuntimeError("module blew up")
    assert list(tmp_path.iterdir()) == []


def test_rewriting_replaces_the_old_cache(tmp_path: Path) -> None:
    _indexed_cache(tmp_path, 20)
    writer = CacheWriter(tmp_path, SAMPLE_SHAPE, count=4)
    assert not (tmp_path / "manifest.json").exists(), "stale manifest must go before writing"
    writer.append(torch.ones(4, *SAMPLE_SHAPE), torch.ones(4, dtype=torch.long))
    writer.close()
    with FeatureCache.open(tmp_path) as cache:
        assert len(cache) == 4


def test_append_checks_shapes(tmp_path: Path) -> None:
    with CacheWriter(tmp_path, SAMPLE_SHAPE, count=4) as writer:
        with pytest.raises(ValueError, match="do not match"):
            writer.append(torch.zeros(4, 3, 5), torch.zeros(4, dtype=torch.long))
        with pytest.raises(ValueError, match="labels"):
            writer.append(torch.zeros(4, *SAMPLE_SHAPE), torch.zeros(3, dtype=torch.long))
        writer.append(torch.zeros(4, *SAMPLE_SHAPE), torch.zeros(4, dtype=torch.long))
    assert cache_is_valid(tmp_path)


def _flip_byte(path: Path, offset_from_end: int) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        byte = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_feature_byte_fails_the_checksum(tmp_path: Path) -> None:
    _indexed_cache(tmp_path, 20)
    assert cache_is_valid(tmp_path)
    _flip_byte(tmp_path / "features.npy", 5)
    with pytest.raises(CacheCorruptError, match=r"features\.npy checksum mismatch"):
        FeatureCache.open(tmp_path, verify=True)
    assert not cache_is_valid(tmp_path)
    with FeatureCache.open(tmp_path, verify=False) as cache:  # sizes still match
        assert len(cache) == 20


def test_flipped_label_byte_fails_the_checksum(tmp_path: Path) -> None:
    _indexed_cache(tmp_path, 20)
    _flip_byte(tmp_path / "labels.npy", 3)
    with pytest.raises(CacheCorruptError, match=r"labels\.npy checksum mismatch"):
        FeatureCache.open(tmp_path)


def test_truncated_features_fail_the_size_check(tmp_path: Path) -> None:
    _indexed_cache(tmp_path, 20)
    path = tmp_path / "features.npy"
    os.truncate(path, path.stat().st_size - 16)
    with pytest.raises(CacheCorruptError, match=r"features\.npy size mismatch"):
        FeatureCache.open(tmp_path, verify=False)
    assert not cache_is_valid(tmp_path)


def test_missing_or_garbled_manifest(tmp_path: Path) -> None:
    _indexed_cache(tmp_path, 20)
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{not json")
    with pytest.raises(CacheCorruptError, match="not valid JSON"):
        FeatureCache.open(tmp_path)
    manifest.unlink()
    assert not cache_is_valid(tmp_path)
    with pytest.raises(CacheCorruptError, match="manifest.json is missing"):
        FeatureCache.open(tmp_path)
    assert not cache_is_valid(tmp_path / "never-written")


def test_manifest_json_round_trip(tmp_path: Path) -> None:
    _indexed_cache(tmp_path, 20)
    text = (tmp_path / "manifest.json").read_text()
    assert CacheManifest.from_json(text).to_json() == text


def test_not_enough_disk_space_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(writer_module.shutil, "disk_usage", lambda _: usage(10**6, 10**6, 1000))
    n = 100
    with pytest.raises(UserInputError) as info:
        CacheWriter(tmp_path, SAMPLE_SHAPE, count=n, dtype="float32")
    message = str(info.value)
    needed = int(re.search(r"needs (\d+) bytes", message).group(1))
    assert needed >= n * 12 * 4 + n * 8
    assert "1000 bytes" in message and str(tmp_path) in message
    assert "--cache-dtype float16" in message and "--cache none" in message
    assert list(tmp_path.iterdir()) == []


def test_disk_full_mid_write_removes_partial_files(tmp_path: Path, monkeypatch) -> None:
    real_open = open

    class FullDisk:
        """A file that takes the header, then fails like a full disk."""

        def __init__(self, path, mode):
            self._file = real_open(path, mode)
            self._writes = 0

        def write(self, data):
            self._writes += 1
            if self._writes > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

    monkeypatch.setattr(writer_module, "open", FullDisk, raising=False)
    writer = CacheWriter(tmp_path, SAMPLE_SHAPE, count=16)
    # The thread writes: the error surfaces at a later append or at close, never later.
    with pytest.raises(UserInputError, match="Ran out of disk space.*--cache-dtype float16"):
        for _ in range(2):
            writer.append(torch.zeros(8, *SAMPLE_SHAPE), torch.zeros(8, dtype=torch.long))
        writer.close()
    assert list(tmp_path.iterdir()) == []
    assert not writer._thread.is_alive()


def test_the_writer_thread_writes_what_was_appended_not_what_the_caller_did_after(
        tmp_path: Path) -> None:
    """append returns before the chunk is on disk: a caller that reuses its tensors in place
    (float32 features on the CPU need no conversion, int64 labels neither) must not change
    what is written; many appends through the one-chunk queue keep their order."""
    features = torch.empty(4, *SAMPLE_SHAPE)
    labels = torch.empty(4, dtype=torch.long)
    expected = []
    with CacheWriter(tmp_path / "c", SAMPLE_SHAPE, count=4 * 50) as writer:
        for i in range(50):
            features.fill_(float(i))
            labels.fill_(i % 10)
            writer.append(features, labels)
            expected.append((features.clone(), labels.clone()))
        features.fill_(-1.0)
        labels.fill_(-1)
        writer.close()
    with FeatureCache.open(tmp_path / "c") as cache:
        got = list(cache.batches(4, False, None))
    assert len(got) == 50
    for (f, y), (ef, ey) in zip(got, expected):
        assert torch.equal(f, ef) and torch.equal(y, ey)


def test_abort_with_chunks_in_flight_leaves_nothing_and_stops_the_thread(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c", SAMPLE_SHAPE, count=64)
    for _ in range(3):
        writer.append(torch.randn(8, *SAMPLE_SHAPE), torch.zeros(8, dtype=torch.long))
    writer.abort()
    assert not writer._thread.is_alive()
    assert list((tmp_path / "c").iterdir()) == []


def test_reading_is_o_batch_memory_and_never_maps_the_file(tmp_path: Path, monkeypatch) -> None:
    n, sample_shape = 2048, (512,)  # 4 MiB of float32 features
    features = torch.randn(n, *sample_shape)
    write_cache(tmp_path, _chunks(features, torch.arange(n), 256), sample_shape, n, "float32")

    def refuse(*args, **kwargs):
        raise AssertionError("the reader must not memory-map the cache")

    monkeypatch.setattr(np, "memmap", refuse)
    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr(mmap, "mmap", refuse)
    with FeatureCache.open(tmp_path) as cache:
        tracemalloc.start()  # numpy buffers are traced; the batch is 16 x 2 KiB = 32 KiB
        total = 0
        for batch, _ in cache.batches(
            batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
        ):
            total += len(batch)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert total == n
    assert peak < 512 * 1024, f"reading peaked at {peak} bytes for a 4 MiB cache"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_cached(tmp_path: Path) -> None:
    features = torch.randn(10, *SAMPLE_SHAPE, device="cuda")
    labels = torch.arange(10, device="cuda")
    write_cache(tmp_path, _chunks(features, labels, 4), SAMPLE_SHAPE, 10, "bfloat16")
    with FeatureCache.open(tmp_path) as cache:
        ((read, read_labels),) = cache.batches(batch_size=10, shuffle=False)
    assert torch.equal(read, features.to(torch.bfloat16).cpu())
    assert torch.equal(read_labels, labels.cpu())


def test_last_evaluation_writes_the_test_cache(tmp_path: Path, monkeypatch) -> None:
    """Sequential mode: module k's last evaluation runs it over the test set with its final
    weights in eval mode, which is what module k+1's test cache holds; it writes that cache on
    the way, so the cache pass after training writes the training view only. Through a real
    fit: every cache written once, and the test cache equal to the saved module's outputs."""
    from edgetrain import api
    from edgetrain.data import load_dataset, normalize
    from edgetrain.runs.rundir import RunDir
    from edgetrain.training import scheduler

    written: list[str] = []
    real_writer = scheduler.cache_writer

    def counting_writer(ctx, k, split):
        written.append(f"{k}/{split}")
        return real_writer(ctx, k, split)

    monkeypatch.setattr(scheduler, "cache_writer", counting_writer)
    kept: dict[str, torch.Tensor] = {}
    real_remove = RunDir.remove

    def keep_test_cache(self, relative):
        # Read module 0's test cache just before the run deletes it (the run's own cleanup).
        directory = self.cache_dir(0, "test")
        if "0" not in kept and relative in ("cache", "cache/module_0") and directory.exists():
            with FeatureCache.open(directory) as cache:
                kept["0"] = torch.cat([f for f, _ in cache.batches(1000, False, None)])
        real_remove(self, relative)

    monkeypatch.setattr(RunDir, "remove", keep_test_cache)
    out = tmp_path / "run"
    trained = api.fit(model="resnet8", widths=(8, 16, 16), modules=3, epochs=2,
                      train_limit=300, test_limit=200, batch_size=64, threads=1,
                      method="trgl", mode="sequential", cache="disk", out=out)
    # Modules 1 and 2 cache their outputs: one training view and the test set each, once.
    assert sorted(written) == ["0/test", "0/train_v0", "1/test", "1/train_v0"]
    data = load_dataset(trained.report["dataset"], test_limit=200, train_limit=300)
    stage = trained.network.stages[0].eval()
    with torch.inference_mode():
        expected = stage(normalize(data.test.images, data.info), need_transport=False)[0]
    assert torch.equal(kept["0"], expected)
    # The module's logged accuracy is the one the stitched network has at its last head.
    assert trained.report["modules"][-1]["aux_test_accuracy"] == pytest.approx(
        trained.report["test_accuracy"], abs=0.01)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parts_of_every_batch_are_the_shards_of_the_whole_batches(tmp_path: Path, dtype) -> None:
    """``part=(start, size)``: each rank reads only its rows of every batch; together the
    parts are the whole batches, in the order the whole job draws (same generator seed), and a
    last batch too short for a rank gives it empty tensors."""
    features = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    labels = torch.arange(10)
    write_cache(tmp_path / "c", [(features, labels)], (3,), 10, dtype=dtype)
    with FeatureCache.open(tmp_path / "c") as cache:
        whole = list(cache.batches(4, True, torch.Generator().manual_seed(5)))
        parts = [list(cache.batches(4, True, torch.Generator().manual_seed(5), part=(r * 2, 2)))
                 for r in range(2)]
    assert [len(y) for _, y in whole] == [4, 4, 2]
    assert [len(y) for _, y in parts[1]] == [2, 2, 0]  # the last batch's second shard: empty
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts, strict=True):
        assert torch.equal(torch.cat([y0, y1]), y)
        assert torch.equal(torch.cat([x0, x1]).float(), x.float())
        assert x1.shape[1:] == (3,)


def test_an_error_on_the_writer_thread_that_is_not_the_disks_reaches_the_caller(
        tmp_path: Path, monkeypatch) -> None:
    """Any failure on the thread (here the checksum's) is raised to the caller at the next
    append or at close, the partial files are removed, and append never waits on a dead
    thread: the thread keeps draining the queue."""
    writer = CacheWriter(tmp_path / "c", SAMPLE_SHAPE, count=40)

    class Broken:
        def update(self, data):
            raise RuntimeError("hash broke")

    monkeypatch.setattr(writer, "_features_hash", Broken())
    with pytest.raises(RuntimeError, match="hash broke"):
        for _ in range(5):  # more chunks than the queue holds: a dead thread would block here
            writer.append(torch.zeros(8, *SAMPLE_SHAPE), torch.zeros(8, dtype=torch.long))
        writer.close()
    assert not writer._thread.is_alive()
    assert list((tmp_path / "c").iterdir()) == []
