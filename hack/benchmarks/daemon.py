"""Daemon baseline: start-up to first Version, idle RSS, Version round trip.

    sudo .venv/bin/python -m hack.benchmarks.daemon [--calls 10000]

Starts crib on a temporary socket/root/runroot, measures, stops it, and prints
JSON. Numbers go in notes; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from api import api_pb2, api_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=10000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="crib-bench-") as tmp:
        base = Path(tmp)
        (base / "crib.toml").write_text("")
        sock = base / "run" / "crib.sock"
        argv = [sys.executable, "-m", "cri", "--config", str(base / "crib.toml"),
                "--config-dir", str(base / "d"), "--socket", str(sock), "--root",
                str(base / "root"), "--runroot", str(base / "run"), "--log-level", "warning"]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            while not sock.exists():
                time.sleep(0.002)
            ch = grpc.insecure_channel(f"unix://{sock}")
            stub = api_pb2_grpc.RuntimeServiceStub(ch)
            while True:
                try:
                    stub.Version(api_pb2.VersionRequest(), timeout=5)
                    break
                except grpc.RpcError:
                    time.sleep(0.002)
            first_version_ms = (time.monotonic() - t0) * 1000
            time.sleep(2)
            idle_rss = rss_kib(proc.pid)
            lat = []
            req = api_pb2.VersionRequest()
            for _ in range(args.calls):
                s = time.perf_counter()
                stub.Version(req)
                lat.append((time.perf_counter() - s) * 1e6)
            lat.sort()
            result = {
                "start_to_first_version_ms": round(first_version_ms, 1),
                "idle_rss_mib": round(idle_rss / 1024, 1),
                "version_calls": args.calls,
                "version_p50_us": round(statistics.median(lat), 1),
                "version_p99_us": round(lat[int(len(lat) * 0.99) - 1], 1),
                "rss_after_calls_mib": round(rss_kib(proc.pid) / 1024, 1),
            }
            ch.close()
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
