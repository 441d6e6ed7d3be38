"""CLI: ``python3 -m hack.testimages build|push|list``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from hack.testimages.build import build_all
from hack.testimages.model import ImageInfo, default_cache_dir
from hack.testimages.push import PushError, push_all


def _summary(images: dict[str, ImageInfo]) -> str:
    lines = []
    for info in images.values():
        config = (info.config_digest or "-")[:19]
        lines.append(f"{info.repository:28} {','.join(info.tags):16} "
                     f"{info.manifest_digest[:19]} {config} {info.uncompressed_size:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m hack.testimages",
                                     description="Build and push crib's test images.")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"cache directory (default {default_cache_dir()})")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the images into the cache")
    build.add_argument("--big", action="store_true", help="also build big:latest (~200 MB)")
    build.add_argument("--json", action="store_true", help="print the records as JSON")
    push = sub.add_parser("push", help="build (if needed) and push to a registry")
    push.add_argument("registry", help="host:port of the registry")
    push.add_argument("--big", action="store_true", help="also push big:latest")
    push.add_argument("--user", help="registry user (Basic or Bearer token auth)")
    push.add_argument("--password", default="", help="registry password")
    args = parser.parse_args(argv)

    start = time.monotonic()
    images = build_all(args.cache, big=args.big)
    built = time.monotonic()
    if args.command == "build":
        if args.json:
            print(json.dumps({n: i.to_json() for n, i in images.items()}, indent=1))
        else:
            print(_summary(images))
        print(f"built {len(images)} images in {built - start:.2f}s", file=sys.stderr)
        return 0
    auth = (args.user, args.password) if args.user else None
    try:
        push_all(args.registry, images, auth=auth)
    except (PushError, OSError) as exc:
        print(f"push failed: {exc}", file=sys.stderr)
        return 1
    print(f"built {len(images)} images in {built - start:.2f}s, "
          f"pushed to {args.registry} in {time.monotonic() - built:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
