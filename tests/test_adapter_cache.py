"""Adapter cache: fetch on first use, LRU by count and by bytes in memory and on disk,
evicted adapters fetched again, clear errors for missing or broken adapters."""

from __future__ import annotations

import json

import boto3
import pytest
import torch
from adapter_cache import AdapterCache, AdapterInvalid, AdapterNotFound
from moto import mock_aws

from avatarflow import keys

BUCKET = "cache-test"


def fake_parse(path):
    """Stands in for diffusers' lora_state_dict: a rank-4 pair sized from the file, so in-memory
    size is exactly 8x the file size and tests control both."""
    n = path.stat().st_size
    return (
        {
            "unet.down.lora_A.weight": torch.zeros(4, n // 4),
            "unet.down.lora_B.weight": torch.zeros(n // 4, 4),
        },
        None,
        None,
    )


@pytest.fixture
def s3():
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def publish(s3, user: str, size: int = 400, version: str = "v1", config: dict | None = None) -> None:
    prefix = keys.model_prefix(user, version)
    s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_WEIGHTS, Body=b"\0" * size)
    s3.put_object(
        Bucket=BUCKET, Key=prefix + keys.ADAPTER_CONFIG, Body=json.dumps(config or {"token": "sks"})
    )


def make_cache(s3, tmp_path, **bounds) -> AdapterCache:
    return AdapterCache(s3, BUCKET, tmp_path / "cache", parse=fake_parse, **bounds)


def test_first_use_fetches_then_memory_hits(s3, tmp_path):
    publish(s3, "u1", config={"token": "zwx", "reference_embedding": [0.5, 0.5]})
    cache = make_cache(s3, tmp_path)
    adapter, source, _ = cache.get("u1", "v1")
    assert source == "s3"
    assert (adapter.token, adapter.reference_embedding, adapter.rank) == ("zwx", [0.5, 0.5], 4)
    assert (tmp_path / "cache/u1/v1" / keys.ADAPTER_WEIGHTS).stat().st_size == 400
    again, source, _ = cache.get("u1", "v1")
    assert source == "memory" and again is adapter
    assert (cache.stats.s3_fetches, cache.stats.memory_hits) == (1, 1)


def test_memory_eviction_by_count_falls_back_to_disk(s3, tmp_path):
    for user in ("a", "b", "c"):
        publish(s3, user)
    cache = make_cache(s3, tmp_path, max_memory_count=2)
    for user in ("a", "b", "c"):
        cache.get(user, "v1")
    assert list(cache.memory) == [("b", "v1"), ("c", "v1")]  # "a", least recently used, left memory
    assert cache.get("a", "v1")[1] == "disk"  # ... but not the disk
    assert list(cache.memory) == [("c", "v1"), ("a", "v1")]
    assert cache.stats.memory_evictions == 2 and cache.stats.s3_fetches == 3


def test_memory_eviction_by_bytes(s3, tmp_path):
    for user in ("a", "b", "c"):
        publish(s3, user, size=400)  # 2 x float32[100, 4] = 3200 bytes each in memory
    cache = make_cache(s3, tmp_path, max_memory_bytes=7000)
    for user in ("a", "b"):
        cache.get(user, "v1")
    assert cache.memory_bytes == 6400
    cache.get("a", "v1")  # a is now the most recently used
    cache.get("c", "v1")
    assert list(cache.memory) == [("a", "v1"), ("c", "v1")]
    assert cache.memory_bytes <= 7000


def test_disk_eviction_by_count_and_bytes_then_refetch(s3, tmp_path):
    for user in ("a", "b", "c"):
        publish(s3, user, size=1000)
    cache = make_cache(s3, tmp_path, max_memory_count=1, max_disk_count=2)
    for user in ("a", "b", "c"):
        cache.get(user, "v1")
    assert list(cache.disk) == [("b", "v1"), ("c", "v1")]
    assert not (tmp_path / "cache/a/v1").exists()  # evicted files are deleted
    assert cache.get("a", "v1")[1] == "s3"  # evicted everywhere: simply fetched again
    assert cache.stats.disk_evictions == 2

    by_bytes = AdapterCache(
        s3, BUCKET, tmp_path / "bytes", parse=fake_parse, max_memory_count=1, max_disk_bytes=2500
    )
    for user in ("a", "b", "c"):
        by_bytes.get(user, "v1")
    # adapter.json (15 bytes) + 1000 bytes of weights each: two fit under 2500 bytes
    assert list(by_bytes.disk) == [("b", "v1"), ("c", "v1")]
    assert by_bytes.disk_bytes <= 2500
    assert sorted(p.name for p in (tmp_path / "bytes").iterdir() if not p.name.startswith(".")) == ["b", "c"]


def test_missing_and_broken_adapters(s3, tmp_path):
    cache = make_cache(s3, tmp_path)
    with pytest.raises(AdapterNotFound):
        cache.get("ghost", "v1")
    publish(s3, "u1")
    with pytest.raises(AdapterNotFound):
        cache.get("u1", "v2")
    prefix = keys.model_prefix("bad", "v1")
    s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_WEIGHTS, Body=b"x" * 10)
    s3.put_object(Bucket=BUCKET, Key=prefix + keys.ADAPTER_CONFIG, Body=b"not json")
    with pytest.raises(AdapterInvalid, match="adapter.json"):
        cache.get("bad", "v1")
    publish(s3, "badref", config={"reference_embedding": "face"})
    with pytest.raises(AdapterInvalid, match="reference_embedding"):
        cache.get("badref", "v1")
    publish(s3, "huge", size=2000)
    with pytest.raises(AdapterInvalid, match="exceed"):
        make_cache(s3, tmp_path / "small", max_adapter_bytes=1000).get("huge", "v1")
    with pytest.raises(ValueError, match="user_id"):
        cache.get("../x", "v1")
    assert cache.get("u1", "v1")[1] == "s3"  # still serving
