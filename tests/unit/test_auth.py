"""Credentials (AuthConfig, auth.json), WWW-Authenticate parsing, bearer tokens and their cache."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import pytest

from api import api_pb2
from cri.errors import InvalidArgument
from imageservice.auth import (
    AuthFile,
    BearerToken,
    Challenge,
    Credentials,
    TokenCache,
    TokenKey,
    credentials_from_auth_config,
    parse_challenges,
    parse_token_response,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --- AuthConfig ---------------------------------------------------------------


def test_auth_config_username_password() -> None:
    creds = credentials_from_auth_config(api_pb2.AuthConfig(username="u", password="p"))
    assert creds == Credentials(username="u", password="p")
    assert creds.has_basic and not creds.anonymous


def test_auth_config_base64_auth() -> None:
    creds = credentials_from_auth_config(api_pb2.AuthConfig(auth=b64("user:pa:ss")))
    assert creds == Credentials(username="user", password="pa:ss")


def test_auth_config_username_wins_over_auth() -> None:
    auth = api_pb2.AuthConfig(username="u", password="p", auth=b64("other:x"))
    assert credentials_from_auth_config(auth) == Credentials(username="u", password="p")


def test_auth_config_tokens() -> None:
    creds = credentials_from_auth_config(
        api_pb2.AuthConfig(identity_token="id", registry_token="rt")
    )
    assert creds is not None
    assert (creds.identity_token, creds.registry_token) == ("id", "rt")
    assert not creds.has_basic


def test_auth_config_empty_or_missing() -> None:
    assert credentials_from_auth_config(None) is None
    assert credentials_from_auth_config(api_pb2.AuthConfig()) is None
    assert credentials_from_auth_config(api_pb2.AuthConfig(server_address="x.io")) is None


@pytest.mark.parametrize("value", ["!!!notbase64", b64("nocolon")])
def test_auth_config_bad_auth(value: str) -> None:
    with pytest.raises(InvalidArgument, match=r"AuthConfig\.auth"):
        credentials_from_auth_config(api_pb2.AuthConfig(auth=value))


def test_secrets_stay_out_of_repr() -> None:
    text = repr(Credentials("u", "secret-pw", "secret-id", "secret-rt"))
    assert "secret" not in text and "u" in text


def test_identity_separates_credentials() -> None:
    assert Credentials().identity() == ""
    assert Credentials("a", "1").identity() != Credentials("a", "2").identity()
    assert Credentials("a", "1").identity() == Credentials("a", "1").identity()


# --- auth.json ----------------------------------------------------------------


def write_auth(tmp_path: Path, auths: dict[str, dict[str, str]]) -> Path:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": auths}))
    return path


def test_auth_file_most_specific_key_wins(tmp_path: Path) -> None:
    path = write_auth(
        tmp_path,
        {
            "quay.io": {"auth": b64("host:1")},
            "quay.io/team": {"auth": b64("ns:2")},
            "quay.io/team/app": {"auth": b64("repo:3")},
        },
    )
    auth = AuthFile.load(path)
    assert auth.lookup("quay.io/team/app") == Credentials("repo", "3")
    assert auth.lookup("quay.io/team/other") == Credentials("ns", "2")
    assert auth.lookup("quay.io/other/app") == Credentials("host", "1")
    assert auth.lookup("quay.io/teamx/app") == Credentials("host", "1")
    assert auth.lookup("docker.io/library/busybox") is None


def test_auth_file_docker_hub_spellings(tmp_path: Path) -> None:
    for key in (
        "docker.io",
        "index.docker.io",
        "https://index.docker.io/v1/",
        "registry-1.docker.io",
    ):
        path = write_auth(tmp_path, {key: {"auth": b64("hub:pw")}})
        assert AuthFile.load(path).lookup("docker.io/library/busybox") == Credentials("hub", "pw")


def test_auth_file_legacy_keys_rank_below_plain_ones(tmp_path: Path) -> None:
    path = write_auth(
        tmp_path,
        {
            "https://myreg.io/v1/": {"auth": b64("legacy:1")},
            "myreg.io": {"auth": b64("plain:2")},
            "http://other.io:5000": {"auth": b64("old:3")},
        },
    )
    auth = AuthFile.load(path)
    assert auth.lookup("myreg.io/a") == Credentials("plain", "2")
    assert auth.lookup("other.io:5000/a/b") == Credentials("old", "3")


def test_auth_file_identity_token(tmp_path: Path) -> None:
    path = write_auth(tmp_path, {"acr.io": {"identitytoken": "refresh-me"}})
    creds = AuthFile.load(path).lookup("acr.io/x")
    assert creds is not None and creds.identity_token == "refresh-me"


def test_auth_file_missing_is_empty(tmp_path: Path) -> None:
    assert AuthFile.load(tmp_path / "nope.json").lookup("quay.io/x") is None


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"auths": []}',
        '{"auths": {"quay.io": "x"}}',
        '{"auths": {"quay.io": {"auth": 5}}}',
        '{"auths": {"quay.io": {"auth": "%%%"}}}',
    ],
)
def test_auth_file_malformed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as info:
        AuthFile.load(path)
    assert str(path) in info.value.message


# --- WWW-Authenticate ---------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:samalba/my-app:pull,push"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:samalba/my-app:pull,push",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
        (
            'Basic realm="a, b", Bearer realm="https://x/token", service=svc',
            [
                Challenge("basic", {"realm": "a, b"}),
                Challenge("bearer", {"realm": "https://x/token", "service": "svc"}),
            ],
        ),
        (
            'bearer REALM="https://x/t" , error="insufficient_scope"',
            [Challenge("bearer", {"realm": "https://x/t", "error": "insufficient_scope"})],
        ),
        ('Bearer realm="say \\"hi\\""', [Challenge("bearer", {"realm": 'say "hi"'})]),
        ("Negotiate", [Challenge("negotiate", {})]),
        ("", []),
        ('Bearer realm="unterminated', [Challenge("bearer", {"realm": "unterminated"})]),
    ],
)
def test_parse_challenges(header: str, expected: list[Challenge]) -> None:
    assert parse_challenges(header) == expected


# --- tokens -------------------------------------------------------------------


def test_token_response_defaults_to_60_seconds() -> None:
    token = parse_token_response({"token": "t"}, now=1000.0)
    assert token.token == "t"
    assert 1000.0 + 50 <= token.expires_at < 1060.0


def test_token_response_access_token_and_expiry() -> None:
    token = parse_token_response({"access_token": "a", "expires_in": 300}, now=1000.0)
    assert token.token == "a"
    assert token.expires_at == pytest.approx(1000.0 + 300 - 10)


def test_token_response_short_expiry_is_raised_to_60() -> None:
    token = parse_token_response({"token": "t", "expires_in": 5}, now=1000.0)
    assert token.expires_at >= 1050.0


def test_token_response_issued_at_in_the_past_shortens_life() -> None:
    # issued 2020-01-01T00:00:00Z, valid 300 s: long expired at "now"
    body = {"token": "t", "expires_in": 300, "issued_at": "2020-01-01T00:00:00Z"}
    token = parse_token_response(body, now=1_700_000_000.0)
    assert not token.valid(now=1_700_000_000.0)
    # an issued_at in the future (clock skew) does not extend it
    body = {"token": "t", "expires_in": 300, "issued_at": "2999-01-01T00:00:00Z"}
    assert parse_token_response(body, now=1000.0).expires_at <= 1300.0


@pytest.mark.parametrize("body", [{}, {"token": ""}, [], {"token": 3}])
def test_token_response_without_token(body: object) -> None:
    with pytest.raises(ValueError):
        parse_token_response(body)


def test_token_cache_expiry_and_invalidate() -> None:
    cache = TokenCache()
    key = TokenKey("r.io", "a/b", "repository:a/b:pull")
    cache.put(key, BearerToken("live", expires_at=1e12))
    assert cache.get(key) == BearerToken("live", expires_at=1e12)
    assert cache.get(TokenKey("r.io", "a/b", "repository:a/b:pull", "someone")) is None
    cache.invalidate(key)
    assert cache.get(key) is None
    cache.put(key, BearerToken("dead", expires_at=1.0))
    assert cache.get(key) is None
    assert len(cache) == 0


def test_token_cache_is_bounded() -> None:
    cache = TokenCache(max_entries=3)
    for i in range(10):
        cache.put(TokenKey("r", f"repo{i}", "s"), BearerToken(str(i), expires_at=1e12))
    assert len(cache) == 3
    assert cache.get(TokenKey("r", "repo9", "s")) is not None


def test_token_cache_threads() -> None:
    cache = TokenCache(max_entries=100)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                key = TokenKey("r", f"repo{(n * 7 + i) % 150}", "s")
                cache.put(key, BearerToken("t", expires_at=1e12))
                cache.get(key)
                if i % 5 == 0:
                    cache.invalidate(key)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(cache) <= 100
