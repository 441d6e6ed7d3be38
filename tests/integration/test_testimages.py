"""The test images, the local registry and the auth proxy work against each other.

Fetches here use a tiny independent client (plain requests), not hack's push
client nor imageservice, and check every digest byte for byte.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hack.testimages import ImageInfo, RegistryClient, build_all, make_bad_digest, push_all
from hack.testimages.model import ALL_MANIFEST_TYPES, INDEX_TYPES
from tests.integration.authproxy import AuthMode, AuthProxy
from tests.integration.registry import Registry, seed, start_registry, write_htpasswd

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="integration tests run as root"),
    pytest.mark.skipif(not Path("/usr/bin/docker-registry").exists(),
                       reason="docker-registry is not installed"),
]

ACCEPT = ", ".join(ALL_MANIFEST_TYPES)
USERS = {"alice": "wonderland"}


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- an independent pull-side fetch ----------------------------------------

def fetch_manifest(base: str, repo: str, ref: str, headers: dict[str, str] | None = None,
                   auth: tuple[str, str] | None = None) -> tuple[bytes, str, str]:
    resp = requests.get(f"{base}/v2/{repo}/manifests/{ref}",
                        headers={"Accept": ACCEPT, **(headers or {})}, auth=auth, timeout=30)
    resp.raise_for_status()
    return resp.content, resp.headers["Content-Type"], resp.headers["Docker-Content-Digest"]


def fetch_blob(base: str, repo: str, digest: str) -> bytes:
    resp = requests.get(f"{base}/v2/{repo}/blobs/{digest}", timeout=60)
    resp.raise_for_status()
    return resp.content


def verify_image(base: str, info: ImageInfo) -> None:
    """Every tag resolves to the recorded digest; every manifest and blob hashes right."""
    for tag in info.tags:
        data, ctype, digest = fetch_manifest(base, info.repository, tag)
        assert sha(data) == digest == info.manifest_digest, (info.name, tag)
        assert ctype == info.media_type
    top = json.loads(data)
    manifests = [top]
    if info.media_type in INDEX_TYPES:
        manifests = []
        for desc in top["manifests"]:
            platform = f"{desc['platform']['os']}/{desc['platform']['architecture']}"
            assert info.platforms[platform].manifest_digest == desc["digest"]
            child, _, digest = fetch_manifest(base, info.repository, desc["digest"])
            assert sha(child) == digest == desc["digest"] and len(child) == desc["size"]
            manifests.append(json.loads(child))
    configs = []
    for manifest in manifests:
        for desc in [manifest["config"], *manifest["layers"]]:
            blob = fetch_blob(base, info.repository, desc["digest"])
            assert sha(blob) == desc["digest"] and len(blob) == desc["size"], info.name
        configs.append(manifest["config"]["digest"])
    if info.config_digest is not None:
        assert info.config_digest in configs


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()
    assert not pid_alive(reg.pid)


@pytest.fixture(scope="module")
def images(registry: Registry) -> dict[str, ImageInfo]:
    return seed(registry)


@pytest.fixture
def proxy_factory(registry: Registry) -> Iterator[type[AuthProxy]]:
    started: list[AuthProxy] = []
    before = threading.active_count()

    class Tracked(AuthProxy):
        def start(self) -> AuthProxy:
            started.append(self)
            return super().start()

    yield Tracked
    for proxy in started:
        proxy.stop()
    assert threading.active_count() <= before, "auth proxy threads left behind"


# -- registry ---------------------------------------------------------------

def test_registry_starts_and_stops_cleanly(tmp_path: Path) -> None:
    reg = start_registry(tmp_path / "reg")
    try:
        assert pid_alive(reg.pid)
        resp = requests.get(f"{reg.url}/v2/", timeout=5)
        assert resp.status_code == 200
        assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    finally:
        reg.stop()
    assert not pid_alive(reg.pid)
    assert not port_open(reg.port)


def test_hack_registry_script(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "hack" / "registry"
    from tests.integration.registry import free_port

    port = free_port()
    out = subprocess.run([str(script), "start", str(tmp_path / "r"), str(port)],
                         check=True, capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.strip())
    try:
        assert int((tmp_path / "r" / "registry.pid").read_text()) == pid
        assert requests.get(f"http://127.0.0.1:{port}/v2/", timeout=5).status_code == 200
    finally:
        subprocess.run([str(script), "stop", str(tmp_path / "r")], check=True, timeout=30)
    assert not pid_alive(pid)
    assert not (tmp_path / "r" / "registry.pid").exists()


def test_registry_htpasswd_without_tls(tmp_path: Path) -> None:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", USERS)
    reg = start_registry(tmp_path / "reg", htpasswd=htpasswd, auth=("alice", "wonderland"))
    try:
        resp = requests.get(f"{reg.url}/v2/", timeout=5)
        assert resp.status_code == 401
        assert resp.headers["WWW-Authenticate"].startswith("Basic ")
        assert requests.get(f"{reg.url}/v2/", auth=("alice", "nope"), timeout=5).status_code == 401
        assert requests.get(f"{reg.url}/v2/", auth=("alice", "wonderland"),
                            timeout=5).status_code == 200
        busybox = build_all()["busybox"]
        push_all(reg.address, [busybox], auth=reg.auth)
        _data, _, digest = fetch_manifest(reg.url, busybox.repository, "latest",
                                         auth=("alice", "wonderland"))
        assert digest == busybox.manifest_digest
    finally:
        reg.stop()
    assert not pid_alive(reg.pid)


# -- images -------------------------------------------------------------------

def test_all_images_fetch_back_with_matching_digests(registry: Registry,
                                                     images: dict[str, ImageInfo]) -> None:
    assert "big" not in images
    for info in images.values():
        verify_image(registry.url, info)


def test_one_image_three_tags(registry: Registry, images: dict[str, ImageInfo]) -> None:
    tags = requests.get(f"{registry.url}/v2/crib-test/busybox/tags/list", timeout=5).json()
    assert sorted(tags["tags"]) == ["1", "latest", "stable"]


def test_second_push_uploads_nothing(registry: Registry, images: dict[str, ImageInfo],
                                     proxy_factory: type[AuthProxy]) -> None:
    proxy = proxy_factory(registry.address).start()
    push_all(proxy.address, images)
    assert proxy.count(method="POST") == 0
    assert proxy.count(method="PUT") == 0
    assert proxy.count(method="HEAD") > 0


def test_skopeo_reads_what_we_pushed(registry: Registry, images: dict[str, ImageInfo],
                                     tmp_path: Path) -> None:
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    for name in ("busybox", "multiarch", "docker-list", "zstd"):
        info = images[name]
        out = subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", "--raw",
             f"docker://{info.reference(registry.address)}"],
            check=True, capture_output=True, timeout=60)
        assert sha(out.stdout) == info.manifest_digest
    dest = tmp_path / "copy"
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--all",
                    f"docker://{images['multiarch'].reference(registry.address)}",
                    f"dir:{dest}"], check=True, capture_output=True, timeout=120)
    assert (dest / "manifest.json").is_file()


def test_evil_layers_carry_their_tricks(registry: Registry, images: dict[str, ImageInfo]) -> None:
    expected = {
        "evil-dotdot": "../crib-evil-dotdot-escape",
        "evil-abs": "/tmp/crib-evil-abs-escape",
        "evil-symlink": "escape-link/crib-evil-symlink-escape",
    }
    for name, member in expected.items():
        info = images[name]
        manifest = json.loads(fetch_manifest(registry.url, info.repository, "latest")[0])
        blob = fetch_blob(registry.url, info.repository, manifest["layers"][0]["digest"])
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            assert member in tar.getnames()
        assert not Path("/tmp/crib-evil-abs-escape").exists()


def test_bad_digest_is_served_with_wrong_bytes(registry: Registry) -> None:
    bad = make_bad_digest(registry.address, registry.storage_root)
    assert registry.blob_path(bad.corrupted_digest).is_file()
    blob = fetch_blob(registry.url, bad.info.repository, bad.corrupted_digest)
    assert sha(blob) == bad.served_digest != bad.corrupted_digest
    assert len(blob) == bad.info.blob_path(bad.corrupted_digest).stat().st_size


# -- auth proxy ---------------------------------------------------------------

def test_proxy_basic_auth(registry: Registry, images: dict[str, ImageInfo],
                          proxy_factory: type[AuthProxy]) -> None:
    proxy = proxy_factory(registry.address, AuthMode.BASIC, users=USERS).start()
    repo = images["busybox"].repository
    resp = requests.get(f"{proxy.url}/v2/{repo}/manifests/latest", timeout=5)
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="crib-test"'
    wrong = requests.get(f"{proxy.url}/v2/", auth=("alice", "bad"), timeout=5)
    assert wrong.status_code == 401
    _, _, digest = fetch_manifest(proxy.url, repo, "latest", auth=("alice", "wonderland"))
    assert digest == images["busybox"].manifest_digest


def _challenge(resp: requests.Response) -> dict[str, str]:
    scheme, _, params = resp.headers["WWW-Authenticate"].partition(" ")
    assert scheme == "Bearer"
    return dict(p.split("=", 1) for p in params.replace('"', "").split(","))


def test_proxy_bearer_auth(registry: Registry, images: dict[str, ImageInfo],
                           proxy_factory: type[AuthProxy]) -> None:
    proxy = proxy_factory(registry.address, AuthMode.BEARER, users=USERS).start()
    info = images["busybox"]
    url = f"{proxy.url}/v2/{info.repository}/manifests/latest"
    resp = requests.get(url, timeout=5)
    assert resp.status_code == 401
    params = _challenge(resp)
    assert params == {"realm": f"{proxy.url}/token", "service": "crib-test",
                      "scope": f"repository:{info.repository}:pull"}
    # anonymous tokens are refused unless allowed; wrong passwords always
    assert requests.get(params["realm"], params=params, timeout=5).status_code == 401
    assert requests.get(params["realm"], params=params, auth=("alice", "x"),
                        timeout=5).status_code == 401
    body = requests.get(params["realm"], params={"service": params["service"],
                                                 "scope": params["scope"]},
                        auth=("alice", "wonderland"), timeout=5).json()
    assert body["token"] == body["access_token"] and body["expires_in"] > 0
    bearer = {"Authorization": f"Bearer {body['token']}"}
    _, _, digest = fetch_manifest(proxy.url, info.repository, "latest", headers=bearer)
    assert digest == info.manifest_digest
    # a token for another repository, or one the proxy never issued, does not pass
    other = requests.get(f"{proxy.url}/v2/crib-test/config/manifests/latest", headers=bearer,
                         timeout=5)
    assert other.status_code == 401 and 'error="insufficient_scope"' in other.headers[
        "WWW-Authenticate"]
    forged = requests.get(url, headers={"Authorization": "Bearer forged"}, timeout=5)
    assert forged.status_code == 401


def test_proxy_bearer_anonymous_and_push_through_proxy(
        registry: Registry, images: dict[str, ImageInfo],
        proxy_factory: type[AuthProxy]) -> None:
    proxy = proxy_factory(registry.address, AuthMode.BEARER, users=USERS,
                          allow_anonymous=True).start()
    info = images["config"]
    first = requests.get(f"{proxy.url}/v2/{info.repository}/manifests/latest", timeout=5)
    params = _challenge(first)
    token = requests.get(params["realm"], params=params, timeout=5).json()["token"]
    _, _, digest = fetch_manifest(proxy.url, info.repository, "latest",
                                  headers={"Authorization": f"Bearer {token}"})
    assert digest == info.manifest_digest
    # pushing needs credentials; the push client gets a pull,push token and its upload
    # Location (rewritten by the proxy) leads back through the proxy
    anon = RegistryClient(proxy.address)
    with pytest.raises(Exception, match="401"):
        anon.push_manifest("crib-test/proxied", "latest",
                           info.blob_path(info.manifest_digest).read_bytes(), info.media_type)
    anon.close()
    proxied = ImageInfo(**{**info.__dict__, "repository": "crib-test/proxied"})
    push_all(proxy.address, [proxied], auth=("alice", "wonderland"))
    assert proxy.count(method="PUT", status=201) >= 1
    verify_image(registry.url, proxied)


def test_proxy_cuts_a_blob_once(registry: Registry, images: dict[str, ImageInfo],
                                proxy_factory: type[AuthProxy]) -> None:
    proxy = proxy_factory(registry.address).start()
    info = images["busybox"]
    layer = json.loads(info.blob_path(info.manifest_digest).read_bytes())["layers"][0]
    proxy.cut_blob(layer["digest"], after_bytes=1000)
    url = f"{proxy.url}/v2/{info.repository}/blobs/{layer['digest']}"
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(url, timeout=10).content  # noqa: B018
    blob = requests.get(url, timeout=10).content
    assert sha(blob) == layer["digest"]
    assert proxy.blob_fetches(layer["digest"]) == 2
    cut = next(r for r in proxy.records if r.path.endswith(layer["digest"]))
    assert cut.bytes_sent == 1000
    # a ranged resume passes through as 206
    part = requests.get(url, headers={"Range": "bytes=1000-"}, timeout=10)
    assert part.status_code == 206 and len(part.content) == layer["size"] - 1000


def test_proxy_fails_first_requests(registry: Registry, images: dict[str, ImageInfo],
                                    proxy_factory: type[AuthProxy]) -> None:
    proxy = proxy_factory(registry.address).start()
    proxy.fail_first(2)
    url = f"{proxy.url}/v2/{images['busybox'].repository}/manifests/latest"
    codes = [requests.get(url, headers={"Accept": ACCEPT}, timeout=5).status_code
             for _ in range(3)]
    assert codes == [503, 503, 200]
    assert proxy.count(path="/v2/crib-test/busybox/manifests/latest") == 3


def test_proxy_redirects_blobs(registry: Registry, images: dict[str, ImageInfo],
                               proxy_factory: type[AuthProxy]) -> None:
    proxy = proxy_factory(registry.address, AuthMode.BASIC, users=USERS,
                          redirect_blobs=True).start()
    info = images["layered"]
    creds = ("alice", "wonderland")
    for digest in info.blobs:
        resp = requests.get(f"{proxy.url}/v2/{info.repository}/blobs/{digest}", auth=creds,
                            allow_redirects=False, timeout=5)
        assert resp.status_code == 307
        assert resp.headers["Location"].startswith(f"{proxy.url}/_redirected/")
        followed = requests.get(resp.headers["Location"], timeout=30)  # no credentials
        assert sha(followed.content) == digest
        assert proxy.blob_fetches(digest) == 1
    tampered = resp.headers["Location"].replace("sig=", "sig=0")
    assert requests.get(tampered, timeout=5).status_code == 403


def test_proxy_streams_and_keeps_headers(registry: Registry, images: dict[str, ImageInfo],
                                         proxy_factory: type[AuthProxy]) -> None:
    proxy = proxy_factory(registry.address).start()
    info = images["busybox"]
    direct = requests.head(f"{registry.url}/v2/{info.repository}/manifests/latest",
                           headers={"Accept": ACCEPT}, timeout=5)
    via = requests.head(f"{proxy.url}/v2/{info.repository}/manifests/latest",
                        headers={"Accept": ACCEPT}, timeout=5)
    for header in ("Docker-Content-Digest", "Content-Type", "Content-Length"):
        assert via.headers[header] == direct.headers[header]
    with requests.Session() as session:  # keep-alive connection reused across requests
        for digest in info.blobs:
            resp = session.get(f"{proxy.url}/v2/{info.repository}/blobs/{digest}", timeout=30)
            assert sha(resp.content) == digest
    auth = base64.b64encode(b"alice:wonderland").decode()
    resp = requests.get(f"{proxy.url}/v2/", headers={"Authorization": f"Basic {auth}"},
                        timeout=5)
    assert resp.status_code == 200  # NONE mode passes Authorization through


@pytest.mark.parametrize("mode", [AuthMode.BASIC, AuthMode.BEARER])
def test_skopeo_pulls_through_the_proxy(registry: Registry, images: dict[str, ImageInfo],
                                        proxy_factory: type[AuthProxy], mode: AuthMode,
                                        tmp_path: Path) -> None:
    """A real third-party client speaks the proxy's auth and follows its redirects."""
    if shutil.which("skopeo") is None:
        pytest.skip("skopeo is not installed")
    proxy = proxy_factory(registry.address, mode, users=USERS, redirect_blobs=True).start()
    info = images["multiarch"]
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--src-creds",
                    "alice:wonderland", "--all", f"docker://{info.reference(proxy.address)}",
                    f"dir:{tmp_path / 'out'}"], check=True, capture_output=True, timeout=120)
    assert sha((tmp_path / "out" / "manifest.json").read_bytes()) == info.manifest_digest
    assert proxy.count(status=401) >= 1
    for digest in info.blobs:
        assert proxy.blob_fetches(digest) == 1
