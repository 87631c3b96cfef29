import math

import pytest
import torch
from transformers import LlavaConfig

from par_vllm.settings import ParSettingError, ParSettings, settings_from_hf_config


@pytest.mark.parametrize(
    "key, value",
    [
        ("par_keep_ratio", 0),
        ("par_keep_ratio", -0.5),
        ("par_keep_ratio", 1.5),
        ("par_keep_ratio", math.nan),
        ("par_keep_ratio", "0.5"),
        ("par_keep_ratio", True),
        ("par_num_tokens", 0),
        ("par_num_tokens", 3.5),
        ("par_outlier_factor", -1),
        ("par_retrieval_share", 2),
        ("par_duplicate_threshold", 0),
        ("par_relevance", "median"),
        ("par_similarity", "euclidean"),
        ("par_centre_relevance", -1),
        ("par_centre_relevance", math.inf),
        ("par_positions", "raster"),
        ("par_min_retrieved", -1),
        ("par_min_retrieved", 1.5),
        ("par_knn_k", 0),
        ("par_enabled", "yes"),
        ("par_typo", 1),
    ],
)
def test_bad_setting_is_rejected_by_name(key, value):
    with pytest.raises(ParSettingError) as info:
        ParSettings.from_keys({key: value})
    assert info.value.setting == key
    assert str(info.value).startswith(f"{key}: ")


def test_request_keys_override_server_defaults_and_ignore_other_keys():
    server = ParSettings.from_keys({"par_keep_ratio": 0.25, "par_knn_k": 9})
    request = ParSettings.from_keys({"par_keep_ratio": 0.5, "do_resize": True}, base=server)
    assert request.keep_ratio == 0.5 and request.knn_k == 9


@pytest.mark.parametrize(
    "settings, n, k",
    [
        (dict(), 576, 64),  # default 0.111: PAR's headline 64 of 576
        (dict(keep_ratio=0.25), 576, 144),
        (dict(keep_ratio=1e-9), 576, 1),
        (dict(keep_ratio=1.0), 576, 576),
        (dict(num_tokens=10), 576, 10),
        (dict(num_tokens=1000), 576, 576),
        (dict(num_tokens=10, keep_ratio=0.5), 2880, 10),
        (dict(enabled=False, num_tokens=10), 576, 576),
        (dict(keep_ratio=0.5), 7, 4),
    ],
)
def test_num_kept(settings, n, k):
    assert ParSettings(**settings).num_kept(n) == k


def test_settings_survive_packing_into_a_tensor():
    for settings in [ParSettings(), ParSettings(enabled=False, num_tokens=7, relevance="mean",
                                               keep_ratio=0.3, outlier_factor=0.25, knn_k=11,
                                               backend="triton", centres="farthest_point",
                                               drop_question_type_words=False, similarity="cosine",
                                               routing="nearest", centre_relevance=1.5,
                                               positions="consecutive", min_retrieved=3)]:
        packed = settings.to_tensor()
        assert packed.dtype == torch.float64
        assert ParSettings.from_tensor(packed) == settings


def test_server_defaults_come_from_par_keys_on_the_hf_config():
    config = LlavaConfig(par_keep_ratio=0.25, par_relevance="mean")
    assert settings_from_hf_config(config) == ParSettings(keep_ratio=0.25, relevance="mean")
    with pytest.raises(ParSettingError, match="par_keep_ratio"):
        settings_from_hf_config(LlavaConfig(par_keep_ratio=2.0))


def test_every_setting_has_its_serve_flags():
    import argparse

    from par_vllm.cli import add_setting_flags

    parser = argparse.ArgumentParser()
    add_setting_flags(parser)
    assert {action.dest for action in parser._actions} - {"help"} == set(ParSettings.model_fields)


def test_server_settings_are_refused_in_a_request_and_taken_from_the_server():
    from par_vllm.settings import SERVER_ONLY

    assert SERVER_ONLY == {"backend", "allowed_request_kwargs", "feature_cache_mb"}
    server = ParSettings.from_keys({"par_backend": "torch", "par_allowed_request_kwargs": ["do_resize"]})
    assert server.backend == "torch" and server.allowed_request_kwargs == ("do_resize",)
    for key, value in [("par_backend", "triton"), ("par_backend", "torch"), ("par_allowed_request_kwargs", ["size"]),
                       ("par_feature_cache_mb", 0)]:
        with pytest.raises(ParSettingError) as info:
            ParSettings.from_keys({key: value}, base=server, request=True)
        assert info.value.setting == key and "server setting" in str(info.value)
    # An unknown key's error lists only what a request may set.
    with pytest.raises(ParSettingError) as info:
        ParSettings.from_keys({"par_settings": {}}, request=True)
    assert "par_keep_ratio" in str(info.value) and "par_backend" not in str(info.value)


def test_allowed_request_kwargs_from_a_comma_separated_string():
    settings = ParSettings.from_keys({"par_allowed_request_kwargs": " do_resize, size ,"})
    assert settings.allowed_request_kwargs == ("do_resize", "size")
    with pytest.raises(ParSettingError, match="par_allowed_request_kwargs"):
        ParSettings.from_keys({"par_allowed_request_kwargs": [1]})


def test_server_only_policy_is_not_packed_or_hashed_per_image():
    settings = ParSettings(allowed_request_kwargs=("do_resize",), backend="torch", feature_cache_mb=0)
    assert "allowed_request_kwargs" not in settings.request_fields()
    assert "feature_cache_mb" not in settings.request_fields()
    assert settings.request_fields()["backend"] == "torch"
    assert ParSettings.from_tensor(settings.to_tensor()) == ParSettings(backend="torch")
