"""crib's default seccomp profile, and loading of Localhost profiles.

The default profile is the one source of truth for ``RuntimeDefault``: deny
by default with EPERM, allow the syscalls an ordinary process needs (the same
allowlist as Docker's and containerd's default profile), allow a few more only
when the container holds the capability that guards them, and forbid creating
namespaces with ``clone`` unless the container holds CAP_SYS_ADMIN.

Both the default and a loaded Localhost profile come out in OCI runtime-spec
form (``linux.seccomp``): ``defaultAction``, ``architectures``, ``syscalls``.
Localhost profiles may be written in the Docker form (``archMap``, ``includes``,
``excludes``, singular ``name``); those are resolved here against the
container's capabilities and the host's architecture.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping
from typing import Any, Final

from cri.errors import InvalidArgument

EPERM: Final = 1
ENOSYS: Final = 38
AF_VSOCK: Final = 40

# Namespace flags of clone(2); a clone with any of these needs CAP_SYS_ADMIN.
_CLONE_NEWNS: Final = 0x00020000
_CLONE_NEWCGROUP: Final = 0x02000000
_CLONE_NEWUTS: Final = 0x04000000
_CLONE_NEWIPC: Final = 0x08000000
_CLONE_NEWUSER: Final = 0x10000000
_CLONE_NEWPID: Final = 0x20000000
_CLONE_NEWNET: Final = 0x40000000
CLONE_NAMESPACE_FLAGS: Final = (
    _CLONE_NEWNS
    | _CLONE_NEWCGROUP
    | _CLONE_NEWUTS
    | _CLONE_NEWIPC
    | _CLONE_NEWUSER
    | _CLONE_NEWPID
    | _CLONE_NEWNET
)

# personality(2) values that stay harmless: PER_LINUX, PER_LINUX32, UNAME26,
# UNAME26|PER_LINUX32, and 0xffffffff (query the current persona).
_PERSONALITIES: Final = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

# Machine (uname -m) → the libseccomp architectures a container may use there.
ARCHITECTURES: Final[dict[str, tuple[str, ...]]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"),
}

# Machine → the architecture labels (Go's spelling) that Docker-form profiles use
# in includes/excludes ``arches``.
_ARCH_LABELS: Final[dict[str, frozenset[str]]] = {
    "x86_64": frozenset({"amd64"}),
    "aarch64": frozenset({"arm64"}),
}

def _names(text: str) -> frozenset[str]:
    """Syscall names from a whitespace-separated block (keeps the tables compact)."""
    return frozenset(text.split())


# Allowed for every container. Names unknown to the host's libseccomp are
# skipped by the runtime, so 32-bit and newer-kernel names are harmless here.
_ALWAYS_ALLOWED: Final[frozenset[str]] = _names(
    """
    accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32
    clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime
    clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect
    copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old
    epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit
    exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
    fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr
    flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync
    ftruncate ftruncate64 futex futex_time64 futex_waitv futimesat getcpu getcwd getdents
    getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32
    getitimer getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid
    getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid getsockname
    getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr inotify_add_watch
    inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents
    io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit
    io_uring_enter io_uring_register io_uring_setup ipc kill landlock_add_rule
    landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat
    listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise
    membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock mlock2
    mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
    mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl msgget
    msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat
    _newselect open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc
    pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64
    process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read readahead
    readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg
    remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq
    rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
    rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr
    sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler
    sched_rr_get_interval sched_rr_get_interval_time64 sched_setaffinity sched_setattr
    sched_setparam sched_setscheduler sched_yield seccomp select semctl semget semop
    semtimedop semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid
    setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid
    setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid
    setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address
    setuid setuid32 setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd
    signalfd4 sigprocmask sigreturn socketcall socketpair splice stat stat64 statfs statfs64
    statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
    timer_delete timer_getoverrun timer_gettime timer_gettime64 timer_settime
    timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
    timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat
    utime utimensat utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
    process_vm_readv process_vm_writev ptrace
    """
)
# ptrace and process_vm_* are safe for everyone on kernels >= 4.8 (seccomp is
# re-checked after a ptrace stop there); crib does not run on older kernels.

# Allowed only on one machine (its own architectural syscalls).
_MACHINE_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "x86_64": frozenset({"arch_prctl", "modify_ldt"}),
    "aarch64": frozenset(
        {
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "sync_file_range2",
            "breakpoint",
            "cacheflush",
            "set_tls",
        }
    ),
}

# Allowed only when the container holds the capability that guards them.
_CAPABILITY_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "CAP_DAC_READ_SEARCH": frozenset({"open_by_handle_at"}),
    "CAP_SYS_ADMIN": _names(
        """
        bpf clone clone3 fanotify_init fsconfig fsmount fsopen fspick lookup_dcookie mount
        mount_setattr move_mount open_tree perf_event_open quotactl quotactl_fd
        setdomainname sethostname setns syslog umount umount2 unshare
        """
    ),
    "CAP_SYS_BOOT": frozenset({"reboot"}),
    "CAP_SYS_CHROOT": frozenset({"chroot"}),
    "CAP_SYS_MODULE": frozenset({"delete_module", "init_module", "finit_module"}),
    "CAP_SYS_PACCT": frozenset({"acct"}),
    "CAP_SYS_PTRACE": frozenset({"kcmp", "pidfd_getfd", "process_madvise"}),
    "CAP_SYS_RAWIO": frozenset({"iopl", "ioperm"}),
    "CAP_SYS_TIME": frozenset({"settimeofday", "stime", "clock_settime", "clock_settime64"}),
    "CAP_SYS_TTY_CONFIG": frozenset({"vhangup"}),
    "CAP_SYS_NICE": frozenset(
        {"get_mempolicy", "mbind", "set_mempolicy", "set_mempolicy_home_node"}
    ),
    "CAP_SYSLOG": frozenset({"syslog"}),
    "CAP_BPF": frozenset({"bpf"}),
    "CAP_PERFMON": frozenset({"perf_event_open"}),
}

_MAX_PROFILE_BYTES: Final = 4 * 1024 * 1024
_OCI_KEYS: Final = ("defaultAction", "defaultErrnoRet", "flags", "listenerPath",
                    "listenerMetadata")


def host_machine() -> str:
    """The host's machine name as uname(2) gives it (``x86_64``, ``aarch64``)."""
    return platform.machine()


def _allow(names: Iterable[str]) -> dict[str, Any]:
    return {"names": sorted(names), "action": "SCMP_ACT_ALLOW"}


def _arg(index: int, value: int, op: str, value_two: int | None = None) -> dict[str, Any]:
    arg: dict[str, Any] = {"index": index, "value": value, "op": op}
    if value_two is not None:
        arg["valueTwo"] = value_two
    return arg


def default_profile(capabilities: Iterable[str], machine: str | None = None) -> dict[str, Any]:
    """crib's RuntimeDefault profile for a container holding ``capabilities``.

    ``capabilities`` are canonical names (``CAP_SYS_ADMIN``); ``machine`` is
    uname's machine name, the host's when None.
    """
    caps = frozenset(capabilities)
    machine = machine or host_machine()
    allowed = set(_ALWAYS_ALLOWED) | _MACHINE_ALLOWED.get(machine, frozenset())
    for cap, names in _CAPABILITY_ALLOWED.items():
        if cap in caps:
            allowed |= names
    rules: list[dict[str, Any]] = [_allow(allowed)]
    # socket: everything but AF_VSOCK (a way out of a VM-based sandbox).
    rules.append({**_allow(["socket"]), "args": [_arg(0, AF_VSOCK, "SCMP_CMP_NE")]})
    for persona in _PERSONALITIES:
        rules.append({**_allow(["personality"]), "args": [_arg(0, persona, "SCMP_CMP_EQ")]})
    if "CAP_SYS_ADMIN" not in caps:
        # clone without namespace flags only; the flags are in arg 0 except on s390.
        rules.append(
            {
                **_allow(["clone"]),
                "args": [_arg(0, CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ", 0)],
            }
        )
        # clone3 passes its flags in memory, out of seccomp's sight: answer ENOSYS
        # so that libc falls back to clone, which the rule above can check.
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "architectures": list(ARCHITECTURES.get(machine, ())),
        "syscalls": rules,
    }


def _conditions_hold(
    entry: Mapping[str, Any], caps: frozenset[str], arches: frozenset[str]
) -> bool:
    """Evaluate a Docker-form rule's ``includes``/``excludes`` for this container."""
    includes = entry.get("includes") or {}
    excludes = entry.get("excludes") or {}
    if not isinstance(includes, Mapping) or not isinstance(excludes, Mapping):
        raise InvalidArgument("seccomp rule includes/excludes must be objects")
    inc_caps = set(includes.get("caps") or [])
    if inc_caps and not inc_caps <= caps:
        return False
    inc_arches = set(includes.get("arches") or [])
    if inc_arches and not inc_arches & arches:
        return False
    if set(excludes.get("caps") or []) & caps:
        return False
    # minKernel conditions are taken as met: crib needs a kernel newer than any
    # minimum a profile states in practice.
    return not set(excludes.get("arches") or []) & arches


def _convert_arg(arg: Any, origin: str) -> dict[str, Any]:
    if not isinstance(arg, Mapping) or "op" not in arg:
        raise InvalidArgument(f"seccomp profile {origin}: malformed syscall argument {arg!r}")
    try:
        return _arg(
            int(arg.get("index", 0)),
            int(arg.get("value", 0)),
            str(arg["op"]),
            int(arg["valueTwo"]) if arg.get("valueTwo") else None,
        )
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"seccomp profile {origin}: malformed syscall argument {arg!r}"
        ) from None


def to_oci(
    profile: Mapping[str, Any],
    capabilities: Iterable[str],
    machine: str | None = None,
    origin: str = "profile",
) -> dict[str, Any]:
    """Turn a profile in Docker or OCI form into OCI runtime-spec ``linux.seccomp``."""
    machine = machine or host_machine()
    caps = frozenset(capabilities)
    arches = _ARCH_LABELS.get(machine, frozenset())
    action = profile.get("defaultAction")
    if not isinstance(action, str) or not action.startswith("SCMP_ACT_"):
        raise InvalidArgument(f"seccomp profile {origin}: missing or invalid defaultAction")
    out: dict[str, Any] = {k: profile[k] for k in _OCI_KEYS if k in profile}
    if "architectures" in profile:
        out["architectures"] = list(profile["architectures"] or [])
    elif "archMap" in profile:
        native = ARCHITECTURES.get(machine, ("",))[0]
        for entry in profile.get("archMap") or []:
            if isinstance(entry, Mapping) and entry.get("architecture") == native:
                out["architectures"] = [native, *(entry.get("subArchitectures") or [])]
    rules = profile.get("syscalls")
    if rules is None:
        rules = []
    if not isinstance(rules, list):
        raise InvalidArgument(f"seccomp profile {origin}: syscalls must be a list")
    out["syscalls"] = []
    for entry in rules:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("action"), str):
            raise InvalidArgument(f"seccomp profile {origin}: malformed syscall rule {entry!r}")
        if not _conditions_hold(entry, caps, arches):
            continue
        names = list(entry.get("names") or [])
        if entry.get("name"):
            names.append(entry["name"])
        if not names or not all(isinstance(n, str) for n in names):
            raise InvalidArgument(f"seccomp profile {origin}: syscall rule without names")
        rule: dict[str, Any] = {"names": names, "action": entry["action"]}
        if entry.get("errnoRet") is not None:
            rule["errnoRet"] = int(entry["errnoRet"])
        if entry.get("args"):
            rule["args"] = [_convert_arg(a, origin) for a in entry["args"]]
        out["syscalls"].append(rule)
    return out


def load_localhost_profile(
    path: str, capabilities: Iterable[str], machine: str | None = None
) -> dict[str, Any]:
    """Load the JSON profile at the absolute ``path`` and return it in OCI form.

    A relative path, a missing or unreadable file and malformed JSON are all
    InvalidArgument naming the path.
    """
    if not os.path.isabs(path):
        raise InvalidArgument(f"seccomp Localhost profile path {path!r} is not absolute")
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_PROFILE_BYTES + 1)
    except OSError as err:
        raise InvalidArgument(
            f"cannot read seccomp Localhost profile {path!r}: {err.strerror}"
        ) from None
    if len(raw) > _MAX_PROFILE_BYTES:
        raise InvalidArgument(f"seccomp Localhost profile {path!r} is larger than 4 MiB")
    try:
        profile = json.loads(raw)
    except ValueError as err:
        raise InvalidArgument(f"seccomp Localhost profile {path!r} is not JSON: {err}") from None
    if not isinstance(profile, dict):
        raise InvalidArgument(f"seccomp Localhost profile {path!r} is not a JSON object")
    return to_oci(profile, capabilities, machine, origin=repr(path))
