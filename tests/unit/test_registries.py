"""registries.conf loading, drop-in merging and pull-source resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri.errors import FailedPrecondition, InvalidArgument
from imageservice.registries import (
    PullFromMirror,
    PullSource,
    RegistriesConfigError,
    RegistryBlocked,
    ShortNameMode,
    load,
    match_prefix,
)

D = "sha256:" + "a" * 64


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def plan(sources: list[PullSource]) -> list[tuple[str, str, bool]]:
    """(physical reference, canonical reference, insecure) per source."""
    return [(s.reference.string(), s.canonical.string(), s.insecure) for s in sources]


def test_missing_file_and_dir_give_an_empty_config(tmp_path: Path) -> None:
    config = load(tmp_path / "nope.conf", tmp_path / "nope.d")
    assert config.registries == []
    assert config.unqualified_search_registries == []
    assert config.short_name_mode is ShortNameMode.PERMISSIVE
    assert plan(config.candidates("busybox")) == [
        ("docker.io/library/busybox:latest", "docker.io/library/busybox:latest", False)
    ]


def test_qualified_reference_without_table_is_used_as_is(tmp_path: Path) -> None:
    config = load(tmp_path / "nope.conf")
    [source] = config.candidates("quay.io/a/b:1")
    assert source.host == "quay.io"
    assert source.repository == "a/b"
    assert source.locator == "1"
    assert not source.mirror
    [hub] = config.candidates("docker.io/library/busybox@" + D)
    assert hub.host == "registry-1.docker.io"
    assert hub.locator == D


MIRRORS = """
unqualified-search-registries = ["example.com"]

[[registry]]
prefix = "example.com/foo"
location = "internal-registry-for-example.com/bar"
insecure = false

[[registry.mirror]]
location = "example-mirror-0.local/mirror-for-foo"

[[registry.mirror]]
location = "example-mirror-1.local/mirrors/foo"
insecure = true

[[registry.mirror]]
location = "digest-mirror.local/foo"
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "tag-mirror.local/foo"
pull-from-mirror = "tag-only"
"""


def test_mirrors_then_location_as_the_man_page_example(tmp_path: Path) -> None:
    config = load(write(tmp_path / "registries.conf", MIRRORS))
    canonical = "example.com/foo/image:latest"
    assert plan(config.candidates("example.com/foo/image:latest")) == [
        ("example-mirror-0.local/mirror-for-foo/image:latest", canonical, False),
        ("example-mirror-1.local/mirrors/foo/image:latest", canonical, True),
        ("tag-mirror.local/foo/image:latest", canonical, False),
        ("internal-registry-for-example.com/bar/image:latest", canonical, False),
    ]
    sources = config.candidates("example.com/foo/image:latest")
    assert [s.mirror for s in sources] == [True, True, True, False]


def test_pull_from_mirror_digest_only_and_tag_only(tmp_path: Path) -> None:
    config = load(write(tmp_path / "registries.conf", MIRRORS))
    physical = [s.reference.string() for s in config.candidates("example.com/foo/image@" + D)]
    assert physical == [
        "example-mirror-0.local/mirror-for-foo/image@" + D,
        "example-mirror-1.local/mirrors/foo/image@" + D,
        "digest-mirror.local/foo/image@" + D,
        "internal-registry-for-example.com/bar/image@" + D,
    ]


def test_mirror_by_digest_only(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
[[registry]]
location = "docker.io"
mirror-by-digest-only = true
[[registry.mirror]]
location = "mirror.local:5000"
""",
    )
    config = load(path)
    assert [s.host for s in config.candidates("busybox")] == ["registry-1.docker.io"]
    by_digest = config.candidates("busybox@" + D)
    assert [s.reference.string() for s in by_digest] == [
        "mirror.local:5000/library/busybox@" + D,
        "docker.io/library/busybox@" + D,
    ]


def test_docker_hub_mirror_keeps_canonical_name(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
[[registry]]
prefix = "docker.io"
location = "docker.io"
[[registry.mirror]]
location = "127.0.0.1:5000"
insecure = true
""",
    )
    sources = load(path).candidates("busybox:1.36")
    assert plan(sources) == [
        ("127.0.0.1:5000/library/busybox:1.36", "docker.io/library/busybox:1.36", True),
        ("docker.io/library/busybox:1.36", "docker.io/library/busybox:1.36", False),
    ]
    assert sources[0].host == "127.0.0.1:5000"
    assert sources[0].repository == "library/busybox"


def test_longest_prefix_wins_and_prefix_needs_a_separator(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
[[registry]]
prefix = "example.com"
location = "one.local"
[[registry]]
prefix = "example.com/foo"
location = "two.local/x"
[[registry]]
prefix = "example.com/foo/exact:v1"
location = "three.local/y:v9"
""",
    )
    config = load(path)
    assert plan(config.candidates("example.com/foobar:v1"))[0][0] == "one.local/foobar:v1"
    assert plan(config.candidates("example.com/foo/bar:v1"))[0][0] == "two.local/x/bar:v1"
    # a prefix may include a tag: the location's tag replaces it
    assert config.candidates("example.com/foo/exact:v1")[0].reference.tag == "v9"
    assert plan(config.candidates("example.community/a"))[0][0] == "example.community/a:latest"


def test_wildcard_prefix(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
[[registry]]
prefix = "*.example.com"
insecure = true
[[registry.mirror]]
location = "mirror.local/sub"
""",
    )
    config = load(path)
    assert plan(config.candidates("blah.example.com/foo/img:1")) == [
        ("mirror.local/sub/foo/img:1", "blah.example.com/foo/img:1", False),
        ("blah.example.com/foo/img:1", "blah.example.com/foo/img:1", True),
    ]
    assert plan(config.candidates("example.com/foo/img:1")) == [
        ("example.com/foo/img:1", "example.com/foo/img:1", False)
    ]
    assert plan(config.candidates("notexample.com/foo:1"))[0][2] is False


@pytest.mark.parametrize(
    ("ref", "prefix", "expected"),
    [
        ("example.com/foo:tag", "example.com", 11),
        ("example.com/foo", "example.com/foo", 15),
        ("example.com/foo@" + D, "example.com/foo", 15),
        ("example.com/foobar", "example.com/foo", -1),
        ("example.com", "example.com/foo", -1),
        ("a.example.com/foo", "*.example.com", 13),
        ("a.b.example.com:5000/foo", "*.example.com", 15),
        ("example.com/a.example.com", "*.example.com", -1),
        ("a.example.community/x", "*.example.com", -1),
    ],
)
def test_match_prefix(ref: str, prefix: str, expected: int) -> None:
    assert match_prefix(ref, prefix) == expected


def test_blocked_registry_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
[[registry]]
location = "evil.example.com"
blocked = true
""",
    )
    config = load(path)
    with pytest.raises(RegistryBlocked) as info:
        config.candidates("evil.example.com/x/y:1")
    assert isinstance(info.value, FailedPrecondition)
    assert "blocked" in info.value.message
    assert "evil.example.com/x/y" in info.value.message
    assert config.candidates("good.example.com/x")  # other registries still work


def test_short_names_search_registries_in_order(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        'unqualified-search-registries = ["quay.io", "docker.io", "localhost:5000"]\n'
        'short-name-mode = "enforcing"\n',
    )
    config = load(path)
    assert config.short_name_mode is ShortNameMode.ENFORCING
    sources = config.candidates("busybox:1")
    assert [s.canonical.string() for s in sources] == [
        "quay.io/busybox:1",
        "docker.io/library/busybox:1",
        "localhost:5000/busybox:1",
    ]
    assert [s.canonical.string() for s in config.candidates("user/app@" + D)] == [
        "quay.io/user/app@" + D,
        "docker.io/user/app@" + D,
        "localhost:5000/user/app@" + D,
    ]


def test_short_names_skip_blocked_search_registries(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
unqualified-search-registries = ["quay.io", "docker.io"]
[[registry]]
location = "quay.io"
blocked = true
""",
    )
    sources = load(path).candidates("busybox")
    assert [s.canonical.string() for s in sources] == ["docker.io/library/busybox:latest"]


def test_aliases(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
unqualified-search-registries = ["quay.io"]
[aliases]
"busybox" = "docker.io/library/busybox"
"ubi" = "registry.access.redhat.com/ubi9"
"tools/dig" = "quay.io/tools/dig"
""",
    )
    config = load(path)
    assert [s.canonical.string() for s in config.candidates("busybox:1.36")] == [
        "docker.io/library/busybox:1.36"
    ]
    assert [s.canonical.string() for s in config.candidates("ubi")] == [
        "registry.access.redhat.com/ubi9:latest"
    ]
    assert [s.canonical.string() for s in config.candidates("tools/dig@" + D)] == [
        "quay.io/tools/dig@" + D
    ]
    # qualified names never use aliases
    assert [s.canonical.string() for s in config.candidates("docker.io/ubi")] == [
        "docker.io/library/ubi:latest"
    ]


def test_dropins_merge_in_lexical_order(tmp_path: Path) -> None:
    main = write(
        tmp_path / "registries.conf",
        """
unqualified-search-registries = ["quay.io"]
short-name-mode = "enforcing"
[[registry]]
prefix = "example.com"
location = "main.local"
[[registry]]
prefix = "keep.com"
location = "keep.local"
[aliases]
"a" = "quay.io/a"
"b" = "quay.io/b"
""",
    )
    dropins = tmp_path / "registries.conf.d"
    write(
        dropins / "10-first.conf",
        """
unqualified-search-registries = ["first.io"]
[[registry]]
prefix = "example.com"
location = "first.local"
[aliases]
"b" = ""
"c" = "quay.io/c"
""",
    )
    write(
        dropins / "20-second.conf",
        """
[[registry]]
prefix = "example.com"
location = "second.local"
[[registry]]
prefix = "new.com"
location = "new.local"
""",
    )
    write(dropins / "30-ignored.txt", "this is not toml = = =")
    (dropins / "40-subdir.conf").mkdir()
    config = load(main, dropins)
    assert config.unqualified_search_registries == ["first.io"]
    assert config.short_name_mode is ShortNameMode.ENFORCING
    assert [t.prefix for t in config.registries] == ["example.com", "keep.com", "new.com"]
    assert config.find_registry("example.com/x") is not None
    assert plan(config.candidates("example.com/x"))[0][0] == "second.local/x:latest"
    assert config.aliases == {"a": "quay.io/a", "c": "quay.io/c"}


def test_dropin_empty_search_list_replaces(tmp_path: Path) -> None:
    main = write(tmp_path / "r.conf", 'unqualified-search-registries = ["quay.io"]\n')
    write(tmp_path / "d" / "x.conf", "unqualified-search-registries = []\n")
    config = load(main, tmp_path / "d")
    assert config.unqualified_search_registries == []
    assert [s.canonical.string() for s in config.candidates("x")] == ["docker.io/library/x:latest"]


def test_dropins_without_main_file(tmp_path: Path) -> None:
    write(tmp_path / "d" / "x.conf", '[[registry]]\nlocation = "a.io"\ninsecure = true\n')
    config = load(tmp_path / "missing.conf", tmp_path / "d")
    assert config.candidates("a.io/b")[0].insecure


def test_v1_main_file_is_converted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
[registries.search]
registries = ["quay.io"]
[registries.insecure]
registries = ["insecure.local:5000"]
[registries.block]
registries = ["blocked.io"]
""",
    )
    config = load(path)
    assert config.unqualified_search_registries == ["quay.io"]
    assert config.candidates("insecure.local:5000/x")[0].insecure
    with pytest.raises(RegistryBlocked):
        config.candidates("blocked.io/x")


def test_crib_insecure_registries_are_combined(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        """
[[registry]]
location = "docker.io"
[[registry.mirror]]
location = "mirror.local:5000/hub"
""",
    )
    config = load(path, None, ["mirror.local:5000", "10.0.0.0/8", "localhost:5000"])
    sources = config.candidates("busybox")
    assert [(s.host, s.insecure) for s in sources] == [
        ("mirror.local:5000", True),
        ("registry-1.docker.io", False),
    ]
    assert config.candidates("10.1.2.3:5000/app")[0].insecure
    assert config.candidates("localhost:5000/app")[0].insecure
    assert not config.candidates("localhost:5001/app")[0].insecure
    assert not config.candidates("11.0.0.1/app")[0].insecure


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("unqualified-search-registries = 'quay.io'", "unqualified-search-registries"),
        ('unqualified-search-registries = ["http://quay.io/x"]', "unqualified-search-registries"),
        ('short-name-mode = "sometimes"', "short-name-mode"),
        ('[[registry]]\nlocation = "a.io"\ninsecure = "yes"', "registry[0].insecure"),
        ('[[registry]]\nlocation = "https://a.io"', "registry[0].location"),
        ("[[registry]]\ninsecure = true", "registry[0].location"),
        ('[[registry]]\nprefix = "a.io/x"', "registry[0].location"),
        ('[[registry]]\nprefix = "*.a.io/x"', "registry[0].prefix"),
        ('[[registry]]\nlocation = "a.io"\npull-from-mirror = "all"', "pull-from-mirror"),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\ninsecure = true',
            "registry[0].mirror[0].location",
        ),
        (
            '[[registry]]\nlocation = "a.io"\n[[registry.mirror]]\nlocation = "m"\n'
            'pull-from-mirror = "sometimes"',
            "registry[0].mirror[0].pull-from-mirror",
        ),
        (
            '[[registry]]\nlocation = "a.io"\nmirror-by-digest-only = true\n'
            '[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "all"',
            "registry[0].mirror[0].pull-from-mirror",
        ),
        (
            '[[registry]]\nprefix = "x.io"\nlocation = "a.io"\n'
            '[[registry]]\nprefix = "y.io"\nlocation = "a.io"\ninsecure = true',
            "'a.io'",
        ),
        ('[aliases]\n"docker.io/busybox" = "docker.io/library/busybox"', "aliases"),
        ('[aliases]\n"busybox" = "busybox"', "aliases"),
        ('[aliases]\n"busybox" = "docker.io/library/busybox:1"', "aliases"),
        ('[aliases]\n"busybox:1" = "docker.io/library/busybox"', "aliases"),
        ("this is = not toml =", "invalid TOML"),
        (
            '[registries.search]\nregistries = ["a.io"]\n[[registry]]\nlocation = "b.io"',
            "mixing",
        ),
    ],
)
def test_malformed_files_name_the_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "bad.conf", text)
    with pytest.raises(RegistriesConfigError) as info:
        load(path)
    assert isinstance(info.value, InvalidArgument)
    assert str(path) in info.value.message
    assert key in info.value.message


def test_dropins_must_be_v2(tmp_path: Path) -> None:
    write(tmp_path / "d" / "old.conf", '[registries.search]\nregistries = ["a.io"]\n')
    with pytest.raises(RegistriesConfigError, match=r"old\.conf.*version 2"):
        load(tmp_path / "missing.conf", tmp_path / "d")


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path / "r.conf", 'credential-helpers = ["pass"]\nfoo = 1\n')
    assert load(path).registries == []


def test_first_table_wins_for_a_duplicate_prefix_in_one_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "r.conf",
        '[[registry]]\nprefix = "a.io"\nlocation = "one.io"\n'
        '[[registry]]\nprefix = "a.io"\nlocation = "two.io"\n',
    )
    assert load(path).candidates("a.io/x")[0].reference.domain == "one.io"


def test_pull_from_mirror_default_is_all(tmp_path: Path) -> None:
    path = write(tmp_path / "r.conf", MIRRORS)
    table = load(path).find_registry("example.com/foo/x:latest")
    assert table is not None
    assert [m.pull_from_mirror for m in table.mirrors] == [
        PullFromMirror.ALL,
        PullFromMirror.ALL,
        PullFromMirror.DIGEST_ONLY,
        PullFromMirror.TAG_ONLY,
    ]


def test_bad_user_reference_is_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="Busybox"):
        load(tmp_path / "none.conf").candidates("Busybox")


def test_location_that_makes_an_invalid_reference(tmp_path: Path) -> None:
    path = write(tmp_path / "r.conf", '[[registry]]\nprefix = "a.io"\nlocation = "b.io/UPPER"\n')
    with pytest.raises(InvalidArgument, match=r"b\.io/UPPER"):
        load(path).candidates("a.io/x")
