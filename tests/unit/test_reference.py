"""Reference parsing/normalisation, cases taken from distribution/reference's test suite."""

from __future__ import annotations

import pytest

from cri.errors import InvalidArgument
from imageservice.reference import (
    Reference,
    is_domain,
    parse_image_id,
    parse_reference,
    validate_digest,
)

BB = "sha256:86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
HEX = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
D = "sha256:" + HEX
ID = "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"


@pytest.mark.parametrize(
    ("raw", "domain", "path", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/busybox", "docker.io", "library/busybox", "latest", None),
        ("index.docker.io/fooo/bar", "docker.io", "fooo/bar", "latest", None),
        ("library/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("library/foo/bar", "docker.io", "library/foo/bar", "latest", None),
        ("store/foo/bar", "docker.io", "store/foo/bar", "latest", None),
        ("dmcgowan/myapp", "docker.io", "dmcgowan/myapp", "latest", None),
        ("test_com/foo", "docker.io", "test_com/foo", "latest", None),
        ("docker/migrator", "docker.io", "docker/migrator", "latest", None),
        ("test.com/foo", "test.com", "foo", "latest", None),
        ("test.com:8080/foo", "test.com:8080", "foo", "latest", None),
        ("test-com:8080/foo", "test-com:8080", "foo", "latest", None),
        ("xn--n3h.com:18080/foo", "xn--n3h.com:18080", "foo", "latest", None),
        ("test:5000/repo", "test:5000", "repo", "latest", None),
        ("test:5000/repo:tag", "test:5000", "repo", "tag", None),
        ("test:5000/repo@" + D, "test:5000", "repo", None, D),
        ("test:5000/repo:tag@" + D, "test:5000", "repo", "tag", D),
        ("localhost/foo", "localhost", "foo", "latest", None),
        ("localhost:5000/a/b/c:v1", "localhost:5000", "a/b/c", "v1", None),
        ("127.0.0.1:5000/library/debian", "127.0.0.1:5000", "library/debian", "latest", None),
        ("192.168.1.1/repo", "192.168.1.1", "repo", "latest", None),
        ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000", "repo", "5050", None),
        ("[::1]:5000/repo", "[::1]:5000", "repo", "latest", None),
        ("[2001:db8::1]/repo", "[2001:db8::1]", "repo", "latest", None),
        ("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", "latest", None),
        (
            "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
            "[fc00:1:2:3:4:5:6:7]:5000",
            "library/debian",
            "latest",
            None,
        ),
        (
            "sub-dom1.foo.com/bar/baz/quux:some-long-tag",
            "sub-dom1.foo.com",
            "bar/baz/quux",
            "some-long-tag",
            None,
        ),
        (
            "b.gcr.io/test.example.com/my-app:test.example.com",
            "b.gcr.io",
            "test.example.com/my-app",
            "test.example.com",
            None,
        ),
        # separators: one period, one or two underscores, any run of dashes
        ("docker---rules/docker", "docker.io", "docker---rules/docker", "latest", None),
        ("dock__er/docker", "docker.io", "dock__er/docker", "latest", None),
        ("x/a.b_c__d-e--f", "docker.io", "x/a.b_c__d-e--f", "latest", None),
        ("d/docker", "docker.io", "d/docker", "latest", None),
        ("jess/t", "docker.io", "jess/t", "latest", None),
        # the name is not a domain without "/": "test.com:5000" is a tag
        ("test.com:5000", "docker.io", "library/test.com", "5000", None),
        ("foo_bar.com:8080", "docker.io", "library/foo_bar.com", "8080", None),
        ("lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase", None),
        # Docker takes an upper-case first component as a domain
        ("Foo/bar", "Foo", "bar", "latest", None),
        ("DOCKER/docker", "DOCKER", "docker", "latest", None),
        # a 64-hex *path* is fine when a domain makes it unambiguous
        ("docker.io/" + ID, "docker.io", "library/" + ID, "latest", None),
        (
            "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
            "docker.io",
            "library/thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev",
            "latest",
            None,
        ),
        (
            "busybox:latest@" + BB,
            "docker.io",
            "library/busybox",
            "latest",
            BB,
        ),
        (
            "xn--7o8h.com/myimage:xn--7o8h.com@sha512:" + "f" * 128,
            "xn--7o8h.com",
            "myimage",
            "xn--7o8h.com",
            "sha512:" + "f" * 128,
        ),
        (
            "a/" * 127 + "a:tag-puts-this-over-max",
            "docker.io",
            "a/" * 127 + "a",
            "tag-puts-this-over-max",
            None,
        ),
    ],
)
def test_parse_valid(raw: str, domain: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(raw)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == (domain, path, tag, digest)
    assert ref.name == f"{domain}/{path}"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ":justtag",
        "@" + D,
        "https://github.com/docker/docker",
        "docker/Docker",
        "docker.io/docker/Docker",
        "test:5000/Uppercase/lowercase:tag",
        "Uppercase:tag",
        "-docker",
        "-docker/docker",
        "-docker.io/docker/docker",
        "docker-/docker",
        "-docker-/docker",
        "docker///docker",
        "docker.io/docker///docker",
        "____/____",
        "_docker/_docker",
        "dock..er/docker",
        "dock_.er/docker",
        "dock-.er/docker",
        "dock___er/docker",
        "docker/",
        "aa/asdf$$^/aa",
        "[fc00::1]",
        "[fc00::1]:5000",
        "[2001:db8::1]:tag",
        "fc00::1:5000/debian",
        "[fe80::1%eth0]:5000/debian",
        "[2001:db8:3:4::192.0.2.33]:5000/debian",
        ID,  # an id, not a name
        "repo@sha256:ffffffffffffffffffffffffffffffffff",  # too short
        "validname@invaliddigest:" + HEX,  # unknown algorithm
        "repo@sha256:" + HEX.upper(),  # go-digest wants lower-case hex
        "busybox:" + "t" * 129,  # tag over 128 characters
        "busybox:-tag",
        "a/" * 128 + "a:tag",  # path over 255 characters
        "this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255_" * 4 + "/docker",
        "busybox\n",
        # "." makes the first component a domain, and "_" is not valid in one (Docker
        # would return a reference without a domain, which cannot be pulled)
        "a.b_c/x",
    ],
)
def test_parse_invalid(raw: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_reference(raw)
    assert repr(raw)[1:-1][:40] in info.value.message or raw == ""


def test_error_names_the_reference_and_the_reason() -> None:
    with pytest.raises(InvalidArgument, match=r"'docker/Docker'.*lowercase"):
        parse_reference("docker/Docker")
    with pytest.raises(InvalidArgument, match=r"128"):
        parse_reference("busybox:" + "t" * 129)
    with pytest.raises(InvalidArgument, match=r"image id"):
        parse_reference(ID)


def test_tag_length_limit() -> None:
    assert parse_reference("busybox:" + "t" * 128).tag == "t" * 128


@pytest.mark.parametrize(
    ("raw", "full", "familiar"),
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("docker.io/library/redis:7", "docker.io/library/redis:7", "redis:7"),
        ("dmcgowan/myapp", "docker.io/dmcgowan/myapp:latest", "dmcgowan/myapp:latest"),
        ("library/foo/bar", "docker.io/library/foo/bar:latest", "library/foo/bar:latest"),
        ("redis@" + D, "docker.io/library/redis@" + D, "redis@" + D),
        ("busybox:1@" + D, "docker.io/library/busybox:1@" + D, "busybox:1@" + D),
        (
            "127.0.0.1:8000/private/moonbase",
            "127.0.0.1:8000/private/moonbase:latest",
            "127.0.0.1:8000/private/moonbase:latest",
        ),
        (
            "example.com/privatebase",
            "example.com/privatebase:latest",
            "example.com/privatebase:latest",
        ),
    ],
)
def test_string_and_familiar(raw: str, full: str, familiar: str) -> None:
    ref = parse_reference(raw)
    assert ref.string() == full
    assert str(ref) == full
    assert ref.familiar() == familiar
    assert parse_reference(full) == ref  # normalisation is idempotent


@pytest.mark.parametrize(
    ("raw", "qualified"),
    [
        ("busybox", False),
        ("library/busybox", False),
        ("user/app:1", False),
        ("docker.io/library/busybox", True),
        ("docker.io/busybox", True),
        ("index.docker.io/busybox", True),
        ("quay.io/a/b", True),
        ("localhost/foo", True),
        ("myhost:5000/foo", True),
        ("[::1]:5000/foo", True),
    ],
)
def test_qualified(raw: str, qualified: bool) -> None:
    assert parse_reference(raw).qualified is qualified


def test_qualified_does_not_affect_equality() -> None:
    assert parse_reference("busybox") == parse_reference("docker.io/library/busybox")


def test_registry_host_and_locator() -> None:
    assert parse_reference("busybox").registry_host == "registry-1.docker.io"
    assert parse_reference("quay.io/x/y").registry_host == "quay.io"
    assert parse_reference("busybox").locator == "latest"
    assert parse_reference("busybox:1@" + D).locator == D


def test_canonical_drops_the_tag_when_there_is_a_digest() -> None:
    ref = parse_reference("busybox:1@" + D).canonical()
    assert ref.string() == "docker.io/library/busybox@" + D
    assert parse_reference("busybox:1").canonical().string() == "docker.io/library/busybox:1"


def test_with_tag_and_digest() -> None:
    ref = parse_reference("busybox@" + D)
    assert ref.with_tag("v2").string() == "docker.io/library/busybox:v2"
    assert ref.with_digest(D).string() == "docker.io/library/busybox@" + D
    with pytest.raises(InvalidArgument):
        ref.with_tag("-bad")
    with pytest.raises(InvalidArgument):
        ref.with_digest("sha256:abc")


def test_no_default_tag() -> None:
    ref = parse_reference("busybox", default_tag=False)
    assert ref.tag is None and ref.digest is None
    assert ref.string() == "docker.io/library/busybox"


def test_reference_is_frozen() -> None:
    ref = Reference("docker.io", "library/busybox", "latest", None)
    with pytest.raises(AttributeError):
        ref.tag = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (ID, "sha256:" + ID),
        ("sha256:" + ID, "sha256:" + ID),
        (ID[:-1], None),
        ("sha256:" + ID.upper(), None),
        ("busybox", None),
        ("sha512:" + ID, None),
    ],
)
def test_parse_image_id(raw: str, expected: str | None) -> None:
    assert parse_image_id(raw) == expected


@pytest.mark.parametrize(
    ("digest", "ok"),
    [
        (D, True),
        ("sha512:" + "a" * 128, True),
        ("sha384:" + "a" * 96, True),
        ("sha256:" + "a" * 63, False),
        ("md5:" + "a" * 32, False),
        ("sha256" + HEX, False),
    ],
)
def test_validate_digest(digest: str, ok: bool) -> None:
    if ok:
        validate_digest(digest)
    else:
        with pytest.raises(InvalidArgument):
            validate_digest(digest)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("docker.io", True),
        ("localhost", True),
        ("localhost:5000", True),
        ("[::1]:5000", True),
        ("quay.io:443", True),
        ("-bad.io", False),
        ("a/b", False),
        ("http://x", False),
    ],
)
def test_is_domain(value: str, ok: bool) -> None:
    assert is_domain(value) is ok
