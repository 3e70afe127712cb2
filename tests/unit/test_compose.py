"""compose/: the compose file and Dockerfile agree with the code they run.

Docker is not needed: the files are parsed, and every value they hand to tempomq goes through the
same parsers the server and CLI use (``tempomq.config``, ``tempomq.cli.build_parser``), so a
misspelt variable, a bad duration or a flag that no longer exists fails here, not in a container.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import socket
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from tempomq import app, cli, config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
DOCKERFILE = COMPOSE_DIR / "Dockerfile"
LOCAL_OVERRIDE = COMPOSE_DIR / "docker-compose.local.yml"
SERVER = "tempomq"
EXAMPLE_PROFILE = "example"
EXAMPLES = ("producer", "consumer")
#: The profile with NATS JetStream and a tempomq releasing into it (--release-to).
NATS_PROFILE = "nats"
NATS_SERVICES = ("nats", "tempomq-nats")
CLIENT_ENV = {"TEMPOMQ_URL", "TEMPOMQ_TOKEN_FILE"}  # read by the SDK examples, not the server
SECRET = "tempomq_admin_token"


# -- loading ------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as text, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return result


def args_of(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def exec_form(text: str) -> list[str]:
    """A JSON-array (exec form) command; the shell form is not used in this Dockerfile."""
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in args_of("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def workdir() -> PurePosixPath:
    (path,) = args_of("WORKDIR")
    return PurePosixPath(path)


def copies() -> list[tuple[str, PurePosixPath]]:
    """Each source of each COPY (relative to the build context) with where it lands."""
    result = []
    for args in args_of("COPY"):
        *sources, dest = [p for p in shlex.split(args) if not p.startswith("--")]
        target = PurePosixPath(dest)
        target = target if target.is_absolute() else workdir() / target
        for source in sources:
            into_dir = dest.endswith(("/", ".")) and not (ROOT / source).is_dir()
            result.append((source, target / PurePosixPath(source).name if into_dir else target))
    return result


def image_path_in_repo(path: str) -> Path:
    """The repository file that ``path`` in the image was copied from."""
    image_path = PurePosixPath(path)
    for source, dest in copies():
        if image_path == dest or ((ROOT / source).is_dir() and dest in image_path.parents):
            return ROOT / source.rstrip("/") / image_path.relative_to(dest)
    raise AssertionError(f"{path} is not copied into the image")


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_compose_test_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def server_settings() -> config.Settings:
    """The settings tempomq starts with in the stack: image ENV, overridden by compose's. A
    secret's file exists only in the container: its content is taken as given."""
    env = {**dockerfile_env(), **environment(services()[SERVER])}
    for name in [n for n in env if n.endswith(config.FILE_SUFFIX)]:
        env[name.removesuffix(config.FILE_SUFFIX)] = "tmq_" + "x" * 40
        del env[name]
    return config.load_settings(vars(server_args()), env)


def server_command() -> list[str]:
    """What the tempomq container runs: compose's command, else the image's CMD."""
    command = services()[SERVER].get("command")
    if command is None:
        (cmd,) = args_of("CMD")
        return exec_form(cmd)
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def server_args() -> Any:
    command = server_command()
    assert command[0] == "tempomq", command
    return cli.build_parser().parse_args(command[1:])


def probe_module() -> ModuleType:
    return load_module(COMPOSE_DIR / "healthcheck.py")


# -- the compose file ---------------------------------------------------------------------------


def test_the_stack_has_its_services() -> None:
    assert set(services()) == {"mysql", "redis", SERVER, *EXAMPLES, *NATS_SERVICES}


def test_every_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        if name in EXAMPLES:
            # Clients: the image's /readyz probe would mark them unhealthy, so they say so.
            assert check.get("disable") is True or check.get("test"), name
        else:
            assert not check.get("disable") and check.get("test"), f"{name}: no active check"


def test_infrastructure_healthchecks_ask_the_service_itself() -> None:
    checks = {name: services()[name]["healthcheck"]["test"] for name in ("mysql", "redis", SERVER)}
    assert "mysqladmin ping" in " ".join(checks["mysql"])
    assert checks["redis"][-2:] == ["redis-cli", "ping"]
    server_check = checks[SERVER]
    assert server_check[0] == "CMD"
    assert image_path_in_repo(server_check[-1]) == COMPOSE_DIR / "healthcheck.py"


def test_the_server_environment_is_known_to_the_cli_and_parses() -> None:
    env = environment(services()[SERVER])
    known = {option.env for option in config.OPTIONS}
    known |= {o.env + config.FILE_SUFFIX for o in config.OPTIONS if o.env_only}
    for name in env:
        if name.startswith(config.ENV_PREFIX):
            assert name in known, f"{name} sets no option of tempomq serve"
    assert config.unknown_env_vars(env) == []
    settings = server_settings()  # raises ConfigError on a malformed value
    assert settings.http == config.HostPort("0.0.0.0", 8080)
    assert settings.data_dir == Path("/data")
    assert settings.redis_url is not None, "the stack keeps delayed messages in Redis"
    assert urlsplit(settings.redis_url).hostname == "redis"
    assert env.get("TEMPOMQ_FLUSH") in ("async", "sync"), "name the flush mode explicitly"


def test_the_server_command_parses_with_the_cli() -> None:
    args = server_args()
    assert args.command == "serve"


def test_example_environment_is_known_and_points_at_the_stack() -> None:
    known = {option.env for option in config.OPTIONS} | CLIENT_ENV
    http = server_settings().http
    for name in EXAMPLES:
        env = environment(services()[name])
        for var in env:
            if var.startswith(config.ENV_PREFIX):
                assert var in known, f"{name}: {var} is read by neither the CLI nor the SDK"
        url = urlsplit(env["TEMPOMQ_URL"])
        assert (url.scheme, url.hostname, url.port) == ("http", SERVER, http.port), name


def test_the_producer_uses_mysql_with_the_stacks_credentials() -> None:
    url = make_url(environment(services()["producer"])["DATABASE_URL"])
    mysql = environment(services()["mysql"])
    assert url.drivername == "mysql+aiomysql"
    assert (url.host, url.port) == ("mysql", 3306)
    assert url.database == mysql["MYSQL_DATABASE"]
    assert (url.username, url.password) == (mysql["MYSQL_USER"], mysql["MYSQL_PASSWORD"])


def test_example_commands_run_the_example_scripts() -> None:
    for name in EXAMPLES:
        command = services()[name]["command"]
        assert command[0] == "python", command
        script = image_path_in_repo(str(workdir() / command[1]))
        assert script == ROOT / "docs" / "examples" / f"{name}.py"
        load_module(script).parse_args(command[2:])  # the arguments it is given exist


def test_depends_on_waits_until_healthy() -> None:
    all_services = services()
    for name, service in all_services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            assert spec == {"condition": "service_healthy"}, f"{name} -> {dependency}: {spec}"
            assert not all_services[dependency]["healthcheck"].get("disable"), dependency
    assert set(all_services[SERVER]["depends_on"]) == {"redis"}, "tempomq needs only Redis"
    assert set(all_services["producer"]["depends_on"]) == {SERVER, "mysql"}
    assert set(all_services["consumer"]["depends_on"]) == {SERVER}


def test_every_host_a_service_talks_to_is_a_dependency() -> None:
    all_services = services()
    for name, service in all_services.items():
        for value in environment(service).values():
            host = urlsplit(value).hostname if "://" in value else None
            if host in all_services:
                assert host in (service.get("depends_on") or {}), f"{name} uses {host}"


def test_redis_keeps_an_append_only_file() -> None:
    command = services()["redis"]["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert words[0] == "redis-server"
    options = dict(zip(words[1::2], words[2::2], strict=True))
    assert options["--appendonly"] == "yes"
    assert options["--appendfsync"] in ("everysec", "always")


def test_data_lives_in_named_volumes() -> None:
    declared = set(compose().get("volumes") or {})
    used: set[str] = set()
    for name, service in services().items():
        for mount in service.get("volumes") or []:
            source, _, target = str(mount).partition(":")
            assert not source.startswith((".", "/", "~")), f"{name}: bind mount {mount}"
            assert source in declared, f"{name}: volume {source} is not declared"
            used.add(source)
            if name == SERVER:
                assert target.split(":")[0] == str(server_settings().data_dir)
    assert used == declared
    stateful = {"mysql", "redis", SERVER}
    assert all(services()[name].get("volumes") for name in stateful)


def test_the_server_port_is_published() -> None:
    ports = [str(p) for p in services()[SERVER]["ports"]]
    assert any(p.rsplit(":", 1)[-1] == str(server_settings().http.port) for p in ports), ports


def test_the_examples_are_in_the_example_profile_only() -> None:
    for name, service in services().items():
        if name in EXAMPLES:
            assert service.get("profiles") == [EXAMPLE_PROFILE], name
        elif name in NATS_SERVICES:
            assert service.get("profiles") == [NATS_PROFILE], name
        else:
            assert not service.get("profiles"), f"{name} must start with a plain `up`"


def test_the_nats_profile_releases_into_its_nats_on_a_redis_database_of_its_own() -> None:
    env = {**dockerfile_env(), **environment(services()["tempomq-nats"])}
    del env["TEMPOMQ_ADMIN_TOKEN_FILE"]  # only in the container; auth as for the tempomq service
    env["TEMPOMQ_ADMIN_TOKEN"] = "tmq_" + "x" * 40
    settings = config.load_settings(vars(server_args()), env)
    assert settings.release_to == "nats://nats:4222"
    assert settings.release_stream and settings.release_topic == "tempomq.{topic}"
    assert settings.redis_url != server_settings().redis_url, "mixed modes on one delay store"
    assert services()["tempomq-nats"]["depends_on"]["nats"]["condition"] == "service_healthy"
    assert "-js" in services()["nats"]["command"]


def test_services_running_the_image_build_it_from_the_dockerfile() -> None:
    for name in (SERVER, *EXAMPLES):
        build = services()[name]["build"]
        context = (COMPOSE_DIR / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    images = [s["image"] for s in services().values() if "build" in s and "image" in s]
    assert len(images) == len(set(images)), "services sharing an image name race to build it"


def test_auth_is_on_with_the_token_in_a_secret_not_a_literal() -> None:
    assert server_settings().auth_enabled, "the stack listens on 0.0.0.0 in its network"
    secrets = compose()["secrets"]
    (source,) = {Path(spec["file"]).parent for spec in secrets.values()}
    assert (COMPOSE_DIR / source).resolve() == COMPOSE_DIR / "secrets"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "compose/secrets/" in ignored, "the token must never be committed"
    for name in (SERVER, "tempomq-nats", *EXAMPLES):
        service = services()[name]
        env = environment(service)
        assert not {"TEMPOMQ_ADMIN_TOKEN", "TEMPOMQ_TOKEN"} & set(env), f"{name}: a literal"
        (path,) = [v for k, v in env.items() if k.endswith("TOKEN_FILE")]
        assert path == f"/run/secrets/{SECRET}" and service["secrets"] == [SECRET], name


# -- the local-images override (compose/docker-compose.local.yml) ------------------------------


@cache
def local_override() -> dict[str, Any]:
    data = yaml.safe_load(LOCAL_OVERRIDE.read_text())
    assert isinstance(data, dict)
    return data


def test_the_override_changes_only_images_and_the_python_base() -> None:
    # The stack the tests run is the users' stack: same commands, environment, healthchecks,
    # volumes, dependencies; only where the images come from differs.
    overridden = local_override()["services"]
    assert set(overridden) <= set(services())
    for name, service in overridden.items():
        assert set(service) <= {"image", "pull_policy", "build"}, name
        if "build" in service:
            assert "build" in services()[name], f"{name} has nothing to build"
            assert set(service["build"]) == {"args"}, name
            assert set(service["build"]["args"]) <= set(build_arg_defaults()), name


def local_image_dockerfile(image: str) -> Path:
    """compose/local/<name>/Dockerfile, from which build-images.sh builds tempomq-local/<name>."""
    assert image.startswith("tempomq-local/"), image
    name = image.removeprefix("tempomq-local/").partition(":")[0]
    return COMPOSE_DIR / "local" / name / "Dockerfile"


def test_the_override_replaces_every_registry_image() -> None:
    overridden = local_override()["services"]
    for name, service in services().items():
        if "build" in service:
            image = overridden[name]["build"]["args"]["PYTHON_IMAGE"]
        else:
            image = overridden[name]["image"]
            assert overridden[name]["pull_policy"] == "never", name
        assert local_image_dockerfile(image).is_file(), f"{name}: nothing builds {image}"
    # Its own name: a locally based image never replaces a user's tempomq:dev.
    assert overridden[SERVER]["image"] != services()[SERVER]["image"]


def test_the_published_port_can_move_and_stays_on_loopback() -> None:
    (port,) = services()[SERVER]["ports"]
    match = re.fullmatch(r"127\.0\.0\.1:\$\{STACK_PORT:-(\d+)\}:(\d+)", str(port))
    assert match, port
    assert match.groups() == ("8080", str(server_settings().http.port))


# -- the Dockerfile -----------------------------------------------------------------------------


def build_arg_defaults() -> dict[str, str]:
    """The Dockerfile's ``ARG NAME=default`` values."""
    return dict(arg.split("=", 1) for arg in args_of("ARG") if "=" in arg)


def base_image() -> str:
    (base,) = args_of("FROM")
    return re.sub(r"\$\{(\w+)\}", lambda m: build_arg_defaults()[m.group(1)], base)


def test_the_base_image_is_slim_python_of_the_supported_version() -> None:
    base = base_image()
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert base.startswith("python:") and base.endswith("-slim"), base
    assert requires == ">=" + base.removeprefix("python:").removesuffix("-slim")


def test_it_runs_as_a_user_other_than_root() -> None:
    kinds = [kw for kw, _ in instructions()]
    users = args_of("USER")
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert kinds.index("USER") < kinds.index("CMD")


def test_its_healthcheck_probes_readyz_with_the_standard_library() -> None:
    (check,) = args_of("HEALTHCHECK")
    command = exec_form(check[check.index("CMD") + len("CMD") :].strip())
    assert command[0] == "python"
    script = image_path_in_repo(command[1])
    assert script == COMPOSE_DIR / "healthcheck.py"
    probe = probe_module()
    assert probe.readyz_url(dockerfile_env()) == "http://127.0.0.1:8080/readyz"


def test_it_copies_the_packages_and_the_spec_in_the_layout_the_app_expects() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    destinations = {dest for _, dest in copies()}
    for package in top_level:
        assert workdir() / package in destinations, f"{package} is not copied"
    # app.py finds the spec at docs/openapi.yaml beside the packages; the image keeps that.
    spec = PurePosixPath(app.OPENAPI_PATH.relative_to(ROOT).as_posix())
    assert image_path_in_repo(str(workdir() / spec)) == app.OPENAPI_PATH
    steps = instructions()
    installs = [i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "install" in args]
    editable = [i for i in installs if "-e ." in steps[i][1]]
    assert editable, "install editable: from site-packages docs/openapi.yaml would be missing"
    last_copy = max(i for i, (kw, _) in enumerate(steps) if kw == "COPY")
    assert editable[0] > last_copy, "the package is installed before all of it is copied"


def test_every_path_it_copies_exists() -> None:
    for source, _ in copies():
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def test_it_listens_and_keeps_data_where_compose_expects() -> None:
    env = dockerfile_env()
    # The image listens on every address, so it refuses to start without credentials.
    with pytest.raises(config.ConfigError, match="auth is off"):
        config.load_settings({}, env)
    settings = config.load_settings({}, {**env, "TEMPOMQ_ADMIN_TOKEN": "tmq_" + "x" * 40})
    (exposed,) = args_of("EXPOSE")
    assert exposed == str(settings.http.port)
    assert settings.http.host == "0.0.0.0"
    (volume,) = args_of("VOLUME")
    assert exec_form(volume) == [str(settings.data_dir)]
    assert config.unknown_env_vars(env) == []


def test_dockerignore_keeps_local_state_out_but_not_what_is_copied() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (".git", ".venv", "data", "**/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert needed in patterns, f".dockerignore misses {needed}"
    for source, _ in copies():
        for pattern in patterns:
            assert not dockerignored(source, pattern), f"{pattern} excludes COPY {source}"


def dockerignored(path: str, pattern: str) -> bool:
    """Whether ``pattern`` excludes ``path`` or a directory above it. Approximates Docker's
    matching (Go's filepath.Match, plus a leading ``**/`` for any depth): enough for ours."""
    parts = path.strip("/").split("/")
    if pattern.startswith("**/"):
        spans = ["/".join(parts[j : i + 1]) for i in range(len(parts)) for j in range(i + 1)]
        return any(fnmatch.fnmatch(span, pattern[3:]) for span in spans)
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)


@pytest.mark.parametrize(
    ("path", "pattern", "excluded"),
    [
        ("docs/openapi.yaml", "docs", True),
        ("docs/openapi.yaml", "**/*.yaml", True),
        ("tempomq/", "**/__pycache__", False),
        ("tempomq/__pycache__/x.pyc", "**/__pycache__", True),
        ("data/x", "data", True),
        ("docs/data.md", "data", False),
    ],
)
def test_the_dockerignore_matcher(path: str, pattern: str, excluded: bool) -> None:
    assert dockerignored(path, pattern) is excluded


# -- the health probe ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "url"),
    [
        (None, "http://127.0.0.1:8080/readyz"),
        ("0.0.0.0:8080", "http://127.0.0.1:8080/readyz"),
        ("127.0.0.1:9090", "http://127.0.0.1:9090/readyz"),
        ("10.1.2.3:8080", "http://10.1.2.3:8080/readyz"),
        ("[::]:8080", "http://[::1]:8080/readyz"),
        ("[::1]:8081", "http://[::1]:8081/readyz"),
    ],
)
def test_the_probe_asks_the_address_the_server_listens_on(address: str | None, url: str) -> None:
    env = {} if address is None else {"TEMPOMQ_HTTP": address}
    assert probe_module().readyz_url(env) == url


def test_the_probe_fails_when_nothing_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        assert probe_module().main([f"http://127.0.0.1:{port}/readyz"]) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
