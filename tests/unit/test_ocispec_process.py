from __future__ import annotations

from typing import Any

import pytest

from api import api_pb2
from cri.errors import InvalidArgument
from runtimeservice import ocispec_process as proc


def _config(**kwargs: Any) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(**kwargs)


IMAGE = {"Entrypoint": ["/entry"], "Cmd": ["--default"], "Env": ["PATH=/img/bin", "A=1"],
         "WorkingDir": "/srv", "User": "app", "StopSignal": "SIGQUIT"}  # fmt: skip


@pytest.mark.parametrize(
    "command, args, image, expected",
    [
        (["/bin/x"], ["a"], IMAGE, ["/bin/x", "a"]),
        (["/bin/x"], [], IMAGE, ["/bin/x"]),
        ([], ["a", "b"], IMAGE, ["/entry", "a", "b"]),
        ([], [], IMAGE, ["/entry", "--default"]),
        ([], [], {"Cmd": ["sh"]}, ["sh"]),
        ([], ["echo"], {"Cmd": ["sh"]}, ["echo"]),
    ],
)
def test_docker_merge_of_command_and_args(
    command: list[str], args: list[str], image: dict[str, Any], expected: list[str]
) -> None:
    assert proc.process_args(_config(command=command, args=args), image) == expected


def test_empty_command_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="no command"):
        proc.process_args(_config(), {})
    with pytest.raises(InvalidArgument, match="Entrypoint"):
        proc.process_args(_config(), {"Entrypoint": "sh -c"})


def test_env_merge() -> None:
    config = _config(
        envs=[api_pb2.KeyValue(key="A", value="2"), api_pb2.KeyValue(key="B", value="x=y")],
        tty=True,
    )
    env = proc.process_env(config, IMAGE, hostname="pod")
    assert env == ["PATH=/img/bin", "HOSTNAME=pod", "A=2", "TERM=xterm", "B=x=y"]
    assert proc.process_env(_config(), {}) == [f"PATH={proc.DEFAULT_PATH}"]


def test_env_bad_name() -> None:
    with pytest.raises(InvalidArgument, match="environment variable"):
        proc.process_env(_config(envs=[api_pb2.KeyValue(key="", value="v")]), {})


def test_working_dir() -> None:
    assert proc.working_dir(_config(working_dir="/work/"), IMAGE) == "/work"
    assert proc.working_dir(_config(), IMAGE) == "/srv"
    assert proc.working_dir(_config(), {"WorkingDir": "rel"}) == "/rel"
    assert proc.working_dir(_config(), {}) == "/"
    with pytest.raises(InvalidArgument, match="not an absolute"):
        proc.working_dir(_config(working_dir="relative"), {})


def test_user_request() -> None:
    config = _config()
    sc = config.linux.security_context
    sc.run_as_user.value = 0  # set, even though zero
    sc.supplemental_groups.extend([5, 6])
    sc.supplemental_groups_policy = api_pb2.Strict
    req = proc.user_request(config, IMAGE)
    assert (req.uid, req.gid, req.image_user, req.supplemental_groups, req.strict_groups) == (
        0, None, "app", (5, 6), True)  # fmt: skip
    assert proc.user_request(_config(), {}).uid is None


def test_group_without_user_is_invalid() -> None:
    config = _config()
    config.linux.security_context.run_as_group.value = 10
    with pytest.raises(InvalidArgument, match="run_as_group 10"):
        proc.user_request(config, IMAGE)


@pytest.mark.parametrize(
    "name, number",
    [("SIGTERM", 15), ("term", 15), ("9", 9), ("SIGRTMIN", 34), ("SIGRTMIN+3", 37),
     ("RTMAX-1", 63), ("SIGRTMAX", 64), ("SIGCLD", 17), ("SIGIOT", 6), ("SIGWINCH", 28)],
)  # fmt: skip
def test_signal_number(name: str, number: int) -> None:
    assert proc.signal_number(name) == number


@pytest.mark.parametrize("name", ["SIGNOPE", "0", "65", "SIGRTMIN+31", "RTMAX-40", ""])
def test_bad_signals(name: str) -> None:
    with pytest.raises(InvalidArgument):
        proc.signal_number(name)


def test_signal_names() -> None:
    assert proc.signal_name(17) == "SIGCHLD"
    assert proc.signal_name(6) == "SIGABRT"
    assert proc.signal_name(37) == "SIGRTMIN+3"
    assert proc.signal_name(63) == "SIGRTMAX-1"
    for num in range(1, 65):
        if num in (32, 33):
            continue
        assert proc.signal_number(proc.signal_name(num)) == num


def test_stop_signal_precedence() -> None:
    assert proc.stop_signal(_config(stop_signal=api_pb2.SIGUSR1), IMAGE) == 10
    assert proc.stop_signal(_config(stop_signal=api_pb2.SIGRTMINPLUS2), IMAGE) == 36
    assert proc.stop_signal(_config(stop_signal=api_pb2.SIGRTMAXMINUS2), IMAGE) == 62
    assert proc.stop_signal(_config(), IMAGE) == 3
    assert proc.stop_signal(_config(), {}) == 15


def test_every_cri_signal_resolves() -> None:
    for value in api_pb2.Signal.values():
        if value != api_pb2.RUNTIME_DEFAULT:
            assert 1 <= proc.stop_signal(_config(stop_signal=value), {}) <= 64


def test_oom_score_adj() -> None:
    assert proc.oom_score_adj(-997, 0) == 0
    assert proc.oom_score_adj(500, 0) == 500
    assert proc.oom_score_adj(-997, None) == -997
    with pytest.raises(InvalidArgument):
        proc.oom_score_adj(1001, None)


def test_image_runtime_config_accepts_both_shapes() -> None:
    assert proc.image_runtime_config({"config": IMAGE, "rootfs": {}}) is IMAGE
    assert proc.image_runtime_config(IMAGE) is IMAGE
