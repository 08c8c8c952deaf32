"""Every numeric setting is range-checked, with a message that names the variable (function/config.py RANGES)."""
from __future__ import annotations

import dataclasses

import pytest

from function.config import RANGES, Config, ConfigError

NUMERIC = {f.name: f for f in dataclasses.fields(Config) if isinstance(f.default, (int, float))
           and not isinstance(f.default, bool)}


def env_of(name: str) -> str:
    return NUMERIC[name].metadata["env"]


def text(name: str, value: float) -> str:
    return str(int(value)) if isinstance(NUMERIC[name].default, int) else repr(float(value))


def test_every_numeric_setting_has_a_range_and_its_default_is_in_it():
    assert set(RANGES) == set(NUMERIC)
    for name, r in RANGES.items():
        assert r.holds(NUMERIC[name].default), name
    Config.from_env({})


@pytest.mark.parametrize("name", sorted(RANGES))
def test_the_bounds_are_accepted_and_beyond_them_is_an_error_naming_the_variable(name):
    r = RANGES[name]
    step = 1 if isinstance(NUMERIC[name].default, int) else 0.01
    below = r.low if r.above else r.low - step
    if not r.above:
        assert getattr(Config.from_env({env_of(name): text(name, r.low)}), name) == r.low
    with pytest.raises(ConfigError, match=f"^{env_of(name)}=") as e:
        Config.from_env({env_of(name): text(name, below)})
    assert "must be" in str(e.value)
    if r.high is not None:
        assert getattr(Config.from_env({env_of(name): text(name, r.high)}), name) == r.high
        with pytest.raises(ConfigError, match=f"^{env_of(name)}="):
            Config.from_env({env_of(name): text(name, r.high + step)})


@pytest.mark.parametrize("env, message", [
    ({"MAX_QUEUE_SIZE": "-1"}, "MAX_QUEUE_SIZE=-1: must be at least 0 (0: 4 x MAX_NUM_SEQS)"),
    ({"RESPONSE_CACHE_TTL_S": "0"}, "RESPONSE_CACHE_TTL_S=0.0: must be positive"),
    ({"REQUEST_TIMEOUT_S": "nan"}, "REQUEST_TIMEOUT_S=nan: must be positive"),
    ({"GPU_MEMORY_UTILIZATION": "1.5"}, "GPU_MEMORY_UTILIZATION=1.5: must be between 0.05 and 0.99"),
    ({"MAX_IMAGE_BYTES": "0"}, "MAX_IMAGE_BYTES=0: must be at least 1"),
])
def test_out_of_range_messages(env, message):
    with pytest.raises(ConfigError) as e:
        Config.from_env(env)
    assert str(e.value) == message


def test_zero_keeps_its_automatic_meaning():
    c = Config.from_env({"MAX_QUEUE_SIZE": "0", "MAX_NUM_SEQS": "3", "DEFAULT_MAX_TOKENS": "0",
                         "IMAGE_MAX_PIXELS": "0"})
    assert c.queue_limit == 12 and c.default_max_tokens == 0 and c.image_max_pixels == 0
