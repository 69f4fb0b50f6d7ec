"""Numbers callers send: refused clearly when they are not what they claim to be.

NaN slips through a plain ``<= 0`` check and breaks asyncio's timer heap, so the rules
are tested one by one, then through a real Hypha server (where NaN and infinity travel
as msgpack floats), and the session that was sent nonsense must still work.
"""

from __future__ import annotations

import math

import pytest

from hypha_conda_plugin.errors import InvalidArgumentError
from hypha_conda_plugin.settings import Settings, SettingsError
from hypha_conda_plugin.validation import (
    MAX_LOG_PAGE,
    MAX_TIME_LIMIT,
    callback,
    log_window,
    optional_time_limit,
    options,
    time_limit,
)
from tests.conftest import WALKTHROUGH_DEPENDENCIES

BAD_TIME_LIMITS = [
    math.nan,
    math.inf,
    -math.inf,
    -1,
    0,
    0.0,
    MAX_TIME_LIMIT + 1,
    10**400,
    "30",
    "soon",
    True,
    [5],
    {"seconds": 5},
]


@pytest.mark.parametrize("value", [0.001, 1, 30.5, MAX_TIME_LIMIT])
def test_good_time_limits_become_floats(value: float) -> None:
    assert time_limit(value, "config['timeout']") == float(value)


@pytest.mark.parametrize("value", BAD_TIME_LIMITS, ids=repr)
def test_bad_time_limits_are_refused_naming_the_field(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"config\['timeout'\] must be a"):
        time_limit(value, "config['timeout']")


def test_a_missing_time_limit_means_the_default() -> None:
    assert optional_time_limit(None, "t", 12.0) == 12.0
    assert optional_time_limit(None, "t", None) is None
    with pytest.raises(InvalidArgumentError):
        optional_time_limit(math.nan, "t", 12.0)


def test_a_long_refused_value_is_quoted_short() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        time_limit("x" * 100_000, "config['timeout']")
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(
    ("offset", "limit", "field"),
    [
        (-1, None, "offset"),
        (1.5, None, "offset"),
        ("0", None, "offset"),
        (True, None, "offset"),
        (2**40, None, "offset"),
        (0, -1, "limit"),
        (0, MAX_LOG_PAGE + 1, "limit"),
        (0, 10**30, "limit"),
        (0, math.nan, "limit"),
        (0, "10", "limit"),
    ],
)
def test_hostile_log_windows_are_refused(offset: object, limit: object, field: str) -> None:
    with pytest.raises(InvalidArgumentError, match=f"^{field} must be a whole number"):
        log_window(offset, limit)


def test_good_log_windows_pass() -> None:
    assert log_window(0, None) == (0, None)
    assert log_window(None, 5) == (0, 5)
    assert log_window(10**6, MAX_LOG_PAGE) == (10**6, MAX_LOG_PAGE)


def test_options_and_callbacks() -> None:
    assert options(None, "config") == {}
    assert options({"timeout": 1}, "config") == {"timeout": 1}
    with pytest.raises(InvalidArgumentError, match="config must be a mapping"):
        options("timeout=1", "config")
    assert callback(None, "output_callback") is None
    assert callback(print, "output_callback") is print
    with pytest.raises(InvalidArgumentError, match="output_callback must be a function"):
        callback("print", "output_callback")


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "0", str(MAX_TIME_LIMIT * 2)])
def test_settings_refuse_nonsense_time_limits(value: str) -> None:
    with pytest.raises(SettingsError, match="default_execute_timeout"):
        Settings.from_env({"CONDA_EXECUTE_TIMEOUT": value})
    if value != str(MAX_TIME_LIMIT * 2):  # no upper bound on the operator's own limits
        with pytest.raises(SettingsError, match="build_timeout"):
            Settings.from_env({"CONDA_BUILD_TIMEOUT": value})


def test_output_and_log_limits_are_settings() -> None:
    settings = Settings.from_env(
        {"CONDA_MAX_OUTPUT_BYTES": "1048576", "CONDA_MAX_LOG_BYTES": "200000"}
    )
    assert settings.max_output_bytes == 2**20
    assert settings.max_log_bytes == 200_000
    defaults = Settings.from_env({})
    assert defaults.max_output_bytes == 16 * 2**20
    assert defaults.max_log_bytes == 2**20
    with pytest.raises(SettingsError, match="max_output_bytes"):
        Settings.from_env({"CONDA_MAX_OUTPUT_BYTES": "lots"})


# ------------------------------------------------------ through a real Hypha server


@pytest.mark.parametrize("value", [math.nan, math.inf, -5, "30"], ids=repr)
async def test_execute_refuses_bad_time_limits_and_the_session_still_works(
    conda_worker, ready_session, value
):
    with pytest.raises(Exception, match=r"InvalidArgumentError: config\['timeout'\] must be a"):
        await conda_worker.execute(ready_session, "print('never')", config={"timeout": value})
    result = await conda_worker.execute(ready_session, "print('fine')", config={"timeout": 30})
    assert result["outputs"] == [{"type": "stream", "name": "stdout", "text": "fine\n"}]


async def test_execute_refuses_a_config_that_is_not_a_mapping(conda_worker, ready_session):
    with pytest.raises(Exception, match="execute\\(\\)'s config must be a mapping"):
        await conda_worker.execute(ready_session, "1", config="timeout=5")


@pytest.mark.parametrize("value", [math.nan, math.inf, -5, 0, "60"], ids=repr)
async def test_start_refuses_bad_time_limits_and_leaves_nothing(conda_worker, value):
    with pytest.raises(Exception, match=r"InvalidArgumentError: config\['timeout'\] must be a"):
        await conda_worker.start(
            {
                "id": "bad-timeout",
                "manifest": {"dependencies": WALKTHROUGH_DEPENDENCIES},
                "timeout": value,
            }
        )
    assert "bad-timeout" not in [s["session_id"] for s in await conda_worker.list_sessions()]


async def test_get_logs_refuses_hostile_windows(conda_worker, ready_session):
    for kwargs, field in [
        ({"offset": -1}, "offset"),
        ({"offset": 1.5}, "offset"),
        ({"limit": 10**9}, "limit"),
        ({"limit": -3}, "limit"),
        ({"limit": "all"}, "limit"),
    ]:
        with pytest.raises(Exception, match=f"InvalidArgumentError: {field} must be"):
            await conda_worker.get_logs(ready_session, **kwargs)
    page = await conda_worker.get_logs(ready_session, offset=0, limit=2)
    assert len(page["items"]) <= 2
