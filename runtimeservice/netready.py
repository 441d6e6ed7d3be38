"""Whether pod networking is ready: a CNI network config is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from cri.config import Config

CNI_EXTENSIONS = (".conf", ".conflist", ".json")


def first_cni_config(conf_dir: Path) -> tuple[Path, str] | None:
    """The lexically first parseable network config in `conf_dir` and its network name."""
    try:
        candidates = sorted(p for p in conf_dir.iterdir() if p.suffix in CNI_EXTENSIONS)
    except OSError:
        return None
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and ("plugins" in data or "type" in data):
            return path, str(data.get("name", ""))
    return None


def network_condition(cfg: Config) -> tuple[bool, str, str]:
    """(ready, reason, message) for the NetworkReady condition."""
    found = first_cni_config(Path(cfg.network.cni_conf_dir))
    if found is not None or cfg.network.default_network:
        return True, "", ""
    return (False, "NetworkPluginNotReady",
            f"no CNI network config in {cfg.network.cni_conf_dir} and "
            "network.default_network is off")
