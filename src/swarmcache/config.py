"""Configuration: TOML file + SWARMCACHE_<SECTION>_<KEY> overrides -> frozen dataclasses.

The schema below is the single list of keys; the parser, the environment overrides
and the error messages all come from it, so a key added here is documented in
config/swarmcache.toml and nowhere else needs to change.
"""

from __future__ import annotations

import base64
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

DEFAULT_CONFIG_PATHS = ("/etc/swarmcache/swarmcache.toml",)
ENV_CONFIG = "SWARMCACHE_CONFIG"

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1024,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1024**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1024**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1024**4,
    "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_size(value: object) -> int:
    """Parse a byte size: an integer, or a string such as "4MiB", "50GiB", "512K".

    Binary units only (KB means KiB): operators write "GB" and mean GiB.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '4MiB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as '4MiB', got {value!r}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse size {value!r} (use e.g. 4MiB, 50GiB, 1TiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_duration(value: object) -> float:
    """Parse a duration in seconds: a number, or a string such as "500ms", "30s", "2m"."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '30s', got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):  # TOML has nan and inf
            raise ValueError(f"duration must be a finite number, got {value}")
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as '30s', got {value!r}")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f"cannot parse duration {value!r} (use e.g. 500ms, 30s, 2m)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_size(n: int) -> str:
    """Render a byte count for humans (binary units)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _parse_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _parse_int(value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _parse_bool(value: object) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return parse


def _listen(value: object) -> str:
    text = _parse_str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {text!r}")
    return text


def _listen_or_off(value: object) -> str:
    """host:port, or "" (off)."""
    return _listen(value) if value != "" else ""


def _str_list(value: object) -> tuple[str, ...]:
    """A TOML array of strings, or (from the environment) a comma-separated string."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _peer_list(value: object) -> tuple[str, ...]:
    peers = _str_list(value)
    for peer in peers:
        _listen(peer)
    return peers


def _key_list(value: object) -> tuple[str, ...]:
    """Public keys: base64 of 32 raw bytes each (see signing.py)."""
    keys = _str_list(value)
    for key in keys:
        try:
            raw = base64.b64decode(key, validate=True)
        except ValueError:
            raise ValueError(f"not a base64 key: {key[:60]!r}") from None
        if len(raw) != 32:
            raise ValueError(f"a public key is 32 bytes (44 base64 characters): {key[:60]!r}")
    return keys


def _nonnegative(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def check(value: object) -> Any:
        result = parse(value)
        if result < 0:
            raise ValueError(f"must not be negative, got {value!r}")
        return result

    return check


def _positive(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def check(value: object) -> Any:
        result = parse(value)
        if result <= 0:
            raise ValueError(f"must be greater than zero, got {value!r}")
        return result

    return check


# section -> key -> (parser, default). Defaults are the documented ones.
SCHEMA: dict[str, dict[str, tuple[Callable[[object], Any], Any]]] = {
    "daemon": {
        "listen": (_listen, "0.0.0.0:7480"),
        "advertise": (_parse_str, ""),
        "log_level": (_choice("debug", "info", "warning", "error"), "info"),
        "access_log": (_parse_bool, False),
        "role": (_choice("host", "seeder"), "host"),
    },
    "cache": {
        "dir": (_parse_str, "/var/lib/swarmcache"),
        "max_size": (_positive(parse_size), parse_size("50GiB")),
        "chunk_size": (_positive(parse_size), parse_size("4MiB")),
    },
    "origin": {
        "kind": (_choice("http", "directory", "glance"), "http"),
        "url": (_parse_str, "http://origin.example:8080/images/{image_id}"),
        "path": (_parse_str, "/srv/images"),
        "concurrency": (_positive(_parse_int), 4),
        "retries": (_parse_int, 4),
        "retry_backoff": (parse_duration, 0.5),
        "connect_timeout": (_positive(parse_duration), 5.0),
        "read_timeout": (_positive(parse_duration), 30.0),
        "min_rate": (_positive(parse_size), parse_size("1MiB")),
        "checksum_sidecar": (_parse_bool, True),
        # kind=glance: a token in a file, or Keystone v3 (secrets from files only)
        "token_file": (_parse_str, ""),
        "auth_url": (_parse_str, ""),
        "username": (_parse_str, ""),
        "password_file": (_parse_str, ""),
        "user_domain_name": (_parse_str, "Default"),
        "project_name": (_parse_str, ""),
        "project_domain_name": (_parse_str, "Default"),
        "application_credential_id": (_parse_str, ""),
        "application_credential_secret_file": (_parse_str, ""),
    },
    "discovery": {
        "mdns": (_parse_bool, True),
        "interfaces": (_str_list, ()),
        "static_peers": (_peer_list, ()),
    },
    "peers": {
        "concurrency": (_positive(_parse_int), 1),
        "timeout": (_positive(parse_duration), 10.0),
        "quarantine": (_positive(parse_duration), 300.0),
        "degree": (_positive(_parse_int), 12),
        "block_size": (_positive(parse_size), parse_size("256KiB")),
    },
    "glance_api": {
        "listen": (_listen_or_off, ""),
    },
    "warm": {
        "concurrency": (_positive(_parse_int), 2),
    },
    "limits": {
        "upload_rate": (_nonnegative(parse_size), 0),
        "download_rate": (_nonnegative(parse_size), 0),
        "origin_rate": (_nonnegative(parse_size), 0),
        "max_peer_connections": (_nonnegative(_parse_int), 512),
    },
    "security": {
        "cluster_secret_file": (_parse_str, ""),
        "chunk_digest": (_choice("blake3", "sha256", "xxh3"), "blake3"),
        "manifest_key_file": (_parse_str, ""),
        "api_token_file": (_parse_str, ""),
        "trusted_manifest_keys": (_key_list, ()),
        "tls_cert": (_parse_str, ""),
        "tls_key": (_parse_str, ""),
        "tls_ca": (_parse_str, ""),
    },
}

_MAX_CHUNK = 256 * 1024**2
_MIN_CHUNK = 64 * 1024


@dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: where the API listens and how loud the log is."""

    listen: str = "0.0.0.0:7480"
    log_level: str = "info"
    access_log: bool = False
    advertise: str = ""
    role: str = "host"  # "seeder": fetches ahead of demand and signs manifests

    @property
    def host(self) -> str:
        """Host part of `listen` (brackets of an IPv6 literal removed)."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """Port part of `listen`."""
        return int(self.listen.rpartition(":")[2])


@dataclass(frozen=True)
class CacheConfig:
    """[cache]: the on-disk store."""

    dir: Path = Path("/var/lib/swarmcache")
    max_size: int = 50 * 1024**3
    chunk_size: int = 4 * 1024**2


@dataclass(frozen=True)
class OriginConfig:
    """[origin]: where images come from when nobody nearer has them."""

    kind: Literal["http", "directory", "glance"] = "http"
    url: str = "http://origin.example:8080/images/{image_id}"
    path: Path = Path("/srv/images")
    concurrency: int = 4
    retries: int = 4
    retry_backoff: float = 0.5
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    min_rate: int = 1024**2
    checksum_sidecar: bool = True
    token_file: str = ""
    auth_url: str = ""
    username: str = ""
    password_file: str = ""
    user_domain_name: str = "Default"
    project_name: str = ""
    project_domain_name: str = "Default"
    application_credential_id: str = ""
    application_credential_secret_file: str = ""


@dataclass(frozen=True)
class DiscoveryConfig:
    """[discovery]: how daemons find each other."""

    mdns: bool = True
    interfaces: tuple[str, ...] = ()
    static_peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeersConfig:
    """[peers]: block exchange between daemons."""

    concurrency: int = 1
    timeout: float = 10.0
    quarantine: float = 300.0
    degree: int = 12
    block_size: int = 256 * 1024


@dataclass(frozen=True)
class GlanceApiConfig:
    """[glance_api]: the Glance-compatible endpoint for nova-compute and the clients."""

    listen: str = ""  # host:port; "" = off


@dataclass(frozen=True)
class WarmConfig:
    """[warm]: pre-warming caches across hosts."""

    concurrency: int = 2  # images one daemon warms at once


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]: bandwidth caps in bytes/s (0: none) and concurrent peer requests."""

    upload_rate: int = 0
    download_rate: int = 0
    origin_rate: int = 0
    max_peer_connections: int = 512


@dataclass(frozen=True)
class SecurityConfig:
    """[security]: who may talk to whom."""

    cluster_secret_file: str = ""  # "": peer requests are not authenticated
    chunk_digest: str = "blake3"  # of chunks and blocks in new manifests (manifest.DIGEST_ALGOS)
    manifest_key_file: str = ""  # a seeder's Ed25519 key: it signs manifests
    api_token_file: str = ""  # the client API's token for callers not on this host
    trusted_manifest_keys: tuple[str, ...] = ()  # base64 public keys whose signatures we trust
    tls_cert: str = ""  # mutual TLS (tls.py): this host's certificate (PEM)
    tls_key: str = ""  # its private key (PEM)
    tls_ca: str = ""  # the cluster CA's certificate(s): what signed it is a member


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration."""

    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    origin: OriginConfig = field(default_factory=OriginConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    glance_api: GlanceApiConfig = field(default_factory=GlanceApiConfig)
    warm: WarmConfig = field(default_factory=WarmConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    source: str = "<defaults>"


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Config:
    """Read a TOML file (None: defaults only), apply environment overrides, validate."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(source, "", "file not found") from None
        except OSError as err:
            raise ConfigError(source, "", f"cannot read: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(source, "", f"invalid TOML: {err}") from None
    return build_config(raw, env, source)


def build_config(raw: Mapping[str, Any], env: Mapping[str, str], source: str) -> Config:
    """Validate a parsed TOML document plus overrides against SCHEMA."""
    values: dict[str, dict[str, Any]] = {
        s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items()
    }
    for section, table in raw.items():
        if section not in SCHEMA:
            raise ConfigError(source, section, f"unknown section [{section}]")
        if not isinstance(table, dict):
            raise ConfigError(source, section, "expected a table")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise ConfigError(source, f"{section}.{key}", "unknown key")
            values[section][key] = _parse(source, section, key, value)
    for name, value in env.items():
        if not name.startswith("SWARMCACHE_") or name == ENV_CONFIG:
            continue
        if name.startswith("SWARMCACHE_TEST_"):  # test-only fault switches, not config
            continue
        section, _, key = name[len("SWARMCACHE_") :].lower().partition("_")
        if section not in SCHEMA or key not in SCHEMA[section]:
            raise ConfigError(f"environment {name}", "", "no such configuration key")
        values[section][key] = _parse(f"environment {name}", section, key, value)
    cache = values["cache"]
    if not _MIN_CHUNK <= cache["chunk_size"] <= _MAX_CHUNK:
        raise ConfigError(source, "cache.chunk_size", "must be between 64KiB and 256MiB")
    # a chunk smaller than a block is one block
    block = values["peers"]["block_size"] = min(values["peers"]["block_size"], cache["chunk_size"])
    if block < 16 * 1024 or cache["chunk_size"] % block:
        raise ConfigError(
            source, "peers.block_size", "must be at least 16KiB and divide cache.chunk_size"
        )
    if values["peers"]["degree"] > 64:
        raise ConfigError(source, "peers.degree", "must be at most 64")
    origin = values["origin"]
    if origin["kind"] == "http" and "{image_id}" not in origin["url"]:
        raise ConfigError(source, "origin.url", "must contain {image_id}")
    if origin["kind"] == "http" and not origin["url"].startswith(("http://", "https://")):
        raise ConfigError(source, "origin.url", "must start with http:// or https://")
    if origin["kind"] == "glance":
        _check_glance(source, origin)
    if values["glance_api"]["listen"] and origin["kind"] != "glance":
        raise ConfigError(
            source, "glance_api.listen", 'needs origin.kind = "glance" (it passes requests to it)'
        )
    if origin["retries"] < 0:
        raise ConfigError(source, "origin.retries", "must not be negative")
    security = values["security"]
    seeder = values["daemon"]["role"] == "seeder"
    if seeder and not security["manifest_key_file"]:
        raise ConfigError(source, "security.manifest_key_file", "a seeder needs a key to sign with")
    if security["manifest_key_file"] and not seeder:
        raise ConfigError(
            source, "security.manifest_key_file", 'only a daemon.role = "seeder" signs'
        )
    if (seeder or security["trusted_manifest_keys"]) and security["chunk_digest"] == "xxh3":
        raise ConfigError(
            source, "security.chunk_digest", "signed manifests need blake3 or sha256 digests"
        )
    return Config(
        daemon=DaemonConfig(**values["daemon"]),
        cache=CacheConfig(
            dir=Path(cache["dir"]), max_size=cache["max_size"], chunk_size=cache["chunk_size"]
        ),
        origin=OriginConfig(**{**origin, "path": Path(origin["path"])}),
        discovery=DiscoveryConfig(**values["discovery"]),
        peers=PeersConfig(**values["peers"]),
        glance_api=GlanceApiConfig(**values["glance_api"]),
        warm=WarmConfig(**values["warm"]),
        security=SecurityConfig(**values["security"]),
        limits=LimitsConfig(**values["limits"]),
        source=source,
    )


def _check_glance(source: str, origin: dict[str, Any]) -> None:
    """kind=glance: an endpoint URL, and at most one complete way to authenticate."""
    url = origin["url"]
    if not url.startswith(("http://", "https://")) or "{image_id}" in url:
        raise ConfigError(
            source, "origin.url", "must be the Glance endpoint, e.g. http://glance.example:9292"
        )
    keystone = ("username", "password_file", "application_credential_id")
    if origin["token_file"] and (origin["auth_url"] or any(origin[k] for k in keystone)):
        raise ConfigError(source, "origin.token_file", "use a token_file or Keystone, not both")
    if not origin["auth_url"]:
        for key in (*keystone, "application_credential_secret_file"):
            if origin[key]:
                raise ConfigError(source, f"origin.{key}", "needs origin.auth_url")
        return
    if origin["application_credential_id"]:
        if not origin["application_credential_secret_file"]:
            raise ConfigError(
                source, "origin.application_credential_secret_file", "is required with an id"
            )
        if origin["username"] or origin["password_file"]:
            raise ConfigError(
                source, "origin.username", "use a password or an application credential, not both"
            )
        return
    for key in ("username", "password_file"):
        if not origin[key]:
            raise ConfigError(
                source,
                f"origin.{key}",
                "is required with auth_url (or use application_credential_id)",
            )


def _parse(source: str, section: str, key: str, value: object) -> Any:
    parser, _ = SCHEMA[section][key]
    try:
        return parser(value)
    except ValueError as err:
        raise ConfigError(source, f"{section}.{key}", str(err)) from None


MAX_SECRET_BYTES = 64 * 1024


def read_secret(path: str | os.PathLike[str], key: str, min_bytes: int = 1) -> str:
    """The first line of a secret file (a token, a password, the cluster secret),
    stripped; ConfigError naming the key `key` ("section.key") if it cannot be read,
    is not one line, or is shorter than `min_bytes`."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as err:
        raise ConfigError(str(path), key, f"cannot read: {err.strerror}") from None
    lines = data.decode("utf-8", "replace").strip().splitlines()
    if len(data) > MAX_SECRET_BYTES or not lines or not lines[0].strip():
        raise ConfigError(str(path), key, "empty or not a one-line secret")
    secret = lines[0].strip()
    if len(secret.encode()) < min_bytes:
        raise ConfigError(str(path), key, f"a secret of at least {min_bytes} bytes is needed")
    return secret


def config_path_from(arg: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """The config file: --config, else $SWARMCACHE_CONFIG, else the system file if present."""
    env = os.environ if env is None else env
    if arg:
        return arg
    if env.get(ENV_CONFIG):
        return env[ENV_CONFIG]
    for candidate in DEFAULT_CONFIG_PATHS:
        if os.path.exists(candidate):
            return candidate
    return None
