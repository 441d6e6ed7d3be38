"""Pull benchmark: the ~200 MB crib-test/big image from a local registry through crib.

    sudo python3 -m hack.benchmarks.pull [--runs 3] [--downloads 3]

Starts Debian's docker-registry on 127.0.0.1 (temporary storage), pushes
crib-test/big (built into the test-image cache if needed), starts crib on a
temporary root, then per run: PullImage (wall time), RemoveImage. Reports MB/s
of registry bytes (compressed blobs) and of unpacked bytes, the daemon's peak
RSS (VmHWM), and the same copy made by `skopeo copy docker://… dir:…` as the
reference for what loopback and the disk allow. Prints JSON; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from api import api_pb2, api_pb2_grpc
from hack.testimages import ImageInfo, build_image, push_all

ROOT = Path(__file__).resolve().parents[2]
MB = 1_000_000


def proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def registry_bytes(info: ImageInfo) -> int:
    return sum(info.blob_path(d).stat().st_size for d in info.blobs)


def start_crib(base: Path, registry: str, downloads: int) -> tuple[subprocess.Popen[bytes], Path]:
    base.mkdir(parents=True, exist_ok=True)
    (base / "registries.conf").write_text("")
    (base / "crib.toml").write_text(
        "[image]\n"
        f'registries_conf = "{base / "registries.conf"}"\n'
        f'registries_conf_dir = "{base / "registries.conf.d"}"\n'
        f'insecure_registries = ["{registry}"]\n'
        f"max_concurrent_downloads = {downloads}\n")
    sock = base / "run" / "crib.sock"
    argv = [sys.executable, "-m", "cri", "--config", str(base / "crib.toml"),
            "--config-dir", str(base / "crib.d"), "--socket", str(sock),
            "--root", str(base / "root"), "--runroot", str(base / "run"),
            "--log-level", "warning"]
    log = (base / "crib.log").open("ab")
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    log.close()
    return proc, sock


def wait_ready(sock: Path, proc: subprocess.Popen[bytes]) -> grpc.Channel:
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("crib did not start")
        time.sleep(0.01)
    channel = grpc.insecure_channel(f"unix://{sock}")
    stub = api_pb2_grpc.RuntimeServiceStub(channel)
    while True:
        try:
            stub.RuntimeConfig(api_pb2.RuntimeConfigRequest(), timeout=5)
            return channel
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def bench_crib(base: Path, registry: str, ref: str, runs: int, downloads: int,
               info: ImageInfo) -> dict[str, object]:
    proc, sock = start_crib(base, registry, downloads)
    try:
        channel = wait_ready(sock, proc)
        images = api_pb2_grpc.ImageServiceStub(channel)
        rss_idle = proc_kib(proc.pid, "VmRSS")
        times = []
        for _ in range(runs):
            t0 = time.monotonic()
            resp = images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)),
                                    timeout=600)
            times.append(time.monotonic() - t0)
            assert resp.image_ref == info.config_digest, resp.image_ref
            images.RemoveImage(api_pb2.RemoveImageRequest(
                image=api_pb2.ImageSpec(image=resp.image_ref)), timeout=120)
        peak = proc_kib(proc.pid, "VmHWM")
        channel.close()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)
    best = min(times)
    return {
        "runs_s": [round(t, 2) for t in times],
        "best_s": round(best, 2),
        "median_s": round(statistics.median(times), 2),
        "registry_MB_per_s": round(registry_bytes(info) / MB / best, 1),
        "unpacked_MB_per_s": round(info.uncompressed_size / MB / best, 1),
        "daemon_idle_rss_mib": round(rss_idle / 1024, 1),
        "daemon_peak_rss_mib": round(peak / 1024, 1),
        "max_concurrent_downloads": downloads,
    }


def bench_skopeo(base: Path, ref: str, runs: int, info: ImageInfo) -> dict[str, object]:
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        return {"error": "skopeo is not installed"}
    times = []
    for i in range(runs):
        dest = base / f"skopeo-{i}"
        t0 = time.monotonic()
        subprocess.run([skopeo, "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{ref}", f"dir:{dest}"], check=True)
        times.append(time.monotonic() - t0)
        shutil.rmtree(dest)
    best = min(times)
    return {"runs_s": [round(t, 2) for t in times], "best_s": round(best, 2),
            "registry_MB_per_s": round(registry_bytes(info) / MB / best, 1),
            "note": "download + verify only: skopeo dir: does not unpack layers"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--downloads", type=int, default=3, help="max_concurrent_downloads")
    args = ap.parse_args()
    from tests.integration.registry import start_registry

    info = build_image("big")
    with tempfile.TemporaryDirectory(prefix="crib-bench-pull-") as tmp:
        base = Path(tmp)
        with start_registry(base / "registry") as reg:
            push_all(reg.address, [info])
            ref = info.reference(reg.address)
            result = {
                "image": ref,
                "registry_bytes": registry_bytes(info),
                "unpacked_tar_bytes": info.uncompressed_size,
                "crib": bench_crib(base / "crib", reg.address, ref, args.runs, args.downloads,
                                   info),
                "skopeo_copy_dir": bench_skopeo(base, ref, args.runs, info),
            }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
