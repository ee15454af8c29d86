"""Hostile serving configuration: ``serving.properties`` files and environment values that are malformed, huge or
odd. Whatever they hold, the configuration either resolves or fails with one ConfigError naming each problem in a
bounded message, never another exception (which ``serve`` would show as a traceback); secrets are never echoed.
A property test generates files from the real setting names and hostile values; hand-written cases cover what
generation would rarely hit (invalid UTF-8, a million-character value, 100 000 lines, JSON nested 100 000 deep)."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.config import ConfigError, Sources, read_env, read_properties, resolve_config
from runtime.config.aliases import ALIASES, ENV_ALIASES
from runtime.config.schema import FIELDS

pytestmark = pytest.mark.unit
SECRET = "sk-kiln-hostile-secret-0123456789"
MAX_MESSAGE = 16_000  # characters: a screenful or two, whatever the file held
NO_NATIVE_KEYS = lambda engine: set()  # noqa: E731 - no engine library imported; every pass-through key is unknown

KEYS = sorted(FIELDS | set(ALIASES))
HOSTILE_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            " ",
            "NaN",
            "nan",
            "Infinity",
            "-Infinity",
            "1e308",
            "-1e308",
            "1e-400",
            "-1",
            "0",
            "2**63",
            str(2**63),
            str(-(2**63)),
            "9" * 400,
            "true",
            "maybe",
            "[]",
            "{}",
            "null",
            "[[[[",
            '{"a":',
            "../../etc",
            "/",
            "~root",
            "s3://",
            "a=b=c",
            "\t",
            "\\",
            "\\u0000",
            "💥",
            "\u202e",
        ]
    ),  # fmt: skip
    st.text(max_size=64),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
KEY = st.one_of(
    st.sampled_from(KEYS).map(lambda k: f"option.{k}"),
    st.sampled_from(KEYS),
    st.text(string.ascii_letters + string.digits + "._-:", max_size=24),
)
LINE = st.one_of(
    st.tuples(KEY, st.sampled_from(["=", ":", " = ", "=="]), HOSTILE_VALUES).map("".join),
    st.text(max_size=40),  # anything: comments, bare words, separators alone
)


def resolve_properties(path: Path, env: dict[str, str] | None = None) -> None:
    """What serve does with a model directory's serving.properties and the environment, up to validation."""
    props = read_properties(path)
    entries, hints = read_env(env or {})
    resolve_config(Sources(properties=props, env=entries, hints=hints), None, NO_NATIVE_KEYS)


def refused_cleanly(path: Path, env: dict[str, str] | None = None) -> ConfigError | None:
    try:
        resolve_properties(path, env)
    except ConfigError as exc:
        text = str(exc)
        assert len(text) <= MAX_MESSAGE, f"a {len(text)}-character error message"
        assert SECRET not in text, text
        return exc
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, max_size=12))
def test_any_properties_file_resolves_or_is_one_config_error(tmp_path: Path, lines: list[str]) -> None:
    f = tmp_path / "serving.properties"
    f.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    refused_cleanly(f)


@settings(max_examples=300, deadline=None)
@given(
    env=st.dictionaries(
        st.one_of(
            st.sampled_from(sorted(ENV_ALIASES)),
            st.sampled_from(KEYS).map(lambda k: "OPTION_" + k.upper()),
            st.sampled_from(["SM_NUM_GPUS", "SERVING_MAX_NUM_SEQS", "OPTION_", "OPTION__"]),
        ),
        HOSTILE_VALUES.filter(lambda v: "\x00" not in v),  # the OS refuses NUL in environment values
        max_size=6,
    )
)
def test_any_environment_resolves_or_is_one_config_error(env: dict[str, str]) -> None:
    message = ""
    try:
        entries, hints = read_env(env)
        resolve_config(Sources(env=entries, hints=hints), None, NO_NATIVE_KEYS)
    except ConfigError as exc:
        message = str(exc)
    assert len(message) <= MAX_MESSAGE


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"option.max_num_seqs=8\noption.dtype=\xff\xfebf16\n", "line 2"),  # invalid UTF-8
        (b"option.max_num_seqs=8\x00\n", "option.max_num_seqs"),
        (b"option.chat_template=/tmp/a\x00b\n", "option.chat_template"),  # a NUL in a path
        (b"option.swap_space=" + b"[" * 100_000 + b"]" * 100_000 + b"\n", "option.swap_space"),  # nested JSON
        (b"option.max_num_seqs=" + b"9" * 1_000_000 + b"\n", "option.max_num_seqs"),  # a million digits
        (b"".join(b"option.unknown_%d=1\n" % i for i in range(100_000)), "more"),  # 100 000 lines
        (b"option.max_model_len=1e308\noption.max_num_seqs=NaN\noption.job_queue_size=-1\n", "option.max_model_len"),
    ],
    ids=["invalid-utf8", "nul-int", "nul-path", "nested-json", "million-digits", "100k-lines", "numbers"],
)
def test_hostile_properties_files_are_refused_naming_the_problem(tmp_path: Path, content: bytes, needle: str) -> None:
    f = tmp_path / "serving.properties"
    f.write_bytes(content)
    exc = refused_cleanly(f)
    assert exc is not None, "accepted"
    assert needle in str(exc), str(exc)[:2000]


def test_a_file_saved_with_a_byte_order_mark_reads_as_without(tmp_path: Path) -> None:
    f = tmp_path / "serving.properties"
    f.write_bytes(b"\xef\xbb\xbfoption.max_num_seqs=8\n")
    entries = read_properties(f)
    assert [(e.key, e.value) for e in entries] == [("max_num_seqs", "8")]


def test_a_secret_in_a_refused_value_is_not_echoed(tmp_path: Path) -> None:
    """Two different API keys in one source are refused (keep one) without quoting either."""
    f = tmp_path / "serving.properties"
    f.write_text(f"option.api_key={SECRET}\napi_key={SECRET}-2\noption.max_num_seqs=many\n")
    exc = refused_cleanly(f, {"OPTION_API_KEY": SECRET})
    assert exc is not None
    assert "set the same setting (api_key)" in str(exc), exc


def test_the_serve_command_reports_a_hostile_properties_file_without_a_traceback(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """The whole path: ``runtime config`` on a model directory whose serving.properties is not UTF-8."""
    import shutil

    from tests.conftest import run_cli

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    (model / "serving.properties").write_bytes(b"option.max_num_seqs=\xff\n")
    proc = run_cli("runtime", "config", str(model))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "serving.properties line 1: byte 0xff is not UTF-8" in proc.stderr, proc.stderr
