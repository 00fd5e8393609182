"""Tollgate's configuration: `config.yaml` parsed into frozen dataclasses.

Everything is validated once, at start-up. An error names its source (the file
or an environment variable), the key path and the problem, for example
``config.yaml: rate_limits.rpm: must be a positive integer (at most 10^12)``.
Unknown keys are errors. Secrets (the master key and the key presented to
LiteLLM) come only from the environment; a secret written into the file is
refused.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Mapping, Union, get_args, get_origin, get_type_hints
from urllib.parse import parse_qs, urlsplit

import yaml

ENV_CONFIG = "TOLLGATE_CONFIG"
ENV_MASTER_KEY = "TOLLGATE_MASTER_KEY"
ENV_UPSTREAM_KEY = "TOLLGATE_UPSTREAM_KEY"
# Environment variables that override a key of the file (the environment wins).
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "TOLLGATE_UPSTREAM_URL": ("upstream", "url"),
    "TOLLGATE_DATABASE_URL": ("database", "url"),
    "TOLLGATE_REDIS_URL": ("redis", "url"),
}
SECRET_KEYS = {
    ("master_key",): ENV_MASTER_KEY,
    ("upstream", "key"): ENV_UPSTREAM_KEY,
    ("upstream", "api_key"): ENV_UPSTREAM_KEY,
}


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Rule:
    """How a value must look: a description for messages, a check, a converter."""

    description: str
    check: Callable[[Any], bool] = lambda value: True
    convert: Callable[[Any], Any] | None = None
    # What is still wrong with a value that passes `check`, said more precisely than the
    # description can (a URL's port, say); None when nothing is.
    problem: Callable[[Any], str | None] = lambda value: None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``"500ms"``, ``"30s"``, ``"24h"``."""
    if not (isinstance(value, str) and (match := _DURATION.match(value))):
        return finite_number(value)
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(value)
    return seconds


def finite_number(value: Any) -> float:
    """A number (not a boolean) as a finite float, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    try:
        number = float(value)
    except OverflowError:  # an integer past a float's range
        raise ValueError(value) from None
    if not math.isfinite(number):
        raise ValueError(value)
    return number


# \Z, not $: $ also matches before a trailing newline, which would let "acme\n" through.
IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
GROUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")

# The largest amount or limit, in this file and through the admin API alike: far inside
# SQLite's 64-bit integers, so that sums of credits cannot overflow them either.
MAX_INTEGER = 10**12

PositiveInt = Annotated[int, Rule("a positive integer (at most 10^12)", lambda v: 0 < v <= MAX_INTEGER)]
NonNegativeInt = Annotated[int, Rule("an integer of 0 or more (at most 10^12)", lambda v: 0 <= v <= MAX_INTEGER)]
Port = Annotated[int, Rule("a port number (1-65535)", lambda v: 0 < v < 65536)]
# Each worker is a process of its own (~60 MB): far past this, `serve` forked until the machine
# refused, with a traceback, rather than being told the number is wrong.
MAX_WORKERS = 1024
Workers = Annotated[int, Rule(f"a number of worker processes from 1 to {MAX_WORKERS}", lambda v: 0 < v <= MAX_WORKERS)]
Seconds = Annotated[float, Rule("a positive duration (seconds, or e.g. '30s', '24h')", lambda v: v > 0, parse_duration)]
# Twice the read timeout and 5 s more is each connection's TCP_USER_TIMEOUT, in milliseconds in a
# C int (at most about 24.8 days): past that, every connection failed as it was accepted.
ReadTimeout = Annotated[
    float,
    Rule(
        "a positive duration of at most 12 days (seconds, or e.g. '30s', '1m')",
        lambda v: 0 < v <= 12 * 86400,
        parse_duration,
    ),
]
# getaddrinfo takes an empty host for every interface: a gateway open to the network unasked. A
# URL or a host:port (`localhost:8003`) passed the check, and `serve` then failed to resolve it
# without naming the key: one colon is a port (an IPv6 address has several), a slash a URL.
Host = Annotated[
    str,
    Rule(
        "a host name or address to listen on (0.0.0.0: every IPv4 interface), without a scheme or a port "
        "(the port is server.port)",
        lambda v: bool(v) and v.strip() == v and v.count(":") != 1 and not any(c in v for c in "/[] "),
    ),
]
# The limiter's Redis script counts whole milliseconds: a shorter window would be none there. A
# longer one than a day keeps every call's entry that long (a sliding log), and past about 10^13 s
# its expiry overflows what Redis takes, so that every admit fails.
Window = Annotated[
    float,
    Rule("a duration from 1 ms to 24 h (seconds, or e.g. '60s', '1m')", lambda v: 0.001 <= v <= 86400, parse_duration),
]
# Far above any model's price per token, and low enough that no call's cost (tokens are at most
# 10^12 each way) nor any sum of costs can reach infinity, which JSON cannot carry.
MAX_PRICE_PER_TOKEN = 1000.0


def is_price(value: float) -> bool:
    """Whether a number is a price per token config.yaml takes (pricing.py's test of LiteLLM's)."""
    return 0 <= value <= MAX_PRICE_PER_TOKEN


# A number in e-notation that PyYAML (YAML 1.1: a dot and an exponent's sign required) leaves a
# string: `1e-6`, `6E-7`, `2.5e2`, as prices per token are written (LiteLLM's config takes them).
_E_NOTATION = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+\Z")


def _e_notation(value: Any) -> Any:
    return float(value) if isinstance(value, str) and _E_NOTATION.match(value) else value


Price = Annotated[float, Rule(f"a number from 0 to {MAX_PRICE_PER_TOKEN:g} (USD per token)", is_price, _e_notation)]
Identifier = Annotated[str, Rule("an identifier (letters, digits, '.', '_', '-'; at most 64)", IDENTIFIER.match)]
GroupName = Annotated[str, Rule("a model group name (letters, digits, '.', '_', ':', '-')", GROUP_NAME.match)]
# A group's models are tried in turn, each to its own timeouts: bounded so that a group cannot
# hold a call for as long as an endless list would (repeats are allowed: a retry of a model).
# A name goes into every call's body, the logs and the metrics' labels: LiteLLM's names are short
# and never hold control characters.
MAX_GROUP_MODELS = 32
MAX_MODEL_NAME = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MODEL_LIST_RULE = (
    f"a list of 1 to {MAX_GROUP_MODELS} model names, primary first, each 1 to {MAX_MODEL_NAME} characters "
    "without control characters"
)


def is_model_list(models: Any) -> bool:
    """Whether a value is a group's models as config.yaml and the admin API take them."""
    return (
        isinstance(models, (list, tuple))
        and 0 < len(models) <= MAX_GROUP_MODELS
        and all(isinstance(m, str) and 0 < len(m) <= MAX_MODEL_NAME and not _CONTROL.search(m) for m in models)
    )


ModelList = Annotated[tuple[str, ...], Rule(MODEL_LIST_RULE, is_model_list)]
# The longest name and group description, declared in the file as through the admin API.
MAX_LABEL = 256
MAX_DESCRIPTION = 1000
# As the admin API takes them: a name left out or null is none (an organization is then named
# after its id), an empty one is refused; a description left out, null or empty is none.
Name = Annotated[
    str,
    Rule(
        f"a name of at most {MAX_LABEL} characters",
        lambda v: len(v) <= MAX_LABEL,
        problem=lambda v: None if v else "must not be empty (leave it out to name the organization after its id)",
    ),
]
Description = Annotated[
    str,
    Rule(
        f"a description of at most {MAX_DESCRIPTION} characters",
        lambda v: len(v) <= MAX_DESCRIPTION,
        convert=lambda v: "" if v is None else v,
    ),
]


# The URL checks below refuse what the clients that read these URLs (proxy/upstream.py,
# proxy/resp.py) would fail on, or misread, later. Their messages never quote the URL: it may
# hold a password.

# What no request head and no host name may hold: spaces and control characters.
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")


def _address_problem(url: str) -> str | None:
    """What `urlsplit`, its `.port`, or resolving its host would fail on."""
    if "\x00" in url:  # no host name, socket path or password holds one
        return "must not hold a NUL character"
    # A password that is not percent-encoded may hold a '/', '?' or '#', which urlsplit takes
    # for the end of the host; the user info runs to the last '@' (as `_mask_url` masks it).
    userinfo = url.partition("://")[2].rpartition("@")[0]
    if any(c in userinfo for c in "/?#[]"):
        return (
            "a password or user name must have its '/', '?', '#', '[', ']' percent-encoded "
            "(%2F, %3F, %23, %5B, %5D)"
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the host is malformed (an IPv6 address goes in brackets: [::1])"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # 0 would be read as no port at all
        return "the port must be a number from 1 to 65535"
    try:
        (parts.hostname or "").encode("idna")  # as the connection's name lookup encodes it
    except UnicodeError:
        return "the host name is malformed"
    if _UNSENDABLE.search(parts.hostname or ""):
        return "the host name is malformed"
    return None


def _http_url_problem(url: str) -> str | None:
    url = url.rstrip("/")  # as the upstream client reads it
    # Its host and path go into every request's head: a space or a control character there
    # makes a head LiteLLM refuses (every call a 400, and /health/ready blaming the key).
    if _UNSENDABLE.search(url):
        return "must not hold spaces or control characters (percent-encode them: %20)"
    if problem := _address_problem(url):
        return problem
    parts = urlsplit(url)
    if not parts.hostname:
        return "must name a host: http://host:port"
    # The client sends the path alone, and presents the key as a bearer token: these were dropped.
    if "?" in url or "#" in url:  # a user's or password's were refused above
        return "must have no query (?...) or fragment (#...): the client sends neither"
    if "@" in parts.netloc:
        return f"must hold no user name or password: LiteLLM is sent {ENV_UPSTREAM_KEY}"
    # The host and path go into every request's head as they are.
    if not (parts.netloc.rpartition("@")[2] + parts.path).isascii():
        return "must be ASCII: a path percent-encoded, a host name in its xn-- form"
    if parts.path.endswith("/v1"):
        # As an OpenAI SDK's base_url would be written: every call would go to /v1/v1/...
        return "is LiteLLM's address without /v1 (Tollgate adds /v1/chat/completions itself)"
    return None


def _redis_url_problem(url: str) -> str | None:
    if url != url.strip():  # urlsplit drops some of it, not a socket path's
        return "must not begin or end with whitespace"
    if problem := _address_problem(url):
        return problem
    parts = urlsplit(url)
    if parts.scheme == "unix" and not parts.path:
        return "must name the socket: unix:///path/to/redis.sock"
    if parts.scheme == "unix" and parts.hostname:  # the client reads the path alone
        return "must name the socket after three slashes, with no host: unix:///path/to/redis.sock"
    if parts.fragment or url.endswith("#"):
        return "must have no fragment (#...): the client reads none"
    if parts.username and parts.password is None:  # AUTH needs a password; none was sent
        return "a user needs its password: redis://user:password@host:6379/0"
    query = parse_qs(parts.query, keep_blank_values=True)
    # The client reads ?db= alone. Another parameter (redis-py's ?password=, ?ssl_cert_reqs=) was
    # ignored without a word (no AUTH sent), and check-config printed its value unmasked.
    if unread := [name for name in query if name != "db"]:
        return (
            f"the client reads no query parameter but ?db= (not '{unread[0][:40]}'); "
            "a password goes before the host: redis://[user]:password@host:6379/0"
        )
    # The database number, read as the Redis client reads it: ?db=, else the path (not a socket's).
    db = query.get("db", [""])[0] or (parts.path.strip("/") if parts.scheme != "unix" else "")
    if db and not re.fullmatch(r"[0-9]+", db):
        return "the database (the path, or ?db=) must be a number of 0 or more: redis://host:6379/0"
    return None


def _database_url_problem(url: str) -> str | None:
    path = url.removeprefix("sqlite:///")
    # No file name can hold one: opening it would fail with a ValueError, not an OSError.
    if "\x00" in path:
        return "the path must not hold a NUL character"
    if path != path.strip():  # a space or newline left in the variable: another file
        return "the path must not begin or end with whitespace"
    # Nothing reads a URL's query here (?mode=ro): it became part of the file's name.
    if "?" in path:
        return "must have no query (?...): the path after sqlite:/// is the file's name"
    # SQLite built with SQLITE_USE_URI (Debian's, Python's own) reads a name beginning with
    # `file:` as a URI and opens the file it names, while the store's checks and the change
    # signal beside it (changes.py) use the name as a path: a worker of `serve` refused the
    # database as removed.
    if path.startswith("file:"):
        return "must name the file, not a SQLite URI (file:...): sqlite:///path/to/file.db"
    # SQLite's name for a private in-memory database: each of the store's connections (the
    # loop's and its thread's) would open a database of its own, and the WAL the store fsyncs
    # has no file, so every write failed as a disk failure.
    if path == ":memory:":
        return "must name a database file (an in-memory database cannot be shared by the store's connections)"
    return None


HttpUrl = Annotated[
    str,
    Rule("an http:// or https:// URL", lambda v: v.startswith(("http://", "https://")), problem=_http_url_problem),
]
DatabaseUrl = Annotated[
    str,
    Rule(
        "a database URL: sqlite:///path/to/file.db (PostgreSQL is not supported yet)",
        lambda v: v.startswith("sqlite:///") and len(v) > len("sqlite:///"),
        problem=_database_url_problem,
    ),
]
RedisUrl = Annotated[
    str,
    Rule(
        "a redis://, rediss:// or unix:// URL",
        lambda v: v.startswith(("redis://", "rediss://", "unix://")),
        problem=_redis_url_problem,
    ),
]


@dataclass(frozen=True)
class Secret:
    """A value that must never be printed or logged."""

    value: str

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True)
class ServerConfig:
    host: Host = "127.0.0.1"
    port: Port = 8003
    workers: Workers = 1
    max_body_bytes: PositiveInt = 10 * 1024 * 1024
    # On SIGTERM: stop accepting, let open streams finish this long, then cut and record them.
    shutdown_grace: Seconds = 30.0
    # A request (head and body) must arrive whole within this long, and a stream's client must
    # take each write within it: a slow client holds no connection for good, nor an upstream's.
    read_timeout: ReadTimeout = 30.0
    # How long an idle keep-alive connection stays open (uvicorn's default): behind a load
    # balancer that keeps its connections open longer (nginx's and ALB's 60 s), one it reused as
    # Tollgate closed it failed its request with a 502.
    keep_alive_timeout: ReadTimeout = 5.0


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect: Seconds = 5.0
    # For a stream: until the upstream's response headers and its first event, and the longest
    # silence tolerated between two of its chunks.
    first_byte: Seconds = 120.0
    # For a call not streamed: until the upstream's answer, whose headers LiteLLM sends with
    # the whole of it. As long as `total` by default, as LiteLLM's and the OpenAI SDKs' own
    # timeouts: under first_byte's 120 s a reasoning model's long answer was cut, tried again on
    # every fallback, and billed by its provider each time for nothing.
    answer: Seconds = 600.0
    total: Seconds = 600.0


@dataclass(frozen=True)
class UpstreamConfig:
    url: HttpUrl = "http://127.0.0.1:4000"
    timeouts: UpstreamTimeouts = field(default_factory=UpstreamTimeouts)
    max_connections: PositiveInt = 200
    max_keepalive_connections: PositiveInt = 50
    model_info_refresh: Seconds = 300.0


# SQLite counts its busy timeout in whole milliseconds, in a 32-bit integer: outside 1 ms to
# 2^31 - 1 ms it takes none at all, and a write that meets a lock fails at once.
BusyTimeout = Annotated[
    float,
    Rule(
        "a duration from 1 ms to 24 days (seconds, or e.g. '10s', '1m')",
        lambda v: 0.001 <= v <= (2**31 - 1) / 1000,
        parse_duration,
    ),
]


@dataclass(frozen=True)
class DatabaseConfig:
    url: DatabaseUrl = "sqlite:///tollgate.db"
    busy_timeout: BusyTimeout = 10.0
    synchronous: Literal["full", "normal"] = "full"
    # The WAL's fsyncs through Linux AIO where the kernel takes them; false: always by a thread
    # (for a seccomp profile that kills a process using io_setup rather than refusing it).
    aio_fsync: bool = True

    @property
    def sqlite_path(self) -> str:
        return self.url.removeprefix("sqlite:///")


@dataclass(frozen=True)
class RedisConfig:
    url: RedisUrl | None = None
    key_prefix: str = "tollgate:"
    # Short on purpose: a slow or dead Redis must never hold a request up.
    connect_timeout: Seconds = 0.1
    timeout: Seconds = 0.1
    # After a failure, Redis is left alone this long before one request tries it again.
    breaker_cooldown: Seconds = 5.0


@dataclass(frozen=True)
class RateLimitsConfig:
    rpm: PositiveInt = 60
    tpm: PositiveInt = 60_000
    default_max_tokens: PositiveInt = 1024
    on_redis_error: Literal["local", "allow", "deny"] = "local"
    # The rolling window the limits count over (RPM and TPM are per this window).
    window: Window = 60.0


@dataclass(frozen=True)
class JobsConfig:
    credits_per_job: NonNegativeInt = 1
    expire_after: Seconds = 24 * 3600.0
    sweep_interval: Seconds = 60.0
    # A call still 'running' this long after upstream.timeouts.total was left behind by a
    # process that died; the sweeper closes it so its job can finish or expire.
    stale_call_margin: Seconds = 60.0


@dataclass(frozen=True)
class AuthConfig:
    # Revoked keys must stop working within a second in every process.
    cache_ttl: Annotated[
        float, Rule("a duration from 0 to 1 second", lambda v: 0 <= v <= 1, parse_duration)
    ] = 0.5


@dataclass(frozen=True)
class LoggingConfig:
    access_log: Literal["plain", "json", "off"] = "plain"
    level: Literal["debug", "info", "warning", "error"] = "info"


@dataclass(frozen=True)
class MetricsConfig:
    # Drop the team label (and the per-team balance gauge) for fleets with many teams.
    team_label: bool = True
    credits_cache: Seconds = 5.0


@dataclass(frozen=True)
class ModelPrice:
    input_cost_per_token: Price
    output_cost_per_token: Price


@dataclass(frozen=True)
class ModelGroupSpec:
    models: ModelList
    description: Description = ""


@dataclass(frozen=True)
class OrganizationSpec:
    organization_id: Identifier
    name: Name | None = None  # none: the organization is named after its id


@dataclass(frozen=True)
class TeamSpec:
    team_id: Identifier
    organization_id: Identifier
    model_groups: tuple[GroupName, ...] = ()
    default_model_group: GroupName | None = None
    credits_allocated: NonNegativeInt = 0
    credits_per_job: NonNegativeInt | None = None
    rpm_limit: PositiveInt | None = None
    tpm_limit: PositiveInt | None = None
    status: Literal["active", "suspended"] = "active"


def _from_env(name: str) -> Any:
    return field(default=None, metadata={"yaml": False, "env": name})


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    pricing: dict[str, ModelPrice] = field(default_factory=dict)
    model_groups: dict[GroupName, ModelGroupSpec] = field(default_factory=dict)
    organizations: tuple[OrganizationSpec, ...] = ()
    teams: tuple[TeamSpec, ...] = ()
    master_key: Secret | None = _from_env(ENV_MASTER_KEY)
    upstream_key: Secret | None = _from_env(ENV_UPSTREAM_KEY)
    source: str = field(default="(defaults)", metadata={"yaml": False})


# --- loading -------------------------------------------------------------------------------


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment and validate; raise ConfigError on any problem."""
    env = os.environ if env is None else env
    path = path or env.get(ENV_CONFIG) or ("config.yaml" if os.path.exists("config.yaml") else None)
    raw: Any = {}
    source = "(defaults)"
    if path is not None:
        source = path
        try:
            with open(path, encoding="utf-8") as handle:
                raw = yaml.load(handle, Loader=_Loader)
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        except yaml.YAMLError as exc:
            raise _yaml_error(path, exc) from None
        except RecursionError:  # PyYAML reads nested collections recursively
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: must be a mapping of sections (server, upstream, ...)")

    for keys, env_name in SECRET_KEYS.items():
        if _dig(raw, keys) is not None:
            raise ConfigError(
                f"{source}: {'.'.join(keys)}: secrets are read from the environment only; set {env_name} instead"
            )

    origins: dict[str, str] = {}
    for env_name, (section, key) in ENV_OVERRIDES.items():
        if env_name in env:
            value = env[env_name]
            section_value = raw.setdefault(section, {})
            if section_value is None:
                section_value = raw[section] = {}
            if isinstance(section_value, dict):
                section_value[key] = value or None
                origins[f"{section}.{key}"] = env_name

    try:
        config = _parse_dataclass(Config, raw, "")
    except _Invalid as invalid:
        where = origins.get(invalid.path, source)
        raise ConfigError(f"{where}: {invalid.path}: {invalid.message}") from None

    secrets = {
        f.name: Secret(_secret(f.metadata["env"], env[f.metadata["env"]]))
        for f in dataclasses.fields(Config)
        if f.metadata.get("env") and env.get(f.metadata["env"])
    }
    config = dataclasses.replace(config, source=source, **secrets)
    _check_consistency(config)
    return config


_KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")


def _secret(name: str, value: str) -> str:
    """A key as it travels in an Authorization header: printable ASCII, no spaces (a master key
    with one could never be presented, an upstream key beyond ASCII could not be sent)."""
    if not _KEY_CHARACTERS.fullmatch(value):
        raise ConfigError(f"{name}: must be printable ASCII without spaces (it travels in an HTTP header)")
    return value


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


# What YAML 1.1 reads as an octal integer (`0100` is 64, `0_17` is 15), where YAML 1.2 reads 100.
_OCTAL = re.compile(r"[-+]?0[0-7_]+\Z")
_LEADING_ZERO = "YAML 1.1 would read a leading 0 as octal (010 as 8): write the number without it"


def _without_base_60_or_octal(
    resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]],
) -> dict[Any, list[tuple[str, Any]]]:
    """PyYAML's implicit resolvers, its numbers never holding a ':'. YAML 1.1 reads `1:20` as
    the base-60 integer 80 (and `1:20.5` as 80.5): `port: 1:20` served on port 80. Without them
    such a scalar is the text it reads as, as in YAML 1.2: a name keeps it, a number refuses it.
    So is an integer with a leading 0, which YAML 1.1 reads in octal: `credits_allocated: 0100`
    gave a team 64 credits; a duration reads it in base 10."""

    def number(tag: str, regexp: re.Pattern[str]) -> re.Pattern[str]:
        octal = f"(?!{_OCTAL.pattern})" if tag == _NUMBER_TAGS[0] else ""
        return re.compile(r"(?!.*:)" + octal + regexp.pattern, regexp.flags)

    return {
        first: [(tag, number(tag, regexp) if tag in _NUMBER_TAGS else regexp) for tag, regexp in entries]
        for first, entries in resolvers.items()
    }


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: PyYAML alone keeps
    the last silently, so a second `server:` section would replace the first unnoticed. It
    reads no base-60 or octal numbers (see `_without_base_60_or_octal`)."""

    yaml_implicit_resolvers = _without_base_60_or_octal(yaml.SafeLoader.yaml_implicit_resolvers)

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[yaml.MappingNode] = set()

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # What PyYAML reads but cannot make a value of (a date such as 2024-02-30, an integer
        # of more digits than Python converts) raises a ValueError without a place in the file.
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            value = node.value[:40] if isinstance(node, yaml.ScalarNode) else node.tag
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {value!r}: {exc}", node.start_mark
            ) from None

    def construct_base_10(self, node: yaml.ScalarNode) -> Any:
        """`!!int` and `!!float`: YAML 1.1 reads such a scalar's `1:20` in base 60 even when it
        is tagged (the resolvers above only see untagged scalars)."""
        if ":" in str(node.value):
            raise ValueError("base-60 numbers are not read (YAML 1.2 has none): write the number in base 10")
        if node.tag == _NUMBER_TAGS[0]:
            if _OCTAL.match(str(node.value)):
                raise ValueError(_LEADING_ZERO)
            return self.construct_yaml_int(node)
        return self.construct_yaml_float(node)

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked here, before its first flattening, which puts the keys of `<<: *base` among
        # the node's own: those may be overridden, the node's own keys may not repeat.
        if node not in self._checked:
            self._checked.add(node)
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if not isinstance(key, Hashable):
                    continue  # construct_mapping says so
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} given twice (first at line {first[key]})", key_node.start_mark
                    )
                first[key] = key_node.start_mark.line + 1
        super().flatten_mapping(node)


for _tag in _NUMBER_TAGS:
    _Loader.add_constructor(_tag, _Loader.construct_base_10)


def _yaml_error(path: str, exc: yaml.YAMLError) -> ConfigError:
    """PyYAML's message, of several lines, as one: the file, where, what, and what it was reading."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None or exc.problem is None:
        return ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}")
    mark = exc.problem_mark
    message = f"{path}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {exc.problem}"
    if exc.context:
        since = f" from line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message += f" ({exc.context}{since})"
    return ConfigError(message)


def check_key(key: str, value: Any) -> Any:
    """`value` checked (and converted) as the key `key` (e.g. "server.port") of the file would
    be, for a command-line option that overrides it; ValueError says what it must be."""
    *sections, name = key.split(".")
    cls: Any = Config
    for section in sections:
        cls = get_type_hints(cls)[section]
    try:
        return _parse_value(get_type_hints(cls, include_extras=True)[name], value, key)
    except _Invalid as invalid:
        raise ValueError(invalid.message) from None


def require_serving_secrets(config: Config) -> None:
    """Serving needs the key Tollgate presents to LiteLLM; say so plainly if it is missing."""
    if config.upstream_key is None:
        raise ConfigError(
            f"{ENV_UPSTREAM_KEY}: not set; Tollgate presents this key to LiteLLM "
            "(LiteLLM's master key or one of its virtual keys)"
        )


# How many times a call's record is tried on a database another process keeps locked, each try
# waiting up to database.busy_timeout (calls.py).
RECORD_ATTEMPTS = 4


def serving_warnings(config: Config, workers: int) -> list[str]:
    """What is allowed but probably not meant, for `serve` to say as it starts."""
    warnings = []
    record_wait = RECORD_ATTEMPTS * config.database.busy_timeout
    if config.jobs.stale_call_margin <= record_wait:
        # The sweeper (of any process) takes a call still running past upstream.timeouts.total plus
        # the margin for one whose process died: a live call's record may be waiting that long yet.
        warnings.append(
            f"jobs.stale_call_margin ({config.jobs.stale_call_margin:g} s) is not longer than a call's record may "
            f"wait on a locked database ({RECORD_ATTEMPTS} x database.busy_timeout = {record_wait:g} s): a sweeper "
            "may close a call that is still being recorded as interrupted; raise the margin or lower busy_timeout"
        )
    for i, team in enumerate(config.teams):
        if team.tpm_limit is not None and config.rate_limits.default_max_tokens >= team.tpm_limit:
            # As the default tpm's check says, but a team's may be meant: one whose calls all set max_tokens.
            warnings.append(
                f"teams[{i}].tpm_limit ({team.tpm_limit}) leaves no room for a call without max_tokens, estimated at "
                f"its prompt plus rate_limits.default_max_tokens ({config.rate_limits.default_max_tokens}): each such "
                f"call of team '{team.team_id}' is refused (429, never to fit)"
            )
    if workers > 1 and config.redis.url is None:
        warnings.append(
            f"{workers} workers without Redis: each keeps its own rate-limit windows, so a team may be "
            f"admitted up to {workers} times its limits; set TOLLGATE_REDIS_URL to share them"
        )
    return warnings


def _check_consistency(config: Config) -> None:
    limits = config.rate_limits
    if limits.default_max_tokens >= limits.tpm:
        # A call without max_tokens is estimated at its prompt plus default_max_tokens: on the
        # default TPM, every one would be refused as one that can never fit.
        raise ConfigError(
            f"{config.source}: rate_limits.tpm: {limits.tpm} leaves no room for a call without max_tokens, "
            f"estimated at its prompt plus rate_limits.default_max_tokens ({limits.default_max_tokens}); "
            "raise it or lower default_max_tokens"
        )
    for i, team in enumerate(config.teams):
        twice = [group for n, group in enumerate(team.model_groups) if group in team.model_groups[:n]]
        if twice:
            raise ConfigError(f"{config.source}: teams[{i}].model_groups: must not name a group twice ('{twice[0]}')")
        if team.default_model_group and team.default_model_group not in team.model_groups:
            raise ConfigError(
                f"{config.source}: teams[{i}].default_model_group: "
                f"'{team.default_model_group}' is not in the team's model_groups"
            )
    organizations: set[str] = set()
    for i, organization in enumerate(config.organizations):
        if organization.organization_id in organizations:
            raise ConfigError(
                f"{config.source}: organizations[{i}].organization_id: "
                f"'{organization.organization_id}' is declared twice"
            )
        organizations.add(organization.organization_id)
    seen: set[str] = set()
    for i, team in enumerate(config.teams):
        if team.team_id in seen:
            raise ConfigError(f"{config.source}: teams[{i}].team_id: '{team.team_id}' is declared twice")
        seen.add(team.team_id)


def describe(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, secrets masked."""
    data = dataclasses.asdict(config)
    for f in dataclasses.fields(Config):
        if f.metadata.get("env"):
            data[f.name] = "***" if getattr(config, f.name) is not None else None
    data["model_groups"] = {name: dataclasses.asdict(spec) for name, spec in config.model_groups.items()}
    # Not the database's: a sqlite URL holds a file's path, never a password, and a path may
    # hold a ':' and an '@' that masking would turn into another path.
    for section in ("upstream", "redis"):
        data[section]["url"] = _mask_url(data[section]["url"])
    return _plain(data)


def _mask_url(url: str | None) -> str | None:
    """The URL with its password, if it carries one, as ``***``: ``redis://user:***@host:6379``.

    Read by hand, not with urlsplit: a password that is not percent-encoded may hold a '/',
    '?' or '#' that urlsplit takes for the end of the host, leaving the password in the clear.
    The user info is everything after '://' up to the last '@', the password all of it after
    the user name."""
    if url is None:
        return None
    scheme, separator, rest = url.partition("://")
    userinfo, at, address = rest.rpartition("@")
    if not separator or not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user}:***@{address}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _dig(raw: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(raw, dict):
            return None
        raw = raw.get(key)
    return raw


# --- a small validating parser driven by the dataclasses' type hints -----------------------


class _Invalid(Exception):
    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parse_dataclass(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _Invalid(path, "must be a mapping")
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        expected = ", ".join(fields)
        raise _Invalid(_join(path, str(unknown[0])), f"unknown key (expected one of: {expected})")
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _parse_value(hints[name], raw[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Invalid(_join(path, name), "is required")
    return cls(**values)


def _parse_value(tp: Any, value: Any, path: str) -> Any:
    rule: Rule | None = None
    if get_origin(tp) is Annotated:
        tp, rule = get_args(tp)[0], get_args(tp)[1]
    origin, args = get_origin(tp), get_args(tp)

    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        return _parse_value(inner[0], value, path)

    if rule is not None and rule.convert is not None:
        try:
            value = rule.convert(value)
        except (ValueError, TypeError):
            raise _Invalid(path, f"must be {rule.description}") from None

    description = rule.description if rule else None
    parsed = _parse_plain(tp, origin, args, value, path, description)
    if rule is not None and not rule.check(parsed):
        raise _Invalid(path, f"must be {rule.description}")
    if rule is not None and (problem := rule.problem(parsed)):
        raise _Invalid(path, problem)
    return parsed


def _read_unquoted(value: Any) -> str:
    """Why a scalar written unquoted where text is due is not text, if YAML made it something
    else: YAML 1.1 reads 2024 and 1.5 as numbers, no and off as booleans, 2024-01-01 as a date,
    all of them ids and names the admin API takes as text. Never converted back to text: 1_000
    would come back as another id (0123, not read in octal, stays the text it is)."""
    if isinstance(value, bool):
        read_as = "true or false"
    elif isinstance(value, (int, float)):
        read_as = "a number"
    elif isinstance(value, datetime.date):  # a datetime is one too
        read_as = "a date"
    else:
        return ""
    return f"; YAML read it, unquoted, as {read_as}: put it in quotes"


def _parse_plain(tp: Any, origin: Any, args: tuple, value: Any, path: str, description: str | None) -> Any:
    def invalid(default: str, why: str = "") -> _Invalid:
        return _Invalid(path, f"must be {description or default}{why}")

    if origin is Literal:
        # YAML 1.1 reads a bare off / on (or no / yes) as a boolean: take it as the word where
        # the word is allowed (logging.access_log: off).
        if isinstance(value, bool) and ("on" if value else "off") in args:
            return "on" if value else "off"
        if value not in args:
            raise _Invalid(path, "must be one of: " + ", ".join(str(a) for a in args))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise invalid("true or false")
        return value
    if tp is int:
        if isinstance(value, str) and _OCTAL.match(value):
            raise invalid("an integer", f"; {_LEADING_ZERO}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid("an integer")
        return value
    if tp is float:
        try:
            return finite_number(value)
        except ValueError:
            raise invalid("a number") from None
    if tp is str:
        if not isinstance(value, str):
            raise invalid("a string", _read_unquoted(value))
        try:
            value.encode("utf-8")  # as the database, Redis and every request store and send it
        except UnicodeEncodeError:
            raise _Invalid(path, "must be UTF-8 text (no lone surrogate such as \\ud800)") from None
        return value
    if origin is tuple:
        if value is None:
            return ()  # a key left empty (`teams:`), like an empty mapping section
        if not isinstance(value, list):
            raise invalid("a list")
        return tuple(_parse_value(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise invalid("a mapping")
        parsed = {}
        for key, item in value.items():
            key = _parse_value(args[0], key, _join(path, str(key)))
            parsed[key] = _parse_value(args[1], item, _join(path, str(key)))
        return parsed
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, path)
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # a programming error, not user input
