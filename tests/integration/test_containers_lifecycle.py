"""Container lifecycle through the ContainerManager on real runc + conmon:
states, exit codes and reasons, stop with grace and at once, remove in every
state, CRI logs, reopen, ExecSync, and that nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from api import api_pb2
from cri.errors import DeadlineExceeded, FailedPrecondition
from runtimeservice.container import ContainerState
from runtimeservice.containers import ContainerManager
from runtimeservice.crilog import Stream, iter_records, read_log, reassemble
from tests.integration.containerenv import ContainerEnv, await_until, busybox_rootfs, cenv, run

pytestmark = pytest.mark.integration
__all__ = ["busybox_rootfs", "cenv"]

CREATED = api_pb2.ContainerState.CONTAINER_CREATED
RUNNING = api_pb2.ContainerState.CONTAINER_RUNNING
EXITED = api_pb2.ContainerState.CONTAINER_EXITED


async def exited(mgr: ContainerManager, cid: str) -> api_pb2.ContainerStatus:
    await await_until(lambda: mgr.store.get(cid).state is ContainerState.EXITED, "the exit")
    return (await mgr.status(cid)).status


def test_full_lifecycle_logs_and_cleanup(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox(app="web")
            config = cenv.config("hello", ["sh", "-c", "echo out; echo err >&2; exit 0"],
                                 labels={"tier": "front"}, annotations={"a": "1"})
            t0 = time.time_ns()
            cid = await mgr.create(cenv.request(pod, config))
            st = (await mgr.status(cid)).status
            assert st.state == CREATED and st.created_at >= t0 and st.started_at == 0
            assert st.metadata.name == "hello" and dict(st.labels) == {"tier": "front"}
            assert dict(st.annotations) == {"a": "1"} and st.image.image == cenv.image.repo_tags[0]
            assert st.image_ref == cenv.image.repo_digests[0] and st.image_id == cenv.image.id
            assert st.log_path == str(cenv.log_file(pod, "hello"))
            assert st.user.linux.uid == 0 and st.stop_signal == api_pb2.Signal.SIGTERM
            assert [c.id for c in mgr.list()] == [cid]
            await mgr.start_container(cid)
            st = await exited(mgr, cid)
            assert (st.exit_code, st.reason) == (0, "Completed")
            assert st.started_at >= st.created_at and st.finished_at >= st.started_at
            entries = read_log(st.log_path)
            assert sorted((e.stream.value, e.text) for e in entries) == [
                (Stream.STDERR.value, "err"), (Stream.STDOUT.value, "out")]
            with pytest.raises(FailedPrecondition, match="only a created container"):
                await mgr.start_container(cid)
            assert os.path.ismount(mgr.store.get(cid).paths.merged)
            await mgr.remove(cid)
            assert mgr.list() == [] and mgr.store.find(cid) is None
            await mgr.remove(cid)  # idempotent
            await mgr.stop(cid, 10)
            assert cenv.leftovers() == []

    run(scenario())


@pytest.mark.parametrize(("script", "code", "reason"), [
    ("exit 3", 3, "Error"),
    ("sleep 100 & kill -9 $!; wait $!", 137, "Error"),
])
def test_exit_codes_and_reasons(cenv: ContainerEnv, script: str, code: int, reason: str) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            cid = await mgr.create(cenv.request(pod, cenv.config("c", ["sh", "-c", script])))
            await mgr.start_container(cid)
            st = await exited(mgr, cid)
            assert (st.exit_code, st.reason) == (code, reason)
            await mgr.remove(cid)

    run(scenario())


def test_oom_killed_is_reported_with_137(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            config = cenv.config("hog", ["sh", "-c", "x=xxxxxxxx; while true; do x=$x$x; done"])
            config.linux.resources.memory_limit_in_bytes = 16 << 20
            config.linux.resources.memory_swap_limit_in_bytes = 16 << 20
            cid = await mgr.create(cenv.request(pod, config))
            await mgr.start_container(cid)
            st = await exited(mgr, cid)
            assert (st.exit_code, st.reason) == (137, "OOMKilled")
            await mgr.remove(cid)

    run(scenario())


TRAP_TERM = ["sh", "-c", "trap 'exit 42' TERM; while true; do sleep 0.05; done"]
IGNORE_TERM = ["sh", "-c", "trap '' TERM; while true; do sleep 0.05; done"]


def test_stop_with_grace_then_kill_and_at_once(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            ids = {}
            for name, args in (("polite", TRAP_TERM), ("stubborn", IGNORE_TERM),
                               ("now", IGNORE_TERM)):
                ids[name] = await mgr.create(cenv.request(pod, cenv.config(name, args)))
                await mgr.start_container(ids[name])
            await mgr.stop(ids["polite"], 30)
            st = (await mgr.status(ids["polite"])).status
            assert (st.state, st.exit_code, st.reason) == (EXITED, 42, "Error")
            await mgr.stop(ids["stubborn"], 1)  # TERM is ignored: killed after 1 s
            st = (await mgr.status(ids["stubborn"])).status
            assert (st.state, st.exit_code) == (EXITED, 137)
            await mgr.stop(ids["now"], 0)
            assert (await mgr.status(ids["now"])).status.exit_code == 137
            await mgr.stop(ids["now"], 0)  # stopping a stopped container succeeds
            await mgr.stop("0" * 64, 0)  # and a missing one
            for cid in ids.values():
                await mgr.remove(cid)

    run(scenario())


def test_remove_in_every_state(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            created = await mgr.create(cenv.request(pod, cenv.config("a", ["sleep", "100"])))
            running = await mgr.create(cenv.request(pod, cenv.config("b", ["sleep", "100"])))
            await mgr.start_container(running)
            pid = mgr.store.get(running).pid
            await mgr.remove(created)
            await mgr.remove(running)  # killed first
            assert mgr.list() == []
            await await_until(lambda: not os.path.exists(f"/proc/{pid}/cmdline")
                              or not Path(f"/proc/{pid}/cmdline").read_bytes(), "pid gone")

    run(scenario())
    assert cenv.leftovers() == []


def test_long_line_split_and_reopen_after_rename(cenv: ContainerEnv) -> None:
    script = ("head -c 20000 /dev/zero | tr '\\0' x; echo; "
              "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.02; done")

    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            cid = await mgr.create(cenv.request(pod, cenv.config("logger", ["sh", "-c", script])))
            await mgr.start_container(cid)
            path = Path((await mgr.status(cid)).status.log_path)

            def complete_lines(p: Path) -> list[str]:
                data = p.read_bytes() if p.exists() else b""
                data = data[: data.rfind(b"\n") + 1]
                return [e.text for e in reassemble(iter_records(data))]

            await await_until(lambda: len(complete_lines(path)) >= 4, "first lines")
            os.rename(path, str(path) + ".1")
            await mgr.reopen_log(cid)
            await await_until(lambda: len(complete_lines(path)) >= 3, "lines in the new file")
            await mgr.stop(cid, 0)
            with pytest.raises(FailedPrecondition):
                await mgr.reopen_log(cid)
            old = complete_lines(Path(str(path) + ".1"))
            records = list(iter_records(Path(str(path) + ".1").read_bytes()))
            assert records[0].partial and all(len(r.content) <= 8192 for r in records)
            assert old[0] == "x" * 20000
            numbers = [int(t.removeprefix("line")) for t in old[1:] + complete_lines(path)]
            assert numbers == list(range(len(numbers)))  # nothing lost or repeated
            await mgr.remove(cid)

    run(scenario())


def test_exec_sync_output_code_timeout(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            cid = await mgr.create(cenv.request(pod, cenv.config("svc", ["sleep", "1000"])))
            with pytest.raises(FailedPrecondition, match="cannot exec"):
                await mgr.exec_sync(cid, ["true"], 0)
            await mgr.start_container(cid)
            res = await mgr.exec_sync(cid, ["sh", "-c", "echo o; echo e >&2; exit 5"], 10)
            assert (res.stdout, res.stderr, res.exit_code) == (b"o\n", b"e\n", 5)
            with pytest.raises(DeadlineExceeded, match="timed out"):
                await mgr.exec_sync(cid, ["sleep", "60"], 1)
            await await_until(lambda: not [c for _, c in cenv.processes() if "sleep 60" in c],
                              "the timed-out exec to be killed")
            await mgr.remove(cid)

    run(scenario())


def test_concurrent_identical_creates_join(cenv: ContainerEnv) -> None:
    async def scenario() -> None:
        async with cenv.started() as mgr:
            pod = await cenv.sandbox()
            req = cenv.request(pod, cenv.config("same", ["sleep", "100"]))
            a, b = await asyncio.gather(mgr.create(req), mgr.create(req))
            assert a == b and len(mgr.list()) == 1
            assert await mgr.create(req) == a  # a later retry too
            await mgr.remove(a)

    run(scenario())
