"""Configuration loading, validation, precedence and rendering."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from cri.config import Config, ConfigError, load, render_default


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_missing_default_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    import cri.config as mod

    monkeypatch.setattr(mod, "DEFAULT_CONFIG_FILE", tmp_path / "nope.toml")
    cfg = load(None, tmp_path / "no.d")
    assert cfg == Config()


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml", tmp_path / "no.d")


def test_rendered_defaults_parse_back_to_defaults(tmp_path: Path) -> None:
    text = render_default()
    assert "[runtime.handlers.runc]" in text and "[streaming]" in text
    f = write(tmp_path / "crib.toml", text)
    assert load(f, tmp_path / "no.d") == Config()
    # every option is documented with a comment line right above it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if " = " in line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), line
    assert dataclasses.asdict(Config()) == tomllib.loads(text)


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    f = write(tmp_path / "crib.toml", "[runtime]\nconmonn = '/x'\n")
    with pytest.raises(ConfigError) as err:
        load(f, tmp_path / "no.d")
    assert str(f) in str(err.value) and "runtime.conmonn" in str(err.value)
    assert "unknown key" in str(err.value)


def test_unknown_table(tmp_path: Path) -> None:
    f = write(tmp_path / "crib.toml", "[netwrok]\nx = 1\n")
    with pytest.raises(ConfigError, match="netwrok: unknown key"):
        load(f, tmp_path / "no.d")


@pytest.mark.parametrize("text, key, fragment", [
    ("[api]\nmax_recv_msg_size = 'big'\n", "api.max_recv_msg_size", "'big' is not an integer"),
    ("[network]\ndefault_network = 1\n", "network.default_network", "is not a boolean"),
    ("[network]\ncni_plugin_dirs = '/x'\n", "network.cni_plugin_dirs", "not a list of strings"),
    ("[runtime]\ncgroup_driver = 'docker'\n", "runtime.cgroup_driver", "not one of"),
    ("log_level = 'loud'\n", "log_level", "not one of"),
    ("root = 'relative'\n", "root", "not an absolute path"),
    ("[image]\nmax_concurrent_downloads = 0\n", "image.max_concurrent_downloads", "minimum"),
    ("[runtime]\nmax_recv = true\n", "runtime.max_recv", "unknown key"),
    ("[runtime]\ndefault_handler = 'kata'\n", "runtime.default_handler", "not a configured"),
    ("[runtime.handlers.kata]\nroot = '/x'\n", "runtime.handlers.kata.path", "must be set"),
    ("[api\n", "(file)", "invalid TOML"),
])
def test_invalid_values(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    f = write(tmp_path / "crib.toml", text)
    with pytest.raises(ConfigError) as err:
        load(f, tmp_path / "no.d")
    msg = str(err.value)
    assert str(f) in msg and key in msg and fragment in msg, msg


def test_float_accepts_integer(tmp_path: Path) -> None:
    f = write(tmp_path / "crib.toml", "[api]\nshutdown_grace = 3\n")
    assert load(f, tmp_path / "no.d").api.shutdown_grace == 3.0


def test_dropins_in_lexical_order_then_flags(tmp_path: Path) -> None:
    f = write(tmp_path / "crib.toml", "log_level = 'warning'\n[image]\npull_retries = 1\n")
    d = tmp_path / "crib.d"
    write(d / "20-b.toml", "[image]\npull_retries = 3\n")
    write(d / "10-a.toml", "[image]\npull_retries = 2\nauth_file = '/a.json'\n")
    write(d / "30-c.toml", "[runtime.handlers.kata]\npath = '/usr/bin/kata'\n")
    write(d / "ignored.conf", "garbage")
    cfg = load(f, d, {"log_level": "debug", "api.listen": "/tmp/x.sock"})
    assert cfg.image.pull_retries == 3
    assert cfg.image.auth_file == "/a.json"
    assert cfg.log_level == "debug"
    assert cfg.api.listen == "/tmp/x.sock"
    assert set(cfg.runtime.handlers) == {"runc", "crun", "kata"}
    assert cfg.handler("kata").root.endswith("/runtimes/kata")
    assert cfg.handler("").path == "/usr/sbin/runc"


def test_dropin_partial_handler_keeps_other_keys(tmp_path: Path) -> None:
    d = tmp_path / "crib.d"
    write(d / "a.toml", "[runtime.handlers.runc]\nroot = '/run/other'\n")
    cfg = load(write(tmp_path / "c.toml", ""), d)
    assert cfg.handler("runc").path == "/usr/sbin/runc"
    assert cfg.handler("runc").root == "/run/other"


def test_unreadable_dropin_is_reported(tmp_path: Path) -> None:
    d = tmp_path / "crib.d"
    (d / "bad.toml").mkdir(parents=True)  # a directory: cannot be read as a file
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path / "c.toml", ""), d)
    assert "bad.toml" in str(err.value) and "cannot read" in str(err.value)


def test_invalid_dropin_names_the_dropin(tmp_path: Path) -> None:
    d = tmp_path / "crib.d"
    write(d / "50-x.toml", "[tracing]\nexporter = 'zipkin'\n")
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path / "c.toml", ""), d)
    assert "50-x.toml" in str(err.value) and "tracing.exporter" in str(err.value)
    assert "'zipkin'" in str(err.value)


def test_bad_flag_value_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="command line: root"):
        load(write(tmp_path / "c.toml", ""), tmp_path / "no.d", {"root": "rel/ative"})
