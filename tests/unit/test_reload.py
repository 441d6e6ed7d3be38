"""SIGHUP reload logic: the config diff, and the reloader with a fake image service."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri import tracing
from cri.config import Config, HandlerConfig, ImageConfig
from cri.reload import UNSET, Change, ConfigSource, Reloader, diff, flatten


def test_flatten_names_every_leaf_by_dotted_key() -> None:
    flat = flatten(Config())
    assert flat["log_level"] == "info"
    assert flat["image.auth_file"] == ""
    assert flat["runtime.handlers.runc.path"] == "/usr/sbin/runc"
    assert flat["tracing.exporter"] == "none"
    assert not any(isinstance(v, (dict, Config, ImageConfig)) for v in flat.values())


def test_diff_of_equal_configs_is_empty() -> None:
    assert diff(Config(), Config()) == []


def test_diff_lists_each_changed_key_once_sorted_and_formats_it() -> None:
    old, new = Config(), Config()
    new.log_level = "debug"
    new.image.auth_file = "/etc/x.json"
    new.image.insecure_registries = ["r.example:5000"]
    new.api.listen = "/run/other.sock"
    new.runtime.handlers["kata"] = HandlerConfig(path="/usr/bin/kata")
    changes = diff(old, new)
    assert [c.key for c in changes] == [
        "api.listen", "image.auth_file", "image.insecure_registries", "log_level",
        "runtime.handlers.kata.path", "runtime.handlers.kata.root"]
    by_key = {c.key: c for c in changes}
    assert str(by_key["image.auth_file"]) == "image.auth_file: '' -> '/etc/x.json'"
    assert str(by_key["image.insecure_registries"]) == \
        "image.insecure_registries: [] -> ['r.example:5000']"
    assert by_key["runtime.handlers.kata.path"].old is UNSET
    assert str(by_key["runtime.handlers.kata.path"]) == \
        "runtime.handlers.kata.path: (unset) -> '/usr/bin/kata'"
    live = {c.key for c in changes if c.live}
    assert live == {"image.auth_file", "image.insecure_registries", "log_level"}


def test_change_sections() -> None:
    assert Change("tracing.sample_ratio", 1.0, 0.5).live
    assert Change("log_level", "info", "debug").section == "log_level"
    assert not Change("root", "/a", "/b").live
    assert not Change("metrics.enabled", False, True).live


# -- the reloader --------------------------------------------------------------------------


class FakeImages:
    """Records the [image] tables it is given; refuses them when told to."""

    def __init__(self) -> None:
        self.calls: list[ImageConfig | None] = []
        self.refuse = False

    async def reload(self, image: ImageConfig | None = None) -> bool:
        self.calls.append(image)
        return not self.refuse


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """Put the root logger back as it was (logs.setup adds a handler and sets the level)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def source(tmp_path: Path) -> ConfigSource:
    (tmp_path / "crib.toml").write_text("")
    return ConfigSource(tmp_path / "crib.toml", tmp_path / "crib.d", {"root": str(tmp_path)})


def running_from(source: ConfigSource) -> Config:
    return source.load()


def rewrite(source: ConfigSource, text: str) -> None:
    assert source.config_file is not None
    source.config_file.write_text(text)


def test_log_level_applies_and_is_logged(source: ConfigSource, root_logger: logging.Logger,
                                         caplog: pytest.LogCaptureFixture) -> None:
    running, images = running_from(source), FakeImages()
    reloader = Reloader(running, source, images)
    rewrite(source, 'log_level = "debug"\n')
    with caplog.at_level(logging.INFO, logger="cri.reload"):
        applied = asyncio.run(reloader.reload())
    assert [str(c) for c in applied] == ["log_level: 'info' -> 'debug'"]
    assert running.log_level == "debug"
    assert root_logger.level == logging.DEBUG
    assert "reload: log_level: 'info' -> 'debug'" in caplog.text
    assert len(images.calls) == 1  # the image files are re-read on every SIGHUP


def test_a_quieter_level_is_set_after_the_lines_are_logged(
        source: ConfigSource, root_logger: logging.Logger,
        caplog: pytest.LogCaptureFixture) -> None:
    running, images = running_from(source), FakeImages()
    rewrite(source, 'log_level = "error"\n[image]\npull_retries = 1\n')
    with caplog.at_level(logging.INFO, logger="cri.reload"):
        asyncio.run(Reloader(running, source, images).reload())
    messages = [r.getMessage() for r in caplog.records if r.name == "cri.reload"]
    assert messages[:2] == ["reload: image.pull_retries: 4 -> 1",
                            "reload: log_level: 'info' -> 'error'"]
    assert root_logger.level == logging.ERROR
    assert running.image.pull_retries == 1


def test_image_table_goes_to_the_image_service(source: ConfigSource) -> None:
    running, images = running_from(source), FakeImages()
    rewrite(source, '[image]\nauth_file = "/etc/x.json"\npinned_images = ["r.example/p*"]\n')
    applied = asyncio.run(Reloader(running, source, images).reload())
    assert {c.key for c in applied} == {"image.auth_file", "image.pinned_images"}
    given = images.calls[-1]
    assert given is not None and given.auth_file == "/etc/x.json"
    assert running.image.auth_file == "/etc/x.json"
    assert running.image.pinned_images == ["r.example/p*"]


def test_refused_image_table_keeps_the_running_one(source: ConfigSource,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    running, images = running_from(source), FakeImages()
    images.refuse = True
    rewrite(source, '[image]\nauth_file = "/etc/x.json"\n')
    with caplog.at_level(logging.INFO, logger="cri.reload"):
        applied = asyncio.run(Reloader(running, source, images).reload())
    assert applied == []
    assert running.image.auth_file == ""
    assert "[image] not changed (image.auth_file)" in caplog.text


def test_config_error_keeps_everything(source: ConfigSource, root_logger: logging.Logger,
                                       caplog: pytest.LogCaptureFixture) -> None:
    running, images = running_from(source), FakeImages()
    before = flatten(running)
    for bad, needle in (("log_level = [not toml", "invalid TOML"),
                        ('log_level = "loud"\n', "log_level: 'loud' is not one of"),
                        ('[image]\nnope = 1\n', "image.nope: unknown key"),
                        ('[image]\npinned_images = ["a*b"]\n', "image.pinned_images")):
        rewrite(source, bad)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cri.reload"):
            assert asyncio.run(Reloader(running, source, images).reload()) == []
        assert "reload: configuration error, keeping the running configuration" in caplog.text
        assert needle in caplog.text, caplog.text
        assert flatten(running) == before
    assert images.calls == []


def test_restart_only_keys_warn_and_stay(source: ConfigSource,
                                         caplog: pytest.LogCaptureFixture) -> None:
    running, images = running_from(source), FakeImages()
    rewrite(source, '[api]\nshutdown_grace = 3.0\n[runtime]\npids_limit = 100\n'
                    '[runtime.handlers.kata]\npath = "/usr/bin/kata"\n')
    reloader = Reloader(running, source, images)
    with caplog.at_level(logging.INFO, logger="cri.reload"):
        assert asyncio.run(reloader.reload()) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for text in ("api.shutdown_grace: 10.0 -> 3.0", "runtime.pids_limit: 0 -> 100",
                 "runtime.handlers.kata.path: (unset) -> '/usr/bin/kata'"):
        assert text in warnings[0]
    assert running.api.shutdown_grace == 10.0 and "kata" not in running.runtime.handlers
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cri.reload"):
        asyncio.run(reloader.reload())  # still pending: warned again
    assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_tracing_exporter_swaps_and_a_failed_one_is_rolled_back(
        source: ConfigSource, caplog: pytest.LogCaptureFixture) -> None:
    running, images = running_from(source), FakeImages()
    reloader = Reloader(running, source, images)
    try:
        rewrite(source, '[tracing]\nexporter = "console"\nsample_ratio = 0.5\n')
        applied = asyncio.run(reloader.reload())
        assert {c.key for c in applied} == {"tracing.exporter", "tracing.sample_ratio"}
        assert tracing.tracer() is not None and running.tracing.exporter == "console"
        try:
            import opentelemetry.exporter.otlp  # type: ignore  # noqa: F401
        except ImportError:
            rewrite(source, '[tracing]\nexporter = "otlp"\n')
            with caplog.at_level(logging.INFO, logger="cri.reload"):
                assert asyncio.run(reloader.reload()) == []
            assert "[tracing] not changed" in caplog.text
            assert "opentelemetry-exporter-otlp" in caplog.text
            assert tracing.tracer() is not None and running.tracing.exporter == "console"
        rewrite(source, "")
        asyncio.run(reloader.reload())
        assert tracing.tracer() is None and running.tracing.exporter == "none"
    finally:
        tracing.shutdown()


def test_without_a_source_only_the_image_files_are_reread() -> None:
    images = FakeImages()
    assert asyncio.run(Reloader(Config(), None, images).reload()) == []
    assert images.calls == [None]
