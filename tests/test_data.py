"""lss_plugin.data: splits, the checksummed default corpus cache, batches, bits per character.

The default-corpus tests run the real ``pip download`` (the package index is the one network
this project may use); the cache is a temporary directory, so the user's cache is never touched
except as a source to copy a verified file from.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

from lss_plugin import data
from lss_plugin.data import (
    GENSIM_CACHE_NAME,
    GENSIM_TEXT_BYTES,
    GENSIM_TEXT_SHA256,
    DataUnavailableError,
    bits_per_character,
    eval_batches,
    file_sha256,
    load_byte_splits,
    sample_batch,
    split_bytes,
)


# ---------------------------------------------------------------------------------------------
# Splits

def test_enwik8_sized_file_splits_90m_5m_5m_memory_mapped(tmp_path):
    path = tmp_path / "enwik8"
    with open(path, "wb") as f:  # sparse: 10^8 bytes on the index, almost none on disk
        f.seek(10**8 - 3)
        f.write(b"end")
    splits = load_byte_splits(str(path), cache_dir=str(tmp_path / "cache"))
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (90_000_000, 5_000_000, 5_000_000)
    assert isinstance(splits.train, np.memmap) and splits.train.dtype == np.uint8
    assert bytes(splits.test[-3:]) == b"end"
    assert splits.sha256 == file_sha256(str(path)) and splits.source == str(path)


def test_any_byte_file_splits_90_5_5_in_order(tmp_path):
    raw = np.random.default_rng(0).integers(0, 256, size=12_345, dtype=np.uint8)
    path = tmp_path / "bytes.bin"
    path.write_bytes(raw.tobytes())
    s = load_byte_splits(str(path), cache_dir=str(tmp_path / "cache"))
    assert (len(s.train), len(s.valid), len(s.test)) == (12_345 * 90 // 100, 12_345 * 5 // 100,
                                                         12_345 - 12_345 * 90 // 100 - 12_345 * 5 // 100)
    np.testing.assert_array_equal(np.concatenate([s.train, s.valid, s.test]), raw)


def test_single_member_zip_is_unpacked_once_into_the_cache(tmp_path):
    raw = bytes(range(256)) * 40
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", raw)
    s = load_byte_splits(str(archive), cache_dir=str(tmp_path / "cache"))
    assert bytes(np.concatenate([s.train, s.valid, s.test])) == raw
    assert os.path.dirname(s.source) == str(tmp_path / "cache")


def test_bad_inputs_name_the_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_byte_splits(str(tmp_path / "nope.bin"))
    with pytest.raises(ValueError, match="10 bytes are too few"):
        split_bytes(np.zeros(10, np.uint8))
    tokens = np.zeros(100, np.uint8)
    with pytest.raises(ValueError, match="101 tokens does not fit in 100"):
        sample_batch(tokens, 2, 100, step=0, seed=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        next(eval_batches(tokens, 0, 8))


# ---------------------------------------------------------------------------------------------
# The default corpus: fetch, verify, re-fetch when corrupted, clear error when unavailable

def _verified_copy_or_none():
    path = os.path.join(data.default_cache_dir(), GENSIM_CACHE_NAME)
    return path if data._is_verified(path) else None


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    """A cache dir holding the verified excerpt: copied from the user's cache, else fetched."""
    cache = tmp_path_factory.mktemp("lss_cache")
    source = _verified_copy_or_none()
    if source:
        shutil.copyfile(source, cache / GENSIM_CACHE_NAME)
    else:
        data.ensure_default_corpus(str(cache))
    return cache


def test_default_corpus_is_the_verified_gensim_excerpt(corpus_cache):
    s = load_byte_splits(cache_dir=str(corpus_cache))
    assert s.num_bytes == GENSIM_TEXT_BYTES == 6_089_746
    assert (len(s.train), len(s.valid), len(s.test)) == (5_480_771, 304_487, 304_488)
    assert s.sha256 == GENSIM_TEXT_SHA256 == file_sha256(s.source)
    assert bytes(s.train[:10]) == b"<mediawiki"


def _load_in_child(cache_dir, results):
    splits = load_byte_splits(cache_dir=cache_dir)
    batch = sample_batch(splits.train, 3, 32, step=7, seed=11)
    results.put((file_sha256(splits.source), batch.tolist()))


def test_corrupted_cache_is_refetched_safely_by_concurrent_callers(corpus_cache, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / GENSIM_CACHE_NAME
    shutil.copyfile(corpus_cache / GENSIM_CACHE_NAME, target)
    with open(target, "r+b") as f:  # flip one byte: same size, wrong content
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not data._is_verified(str(target))
    (cache / ".download-killed").mkdir()  # scratch of a fetch that was killed
    (cache / ".download-killed" / "gensim.whl").write_bytes(b"partial")
    # Three processes at once (as ranks would): one re-fetches under the lock, all read the same.
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(str(cache), results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert {sha for sha, _ in got} == {GENSIM_TEXT_SHA256}
    here = sample_batch(load_byte_splits(cache_dir=str(cache)).train, 3, 32, step=7, seed=11).tolist()
    assert all(batch == here for _, batch in got)  # same batch in every process
    assert sorted(os.listdir(cache)) == [".lock", GENSIM_CACHE_NAME]  # no temp files left behind


def test_unreachable_index_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip may not reach any index: the fetch must fail
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / GENSIM_CACHE_NAME).write_bytes(b"truncated")  # a broken cache is not used either
    with pytest.raises(DataUnavailableError, match="gensim==4.4.0") as info:
        load_byte_splits(cache_dir=str(cache))
    assert "--data-path" in str(info.value)
    assert (cache / GENSIM_CACHE_NAME).read_bytes() == b"truncated"  # reported, not replaced by junk


# ---------------------------------------------------------------------------------------------
# Batches and bits per character

def test_sample_batch_is_a_function_of_seed_and_step():
    tokens = (np.arange(50_000) % 251).astype(np.uint8)  # a window is identified by its start
    a = sample_batch(tokens, 8, 64, step=5, seed=1)
    assert a.shape == (8, 65) and a.dtype == torch.int64
    assert torch.equal(a, sample_batch(tokens, 8, 64, step=5, seed=1))
    assert not torch.equal(a, sample_batch(tokens, 8, 64, step=6, seed=1))
    assert not torch.equal(a, sample_batch(tokens, 8, 64, step=5, seed=2))
    # Rows are contiguous windows of the token stream.
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.where(a[:, :-1] == 250, -250, 1))


def test_sample_batch_reaches_both_ends():
    tokens = np.arange(20, dtype=np.uint8)
    firsts = {int(sample_batch(tokens, 16, 9, step=s, seed=0)[:, 0].min()) for s in range(20)}
    lasts = {int(sample_batch(tokens, 16, 9, step=s, seed=0)[:, -1].max()) for s in range(20)}
    assert 0 in firsts and 19 in lasts


def test_eval_batches_predict_every_byte_once():
    tokens = np.random.default_rng(1).integers(0, 256, size=1003, dtype=np.uint8)
    batches = list(eval_batches(tokens, 4, 25))  # (1003 - 1) // 25 = 40 windows = 10 batches
    assert len(batches) == 10 and all(b.shape == (4, 26) for b in batches)
    targets = torch.cat([b[:, 1:].reshape(-1) for b in batches])
    assert torch.equal(targets, torch.from_numpy(tokens[1:1001].astype(np.int64)))
    assert len(list(eval_batches(tokens, 4, 25, max_batches=3))) == 3
    assert len(list(eval_batches(tokens, 3, 25))) == 13  # 40 // 3: the partial batch is left out


def test_bits_per_character():
    assert bits_per_character(1000 * math.log(2), 1000) == pytest.approx(1.0, rel=1e-15)
    assert bits_per_character(10 * math.log(256), 10) == pytest.approx(8.0, rel=1e-15)
    with pytest.raises(ValueError, match="num_tokens must be positive, got 0"):
        bits_per_character(1.0, 0)


# ---------------------------------------------------------------------------------------------
# Documents found by their start (the Trainer example, pack_windows)

def test_document_spans_start_at_every_page_and_are_cut_to_max_length():
    text = b"head<page>ab<page>abcdefg"  # 4 + 8 + 13 bytes
    tokens = np.frombuffer(text, dtype=np.uint8)
    assert data.document_spans(tokens) == [(0, 4), (4, 12), (12, 25)]
    assert data.document_spans(tokens, max_length=5) == [(0, 4), (4, 9), (9, 12), (12, 17), (17, 22), (22, 25)]
    assert data.document_spans(np.frombuffer(b"<page>x", dtype=np.uint8)) == [(0, 7)]  # one start at 0, not two
    assert data.document_spans(tokens, separator=b"\n") == [(0, 25)]  # no separator: one document


def test_parse_separator_reads_python_escapes():
    assert data.parse_separator("<page>") == data.PAGE_SEPARATOR
    assert data.parse_separator("\\n\\x03") == b"\n\x03"
    with pytest.raises(ValueError, match="must not be empty"):
        data.parse_separator("")
