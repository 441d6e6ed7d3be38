"""The pod network crib uses, and whether it is ready (the NetworkReady condition).

The network is the lexically first valid CNI config in `network.cni_conf_dir`
(`cni.load_network_config`), or, when there is none and
`network.default_network` is on, crib's built-in bridge network, whose IPAM
state lives under crib's root so it never clashes with another runtime's.
NetworkReady is true only when that network exists and every plugin it names
is installed in `network.cni_plugin_dirs`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cri.config import Config
from cri.errors import CribError
from runtimeservice import cni
from runtimeservice.cni import NetworkConfig, PodNetwork

log = logging.getLogger(__name__)

NOT_READY = "NetworkPluginNotReady"


def default_network(cfg: Config) -> NetworkConfig | None:
    """crib's built-in network when the config enables it, else None."""
    if not cfg.network.default_network:
        return None
    conf = cni.default_conflist(cfg.network.default_network_subnet,
                                cfg.network.default_network_bridge,
                                data_dir=Path(cfg.root) / "cni" / "networks")
    return cni.parse_network_config(conf, "crib built-in network")


def pod_network(cfg: Config) -> PodNetwork:
    """The PodNetwork sandboxes use; the CNI result cache lives under crib's root."""
    return PodNetwork(Path(cfg.network.cni_conf_dir),
                      [Path(d) for d in cfg.network.cni_plugin_dirs],
                      Path(cfg.root) / "cni" / "cache", default=default_network(cfg))


async def network_condition(network: PodNetwork) -> tuple[bool, str, str]:
    """(ready, reason, message) for the NetworkReady condition."""
    try:
        net = await network.network()
        for plugin in net.plugins:
            network.find_plugin(str(plugin["type"]))
    except CribError as exc:
        extra = "" if network.default is not None else " (network.default_network is off)"
        return False, NOT_READY, exc.message + extra
    return True, "", ""
