"""ServeConfig: validation, and the one merge (explicit > environment > profile > defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from yolo_batch.errors import InputError
from yolo_batch.inference.config import BatchSetting
from yolo_batch.serving.config import SETTINGS, ServeConfig, from_env, resolve


def test_defaults_bind_loopback_without_a_token():
    config = resolve({"model": "m.pt"}, {})
    assert (config.host, config.port, config.token) == ("127.0.0.1", 8000, None)
    assert config.max_batch == BatchSetting(16) and config.max_delay_ms == 5.0 and config.queue_size == 1024
    assert "token" not in repr(config)


@pytest.mark.parametrize("explicit, env, expected", [
    ({}, {}, ("16", None, None)),  # defaults (the default profile)
    ({"profile": "inspection"}, {}, ("auto", True, None)),  # the profile's infer section
    ({}, {"YOLO_BATCH_PROFILE": "inspection"}, ("auto", True, None)),
    ({"profile": "inspection"}, {"YOLO_BATCH_MAX_BATCH": "8"}, ("8", True, None)),  # env over profile
    ({"profile": "inspection", "max_batch": "4"}, {"YOLO_BATCH_MAX_BATCH": "8"}, ("4", True, None)),  # explicit wins
    ({"profile": "inspection", "half": False}, {"YOLO_BATCH_HALF": "true"}, ("auto", False, None)),
    ({"max_batch": "auto", "max_latency_ms": 50.0}, {}, ("auto", None, 50.0)),
    ({"profile": "medical"}, {}, ("1", None, None)),
])
def test_precedence(explicit, env, expected):
    config = resolve({"model": "m.pt", **explicit}, env)
    assert (str(config.max_batch), config.half, config.max_latency_ms) == expected


def test_environment_fills_what_is_not_given_explicitly(tmp_path):
    env = {"YOLO_BATCH_MODEL": "/models/a.pt", "YOLO_BATCH_PORT": "9000", "YOLO_BATCH_HOST": "0.0.0.0",
           "YOLO_BATCH_CLASSES": "0,2", "YOLO_BATCH_WATCH": str(tmp_path), "YOLO_BATCH_OUT": str(tmp_path / "o"),
           "YOLO_BATCH_MAX_DELAY_MS": "2.5", "YOLO_BATCH_QUEUE_SIZE": ""}  # empty counts as unset
    config = resolve({"port": 8001, "host": None}, env)
    assert (config.model, config.port, config.host, config.classes) == ("/models/a.pt", 8001, "0.0.0.0", (0, 2))
    assert config.watch == tmp_path and config.out == tmp_path / "o" and config.max_delay_ms == 2.5
    assert config.queue_size == 1024


def test_token_from_environment_or_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    assert resolve({"model": "m"}, {"YOLO_BATCH_TOKEN": "abc"}).token == "abc"
    assert resolve({"model": "m"}, {"YOLO_BATCH_TOKEN_FILE": str(token_file)}).token == "s3cret"
    assert resolve({"model": "m", "token_file": token_file}, {"YOLO_BATCH_TOKEN": "abc"}).token == "s3cret"
    assert resolve({"model": "m"}, {"YOLO_BATCH_TOKEN": "abc", "YOLO_BATCH_TOKEN_FILE": str(token_file)}).token == "abc"


@pytest.mark.parametrize("explicit, env, message", [
    ({}, {}, "no model"),
    ({"model": "m", "port": 70000}, {}, "port must be in 0..65535"),
    ({"model": "m"}, {"YOLO_BATCH_PORT": "eighty"}, "YOLO_BATCH_PORT='eighty'"),
    ({"model": "m"}, {"YOLO_BATCH_HALF": "maybe"}, "expected true or false"),
    ({"model": "m"}, {"YOLO_BATCH_CLASSES": "a,b"}, "class ids"),
    ({"model": "m", "max_batch": "0"}, {}, "batch must be 'auto' or an integer >= 1"),
    ({"model": "m", "max_batch": "lots"}, {}, "batch must be 'auto' or an integer >= 1"),
    ({"model": "m", "max_delay_ms": -1.0}, {}, "max-delay-ms must be >= 0"),
    ({"model": "m", "timeout_ms": 0.0}, {}, "timeout-ms must be > 0"),
    ({"model": "m", "queue_size": 0}, {}, "queue-size must be an integer >= 1"),
    ({"model": "m", "imgsz": 100}, {}, "multiple of 32"),
    ({"model": "m", "imgsz": 99968}, {}, "imgsz must be at most 8192"),
    ({"model": "m", "workers": 100000}, {}, "workers must be at most"),
    ({"model": "m"}, {"YOLO_BATCH_THREADS": "10000"}, "threads must be at most"),
    ({"model": "m", "conf": 2.0}, {}, "conf must be in [0, 1]"),
    ({"model": "m", "watch": Path("in")}, {}, "--watch and --out go together"),
    ({"model": "m", "max_batch": "8", "max_latency_ms": 10.0}, {}, "applies to --max-batch auto only"),
    ({"model": "m", "profile": "nope"}, {}, "unknown profile 'nope'"),
    ({"model": "m", "token_file": Path("/nonexistent/token")}, {}, "cannot read the token file"),
    ({"model": "m"}, {"YOLO_BATCH_TOKEN": "two words"}, "without whitespace"),
    ({"model": "m"}, {"YOLO_BATCH_TOKEN": "change-me"}, "YOLO_BATCH_TOKEN is the placeholder 'change-me'"),
    ({"model": "m"}, {"YOLO_BATCH_TOKEN": "CHANGEME"}, "is the placeholder"),
    ({"model": "m", "log_level": "loud"}, {}, "log level"),
    ({"model": "m", "colour": "red"}, {}, "unknown serve setting(s): colour"),
])
def test_bad_values_are_one_line_input_errors(explicit, env, message):
    with pytest.raises(InputError) as caught:
        resolve(explicit, env)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_every_setting_has_a_field_or_is_the_token_file():
    fields = set(ServeConfig.__dataclass_fields__)
    assert {s.name for s in SETTINGS} - fields == {"token_file"}
    assert all(s.env.startswith("YOLO_BATCH_") for s in SETTINGS)


def test_from_env_parses_types():
    assert from_env({"YOLO_BATCH_PORT": "81", "YOLO_BATCH_HALF": "no", "YOLO_BATCH_POLL_MS": "100"}) == {
        "port": 81, "half": False, "poll_ms": 100.0}


def test_placeholder_tokens_are_refused_from_a_file_too_and_real_ones_pass(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    with pytest.raises(InputError, match=f"the token file {token_file} is the placeholder 'secret'"):
        resolve({"model": "m", "token_file": token_file}, {})
    for real in ("change-me-7Hq2", "s3cret", "tokens"):  # near a placeholder is not one
        assert resolve({"model": "m"}, {"YOLO_BATCH_TOKEN": real}).token == real


def test_the_example_env_files_token_is_refused():
    lines = (ROOT / "deploy" / "yolo-batch.env.example").read_text().splitlines()
    [example] = [line.split("=", 1)[1] for line in lines if line.startswith("YOLO_BATCH_TOKEN=")]
    with pytest.raises(InputError, match="is the placeholder"):
        resolve({"model": "m"}, {"YOLO_BATCH_TOKEN": example})
