"""The container process: args, env, working dir, user request, stop signal, OOM score.

Pure functions of the CRI ``ContainerConfig`` and the image's runtime config
(the ``config`` object of an OCI image config: ``Entrypoint``, ``Cmd``, ``Env``,
``WorkingDir``, ``User``, ``StopSignal``).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

from api import api_pb2
from cri.errors import InvalidArgument
from runtimeservice.userdb import UserRequest

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Linux signal numbers (the same on x86_64 and aarch64).
_SIGNALS: Final[dict[str, int]] = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6,
    "SIGIOT": 6, "SIGBUS": 7, "SIGFPE": 8, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11,
    "SIGUSR2": 12, "SIGPIPE": 13, "SIGALRM": 14, "SIGTERM": 15, "SIGSTKFLT": 16,
    "SIGCHLD": 17, "SIGCLD": 17, "SIGCONT": 18, "SIGSTOP": 19, "SIGTSTP": 20,
    "SIGTTIN": 21, "SIGTTOU": 22, "SIGURG": 23, "SIGXCPU": 24, "SIGXFSZ": 25,
    "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28, "SIGIO": 29, "SIGPOLL": 29,
    "SIGPWR": 30, "SIGSYS": 31,
}  # fmt: skip
_SIGRTMIN: Final = 34
_SIGRTMAX: Final = 64
_ALIASES: Final = frozenset({"SIGIOT", "SIGCLD", "SIGPOLL"})
_CANONICAL: Final[dict[int, str]] = {n: s for s, n in _SIGNALS.items() if s not in _ALIASES}
SIGTERM: Final = 15
_RT_SIGNAL: Final = re.compile(r"SIG(?P<base>RTMIN|RTMAX)(?:(?P<op>[+-])(?P<offset>\d+))?")


def image_runtime_config(image: Mapping[str, Any]) -> Mapping[str, Any]:
    """The runtime part of an image config: accepts the whole config blob or its ``config``."""
    inner = image.get("config")
    return inner if isinstance(inner, Mapping) else image


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, Sequence) or isinstance(value, str | bytes) or not all(
        isinstance(v, str) for v in value
    ):
        raise InvalidArgument(f"image config {what} is not a list of strings")
    return list(value)


def process_args(config: api_pb2.ContainerConfig, image: Mapping[str, Any]) -> list[str]:
    """Docker's merge: command+args; args alone run after the image entrypoint;
    neither gives entrypoint+cmd. An empty result is InvalidArgument."""
    command, args = list(config.command), list(config.args)
    if not command:
        command = _strings(image.get("Entrypoint"), "Entrypoint")
        if not args:
            args = _strings(image.get("Cmd"), "Cmd")
    argv = command + args
    if not argv:
        raise InvalidArgument(
            "no command specified: the container config has no command or args "
            "and the image has no entrypoint or cmd"
        )
    return argv


def process_env(
    config: api_pb2.ContainerConfig, image: Mapping[str, Any], hostname: str = ""
) -> list[str]:
    """Default PATH, HOSTNAME, the image's env, TERM for a tty, then the CRI envs.

    A later entry replaces an earlier one with the same name in place.
    """
    env: dict[str, str] = {"PATH": f"PATH={DEFAULT_PATH}"}
    if hostname:
        env["HOSTNAME"] = f"HOSTNAME={hostname}"
    for entry in _strings(image.get("Env"), "Env"):
        key = entry.split("=", 1)[0]
        if key:
            env[key] = entry
    if config.tty:
        env["TERM"] = "TERM=xterm"
    for kv in config.envs:
        if not kv.key or "=" in kv.key or "\0" in kv.key + kv.value:
            raise InvalidArgument(f"invalid environment variable name {kv.key!r}")
        env[kv.key] = f"{kv.key}={kv.value}"
    return list(env.values())


def working_dir(config: api_pb2.ContainerConfig, image: Mapping[str, Any]) -> str:
    """The CRI working dir, else the image's, else ``/``; it must be absolute."""
    if config.working_dir:
        if not posixpath.isabs(config.working_dir):
            raise InvalidArgument(f"working_dir {config.working_dir!r} is not an absolute path")
        return posixpath.normpath(config.working_dir)
    image_dir = image.get("WorkingDir") or ""
    if not isinstance(image_dir, str):
        raise InvalidArgument("image config WorkingDir is not a string")
    return posixpath.normpath(posixpath.join("/", image_dir)) if image_dir else "/"


def user_request(config: api_pb2.ContainerConfig, image: Mapping[str, Any]) -> UserRequest:
    """Gather what the security context and the image say about the user."""
    sc = config.linux.security_context
    uid = sc.run_as_user.value if sc.HasField("run_as_user") else None
    gid = sc.run_as_group.value if sc.HasField("run_as_group") else None
    if gid is not None and uid is None and not sc.run_as_username:
        raise InvalidArgument(
            f"run_as_group {gid} is set without run_as_user or run_as_username"
        )
    image_user = image.get("User") or ""
    if not isinstance(image_user, str):
        raise InvalidArgument("image config User is not a string")
    return UserRequest(
        uid=uid,
        username=sc.run_as_username,
        gid=gid,
        image_user=image_user,
        supplemental_groups=tuple(sc.supplemental_groups),
        strict_groups=sc.supplemental_groups_policy == api_pb2.Strict,
    )


def signal_number(name: str) -> int:
    """``SIGTERM``, ``term``, ``15``, ``SIGRTMIN+3``, ``RTMAX-1`` → the signal number."""
    text = name.strip().upper()
    if text.isdigit():
        num = int(text)
        if not 1 <= num <= _SIGRTMAX:
            raise InvalidArgument(f"unknown signal number {name!r}")
        return num
    if not text.startswith("SIG"):
        text = "SIG" + text
    if text in _SIGNALS:
        return _SIGNALS[text]
    match = _RT_SIGNAL.fullmatch(text)
    if match:
        base = _SIGRTMIN if match["base"] == "RTMIN" else _SIGRTMAX
        offset = int(match["offset"] or 0)
        num = base + offset if match["op"] == "+" else base - offset
        if _SIGRTMIN <= num <= _SIGRTMAX:
            return num
    raise InvalidArgument(f"unknown signal {name!r}")


def signal_name(num: int) -> str:
    """The canonical name of a signal number (``SIGTERM``, ``SIGRTMIN+3``)."""
    if num in _CANONICAL:
        return _CANONICAL[num]
    if _SIGRTMIN <= num <= _SIGRTMAX:
        if num == _SIGRTMIN:
            return "SIGRTMIN"
        if num == _SIGRTMAX:
            return "SIGRTMAX"
        mid = (_SIGRTMIN + _SIGRTMAX) // 2
        if num <= mid:
            return f"SIGRTMIN+{num - _SIGRTMIN}"
        return f"SIGRTMAX-{_SIGRTMAX - num}"
    raise InvalidArgument(f"unknown signal number {num}")


def _cri_signal_name(value: int) -> str:
    """The CRI Signal enum name in signal(7) spelling (SIGRTMINPLUS3 → SIGRTMIN+3)."""
    name = str(api_pb2.Signal.Name(value))
    return name.replace("PLUS", "+").replace("MINUS", "-")


def stop_signal(config: api_pb2.ContainerConfig, image: Mapping[str, Any]) -> int:
    """The CRI stop_signal, else the image's StopSignal, else SIGTERM."""
    if config.stop_signal != api_pb2.RUNTIME_DEFAULT:
        try:
            return signal_number(_cri_signal_name(config.stop_signal))
        except ValueError:
            raise InvalidArgument(f"unknown stop_signal {config.stop_signal}") from None
    image_signal = image.get("StopSignal") or ""
    if not isinstance(image_signal, str):
        raise InvalidArgument("image config StopSignal is not a string")
    return signal_number(image_signal) if image_signal else SIGTERM


def oom_score_adj(requested: int, floor: int | None) -> int:
    """The OOM score to give the process: ``requested``, raised to ``floor`` when lower.

    ``floor`` is the daemon's own score when it cannot lower scores (no
    CAP_SYS_RESOURCE): asking the kernel for less would fail the start.
    """
    if not -1000 <= requested <= 1000:
        raise InvalidArgument(f"oom_score_adj {requested} is outside [-1000, 1000]")
    if floor is not None and requested < floor:
        return floor
    return requested
