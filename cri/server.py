"""The daemon, top to bottom: lock → services → socket → signals → serve → shutdown.

A daemon stop never touches containers: they belong to their monitors and
outlive the daemon; the next start finds them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import grpc

from api import api_pb2
from cri import __version__, metrics, tracing
from cri.boundary import Gate, service_handler
from cri.config import Config
from cri.errors import CribError
from cri.fsutil import PidLock
from cri.reload import ConfigSource, Reloader
from imageservice.service import ImageService
from runtimeservice.service import RuntimeService

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


class Daemon:
    def __init__(self, cfg: Config, source: ConfigSource | None = None) -> None:
        self.cfg = cfg
        self.socket = Path(cfg.api.listen)
        self.locks = [PidLock(Path(cfg.runroot) / "crib.lock"),
                      PidLock(Path(cfg.root) / "crib.lock")]
        self.gate = Gate()
        self.stopping = asyncio.Event()
        self.server: grpc.aio.Server | None = None
        self.metrics_server: metrics.MetricsServer | None = None
        self.images = ImageService(cfg)
        self.runtime = RuntimeService(cfg, self.images)
        self.reloader = Reloader(cfg, source, self.images)  # SIGHUP; no source: images only
        self._reloads: set[asyncio.Task[None]] = set()

    def _lock(self) -> None:
        from cri.fsutil import LockHeld

        for lock in self.locks:
            try:
                lock.acquire()
            except LockHeld as exc:
                self._unlock()
                raise StartupError(
                    f"another crib daemon (pid {exc.holder or '?'}) is using this root/runroot: "
                    f"{exc.path} is locked") from None

    def _unlock(self) -> None:
        for lock in self.locks:
            lock.release()

    async def _bind(self) -> None:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        # We hold the lock, so a socket file here is a stale one from a crash.
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self.cfg.api.max_recv_msg_size),
            ("grpc.max_send_message_length", self.cfg.api.max_send_msg_size),
        ])
        runtime_desc = api_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
        image_desc = api_pb2.DESCRIPTOR.services_by_name["ImageService"]
        server.add_generic_rpc_handlers((
            service_handler(runtime_desc, self.runtime, self.gate),
            service_handler(image_desc, self.images, self.gate),
        ))
        # Create the socket without group/other bits, then open it to the group.
        old = os.umask(0o177)
        try:
            if server.add_insecure_port(f"unix://{self.socket}") == 0:
                raise StartupError(f"cannot listen on {self.socket}")
            await server.start()
        finally:
            os.umask(old)
        os.chmod(self.socket, 0o660)
        self.server = server

    def _signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        log.info("received %s, shutting down", sig.name)
        self.stopping.set()

    def _on_reload_signal(self) -> None:
        log.info("received SIGHUP, reloading the configuration")
        task = asyncio.get_running_loop().create_task(self._reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self) -> None:
        try:
            await self.reloader.reload()
        except Exception:
            log.exception("reloading the configuration failed")

    async def run(self) -> None:
        _watch_children_with_pidfds()
        self._lock()
        try:
            for d in (self.cfg.root, self.cfg.runroot):
                Path(d).mkdir(parents=True, exist_ok=True, mode=0o711)
            tracing.setup(self.cfg.tracing)
            if self.cfg.metrics.enabled:
                try:
                    self.metrics_server = await metrics.start_server(self.cfg.metrics.address)
                except (OSError, CribError) as exc:
                    raise StartupError(f"cannot serve metrics on {self.cfg.metrics.address}: "
                                       f"{exc}") from None
            await self._start_streaming()
            self._signals()
            await self._bind()
            log.info("crib %s serving CRI on %s", __version__, self.socket)
            await self.runtime.start()
            await self.images.start()
            self.gate.ready.set()
            log.info("ready")
            await self.stopping.wait()
            await self._shutdown()
        finally:
            await self.runtime.streaming.stop()  # idempotent; here for a failed start-up
            if self.metrics_server is not None:
                await self.metrics_server.stop()
            tracing.shutdown()
            with contextlib.suppress(FileNotFoundError):
                if self.server is not None:
                    self.socket.unlink()
            self._unlock()

    async def _start_streaming(self) -> None:
        """Listen for exec/attach/port-forward before any RPC can hand out a URL."""
        try:
            await self.runtime.streaming.start()
        except (OSError, CribError) as exc:
            cfg = self.cfg.streaming
            raise StartupError(f"cannot serve exec/attach/port-forward streams on "
                               f"{cfg.address}:{cfg.port}: {exc}") from None

    async def _shutdown(self) -> None:
        if self.server is None:
            return
        grace = self.cfg.api.shutdown_grace
        log.info("stopping the gRPC server (grace %.0fs)", grace)
        # Open event streams (the kubelet's) would hold the grace period: end them first.
        self.runtime.event_hub.close()
        await self.server.stop(grace)
        await self.runtime.close()
        # Open exec sessions end (their processes are killed), attach clients are
        # detached; the containers themselves are not touched.
        log.info("stopping the streaming server")
        await self.runtime.streaming.stop()
        self.images.close()
        log.info("stopped")


def _watch_children_with_pidfds() -> None:
    """Have the event loop learn of subprocess exits through pidfds (Linux 5.3+).

    Python 3.11's default child watcher starts one thread per subprocess, blocked
    in waitpid(), and hands the exit back to the loop from there: every runc,
    conmon and CNI call pays a thread start and a cross-thread wake-up. A pidfd is
    polled by the loop itself. Called once, first thing on the running loop in the
    main thread (the watcher belongs to the event loop policy, and asyncio.run
    detaches it when the loop closes). 3.12+ uses pidfds by default and deprecates
    child watchers, so this is for 3.11; an old kernel keeps the threaded watcher.
    """
    if sys.version_info >= (3, 12):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        log.info("pidfds unavailable (%s): keeping asyncio's threaded child watcher", exc)
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)


def serve(cfg: Config, source: ConfigSource | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; SIGHUP re-reads ``source`` (cri.reload)."""
    try:
        asyncio.run(Daemon(cfg, source).run())
    except StartupError as exc:
        log.error("%s", exc)
        return 1
    return 0
