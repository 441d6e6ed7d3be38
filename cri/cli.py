"""The `crib` command: `crib [serve]`, `crib config`, `crib version`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cri import __version__, logs
from cri.config import LOG_LEVELS, ConfigError, render_default


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crib", description="A Kubernetes CRI container runtime.")
    p.add_argument("command", nargs="?", default="serve", choices=("serve", "config", "version"),
                   help="serve (default): run the daemon; config: print the default "
                        "configuration; version: print the version")
    p.add_argument("--config", type=Path, default=None,
                   help="configuration file (default /etc/crib/crib.toml)")
    p.add_argument("--config-dir", type=Path, default=None,
                   help="drop-in directory (default /etc/crib/crib.d)")
    p.add_argument("--socket", help="CRI socket path (api.listen)")
    p.add_argument("--root", help="persistent state directory (default /var/lib/crib)")
    p.add_argument("--runroot", help="volatile state directory (default /run/crib)")
    p.add_argument("--log-level", choices=LOG_LEVELS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"crib {__version__}")
        return 0
    if args.command == "config":
        sys.stdout.write(render_default())
        return 0
    overrides: dict[str, Any] = {}
    for flag, key in (("socket", "api.listen"), ("root", "root"), ("runroot", "runroot"),
                      ("log_level", "log_level")):
        value = getattr(args, flag)
        if value is not None:
            overrides[key] = value
    from cri.reload import ConfigSource  # imported late: `crib version` stays fast

    source = ConfigSource(args.config, args.config_dir, overrides)  # re-read on SIGHUP
    try:
        cfg = source.load()
    except ConfigError as exc:
        print(f"crib: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level)
    from cri.server import serve

    return serve(cfg, source)


if __name__ == "__main__":
    sys.exit(main())
