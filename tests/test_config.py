"""config.yaml is validated at start-up: errors name the file, the key path and the problem."""

import dataclasses
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.config import (
    MAX_INTEGER,
    Config,
    ConfigError,
    DatabaseConfig,
    RedisConfig,
    TeamSpec,
    UpstreamConfig,
    describe,
    load_config,
    require_serving_secrets,
    serving_warnings,
)
from proxy.resp import Redis
from proxy.upstream import Upstream
from tests.support import PYTHON, REPO, free_port


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def error_for(tmp_path: Path, text: str, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env or {})
    return str(info.value)


@pytest.mark.parametrize("host", ["localhost:8003", "http://0.0.0.0", " 127.0.0.1", "[::1]"])
def test_a_listening_host_with_a_scheme_a_port_or_spaces_is_refused_naming_the_key(tmp_path, host):
    # check-config passed them, and serve then failed to resolve the host without naming the key.
    message = error_for(tmp_path, yaml.safe_dump({"server": {"host": host}}))
    assert "server.host: must be a host name or address to listen on" in message and "server.port" in message


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "::1", "localhost", "gateway.internal"])
def test_a_listening_host_name_or_address_is_taken(tmp_path, host):
    assert load_config(write(tmp_path, yaml.safe_dump({"server": {"host": host}})), {}).server.host == host


def test_unknown_key_is_an_error_naming_it(tmp_path):
    message = error_for(tmp_path, "rate_limits:\n  rmp: 10\n")
    assert message.startswith(f"{tmp_path}/config.yaml: rate_limits.rmp: unknown key (expected one of: rpm, tpm")


def test_unknown_section_is_an_error(tmp_path):
    assert ": limits: unknown key" in error_for(tmp_path, "limits: {}\n")


def test_wrong_type_names_the_key_path_and_the_expectation(tmp_path):
    assert error_for(tmp_path, "rate_limits:\n  rpm: lots\n").endswith(
        "config.yaml: rate_limits.rpm: must be a positive integer (at most 10^12)"
    )


def test_out_of_range_value_is_an_error(tmp_path):
    assert error_for(tmp_path, "server:\n  port: 70000\n").endswith("server.port: must be a port number (1-65535)")


def test_nested_list_items_are_named_by_index(tmp_path):
    text = "teams:\n  - team_id: a\n    organization_id: o\n    credits_allocated: -1\n"
    assert error_for(tmp_path, text).endswith(
        "teams[0].credits_allocated: must be an integer of 0 or more (at most 10^12)"
    )


def test_durations_accept_units(tmp_path):
    config = load_config(write(tmp_path, "jobs:\n  expire_after: 2h\nupstream:\n  timeouts: {connect: 500ms}\n"), {})
    assert config.jobs.expire_after == 7200
    assert config.upstream.timeouts.connect == 0.5


def test_secret_in_the_file_is_refused(tmp_path):
    message = error_for(tmp_path, "upstream:\n  key: sk-abc\n")
    assert "upstream.key: secrets are read from the environment only; set TOLLGATE_UPSTREAM_KEY" in message
    assert "sk-abc" not in message


def test_missing_upstream_key_is_an_error_when_serving(tmp_path):
    config = load_config(write(tmp_path, ""), {})
    with pytest.raises(ConfigError, match="TOLLGATE_UPSTREAM_KEY: not set"):
        require_serving_secrets(config)


def test_environment_overrides_the_file(tmp_path):
    text = "upstream:\n  url: http://file:4000\ndatabase:\n  url: sqlite:///file.db\n"
    env = {"TOLLGATE_UPSTREAM_URL": "http://env:4000", "TOLLGATE_DATABASE_URL": "sqlite:///env.db"}
    config = load_config(write(tmp_path, text), env)
    assert config.upstream.url == "http://env:4000"
    assert config.database.url == "sqlite:///env.db"


def test_bad_environment_value_names_the_variable(tmp_path):
    message = error_for(tmp_path, "", {"TOLLGATE_DATABASE_URL": "postgresql://db/tollgate"})
    assert message.startswith("TOLLGATE_DATABASE_URL: database.url: must be a database URL")


@pytest.mark.parametrize("name", ["TOLLGATE_MASTER_KEY", "TOLLGATE_UPSTREAM_KEY"])
@pytest.mark.parametrize("value", ["sk-with space", "sk-ключ", "sk-tab\t"])
def test_a_key_that_cannot_travel_in_a_header_is_refused_without_showing_it(tmp_path, name, value):
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, ""), {"TOLLGATE_MASTER_KEY": "m", "TOLLGATE_UPSTREAM_KEY": "u", name: value})
    assert str(refused.value) == f"{name}: must be printable ASCII without spaces (it travels in an HTTP header)"


def test_secrets_come_from_the_environment(tmp_path):
    config = load_config(write(tmp_path, ""), {"TOLLGATE_MASTER_KEY": "m", "TOLLGATE_UPSTREAM_KEY": "u"})
    assert config.master_key.value == "m" and config.upstream_key.value == "u"
    assert "m" not in repr(config.master_key)


def test_default_group_must_be_granted(tmp_path):
    text = "teams:\n  - {team_id: a, organization_id: o, model_groups: [A], default_model_group: B}\n"
    assert "teams[0].default_model_group: 'B' is not in the team's model_groups" in error_for(tmp_path, text)


def test_without_a_file_the_defaults_are_the_contracts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no config.yaml here
    config = load_config(None, {})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8003)
    assert config.upstream.url == "http://127.0.0.1:4000" and config.database.url.startswith("sqlite:///")
    assert config.redis.url is None  # the in-process limiter
    limits = config.rate_limits
    assert (limits.rpm, limits.tpm, limits.default_max_tokens, limits.on_redis_error) == (60, 60_000, 1024, "local")
    assert config.jobs.credits_per_job == 1


def test_the_config_file_is_read_from_tollgate_config_else_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "rate_limits:\n  rpm: 7\n")
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text("rate_limits:\n  rpm: 9\n")
    assert load_config(None, {}).rate_limits.rpm == 7
    assert load_config(None, {"TOLLGATE_CONFIG": str(elsewhere)}).rate_limits.rpm == 9


def test_bundled_config_is_valid():
    config = load_config(str(REPO / "config.yaml"), {})
    assert set(config.model_groups) >= {"ChatAgent", "ResumeAgent", "AnalysisAgent", "SummaryAgent", "WritingAgent"}


def run_cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "proxy", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_check_config_prints_the_effective_configuration_with_secrets_masked(tmp_path):
    write(tmp_path, "rate_limits:\n  rpm: 7\n")
    env = {"PATH": "/usr/bin:/bin", "TOLLGATE_MASTER_KEY": "sk-very-secret-master", "TOLLGATE_UPSTREAM_KEY": "sk-up-secret"}
    result = run_cli("check-config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# config.yaml: valid\n")
    assert "rpm: 7" in result.stdout
    assert "master_key: '***'" in result.stdout
    assert "sk-very-secret-master" not in result.stdout + result.stderr
    assert "sk-up-secret" not in result.stdout + result.stderr


def test_serve_exits_non_zero_with_the_message_on_a_bad_config(tmp_path):
    write(tmp_path, "rate_limits:\n  rpm: 0\n")
    result = run_cli("serve", env={"PATH": "/usr/bin:/bin", "TOLLGATE_UPSTREAM_KEY": "x"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "config.yaml: rate_limits.rpm: must be a positive integer" in result.stderr


# check-config says whether serve would start: a file it calls valid must not then be refused.
@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_serve_and_check_config_exit_non_zero_without_the_upstream_key(tmp_path, command):
    write(tmp_path, "")
    result = run_cli(command, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "TOLLGATE_UPSTREAM_KEY: not set" in result.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("jobs:\n  credits_per_job: 99999999999999999999\n",
         "jobs.credits_per_job: must be an integer of 0 or more (at most 10^12)"),
        ("rate_limits:\n  rpm: 1000000000001\n", "rate_limits.rpm: must be a positive integer (at most 10^12)"),
        ("teams:\n  - {team_id: a, organization_id: o, credits_allocated: 9223372036854775807}\n",
         "teams[0].credits_allocated: must be an integer of 0 or more (at most 10^12)"),
    ],
)
def test_integers_above_the_admin_apis_bound_are_refused(tmp_path, text, message):
    assert error_for(tmp_path, text).endswith(message)


def test_integers_up_to_the_admin_apis_bound_are_accepted(tmp_path):
    config = load_config(write(tmp_path, "jobs:\n  credits_per_job: 1000000000000\n"), {})
    assert config.jobs.credits_per_job == MAX_INTEGER == 10**12


def test_a_bare_off_is_the_word_off_where_off_is_allowed(tmp_path):
    config = load_config(write(tmp_path, "logging:\n  access_log: off\n"), {})
    assert config.logging.access_log == "off"


def test_a_bare_off_is_refused_where_off_is_not_allowed(tmp_path):
    message = error_for(tmp_path, "database:\n  synchronous: off\n")
    assert message.endswith("database.synchronous: must be one of: full, normal")


@pytest.mark.parametrize(
    "text, path",
    [
        ('organizations:\n  - {organization_id: "acme\\n"}\n', "organizations[0].organization_id"),
        ('teams:\n  - {team_id: "t\\n", organization_id: o}\n', "teams[0].team_id"),
        ('model_groups:\n  "X\\n": {models: [a]}\n', "model_groups.X\n"),
    ],
)
def test_names_with_a_trailing_newline_are_refused(tmp_path, text, path):
    assert f": {path}: must be " in error_for(tmp_path, text)


def test_a_team_naming_a_group_twice_is_refused(tmp_path):
    text = "teams:\n  - {team_id: a, organization_id: o, model_groups: [X, X]}\n"
    assert error_for(tmp_path, text).endswith("teams[0].model_groups: must not name a group twice ('X')")


def test_empty_organizations_and_teams_mean_none(tmp_path):
    config = load_config(write(tmp_path, "organizations:\nteams:\n"), {})
    assert (config.organizations, config.teams) == ((), ())


def test_an_empty_model_name_is_refused(tmp_path):
    assert "model_groups.X.models: must be a list of 1 to 32 model names" in error_for(
        tmp_path, 'model_groups:\n  X: {models: [""]}\n'
    )


def test_a_group_of_more_than_32_models_is_refused(tmp_path):
    models = ", ".join(["m"] * 33)
    assert "model_groups.X.models: must be a list of 1 to 32 model names" in error_for(
        tmp_path, f"model_groups:\n  X: {{models: [{models}]}}\n"
    )


def test_a_group_of_32_models_repeats_included_is_taken(tmp_path):
    models = ", ".join(["m"] * 31 + ["backup"])
    config = load_config(write(tmp_path, f"model_groups:\n  X: {{models: [{models}]}}\n"), {})
    assert len(config.model_groups["X"].models) == 32


def test_a_model_name_over_256_characters_is_refused(tmp_path):
    assert "each 1 to 256 characters" in error_for(tmp_path, f"model_groups:\n  X: {{models: [{'m' * 257}]}}\n")


def test_a_model_name_holding_a_control_character_is_refused(tmp_path):
    assert "without control characters" in error_for(tmp_path, 'model_groups:\n  X: {models: ["gpt\\n4o"]}\n')


def test_check_config_masks_the_passwords_in_urls(tmp_path):
    write(tmp_path, "")
    env = {
        "PATH": "/usr/bin:/bin",
        "TOLLGATE_UPSTREAM_KEY": "x",
        "TOLLGATE_REDIS_URL": "redis://default:envsecret@h:1",
    }
    result = run_cli("check-config", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "url: redis://default:***@h:1" in result.stdout
    assert "secret" not in result.stdout + result.stderr


def test_serve_exits_with_one_line_when_the_database_cannot_be_created(tmp_path):
    write(tmp_path, "")
    (tmp_path / "a-file").write_text("")
    env = {
        "PATH": "/usr/bin:/bin",
        "TOLLGATE_UPSTREAM_KEY": "x",
        "TOLLGATE_DATABASE_URL": f"sqlite:///{tmp_path}/a-file/x.db",  # its directory cannot be made
    }
    # Its own port: serve listens before it opens the database, and 8003 may be taken.
    result = run_cli("serve", "--port", str(free_port()), env=env, cwd=tmp_path)
    assert result.returncode == 2
    # Named: the path that could not be made, a directory above the database's file.
    assert result.stderr.startswith(f"tollgate: cannot open the database {tmp_path}/a-file/x.db: {tmp_path}/a-file: ")
    assert result.stderr.count("\n") == 1, result.stderr


def test_several_workers_without_redis_are_warned_that_each_limits_on_its_own(tmp_path):
    config = load_config(write(tmp_path, ""), {})
    (warning,) = serving_warnings(config, workers=2)
    assert "2 workers without Redis" in warning and "TOLLGATE_REDIS_URL" in warning
    assert serving_warnings(config, workers=1) == []
    shared = load_config(write(tmp_path, ""), {"TOLLGATE_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert serving_warnings(shared, workers=4) == []


def test_a_declared_teams_tpm_no_call_without_max_tokens_could_fit_is_warned_of(tmp_path):
    # Not refused as the default tpm is: a team whose calls all set max_tokens may mean it.
    team = "teams:\n  - {{team_id: t, organization_id: o, model_groups: [], tpm_limit: {}}}\n"
    (warning,) = serving_warnings(load_config(write(tmp_path, team.format(1024)), {}), workers=1)
    assert warning == (
        "teams[0].tpm_limit (1024) leaves no room for a call without max_tokens, estimated at its prompt plus "
        "rate_limits.default_max_tokens (1024): each such call of team 't' is refused (429, never to fit)"
    )
    assert serving_warnings(load_config(write(tmp_path, team.format(1025)), {}), workers=1) == []


def test_a_stale_call_margin_no_longer_than_a_records_wait_on_a_locked_database_is_warned_of(tmp_path):
    config = load_config(write(tmp_path, "database:\n  busy_timeout: 30s\n"), {})
    (warning,) = serving_warnings(config, workers=1)
    assert warning.startswith("jobs.stale_call_margin (60 s) is not longer than a call's record may wait on a "
                              "locked database (4 x database.busy_timeout = 120 s)")
    assert serving_warnings(load_config(write(tmp_path, ""), {}), workers=1) == []  # 60 s against 40 s


def test_bundled_config_lists_every_setting_with_its_default():
    """README: the bundled config.yaml lists every key with its default."""
    bundled = yaml.safe_load((REPO / "config.yaml").read_text())
    defaults = describe(load_config(None, {}))

    def leaves(data: dict, path: str = "") -> set[str]:
        found = set()
        for key, value in data.items():
            if isinstance(value, dict) and value:
                found |= leaves(value, f"{path}{key}.")
            else:
                found.add(f"{path}{key}")
        return found

    sections = {k: v for k, v in defaults.items() if isinstance(v, dict) and k not in ("model_groups", "pricing")}
    missing = leaves(sections) - leaves({k: bundled.get(k) or {} for k in sections})
    assert not missing, f"config.yaml does not list {sorted(missing)}"
    for name in leaves(sections):
        section, _, key = name.partition(".")
        if "." not in key and key != "url":
            assert bundled[section][key] == defaults[section][key] or isinstance(defaults[section][key], float), name


def test_bundled_config_loads_to_the_defaults_but_for_its_example_groups():
    # "the values below are the defaults": the test above skips durations and nested keys, so a
    # duration written there (`first_byte: 120s`) could drift from the code's unnoticed.
    bundled = load_config(str(REPO / "config.yaml"), {})
    assert dataclasses.replace(bundled, model_groups={}, source=Config().source) == Config()


def test_bundled_configs_commented_team_example_loads_and_shows_every_team_key(tmp_path):
    # The example is where an operator learns what a declared team takes: uncommented, it must
    # load, and name every key a team may set.
    text = (REPO / "config.yaml").read_text()
    example = text.split("# Organizations and teams may be declared here too", 1)[1].split("\n", 1)[1]
    uncommented = "\n".join(line.removeprefix("# ") for line in example.splitlines())
    config = load_config(write(tmp_path, text + uncommented), {})
    declared = yaml.safe_load(uncommented)["teams"][0]
    assert config.teams[0].team_id == declared["team_id"]
    assert sorted(declared) == sorted(f.name for f in dataclasses.fields(TeamSpec))


BAD_DB = "the database (the path, or ?db=) must be a number of 0 or more: redis://host:6379/0"


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis://:pw@127.0.0.1:99999/0", "the port must be a number from 1 to 65535"),
        ("redis://h:0/0", "the port must be a number from 1 to 65535"),
        ("redis://h:six/0", "the port must be a number from 1 to 65535"),
        ("redis://h:6379/abc", BAD_DB),
        ("redis://h:6379/0?db=x", BAD_DB),
        ("redis://h:6379/-1", BAD_DB),
        ("redis://[::1:6379/0", "the host is malformed (an IPv6 address goes in brackets: [::1])"),
        ("redis://[zz]:6379/0", "the host is malformed (an IPv6 address goes in brackets: [::1])"),
        ("redis://a..b:6379/0", "the host name is malformed"),
        ("unix://", "must name the socket: unix:///path/to/redis.sock"),
        ("redis://h\x00:6379/0", "must not hold a NUL character"),
        ("redis://red is:6379/0", "the host name is malformed"),
        # Both were read as nothing: no AUTH sent, the fragment dropped, without a word.
        ("redis://user@h:6379/0", "a user needs its password: redis://user:password@host:6379/0"),
        ("redis://h:6379/0#1", "must have no fragment (#...): the client reads none"),
        ("redis://h:6379/0#", "must have no fragment (#...): the client reads none"),
    ],
)
def test_a_redis_url_its_client_could_not_read_is_refused_naming_the_variable(tmp_path, url, message):
    assert error_for(tmp_path, "", {"TOLLGATE_REDIS_URL": url}) == f"TOLLGATE_REDIS_URL: redis.url: {message}"


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://127.0.0.1:99999", "the port must be a number from 1 to 65535"),
        ("http://", "must name a host: http://host:port"),
        ("http://[::1:4000", "the host is malformed (an IPv6 address goes in brackets: [::1])"),
        ("http://例え.jp:4000", "must be ASCII: a path percent-encoded, a host name in its xn-- form"),
        ("http://h:4000/a b", "must not hold spaces or control characters (percent-encode them: %20)"),
        ("http://h:4000/v1\r\nX-Injected: 1", "must not hold spaces or control characters (percent-encode them: %20)"),
        ("http://127.0.0.1\x00:4000", "must not hold spaces or control characters (percent-encode them: %20)"),
        # An OpenAI SDK's base_url ends in /v1; LiteLLM's address does not (calls went to /v1/v1/...).
        ("http://h:4000/v1/", "is LiteLLM's address without /v1 (Tollgate adds /v1/chat/completions itself)"),
        ("http://h:4000/litellm/v1", "is LiteLLM's address without /v1 (Tollgate adds /v1/chat/completions itself)"),
    ],
)
def test_an_upstream_url_its_client_could_not_read_is_refused_naming_the_variable(tmp_path, url, message):
    assert error_for(tmp_path, "", {"TOLLGATE_UPSTREAM_URL": url}) == f"TOLLGATE_UPSTREAM_URL: upstream.url: {message}"


def test_a_bad_url_in_the_file_is_refused_naming_the_file(tmp_path):
    assert error_for(tmp_path, "redis:\n  url: redis://h:99999\n").endswith(
        "config.yaml: redis.url: the port must be a number from 1 to 65535"
    )


@pytest.mark.parametrize(
    "url",
    [
        "redis://h",
        "redis://:p@ss@h:1/2",
        "rediss://user:p%2Fss@h:6380?db=3",
        "redis://[::1]:6379/0",
        "unix:///tmp/r.sock?db=1",
        "unix:///tmp/r.sock",  # a socket's path is no database number
    ],
)
def test_redis_urls_its_client_reads_are_accepted(tmp_path, url):
    config = load_config(write(tmp_path, ""), {"TOLLGATE_REDIS_URL": url})
    Redis(config.redis.url, 0.1, 0.1)  # reads it without an error


@pytest.mark.parametrize("url", ["http://h", "https://h:4443/litellm/", "http://[::1]:4000"])
def test_upstream_urls_its_client_reads_are_accepted(tmp_path, url):
    config = load_config(write(tmp_path, ""), {"TOLLGATE_UPSTREAM_URL": url})
    Upstream(config.upstream, None)  # reads it without an error


def test_a_redis_url_parameter_its_client_would_ignore_is_refused_without_showing_its_value(tmp_path):
    # redis-py's spelling: the client sent no AUTH, and check-config printed the password.
    message = error_for(tmp_path, "", {"TOLLGATE_REDIS_URL": "redis://h:6379/0?password=s3cret"})
    assert message.startswith(
        "TOLLGATE_REDIS_URL: redis.url: the client reads no query parameter but ?db= (not 'password')"
    )
    assert "s3cret" not in message


@pytest.mark.parametrize(
    "url", ["redis://:se#cret@h:1/0", "redis://:se/cret@h/0", "redis://u:se?cret@h", "redis://:se[cret@h"]
)
def test_a_password_that_is_not_percent_encoded_is_refused_without_showing_it(tmp_path, url):
    message = error_for(tmp_path, "", {"TOLLGATE_REDIS_URL": url})
    assert message.startswith("TOLLGATE_REDIS_URL: redis.url: a password or user name must have its '/', '?', '#'")
    assert "cret" not in message


@pytest.mark.parametrize(
    "url, masked",
    [
        ("redis://:se#cret@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:se/cret@h/0", "redis://user:***@h/0"),
        ("redis://:se@cr?et@h", "redis://:***@h"),
        ("http://u:se[cret@h:4000", "http://u:***@h:4000"),
        ("redis://user:se:cret@h/0", "redis://user:***@h/0"),
    ],
)
def test_describe_masks_a_password_whatever_characters_it_holds(url, masked):
    data = describe(Config(upstream=UpstreamConfig(url=url), redis=RedisConfig(url=url)))
    assert data["redis"]["url"] == data["upstream"]["url"] == masked


def test_a_yaml_syntax_error_is_one_line_naming_the_file_line_and_column(tmp_path):
    assert error_for(tmp_path, "server:\n  port: 8003\n  host: a: b\n") == (
        f"{tmp_path}/config.yaml: line 3, column 10: not valid YAML: mapping values are not allowed here"
    )


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"server:\n  host: caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(info.value) == f"{path}: not UTF-8 text"


def test_a_section_given_twice_is_refused_naming_it_and_its_line(tmp_path):
    assert error_for(tmp_path, "server:\n  port: 8003\nserver:\n  workers: 2\n").endswith(
        "config.yaml: line 3, column 1: not valid YAML: key 'server' given twice (first at line 1)"
    )


def test_a_key_given_twice_in_a_section_is_refused_naming_it_and_its_line(tmp_path):
    assert error_for(tmp_path, "rate_limits:\n  rpm: 10\n  tpm: 100\n  rpm: 20\n").endswith(
        "config.yaml: line 4, column 3: not valid YAML: key 'rpm' given twice (first at line 2)"
    )


def test_a_key_merged_from_an_anchor_may_be_overridden(tmp_path):
    text = "model_groups:\n  A: &a {models: [x], description: d}\n  B: {<<: *a, models: [y]}\n"
    group = load_config(write(tmp_path, text), {}).model_groups["B"]
    assert (group.models, group.description) == (("y",), "d")


def test_a_rate_limit_window_longer_than_a_day_is_refused(tmp_path):
    # Every call's entry is kept for a window (a sliding log); past about 10^13 s the expiry
    # Redis is sent overflows, and every admit failed.
    assert error_for(tmp_path, "rate_limits:\n  window: 2d\n").endswith(
        "rate_limits.window: must be a duration from 1 ms to 24 h (seconds, or e.g. '60s', '1m')"
    )


def test_a_rate_limit_window_shorter_than_redis_counts_is_refused(tmp_path):
    # Redis's limiter counts whole milliseconds: a window of less than one would admit every call.
    message = error_for(tmp_path, "rate_limits:\n  window: 0.5ms\n")
    assert "rate_limits.window: must be" in message


@pytest.mark.parametrize(
    "text, message",
    [
        (f"server:\n  read_timeout: 1{'0' * 400}\n", "server.read_timeout: must be a positive duration"),
        (f"auth:\n  cache_ttl: 1{'0' * 400}\n", "auth.cache_ttl: must be a duration from 0 to 1 second"),
        (f"pricing:\n  m: {{input_cost_per_token: 1{'0' * 400}, output_cost_per_token: 0}}\n",
         "pricing.m.input_cost_per_token: must be a number from 0 to 1000 (USD per token)"),
    ],
)
def test_an_integer_past_a_floats_range_is_refused_in_one_line(tmp_path, text, message):
    assert message in error_for(tmp_path, text)


def test_a_price_per_token_that_could_make_a_cost_infinite_is_refused(tmp_path):
    # 1e300 per token is a finite number, and a call's cost or a job's total from it was not:
    # JSON carries infinity as null, which the contract never allows for a cost.
    assert error_for(tmp_path, "pricing:\n  m: {input_cost_per_token: 1.0e+300, output_cost_per_token: 0}\n").endswith(
        "pricing.m.input_cost_per_token: must be a number from 0 to 1000 (USD per token)"
    )


@pytest.mark.parametrize("written, price", [("1e-6", 1e-6), ("6E-7", 6e-7), ("2.5e2", 250.0), ("2e+0", 2.0)])
def test_a_price_written_in_e_notation_is_that_number(tmp_path, written, price):
    # PyYAML reads YAML 1.1, where `1e-6` (no dot, no exponent sign) is a string: the way prices
    # per token are written, and LiteLLM's own config takes it, yet `serve` refused to start,
    # saying the price "must be a number from 0 to 1000".
    text = f"pricing:\n  m: {{input_cost_per_token: {written}, output_cost_per_token: {written}}}\n"
    (prices,) = load_config(write(tmp_path, text), {}).pricing.values()
    assert (prices.input_cost_per_token, prices.output_cost_per_token) == (price, price)


@pytest.mark.parametrize(
    "text, message",
    [
        ("teams:\n  - {team_id: t, organization_id: 2024-02-30}\n",
         "line 2, column 35: not valid YAML: cannot read '2024-02-30': day is out of range for month"),
        (f"rate_limits:\n  rpm: 1{'0' * 5000}\n", "line 2, column 8: not valid YAML: cannot read '1000"),
    ],
)
def test_a_value_yaml_cannot_make_is_one_line_naming_its_line(tmp_path, text, message):
    assert error_for(tmp_path, text).startswith(f"{tmp_path}/config.yaml: {message}")


def test_yaml_nested_too_deeply_is_one_line(tmp_path):
    assert error_for(tmp_path, "server: " + "[" * 5000 + "]" * 5000 + "\n") == (
        f"{tmp_path}/config.yaml: not valid YAML: nested too deeply"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("organizations:\n  - {organization_id: acme, name: Acme}\n  - {organization_id: acme, name: Other}\n",
         "organizations[1].organization_id: 'acme' is declared twice"),
        ("teams:\n  - {team_id: a, organization_id: o}\n  - {team_id: a, organization_id: p}\n",
         "teams[1].team_id: 'a' is declared twice"),
    ],
    ids=["organization", "team"],
)
def test_an_organization_or_team_declared_twice_is_refused(tmp_path, text, message):
    assert error_for(tmp_path, text).endswith(message)


def test_a_database_path_holding_a_nul_is_refused(tmp_path):
    assert error_for(tmp_path, 'database:\n  url: "sqlite:///a\\0b.db"\n').endswith(
        "database.url: the path must not hold a NUL character"
    )


@pytest.mark.parametrize("value", ["25d", "0.0001", "1e+300", "2147483.648"])
def test_a_busy_timeout_sqlite_would_take_as_none_is_refused(tmp_path, value):
    # Outside 1 ms to 2^31 - 1 ms, SQLite's busy timeout is 0: a write meeting a lock fails at once.
    assert error_for(tmp_path, f"database:\n  busy_timeout: {value}\n").endswith(
        "database.busy_timeout: must be a duration from 1 ms to 24 days (seconds, or e.g. '10s', '1m')"
    )


def test_a_busy_timeout_of_24_days_is_what_sqlite_takes(tmp_path):
    import sqlite3

    config = load_config(write(tmp_path, "database:\n  busy_timeout: 24d\n"), {})
    connection = sqlite3.connect(":memory:")
    connection.execute(f"PRAGMA busy_timeout = {int(config.database.busy_timeout * 1000)}")
    assert connection.execute("PRAGMA busy_timeout").fetchone()[0] == 24 * 86400 * 1000


def test_an_in_memory_database_is_refused(tmp_path):
    # Each of the store's connections would open a database of its own, and the WAL it fsyncs
    # has no file: check-config passed it, and then every command failed on its first write
    # with "The write was committed but may not be on disk".
    assert error_for(tmp_path, 'database:\n  url: "sqlite:///:memory:"\n').endswith(
        "database.url: must name a database file (an in-memory database cannot be shared by the store's connections)"
    )


def test_a_default_tpm_no_call_without_max_tokens_could_fit_is_refused(tmp_path):
    # A call's estimate is its prompt plus default_max_tokens when it sets no max_tokens: with
    # the default TPM at or below that, every such call of every team on the default (the
    # client documentation's examples among them) was a 429 "can never fit", not to be retried.
    assert error_for(tmp_path, "rate_limits:\n  tpm: 1000\n").endswith(
        "rate_limits.tpm: 1000 leaves no room for a call without max_tokens, "
        "estimated at its prompt plus rate_limits.default_max_tokens (1024); raise it or lower default_max_tokens"
    )
    assert error_for(tmp_path, "rate_limits:\n  tpm: 5000\n  default_max_tokens: 5000\n").endswith(
        "rate_limits.tpm: 5000 leaves no room for a call without max_tokens, "
        "estimated at its prompt plus rate_limits.default_max_tokens (5000); raise it or lower default_max_tokens"
    )
    assert load_config(write(tmp_path, "rate_limits:\n  tpm: 1025\n"), {}).rate_limits.tpm == 1025


def test_a_duration_of_zero_is_refused(tmp_path):
    # A timeout of 0 would fail every call at once; the rule says "positive".
    assert error_for(tmp_path, "upstream:\n  timeouts: {connect: 0s}\n").endswith(
        "upstream.timeouts.connect: must be a positive duration (seconds, or e.g. '30s', '24h')"
    )


def test_a_positive_integer_of_exactly_the_bound_is_accepted(tmp_path):
    config = load_config(write(tmp_path, "rate_limits:\n  rpm: 1000000000000\n  tpm: 1000000000000\n"), {})
    assert config.rate_limits.rpm == config.rate_limits.tpm == MAX_INTEGER


def test_port_65536_is_refused_and_65535_accepted(tmp_path):
    assert error_for(tmp_path, "server:\n  port: 65536\n").endswith("server.port: must be a port number (1-65535)")
    assert load_config(write(tmp_path, "server:\n  port: 65535\n"), {}).server.port == 65535


def test_an_auth_cache_ttl_over_one_second_is_refused(tmp_path):
    # README: revoked keys must stop working within a second should the changes file be unusable.
    assert error_for(tmp_path, "auth:\n  cache_ttl: 1500ms\n").endswith(
        "auth.cache_ttl: must be a duration from 0 to 1 second"
    )
    assert load_config(write(tmp_path, "auth:\n  cache_ttl: 1s\n"), {}).auth.cache_ttl == 1.0


def test_an_empty_tollgate_redis_url_unsets_the_files_redis(tmp_path):
    # An empty variable (TOLLGATE_REDIS_URL= in a unit file) means unset: the in-process limiter.
    config = load_config(write(tmp_path, "redis:\n  url: redis://file:6379/0\n"), {"TOLLGATE_REDIS_URL": ""})
    assert config.redis.url is None


@pytest.mark.parametrize("variable,key", [("TOLLGATE_UPSTREAM_URL", "upstream.url"), ("TOLLGATE_DATABASE_URL", "database.url")])
def test_an_empty_url_variable_of_a_key_that_needs_one_is_refused_naming_the_variable(tmp_path, variable, key):
    # README: an empty variable is the key unset, not the file's value; these two cannot be unset.
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, ""), {variable: ""})
    assert str(refused.value).startswith(f"{variable}: {key}: must be ")


def test_an_upstream_api_key_in_the_file_is_refused_as_a_secret(tmp_path):
    message = error_for(tmp_path, "upstream:\n  api_key: sk-abc\n")
    assert message.endswith(
        "upstream.api_key: secrets are read from the environment only; set TOLLGATE_UPSTREAM_KEY instead"
    )
    assert "sk-abc" not in message


def test_an_empty_secret_variable_means_unset(tmp_path):
    config = load_config(write(tmp_path, ""), {"TOLLGATE_MASTER_KEY": "", "TOLLGATE_UPSTREAM_KEY": ""})
    assert config.master_key is None and config.upstream_key is None


def test_a_team_without_its_team_id_is_refused_naming_the_key(tmp_path):
    assert error_for(tmp_path, "teams:\n  - {organization_id: o}\n").endswith("teams[0].team_id: is required")


def test_a_boolean_is_not_taken_for_an_integer(tmp_path):
    # YAML reads `true` as a boolean, which Python would count as 1.
    assert error_for(tmp_path, "rate_limits:\n  rpm: true\n").endswith(
        "rate_limits.rpm: must be a positive integer (at most 10^12)"
    )


def test_an_identifier_of_64_characters_is_taken_and_of_65_refused(tmp_path):
    text = "organizations:\n  - organization_id: {}\n"
    assert load_config(write(tmp_path, text.format("o" * 64)), {}).organizations[0].organization_id == "o" * 64
    assert error_for(tmp_path, text.format("o" * 65)).endswith(
        "organizations[0].organization_id: must be an identifier (letters, digits, '.', '_', '-'; at most 64)"
    )


@pytest.mark.parametrize(
    "text, path, read_as",
    [
        ("organizations:\n  - organization_id: 2024\n", "organizations[0].organization_id", "a number"),
        ("organizations:\n  - organization_id: no\n", "organizations[0].organization_id", "true or false"),
        ("organizations:\n  - {organization_id: o, name: 456}\n", "organizations[0].name", "a number"),
        ("teams:\n  - {team_id: 2024-01-01, organization_id: o}\n", "teams[0].team_id", "a date"),
        ("model_groups:\n  1.5:\n    models: [m]\n", "model_groups.1.5", "a number"),
    ],
)
def test_a_name_yaml_reads_as_another_type_is_refused_saying_to_quote_it(tmp_path, text, path, read_as):
    # The admin API and the CLI take "2024", "no" or "1.5" as an id or a name; unquoted in the
    # file, YAML 1.1 reads them as a number, a boolean or a date, and the refusal said
    # "must be an identifier (letters, digits, ...)" of what was all digits.
    message = error_for(tmp_path, text)
    assert f": {path}: must be " in message
    assert message.endswith(f"; YAML read it, unquoted, as {read_as}: put it in quotes")


def test_a_model_group_name_may_hold_a_colon(tmp_path):
    config = load_config(write(tmp_path, "model_groups:\n  'openai:fast':\n    models: [gpt-4o-mini]\n"), {})
    assert list(config.model_groups) == ["openai:fast"]


def test_a_price_of_exactly_1000_per_token_is_taken(tmp_path):
    text = "pricing:\n  m: {input_cost_per_token: 1000, output_cost_per_token: 0}\n"
    assert load_config(write(tmp_path, text), {}).pricing["m"].input_cost_per_token == 1000.0


def test_the_environment_overrides_a_section_left_empty_in_the_file(tmp_path):
    config = load_config(write(tmp_path, "redis:\n"), {"TOLLGATE_REDIS_URL": "redis://env:6379/0"})
    assert config.redis.url == "redis://env:6379/0"


def test_a_stale_call_margin_equal_to_a_records_wait_is_warned_of(tmp_path):
    config = load_config(write(tmp_path, "database:\n  busy_timeout: 15s\n"), {})  # 4 x 15 s = the 60 s margin
    (warning,) = serving_warnings(config, workers=1)
    assert warning.startswith("jobs.stale_call_margin (60 s) is not longer than")


def test_describe_leaves_a_url_with_a_user_but_no_password_as_it_is():
    assert describe(Config(redis=RedisConfig(url="redis://user@h:6379/0")))["redis"]["url"] == "redis://user@h:6379/0"


def test_a_database_url_naming_no_file_is_refused(tmp_path):
    # SQLite opens an empty name as a private temporary database, one per connection.
    assert error_for(tmp_path, "database:\n  url: sqlite:///\n").endswith(
        "database.url: must be a database URL: sqlite:///path/to/file.db (PostgreSQL is not supported yet)"
    )


def test_a_read_timeout_longer_than_the_kernel_can_watch_is_refused(tmp_path):
    # Twice the read timeout and 5 s more goes to TCP_USER_TIMEOUT, in milliseconds in a C int:
    # past that every connection failed as it was accepted, and SIGTERM then never ended serve.
    assert error_for(tmp_path, "server:\n  read_timeout: 13d\n").endswith(
        "server.read_timeout: must be a positive duration of at most 12 days (seconds, or e.g. '30s', '1m')"
    )
    assert load_config(write(tmp_path, "server:\n  read_timeout: 12d\n"), {}).server.read_timeout == 12 * 86400


def test_a_read_timeout_of_zero_is_refused(tmp_path):
    # No request could arrive within it: every connection would time out as it was accepted.
    assert error_for(tmp_path, "server:\n  read_timeout: 0\n").endswith(
        "server.read_timeout: must be a positive duration of at most 12 days (seconds, or e.g. '30s', '1m')"
    )


def test_a_read_timeout_a_second_past_twelve_days_is_refused(tmp_path):
    # The bound its message states, to the second.
    assert error_for(tmp_path, f"server:\n  read_timeout: {12 * 86400 + 1}\n").endswith(
        "server.read_timeout: must be a positive duration of at most 12 days (seconds, or e.g. '30s', '1m')"
    )


def test_more_workers_than_a_machine_could_run_are_refused(tmp_path):
    # serve forked until the machine refused, with a traceback.
    assert error_for(tmp_path, "server:\n  workers: 1025\n").endswith(
        "server.workers: must be a number of worker processes from 1 to 1024"
    )
    assert load_config(write(tmp_path, "server:\n  workers: 1024\n"), {}).server.workers == 1024


def test_an_empty_server_host_is_refused_rather_than_listening_on_every_interface(tmp_path):
    assert error_for(tmp_path, "server:\n  host: ''\n").endswith(
        "server.host: must be a host name or address to listen on (0.0.0.0: every IPv4 interface), without a scheme or a port (the port is server.port)"
    )


@pytest.mark.parametrize(
    "text, key",
    [
        ('model_groups:\n  A: {models: [m], description: "\\ud800"}\n', "model_groups.A.description"),
        ('organizations:\n  - {organization_id: o, name: "\\udfff"}\n', "organizations[0].name"),
        ('model_groups:\n  A: {models: ["\\ud800"]}\n', "model_groups.A.models[0]"),
        ('redis:\n  key_prefix: "x\\ud800"\n', "redis.key_prefix"),
    ],
)
def test_a_string_holding_a_lone_surrogate_is_refused_naming_its_key(tmp_path, text, key):
    # YAML's "\ud800" escape makes one; it cannot be stored or sent (UTF-8 has no such character):
    # `serve` and `apply` failed with a traceback from the database.
    assert error_for(tmp_path, text).endswith(f"{key}: must be UTF-8 text (no lone surrogate such as \\ud800)")


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://h:4000?key=1", "must have no query (?...) or fragment (#...): the client sends neither"),
        ("http://h:4000/litellm#x", "must have no query (?...) or fragment (#...): the client sends neither"),
        ("http://user:pw@h:4000", "must hold no user name or password: LiteLLM is sent TOLLGATE_UPSTREAM_KEY"),
    ],
)
def test_an_upstream_url_part_its_client_would_ignore_is_refused(tmp_path, url, message):
    assert error_for(tmp_path, "", {"TOLLGATE_UPSTREAM_URL": url}) == f"TOLLGATE_UPSTREAM_URL: upstream.url: {message}"


def test_a_unix_redis_url_naming_a_host_is_refused(tmp_path):
    # unix://relative/r.sock was read as the socket /r.sock, the word before it ignored.
    assert error_for(tmp_path, "", {"TOLLGATE_REDIS_URL": "unix://relative/r.sock"}) == (
        "TOLLGATE_REDIS_URL: redis.url: must name the socket after three slashes, with no host: "
        "unix:///path/to/redis.sock"
    )


def test_a_database_url_with_a_query_is_refused(tmp_path):
    # The path is opened as it is: sqlite:///x.db?mode=ro made a file named "x.db?mode=ro", read-write.
    assert error_for(tmp_path, "", {"TOLLGATE_DATABASE_URL": "sqlite:///x.db?mode=ro"}) == (
        "TOLLGATE_DATABASE_URL: database.url: must have no query (?...): the path after sqlite:/// is the file's name"
    )


def test_a_database_path_sqlite_would_read_as_a_uri_is_refused(tmp_path):
    # SQLite built with SQLITE_USE_URI (as Debian's and Python's own builds are) reads a name
    # beginning with `file:` as a URI: sqlite:///file:t.db opened t.db, while Tollgate looked
    # for the file `file:t.db` (and kept its change signal beside that). check-config passed it,
    # and `serve --workers 2` then failed to start, saying the database had been removed.
    assert error_for(tmp_path, "", {"TOLLGATE_DATABASE_URL": f"sqlite:///file:{tmp_path}/t.db"}) == (
        "TOLLGATE_DATABASE_URL: database.url: must name the file, not a SQLite URI (file:...): "
        "sqlite:///path/to/file.db"
    )


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///data/t.db\n",  # a newline left at the end of the variable: a second database beside the real one
        "sqlite:/// data/t.db",  # a file whose name begins with a space, beside the one meant
    ],
)
def test_a_database_path_beginning_or_ending_in_whitespace_is_refused(tmp_path, url):
    assert error_for(tmp_path, "", {"TOLLGATE_DATABASE_URL": url}) == (
        "TOLLGATE_DATABASE_URL: database.url: the path must not begin or end with whitespace"
    )


def test_a_unix_redis_url_ending_in_whitespace_is_refused(tmp_path):
    # The socket's path was taken with the space: every connection to Redis failed.
    assert error_for(tmp_path, "", {"TOLLGATE_REDIS_URL": "unix:///run/redis.sock "}) == (
        "TOLLGATE_REDIS_URL: redis.url: must not begin or end with whitespace"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        (f"organizations:\n  - {{organization_id: o, name: {'n' * 257}}}\n",
         "organizations[0].name: must be a name of at most 256 characters"),
        (f"model_groups:\n  A: {{models: [m], description: {'d' * 1001}}}\n",
         "model_groups.A.description: must be a description of at most 1000 characters"),
    ],
)
def test_a_declared_name_or_description_longer_than_the_admin_api_takes_is_refused(tmp_path, text, message):
    # The file declares what the admin API creates: a value it would refuse must not come in this way.
    assert error_for(tmp_path, text).endswith(message)


def test_a_declared_name_and_description_as_long_as_the_admin_api_takes_are_accepted(tmp_path):
    # The bounds are the admin API's own: what it takes, the file may declare.
    text = f"organizations:\n  - {{organization_id: o, name: {'n' * 256}}}\n" \
           f"model_groups:\n  A: {{models: [m], description: {'d' * 1000}}}\n"
    config = load_config(write(tmp_path, text), {})
    assert (config.organizations[0].name, config.model_groups["A"].description) == ("n" * 256, "d" * 1000)


def test_a_declared_organizations_empty_name_is_refused_as_the_admin_api_refuses_it(tmp_path):
    # One rule for both fronts: a name left out or null is the id, an empty one is refused.
    assert error_for(tmp_path, 'organizations:\n  - {organization_id: o, name: ""}\n').endswith(
        "organizations[0].name: must not be empty (leave it out to name the organization after its id)"
    )


def test_a_declared_null_name_or_description_is_none_as_through_the_admin_api(tmp_path):
    text = "organizations:\n  - {organization_id: o, name: null}\n" \
           "model_groups:\n  A: {models: [m], description: null}\n"
    config = load_config(write(tmp_path, text), {})
    assert (config.organizations[0].name, config.model_groups["A"].description) == (None, "")


@pytest.mark.parametrize(
    "text, message",
    [
        ("server:\n  port: 1:20\n", "server.port: must be a port number (1-65535)"),
        ("rate_limits:\n  rpm: 1:00\n", "rate_limits.rpm: must be a positive integer (at most 10^12)"),
        ("server:\n  shutdown_grace: 1:20.5\n", "server.shutdown_grace: must be a positive duration"),
    ],
)
def test_a_base_60_number_is_not_read_as_one(tmp_path, text, message):
    # YAML 1.1 reads 1:20 as 80 (1 x 60 + 20) and 1:20.5 as 80.5: the gateway listened on port 80.
    assert message in error_for(tmp_path, text)


@pytest.mark.parametrize("text", ["server:\n  port: !!int 1:20\n", "server:\n  shutdown_grace: !!float 1:20.5\n"])
def test_a_base_60_number_tagged_as_a_number_is_refused_with_its_line(tmp_path, text):
    # The tag asks for a number, and PyYAML's constructor still read it in base 60 (port 80).
    message = error_for(tmp_path, text)
    assert "line 2, column" in message and "cannot read '1:20" in message
    assert message.endswith("base-60 numbers are not read (YAML 1.2 has none): write the number in base 10")


def test_a_name_written_as_a_base_60_number_is_kept_as_written(tmp_path):
    config = load_config(write(tmp_path, "model_groups:\n  A: {models: [m], description: 1:20}\n"), {})
    assert config.model_groups["A"].description == "1:20"


@pytest.mark.parametrize(
    "text, message",
    [
        ("server:\n  port: 0100\n", "server.port: must be a port number (1-65535)"),
        ("rate_limits:\n  rpm: 010\n", "rate_limits.rpm: must be a positive integer (at most 10^12)"),
        ("teams:\n  - {team_id: t, organization_id: o, credits_allocated: 0100}\n",
         "teams[0].credits_allocated: must be an integer of 0 or more (at most 10^12)"),
    ],
)
def test_a_number_with_a_leading_zero_is_not_read_in_octal(tmp_path, text, message):
    # YAML 1.1 reads 0100 as octal 64 (YAML 1.2 as 100): a team was given 64 credits, not 100.
    assert error_for(tmp_path, text).endswith(
        f"{message}; YAML 1.1 would read a leading 0 as octal (010 as 8): write the number without it"
    )


def test_a_number_tagged_with_a_leading_zero_is_refused_with_its_line(tmp_path):
    message = error_for(tmp_path, "server:\n  port: !!int 0100\n")
    assert "line 2, column" in message and "cannot read '0100'" in message
    assert message.endswith("YAML 1.1 would read a leading 0 as octal (010 as 8): write the number without it")


def test_a_duration_with_a_leading_zero_is_read_in_base_10(tmp_path):
    assert load_config(write(tmp_path, "server:\n  read_timeout: 030\n"), {}).server.read_timeout == 30


def test_a_name_written_with_a_leading_zero_is_kept_as_written(tmp_path):
    config = load_config(write(tmp_path, "teams:\n  - {team_id: 0100, organization_id: o}\n"), {})
    assert config.teams[0].team_id == "0100"


def test_a_yaml_error_says_what_was_being_read_and_from_which_line(tmp_path):
    assert error_for(tmp_path, "server:\n  host: [a, b\n").endswith(
        "not valid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence from line 2)"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("server:\n  shutdown_grace: true\n", "server.shutdown_grace: must be a positive duration"),
        ("pricing:\n  m: {input_cost_per_token: true, output_cost_per_token: 0}\n",
         "pricing.m.input_cost_per_token: must be a number from 0 to 1000 (USD per token)"),
    ],
)
def test_a_boolean_is_not_taken_for_a_number(tmp_path, text, message):
    # YAML reads `true` (or `yes`, `on`) as a boolean, which Python would count as 1.
    assert message in error_for(tmp_path, text)


def test_jobs_may_cost_no_credits(tmp_path):
    config = load_config(write(tmp_path, "jobs:\n  credits_per_job: 0\n"), {})
    assert config.jobs.credits_per_job == 0


def test_a_rate_limit_window_of_one_millisecond_is_accepted(tmp_path):
    assert load_config(write(tmp_path, "rate_limits:\n  window: 1ms\n"), {}).rate_limits.window == 0.001


def test_an_auth_cache_ttl_of_zero_is_accepted(tmp_path):
    # No cache: every request reads its key from the store.
    assert load_config(write(tmp_path, "auth:\n  cache_ttl: 0\n"), {}).auth.cache_ttl == 0


def test_describe_shows_a_database_path_holding_a_colon_and_an_at_sign_as_it_is():
    # A sqlite URL holds a file's path, never a password: check-config printed another path.
    url = "sqlite:///srv/db/team:a@b.db"
    assert describe(Config(database=DatabaseConfig(url=url)))["database"]["url"] == url
