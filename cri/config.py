"""crib's configuration: built-in defaults, one TOML file, drop-ins, then flags.

Order of precedence (later wins): the defaults below, the main file
(`/etc/crib/crib.toml`; a missing file means defaults), every `*.toml` in the
drop-in directory (`/etc/crib/crib.d`) in lexical order, the command-line flags.
Unknown keys and invalid values stop the start with a ConfigError that names
the file, the key and the value.

Every option is a dataclass field whose metadata carries its documentation;
`render_default()` prints the whole default configuration as commented TOML
from those same fields, so the docs cannot drift from the code.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

DEFAULT_CONFIG_FILE = Path("/etc/crib/crib.toml")
DEFAULT_DROPIN_DIR = Path("/etc/crib/crib.d")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem, with where it came from."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: {message}")


def opt(default: Any, doc: str, *, choices: Iterable[str] = (), minimum: float | None = None,
        absolute: bool = False) -> Any:
    """A config field: its default, its documentation and its constraints."""
    meta = {"doc": doc, "choices": tuple(choices), "minimum": minimum, "absolute": absolute}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ApiConfig:
    """The gRPC endpoint the kubelet and crictl talk to."""

    listen: str = opt("/run/crib/crib.sock", "Unix socket serving the CRI (mode 0660).",
                      absolute=True)
    max_recv_msg_size: int = opt(16 * 1024 * 1024, "Largest request accepted, in bytes.",
                                 minimum=1024)
    max_send_msg_size: int = opt(16 * 1024 * 1024, "Largest response sent, in bytes.",
                                 minimum=1024)
    shutdown_grace: float = opt(10.0, "Seconds in-flight calls get to finish on SIGTERM.",
                                minimum=0)


@dataclass
class HandlerConfig:
    """One OCI runtime handler (a RuntimeClass's `handler`)."""

    path: str = opt("", "Path of the OCI runtime binary.", absolute=True)
    root: str = opt("", "State directory passed as --root; empty = <runroot>/runtimes/<name>.")


def _default_handlers() -> dict[str, HandlerConfig]:
    return {
        "runc": HandlerConfig(path="/usr/sbin/runc"),
        "crun": HandlerConfig(path="/usr/bin/crun"),
    }


@dataclass
class RuntimeConfig:
    """Containers: OCI runtimes, the monitor, cgroups."""

    default_handler: str = opt("runc", "Handler used when a pod names none.")
    conmon: str = opt("/usr/bin/conmon", "Path of the conmon container monitor.", absolute=True)
    cgroup_driver: str = opt("cgroupfs", "How pod cgroups are named: cgroupfs or systemd.",
                             choices=("cgroupfs", "systemd"))
    clamp_oom_score_adj: bool = opt(
        True, "Raise an oom_score_adj below the daemon's own to the daemon's value instead of "
        "failing (needed where root lacks CAP_SYS_RESOURCE).")
    infra_binary: str = opt("/usr/bin/catatonit",
                            "Init that holds a pod's shared PID namespace.", absolute=True)
    pids_limit: int = opt(0, "Default pids limit per container; 0 = unlimited.", minimum=0)
    exec_output_limit: int = opt(16 * 1024 * 1024,
                                 "Bytes of stdout and of stderr ExecSync returns at most.",
                                 minimum=1024)
    event_buffer: int = opt(1000, "Container events buffered per GetContainerEvents stream; a "
                                  "subscriber that falls further behind is dropped "
                                  "(RESOURCE_EXHAUSTED).", minimum=1)
    event_replay_window: float = opt(60.0, "Seconds after start during which new "
                                           "GetContainerEvents streams first receive the events "
                                           "of exits found at start.", minimum=0)
    handlers: dict[str, HandlerConfig] = field(
        default_factory=_default_handlers,
        metadata={"doc": "OCI runtime handlers by name ([runtime.handlers.<name>])."})


@dataclass
class ImageConfig:
    """Pulling and storing images."""

    registries_conf: str = opt("/etc/containers/registries.conf",
                               "containers-registries.conf(5) file (v2 format).", absolute=True)
    registries_conf_dir: str = opt("/etc/containers/registries.conf.d",
                                   "Drop-in directory for registries.conf.", absolute=True)
    auth_file: str = opt("", "containers-auth.json(5) credentials file; empty = none.")
    insecure_registries: list[str] = opt([], "Registries reached over plain HTTP or "
                                             "unverified TLS, in addition to registries.conf.")
    max_concurrent_downloads: int = opt(3, "Layers fetched in parallel per pull.", minimum=1)
    pull_progress_timeout: float = opt(60.0, "Seconds without a byte before a pull fails.",
                                       minimum=1)
    pull_retries: int = opt(4, "Retries of a failed registry request.", minimum=0)
    pinned_images: list[str] = opt(
        [], "Images reported pinned, which the kubelet's image GC keeps: exact names or "
            "ids, name* globs, *keyword* patterns (matched against repo tags and digests).")


@dataclass
class NetworkConfig:
    """Pod networking through CNI."""

    cni_conf_dir: str = opt("/etc/cni/net.d", "CNI network configurations; the lexically "
                                              "first valid one is used.", absolute=True)
    cni_plugin_dirs: list[str] = opt(["/usr/lib/cni", "/opt/cni/bin"],
                                     "Directories searched for CNI plugins.")
    default_network: bool = opt(False, "With no CNI config, use crib's built-in network "
                                       "(bridge + host-local + portmap; crib brings up lo itself).")
    default_network_subnet: str = opt("10.89.0.0/16", "Pod subnet of the built-in network.")
    default_network_bridge: str = opt("crib0", "Bridge of the built-in network.")


@dataclass
class TracingConfig:
    """OpenTelemetry tracing: one span per RPC, child spans around runc, CNI, registries."""

    exporter: str = opt("none", "none, console or otlp (needs opentelemetry-exporter-otlp).",
                        choices=("none", "console", "otlp"))
    otlp_endpoint: str = opt("http://127.0.0.1:4317", "OTLP/gRPC collector endpoint.")
    sample_ratio: float = opt(1.0, "Fraction of RPCs traced.", minimum=0)


@dataclass
class MetricsConfig:
    """Prometheus metrics endpoint."""

    enabled: bool = opt(False, "Serve metrics over HTTP.")
    address: str = opt("127.0.0.1:9537", "host:port of the metrics endpoint.")


@dataclass
class StreamingConfig:
    """The exec/attach/port-forward streaming server."""

    address: str = opt("127.0.0.1", "Address the streaming server listens on.")
    port: int = opt(10010, "Port of the streaming server.", minimum=0)
    tls_cert: str = opt("", "PEM certificate for TLS; empty = plain HTTP.")
    tls_key: str = opt("", "PEM key for TLS.")
    url_ttl: float = opt(60.0, "Seconds a streaming URL stays valid.", minimum=1)


@dataclass
class Config:
    """The whole configuration."""

    root: str = opt("/var/lib/crib", "Persistent state: images, sandbox and container "
                                     "records.", absolute=True)
    runroot: str = opt("/run/crib", "Volatile state: pinned namespaces, sockets, locks.",
                       absolute=True)
    log_level: str = opt("info", "debug, info, warning or error.", choices=LOG_LEVELS)
    api: ApiConfig = field(default_factory=ApiConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)

    def handler(self, name: str) -> HandlerConfig:
        """The handler called `name` ('' = the default) with its derived state root."""
        name = name or self.runtime.default_handler
        found = self.runtime.handlers[name]
        root = found.root or str(Path(self.runroot) / "runtimes" / name)
        return HandlerConfig(path=found.path, root=root)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(
        tp, "a list of strings" if get_origin(tp) is list else "a table")


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check one scalar/list value against its declared type."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if get_origin(tp) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, key, f"{value!r} is not {_type_name(tp)}")
        return list(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(source, key, f"{value!r} is not {_type_name(tp)}")
    if not isinstance(value, tp):
        raise ConfigError(source, key, f"{value!r} is not {_type_name(tp)}")
    return value


def _check_constraints(f: dataclasses.Field[Any], value: Any, source: str, key: str) -> None:
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(source, key, f"{value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(source, key, f"{value!r} is below the minimum {meta['minimum']}")
    if meta.get("absolute") and value and not os.path.isabs(value):
        raise ConfigError(source, key, f"{value!r} is not an absolute path")


def _apply(obj: Any, data: dict[str, Any], source: str, prefix: str) -> None:
    """Overlay a parsed TOML table onto a config dataclass, validating as it goes."""
    hints = get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        f = fields.get(key)
        if f is None:
            raise ConfigError(source, dotted, "unknown key")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(source, dotted, f"{value!r} is not a table")
            _apply(getattr(obj, key), value, source, dotted + ".")
        elif get_origin(tp) is dict:
            if not isinstance(value, dict):
                raise ConfigError(source, dotted, f"{value!r} is not a table")
            current = getattr(obj, key)
            item_type = get_args(tp)[1]
            for name, sub in value.items():
                if not isinstance(sub, dict):
                    raise ConfigError(source, f"{dotted}.{name}", f"{sub!r} is not a table")
                target = current.get(name) or item_type()
                _apply(target, sub, source, f"{dotted}.{name}.")
                current[name] = target
        else:
            checked = _coerce(tp, value, source, dotted)
            _check_constraints(f, checked, source, dotted)
            setattr(obj, key, checked)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "(file)", f"invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(str(path), "(file)", f"cannot read: {exc.strerror}") from None


def _validate_whole(cfg: Config, source: str) -> None:
    handlers = cfg.runtime.handlers
    if cfg.runtime.default_handler not in handlers:
        raise ConfigError(source, "runtime.default_handler",
                          f"{cfg.runtime.default_handler!r} is not a configured handler "
                          f"({', '.join(sorted(handlers)) or 'none'})")
    for name, h in handlers.items():
        if not h.path:
            raise ConfigError(source, f"runtime.handlers.{name}.path", "must be set")
    from imageservice.pinning import pattern_error  # late: config stays import-light

    for pattern in cfg.image.pinned_images:
        problem = pattern_error(pattern)
        if problem is not None:
            raise ConfigError(source, "image.pinned_images", problem)


def load(config_file: Path | None = None, dropin_dir: Path | None = None,
         overrides: dict[str, Any] | None = None) -> Config:
    """Build the effective configuration.

    `config_file` None means the default path, where a missing file is fine; an
    explicitly named file must exist. `overrides` are flag values by dotted key.
    """
    cfg = Config()
    explicit = config_file is not None
    path = config_file or DEFAULT_CONFIG_FILE
    if path.exists() or explicit:
        _apply(cfg, _read_toml(path), str(path), "")
    dropins = dropin_dir or DEFAULT_DROPIN_DIR
    if dropins.is_dir():
        for item in sorted(dropins.glob("*.toml")):
            _apply(cfg, _read_toml(item), str(item), "")
    for dotted, value in (overrides or {}).items():
        *parents, last = dotted.split(".")
        table: dict[str, Any] = {last: value}
        for parent in reversed(parents):
            table = {parent: table}
        _apply(cfg, table, "command line", "")
    _validate_whole(cfg, str(path))
    return cfg


# ---------------------------------------------------------------- rendering


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")


def _render_table(obj: Any, name: str, lines: list[str]) -> None:
    nested: list[tuple[str, Any]] = []
    if name:
        doc = (type(obj).__doc__ or "").strip()
        lines += ["", f"# {doc}", f"[{name}]"]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            nested.append((f.name, value))
            continue
        lines.append(f"# {f.metadata['doc']}")
        lines.append(f"{f.name} = {_toml_value(value)}")
    for key, value in nested:
        sub = f"{name}.{key}" if name else key
        if isinstance(value, dict):
            for item_name, item in value.items():
                _render_table(item, f"{sub}.{item_name}", lines)
        else:
            _render_table(value, sub, lines)


def render_default() -> str:
    """The complete default configuration as commented TOML."""
    lines = ["# crib configuration (defaults). Drop-ins in /etc/crib/crib.d/*.toml",
             "# override this file in lexical order; command-line flags override both."]
    _render_table(Config(), "", lines)
    return "\n".join(lines) + "\n"
