"""The workers' feature cache: the tower's unreduced rows by item content, least recently
used first out, within a byte budget, copies in and out. (Through a real engine:
test_qwen_vl's test_a_later_question_about_the_same_image_or_video_skips_the_tower.)"""

import torch

from par_vllm.feature_cache import FeatureCache, content_key, pack_key


def rows(n: int, value: float = 1.0) -> torch.Tensor:
    return torch.full((n, 4), value)  # n x 4 float32: 16 bytes a row


def test_rows_come_back_equal_and_as_copies():
    cache = FeatureCache(1024)
    original = rows(3, 2.0)
    cache.put(b"a", original)
    original.add_(1.0)  # the caller's tensor changes: the cache's does not
    got = cache.get(b"a", "cpu")
    assert torch.equal(got, rows(3, 2.0))
    got.add_(1.0)  # nor does what a reader does to its copy
    assert torch.equal(cache.get(b"a", "cpu"), rows(3, 2.0))
    assert cache.get(b"b", "cpu") is None and cache.get(None, "cpu") is None
    assert b"a" in cache and b"b" not in cache and None not in cache


def test_the_least_recently_used_leave_first_within_the_budget():
    cache = FeatureCache(3 * 64)  # three items of 4 rows
    for key in (b"a", b"b", b"c"):
        cache.put(key, rows(4))
    assert cache.get(b"a", "cpu") is not None  # a is now the most recently used
    cache.put(b"d", rows(4))
    assert cache.get(b"b", "cpu") is None
    assert all(cache.get(key, "cpu") is not None for key in (b"a", b"c", b"d"))
    assert len(cache) == 3 and cache.size == 3 * 64
    cache.put(b"e", rows(8))  # takes two places: the two least recently used leave
    assert [key for key in (b"a", b"c", b"d", b"e") if cache.get(key, "cpu") is not None] == [b"d", b"e"]
    assert cache.size == 3 * 64


def test_nothing_is_kept_without_a_key_over_the_budget_or_at_capacity_zero():
    cache = FeatureCache(64)
    cache.put(None, rows(1))
    cache.put(b"big", rows(5))
    assert len(cache) == 0 and cache.size == 0
    off = FeatureCache(0)
    off.put(b"a", rows(1))
    assert off.get(b"a", "cpu") is None


def test_a_content_key_travels_as_a_field_and_back():
    key = "6f1c0b2e" * 8
    assert content_key(pack_key(key)) == key.encode()
    assert pack_key(None).numel() == 0 and content_key(pack_key(None)) is None and content_key(None) is None
