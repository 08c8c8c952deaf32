"""The deployment guide's environment names, accepted as aliases (function/config.py ENV_ALIASES):
MODEL_MAX_LENGTH -> MAX_MODEL_LEN and USE_FLASH_ATTENTION=true|false -> ATTN_IMPLEMENTATION, with one log line per
alias used; a value that contradicts the setting it stands for is a start-up error that readiness shows."""
from __future__ import annotations

import logging

import httpx
import pytest
from support.fake_engine import FakeEngine

from function.config import ENV_ALIASES, ENV_VARS, Config, ConfigError
from function.func import Function


def test_aliases_name_real_settings_and_are_not_settings_themselves():
    assert ENV_ALIASES == {"MODEL_MAX_LENGTH": "MAX_MODEL_LEN", "USE_FLASH_ATTENTION": "ATTN_IMPLEMENTATION"}
    assert set(ENV_ALIASES.values()) <= set(ENV_VARS) and not set(ENV_ALIASES) & set(ENV_VARS)


@pytest.mark.parametrize("env, field, value", [
    ({"MODEL_MAX_LENGTH": "8192"}, "max_model_len", 8192),
    ({"MODEL_MAX_LENGTH": " 4096 "}, "max_model_len", 4096),
    ({"USE_FLASH_ATTENTION": "true"}, "attn_implementation", "flash_attention_2"),
    ({"USE_FLASH_ATTENTION": "True"}, "attn_implementation", "flash_attention_2"),
    ({"USE_FLASH_ATTENTION": "false"}, "attn_implementation", "sdpa"),
    ({"USE_FLASH_ATTENTION": "0"}, "attn_implementation", "sdpa"),
    # both names with agreeing values; the automatic value of ours agrees with either
    ({"MODEL_MAX_LENGTH": "8192", "MAX_MODEL_LEN": "8192"}, "max_model_len", 8192),
    ({"MODEL_MAX_LENGTH": "8192", "MAX_MODEL_LEN": "0"}, "max_model_len", 8192),
    ({"USE_FLASH_ATTENTION": "true", "ATTN_IMPLEMENTATION": "auto"}, "attn_implementation", "flash_attention_2"),
    ({"USE_FLASH_ATTENTION": "true", "ATTN_IMPLEMENTATION": "flash_attention_2"}, "attn_implementation",
     "flash_attention_2"),
    ({"USE_FLASH_ATTENTION": "false", "ATTN_IMPLEMENTATION": "auto"}, "attn_implementation", "sdpa"),
    ({"USE_FLASH_ATTENTION": "false", "ATTN_IMPLEMENTATION": "eager"}, "attn_implementation", "eager"),
])
def test_alias_maps_to_the_setting(env, field, value, caplog):
    with caplog.at_level(logging.INFO, logger="function.config"):
        cfg = Config.from_env(env)
    assert getattr(cfg, field) == value
    used = [a for a in ENV_ALIASES if a in env]
    lines = [r.getMessage() for r in caplog.records if r.name == "function.config"]
    assert len(lines) == len(used) == 1
    assert used[0] in lines[0] and f"{ENV_ALIASES[used[0]]}=" in lines[0] and "\n" not in lines[0]


def test_both_aliases_at_once_and_no_alias_no_log(caplog):
    with caplog.at_level(logging.INFO, logger="function.config"):
        cfg = Config.from_env({"MODEL_MAX_LENGTH": "2048", "USE_FLASH_ATTENTION": "false"})
        assert (cfg.max_model_len, cfg.attn_implementation) == (2048, "sdpa")
        assert len(caplog.records) == 2
        caplog.clear()
        assert Config.from_env({"MAX_MODEL_LEN": "2048"}).max_model_len == 2048
        assert caplog.records == []


@pytest.mark.parametrize("env, fragments", [
    ({"MODEL_MAX_LENGTH": "8192", "MAX_MODEL_LEN": "4096"}, ["MODEL_MAX_LENGTH='8192'", "MAX_MODEL_LEN='4096'"]),
    ({"USE_FLASH_ATTENTION": "true", "ATTN_IMPLEMENTATION": "sdpa"}, ["USE_FLASH_ATTENTION", "'sdpa'"]),
    ({"USE_FLASH_ATTENTION": "true", "ATTN_IMPLEMENTATION": "eager"}, ["USE_FLASH_ATTENTION", "'eager'"]),
    ({"USE_FLASH_ATTENTION": "false", "ATTN_IMPLEMENTATION": "flash_attention_2"},
     ["USE_FLASH_ATTENTION='false'", "flash_attention_2"]),
])
def test_conflicting_values_are_a_start_up_error(env, fragments):
    with pytest.raises(ConfigError, match="contradicts") as e:
        Config.from_env(env)
    assert all(f in str(e.value) for f in fragments), e.value


@pytest.mark.parametrize("env, fragment", [
    ({"USE_FLASH_ATTENTION": "maybe"}, "USE_FLASH_ATTENTION"),
    ({"MODEL_MAX_LENGTH": "8k"}, "MODEL_MAX_LENGTH"),
    ({"MODEL_MAX_LENGTH": "-1"}, "MODEL_MAX_LENGTH"),
])
def test_bad_alias_values_name_the_alias(env, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Config.from_env(env)


async def test_a_conflict_shows_in_readiness_and_the_api_answers_503():
    made = []
    fn = Function(engine_factory=lambda cfg: made.append(FakeEngine()) or made[-1])
    fn.start({"MODEL_MAX_LENGTH": "8192", "MAX_MODEL_LEN": "4096"})
    ready, message = fn.ready()
    assert made == [] and ready is False and message.startswith("configuration error") and "contradicts" in message
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=fn.handle), base_url="http://fn") as c:
        r = await c.post("/v1/chat/completions", json={"model": "autoglm-phone-9b",
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "MODEL_MAX_LENGTH" in r.json()["error"]["message"]
