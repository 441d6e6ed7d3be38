"""CNI: config loading, result conversion, and how plugins are invoked.

Invocation is checked with stand-in plugins (a shell script that records its
environment and stdin and prints a canned result), so no root and no network.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from cri.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from runtimeservice import cni, netlink
from runtimeservice.cni import (
    CniError,
    PodNetwork,
    PodRef,
    PortMapping,
    convert_result,
    load_network_config,
    parse_network_config,
    parse_result,
)
from runtimeservice.podfiles import DnsConfig

CID = "c0ffee" * 4
POD = PodRef("default", "web-0", "uid-1")

FAKE = """#!/bin/sh
name=$(basename "$0")
input=$(cat)
printf '%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\t%s\\n' "$name" "$CNI_COMMAND" "$CNI_CONTAINERID" \\
  "$CNI_IFNAME" "$CNI_NETNS" "$CNI_ARGS" "$CNI_PATH" "$input" >> "$FAKE_CNI_LOG"
base="$FAKE_CNI_DIR/$name.$CNI_COMMAND"
[ -f "$base.sleep" ] && exec sleep "$(cat "$base.sleep")"
[ -f "$base.out" ] && cat "$base.out"
[ -f "$base.rc" ] && exit "$(cat "$base.rc")"
exit 0
"""

RESULT_A = {"cniVersion": "1.0.0",
            "interfaces": [{"name": "br0"}, {"name": "eth0", "sandbox": "/ns"}],
            "ips": [{"address": "10.199.0.7/24", "gateway": "10.199.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}


def conflist(*plugins: dict[str, Any], name: str = "testnet",
             version: str = "1.0.0") -> dict[str, Any]:
    return {"cniVersion": version, "name": name, "plugins": list(plugins)}


class Fake:
    """A plugin dir of stand-ins plus the log of their invocations."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.dir = tmp / "plugins"
        self.dir.mkdir()
        self.log = tmp / "calls.log"
        self.log.touch()
        monkeypatch.setenv("FAKE_CNI_LOG", str(self.log))
        monkeypatch.setenv("FAKE_CNI_DIR", str(self.dir))
        for name in ("alpha", "beta", "loopback"):  # a loopback plugin crib must not run
            self.add_plugin(name)
        self.lo_up: list[Path] = []  # where crib brought lo up itself (netlink, stood in)

        async def loopback_up(netns: Path) -> None:
            self.lo_up.append(netns)

        monkeypatch.setattr(netlink, "loopback_up", loopback_up)
        self.conf_dir = tmp / "net.d"
        self.conf_dir.mkdir()
        self.cache = tmp / "cache"

    def add_plugin(self, name: str) -> None:
        p = self.dir / name
        p.write_text(FAKE)
        p.chmod(0o755)

    def respond(self, plugin: str, command: str, out: Any = None, rc: int = 0) -> None:
        if out is not None:
            text = out if isinstance(out, str) else json.dumps(out)
            (self.dir / f"{plugin}.{command}.out").write_text(text)
        (self.dir / f"{plugin}.{command}.rc").write_text(str(rc))

    def write_conf(self, name: str, conf: dict[str, Any]) -> None:
        (self.conf_dir / name).write_text(json.dumps(conf))

    def calls(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            name, cmd, cid, ifname, netns, args, path, stdin = line.split("\t", 7)
            out.append({"plugin": name, "cmd": cmd, "cid": cid, "ifname": ifname,
                        "netns": netns, "args": args, "path": path,
                        "conf": json.loads(stdin)})
        self.log.write_text("")
        return out

    def network(self, **kw: Any) -> PodNetwork:
        return PodNetwork(self.conf_dir, [self.dir], self.cache, **kw)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    return Fake(tmp_path, monkeypatch)


# ---------------------------------------------------------------- config


def test_conf_is_wrapped_into_a_list() -> None:
    net = parse_network_config(json.dumps({"cniVersion": "0.4.0", "name": "n", "type": "bridge",
                                           "bridge": "b0"}), single=True)
    assert net.name == "n" and net.cni_version == "0.4.0"
    assert [dict(p) for p in net.plugins] == [{"type": "bridge", "bridge": "b0"}]


def test_lexically_first_valid_config_wins(tmp_path: Path) -> None:
    (tmp_path / "05-broken.conflist").write_text("{not json")
    (tmp_path / "07-noplugins.conflist").write_text(json.dumps({"name": "x", "plugins": []}))
    (tmp_path / "10-b.conf").write_text(json.dumps({"cniVersion": "1.0.0", "name": "b",
                                                    "type": "bridge"}))
    (tmp_path / "20-a.conflist").write_text(json.dumps(conflist({"type": "x"}, name="a")))
    (tmp_path / "00-ignored.txt").write_text("{}")
    net = load_network_config(tmp_path)
    assert net is not None and net.name == "b" and net.source.endswith("10-b.conf")
    assert load_network_config(tmp_path / "missing") is None


def test_version_selection_and_validation() -> None:
    net = parse_network_config({"cniVersions": ["0.4.0", "1.0.0", "9.9.9"], "name": "n",
                                "plugins": [{"type": "x"}]})
    assert net.cni_version == "1.0.0"
    with pytest.raises(InvalidArgument, match="cniVersion"):
        parse_network_config(conflist({"type": "x"}, version="2.0.0"))
    with pytest.raises(InvalidArgument, match="type"):
        parse_network_config(conflist({"type": "../../bin/sh"}))
    with pytest.raises(InvalidArgument, match="name"):
        parse_network_config({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]})


def test_default_conflist() -> None:
    conf = cni.default_conflist("10.89.0.0/16", data_dir=Path("/var/lib/crib/cni/networks"))
    net = parse_network_config(conf)
    bridge, portmap = net.plugins
    assert bridge["type"] == "bridge" and bridge["bridge"] == "crib0"
    assert bridge["isGateway"] and bridge["ipMasq"] and bridge["hairpinMode"]
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.89.0.0/16"}]]
    assert bridge["ipam"]["dataDir"] == "/var/lib/crib/cni/networks"
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    six = cni.default_conflist("fd00:89::/64", "crib6")
    assert six["plugins"][0]["ipam"]["routes"] == [{"dst": "::/0"}]
    with pytest.raises(InvalidArgument, match="subnet"):
        cni.default_conflist("10.89.0.0/33")
    with pytest.raises(InvalidArgument, match="bridge"):
        cni.default_conflist("10.89.0.0/16", "a-very-long-bridge-name")


# ---------------------------------------------------------------- results


def test_result_conversion_between_versions() -> None:
    old = {"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "10.0.0.2/24"}]}
    assert convert_result(old, "1.0.0")["ips"] == [{"address": "10.0.0.2/24"}]
    new = {"cniVersion": "1.0.0", "ips": [{"address": "fd00::2/64"}]}
    assert convert_result(new, "0.4.0")["ips"] == [{"address": "fd00::2/64", "version": "6"}]
    legacy = {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.3/16", "gateway": "10.1.0.1",
                                             "routes": [{"dst": "0.0.0.0/0"}]}}
    conv = convert_result(legacy, "0.3.1")
    assert conv["ips"] == [{"version": "4", "address": "10.1.0.3/16", "gateway": "10.1.0.1"}]
    assert conv["routes"] == [{"dst": "0.0.0.0/0"}] and conv["cniVersion"] == "0.3.1"


def test_pod_ips_are_those_on_sandbox_interfaces() -> None:
    raw = {"cniVersion": "1.0.0",
           "interfaces": [{"name": "br0"}, {"name": "eth0", "sandbox": "/ns"}],
           "ips": [{"address": "10.0.0.1/24", "interface": 0},
                   {"address": "10.0.0.5/24", "interface": 1},
                   {"address": "fd00::5/64", "interface": 1}]}
    res = parse_result(raw)
    assert res.pod_ips() == ["10.0.0.5", "fd00::5"]
    assert parse_result({"ips": [{"address": "10.0.0.9/8"}]}).pod_ips() == ["10.0.0.9"]


# ---------------------------------------------------------------- invocation


def test_add_chains_results_and_passes_capabilities(fake: Fake) -> None:
    fake.write_conf("10-t.conflist", conflist(
        {"type": "alpha", "ipam": {"type": "x"}},
        {"type": "beta", "capabilities": {"portMappings": True}}))
    fake.respond("alpha", "ADD", RESULT_A)
    fake.respond("beta", "ADD", RESULT_A)
    net = fake.network()
    res = asyncio.run(net.add(Path("/run/ns/x"), CID, POD,
                              port_mappings=[PortMapping(8080, 80, "TCP")],
                              dns=DnsConfig(servers=("10.96.0.10",))))
    assert res.pod_ips() == ["10.199.0.7"] and res.ips[0].gateway == "10.199.0.1"
    alpha, beta = fake.calls()  # lo is crib's job: no loopback plugin, even when installed
    assert fake.lo_up == [Path("/run/ns/x")]
    for c in (alpha, beta):
        assert c["cmd"] == "ADD" and c["cid"] == CID and c["ifname"] == "eth0"
        assert c["netns"] == "/run/ns/x" and c["path"] == str(fake.dir)
        assert c["args"] == (f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
                             f"K8S_POD_INFRA_CONTAINER_ID={CID};K8S_POD_UID=uid-1")
        assert c["conf"]["name"] == "testnet" and c["conf"]["cniVersion"] == "1.0.0"
    assert "prevResult" not in alpha["conf"] and "runtimeConfig" not in alpha["conf"]
    assert beta["conf"]["prevResult"]["ips"] == RESULT_A["ips"]
    # Only the declared capability is passed; dns is not declared by beta.
    assert beta["conf"]["runtimeConfig"] == {"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}]}
    entry = json.loads((fake.cache / "results" / f"testnet-{CID}-eth0").read_text())
    assert entry["kind"] == "cniCacheV1" and entry["result"]["ips"] == RESULT_A["ips"]
    assert json.loads(base64.b64decode(entry["config"]))["name"] == "testnet"


def test_delete_uses_cached_config_in_reverse_order(fake: Fake) -> None:
    fake.write_conf("10-t.conflist", conflist({"type": "alpha"}, {"type": "beta"}))
    fake.respond("alpha", "ADD", RESULT_A)
    net = fake.network()
    asyncio.run(net.add(Path("/run/ns/x"), CID, POD))
    assert net.cached_result(CID) is not None
    # The conf dir changes before DEL: the attachment is removed as it was made.
    fake.write_conf("00-other.conflist", conflist({"type": "beta"}, name="other"))
    fake.calls()
    asyncio.run(net.delete(Path("/run/ns/x"), CID, POD))
    calls = fake.calls()
    assert [(c["plugin"], c["cmd"]) for c in calls] == [("beta", "DEL"), ("alpha", "DEL")]
    assert all(c["conf"]["name"] == "testnet" for c in calls)
    assert calls[0]["conf"]["prevResult"]["ips"] == RESULT_A["ips"]
    assert calls[0]["netns"] == ""  # not a pinned namespace: passed as gone
    assert not list((fake.cache / "results").iterdir())
    assert net.cached_result(CID) is None


def test_plugin_error_is_reported_and_add_is_rolled_back(fake: Fake) -> None:
    fake.write_conf("10-t.conflist", conflist({"type": "alpha"}, {"type": "beta"}))
    fake.respond("alpha", "ADD", RESULT_A)
    fake.respond("beta", "ADD", {"cniVersion": "1.0.0", "code": 7, "msg": "bad config",
                                 "details": "field foo"}, rc=1)
    net = fake.network()
    with pytest.raises(CniError) as info:
        asyncio.run(net.add(Path("/ns"), CID, POD))
    err = info.value
    assert (err.cni_code, err.msg, err.details, err.plugin) == (7, "bad config", "field foo",
                                                                "beta")
    assert "bad config" in err.message and "testnet" in err.message
    cmds = [(c["plugin"], c["cmd"]) for c in fake.calls()]
    assert cmds[-2:] == [("beta", "DEL"), ("alpha", "DEL")]
    assert not list((fake.cache / "results").iterdir())


def test_non_json_failure_uses_stderr_or_exit_status(fake: Fake) -> None:
    fake.write_conf("10-t.conflist", conflist({"type": "alpha"}))
    fake.respond("alpha", "ADD", "plain text failure", rc=2)
    with pytest.raises(CniError, match="plain text failure"):
        asyncio.run(fake.network().add(Path("/ns"), CID, POD))


def test_delete_is_retried_a_bounded_number_of_times(fake: Fake) -> None:
    fake.write_conf("10-t.conflist", conflist({"type": "alpha"}, {"type": "beta"}))
    fake.respond("alpha", "ADD", RESULT_A)
    net = fake.network(del_attempts=3)
    asyncio.run(net.add(Path("/ns"), CID, POD))
    fake.calls()
    fake.respond("alpha", "DEL", {"code": 11, "msg": "try again"}, rc=1)
    with pytest.raises(CniError, match="try again"):
        asyncio.run(net.delete(Path("/ns"), CID, POD))
    cmds = [(c["plugin"], c["cmd"]) for c in fake.calls()]
    assert cmds == [("beta", "DEL"), ("alpha", "DEL")] * 3
    # Kept for a later retry; succeeds once the plugin does.
    assert net.cached_result(CID) is not None
    (fake.dir / "alpha.DEL.rc").write_text("0")
    (fake.dir / "alpha.DEL.out").unlink()
    asyncio.run(net.delete(Path("/ns"), CID, POD))
    asyncio.run(net.delete(Path("/ns"), CID, POD))
    assert net.cached_result(CID) is None


def test_check_passes_cached_result(fake: Fake) -> None:
    fake.write_conf("10-t.conflist", conflist({"type": "alpha"}))
    fake.respond("alpha", "ADD", RESULT_A)
    net = fake.network()
    with pytest.raises(FailedPrecondition):
        asyncio.run(net.check(Path("/ns"), CID, POD))
    asyncio.run(net.add(Path("/ns"), CID, POD))
    fake.calls()
    asyncio.run(net.check(Path("/ns"), CID, POD))
    [c] = fake.calls()
    assert c["cmd"] == "CHECK" and c["conf"]["prevResult"]["ips"] == RESULT_A["ips"]


def test_missing_config_plugin_and_bad_args(fake: Fake) -> None:
    net = fake.network()
    with pytest.raises(FailedPrecondition, match="no valid CNI network config"):
        asyncio.run(net.add(Path("/ns"), CID, POD))
    asyncio.run(net.delete(None, CID, POD))  # nothing to do, no error
    fake.write_conf("10-t.conflist", conflist({"type": "gamma"}))
    with pytest.raises(FailedPrecondition, match="gamma"):
        asyncio.run(net.add(Path("/ns"), CID, POD))
    with pytest.raises(InvalidArgument, match="K8S_POD_NAME"):
        asyncio.run(net.add(Path("/ns"), CID, PodRef("default", "a;b=c", "u")))
    with pytest.raises(InvalidArgument, match="container id"):
        asyncio.run(net.add(Path("/ns"), "../x", POD))


def test_built_in_network_is_used_without_a_config(fake: Fake) -> None:
    default = parse_network_config(conflist({"type": "alpha"}, name="builtin"))
    fake.respond("alpha", "ADD", RESULT_A)
    net = fake.network(default=default)
    asyncio.run(net.add(Path("/ns"), CID, POD))
    assert (fake.cache / "results" / f"builtin-{CID}-eth0").exists()


def test_slow_plugin_times_out_and_is_killed(fake: Fake) -> None:
    fake.write_conf("10-t.conflist", conflist({"type": "alpha"}))
    (fake.dir / "alpha.ADD.sleep").write_text("30")
    with pytest.raises(DeadlineExceeded, match="alpha"):
        asyncio.run(fake.network(timeout=0.5).add(Path("/ns"), CID, POD))
