"""The committed stubs match the proto, and the proto matches the CRI wire contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK_WIRE = ROOT.parent / "shared" / "cri-api" / "check_wire.py"


def test_stubs_are_fresh(tmp_path: Path) -> None:
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "api.proto").write_bytes((ROOT / "api" / "api.proto").read_bytes())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "--pyi_out=.", "--grpc_python_out=.", "api/api.proto"],
                   cwd=tmp_path, check=True)
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        fresh = (tmp_path / "api" / name).read_text()
        committed = (ROOT / "api" / name).read_text()
        assert fresh == committed, f"api/{name} is stale: run hack/gen-api"


@pytest.mark.skipif(not CHECK_WIRE.exists(), reason="shared/cri-api/check_wire.py not present")
def test_wire_identical_to_cri_api() -> None:
    done = subprocess.run([sys.executable, str(CHECK_WIRE), str(ROOT / "api" / "api.proto")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical on all 41 rpcs" in done.stdout


def test_service_shape() -> None:
    from api import api_pb2

    services = api_pb2.DESCRIPTOR.services_by_name
    runtime, image = services["RuntimeService"], services["ImageService"]
    assert len(runtime.methods) == 35
    assert len(image.methods) == 6
    streaming = [m.name for s in (runtime, image) for m in s.methods if m.server_streaming]
    assert len(streaming) == 7
