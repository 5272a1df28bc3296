"""The Django app: system checks of the layer's CONFIG (no I/O), and ``manage.py rabbitmq_check``.

The checks run in this process on CHANNEL_LAYERS overridden per case, and as ``manage.py
check`` in a process of its own; the command runs against the real broker and must say what
``python -m channels_rabbitmq check`` says, with the same exit status.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Broker

REPO = Path(__file__).resolve().parents[2]
SETTINGS_MODULE = "tests.django_project.settings"
BACKEND = "channels_rabbitmq.core.RabbitmqChannelLayer"
PASSWORD = "Pw/Check:S3cret@1"  # in URLs: Pw%2FCheck%3AS3cret%401
URL_PASSWORD = "Pw%2FCheck%3AS3cret%401"


@pytest.fixture(scope="module")
def django_checks() -> Iterator[Any]:
    """Django set up with the test project (its INSTALLED_APPS has "channels_rabbitmq", the
    documented entry, which loads the app of ``channels_rabbitmq.django_app``)."""
    import django
    from django.apps import apps

    previous = os.environ.get("DJANGO_SETTINGS_MODULE")
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    try:
        if not apps.ready:
            django.setup()
        from django.core import checks

        yield checks
    finally:
        if previous is None:
            os.environ.pop("DJANGO_SETTINGS_MODULE", None)
        else:
            os.environ["DJANGO_SETTINGS_MODULE"] = previous


def run_checks(
    django_checks: Any, config: object, *, deploy: bool = False, backend: str = BACKEND
) -> list[Any]:
    from django.test import override_settings

    entry = {"BACKEND": backend} if config is None else {"BACKEND": backend, "CONFIG": config}
    with override_settings(CHANNEL_LAYERS={"default": entry}):
        return django_checks.run_checks(tags=["channels_rabbitmq"], include_deployment_checks=deploy)


def ids(messages: list[Any]) -> list[str]:
    return [message.id for message in messages]


def assert_no_password(messages: list[Any]) -> None:
    for message in messages:
        text = f"{message.msg} {message.hint} {message.obj}"
        assert PASSWORD not in text, text
        assert URL_PASSWORD not in text, text


def test_the_app_registers_its_checks_and_a_good_config_passes(django_checks: Any) -> None:
    assert "channels_rabbitmq" in django_checks.registry.registry.tags_available()
    good = {"host": "amqp://guest:guest@127.0.0.1:5672/%2F", "capacity": 50, "expiry": 30}
    assert run_checks(django_checks, good) == []
    assert run_checks(django_checks, good, deploy=True) == []


@pytest.mark.parametrize(
    ("config", "expected", "in_message", "in_hint"),
    [
        (["amqp://localhost"], "channels_rabbitmq.E001", "is a list, not a dict", "keyword arguments"),
        ({"hots": "amqp://localhost"}, "channels_rabbitmq.E002", "unknown CONFIG key 'hots'", "'host'"),
        ({"capacity": "100"}, "channels_rabbitmq.E003", "capacity must be an integer", "Configuration"),
        (
            {"ssl_context": "yes"},
            "channels_rabbitmq.E003",
            "ssl_context must be an ssl.SSLContext",
            "Configuration",
        ),
        ({"expiry": 0}, "channels_rabbitmq.E004", "expiry must be a finite number", "Configuration"),
        ({"host": "http://localhost"}, "channels_rabbitmq.E004", "amqp:// or amqps://", "Configuration"),
        (
            {"host": f"amqp://app:{URL_PASSWORD}@localhost:notaport/%2F"},
            "channels_rabbitmq.E004",
            "not a valid AMQP URL",
            "Configuration page",
        ),
        (  # the "@" percent-encoded: nothing marks where the password ends
            {"host": f"amqp://app:{URL_PASSWORD}%40rmq2.example.com/asgi"},
            "channels_rabbitmq.E004",
            "not a valid AMQP URL",
            "Configuration page",
        ),
        (
            {"host": f"amqp://app:{URL_PASSWORD}"},
            "channels_rabbitmq.E004",
            "not a valid AMQP URL",
            "Configuration",
        ),
    ],
)
def test_a_bad_config_is_an_error_with_a_stable_id_and_a_hint(
    django_checks: Any, config: object, expected: str, in_message: str, in_hint: str
) -> None:
    messages = run_checks(django_checks, config)
    assert ids(messages) == [expected]
    [message] = messages
    assert message.is_serious()
    assert in_message in message.msg
    assert in_hint in message.hint
    assert message.obj == "CHANNEL_LAYERS['default']"
    assert_no_password(messages)


def test_unknown_keys_and_a_bad_value_are_all_reported_and_no_password_shown(django_checks: Any) -> None:
    config = {
        "host": f"amqp://app:{URL_PASSWORD}@rabbit.example.com/%2F",
        "capacty": 10,
        "zzz": 1,
        "expiry": -1,
    }
    messages = run_checks(django_checks, config)
    assert ids(messages) == ["channels_rabbitmq.E002", "channels_rabbitmq.E002", "channels_rabbitmq.E004"]
    assert messages[0].hint == "did you mean 'capacity'?"
    assert messages[1].hint.startswith("the keys are: ")
    assert_no_password(messages)


def test_warnings_for_guest_far_away_and_in_deployment(django_checks: Any) -> None:
    guest_far = {"host": "amqp://guest:guest@rabbit.example.com:5672/%2F"}
    assert ids(run_checks(django_checks, guest_far)) == ["channels_rabbitmq.W001"]
    # --deploy: no host at all, clear text to another machine, TLS that verifies nothing.
    assert ids(run_checks(django_checks, None, deploy=True)) == ["channels_rabbitmq.W002"]
    clear = {"host": f"amqp://app:{URL_PASSWORD}@rabbit.example.com/%2F"}
    messages = run_checks(django_checks, clear, deploy=True)
    assert ids(messages) == ["channels_rabbitmq.W003"]
    assert not messages[0].is_serious()
    assert_no_password(messages)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    unverified = {"host": "amqps://app:secret@rabbit.example.com/%2F", "ssl_context": context}
    messages = run_checks(django_checks, unverified, deploy=True)
    assert ids(messages) == ["channels_rabbitmq.W004"]
    assert "certificate" in messages[0].msg
    assert run_checks(django_checks, clear) == []  # deployment warnings only with --deploy


def test_other_backends_are_not_checked(django_checks: Any) -> None:
    assert run_checks(django_checks, {"anything": 1}, backend="channels.layers.InMemoryChannelLayer") == []


# In processes of their own -------------------------------------------------------------------------


def settings_module(
    directory: Path, name: str, config: dict[str, Any], *, installed_apps: list[str] | None = None
) -> str:
    """A settings module: the test project's, with the default layer's CONFIG replaced (and
    INSTALLED_APPS, when given)."""
    text = (
        f"from tests.django_project.settings import *  # noqa: F403\n"
        f"CHANNEL_LAYERS = {{'default': {{'BACKEND': {BACKEND!r}, 'CONFIG': {config!r}}}}}\n"
    )
    if installed_apps is not None:
        text += f"INSTALLED_APPS = {installed_apps!r}\n"
    (directory / f"{name}.py").write_text(text)
    return name


def run(*args: str, settings: str, directory: Path | None = None, broker: Broker | None = None) -> Any:
    environment = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    environment["PYTHONPATH"] = os.pathsep.join(str(path) for path in (REPO, directory) if path is not None)
    if broker is not None:
        environment["CHANNELS_RABBITMQ_TEST_URL"] = broker.url
    return subprocess.run(
        [sys.executable, *args, "--settings", settings],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=90,
        check=False,
    )


def test_manage_py_check_reports_the_errors_and_fails(tmp_path: Path) -> None:
    name = settings_module(
        tmp_path, "bad_settings", {"host": f"amqp://app:{URL_PASSWORD}@localhost/%2F", "hots": 1}
    )
    checked = run("-m", "django", "check", settings=name, directory=tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "channels_rabbitmq.E002" in checked.stderr
    assert "did you mean 'host'?" in checked.stderr
    assert PASSWORD not in checked.stderr + checked.stdout
    assert URL_PASSWORD not in checked.stderr + checked.stdout


#: What Django made of the entry: the app's name, label and AppConfig module, and the app
#: that provides rabbitmq_check (on the line that starts with "app:"; ``manage.py shell``
#: may print lines of its own).
DESCRIBE_APP = """
from django.apps import apps
from django.core.management import get_commands
config = apps.get_app_config("channels_rabbitmq")
print("app:", config.name, config.label, type(config).__module__, get_commands().get("rabbitmq_check"))
"""


@pytest.mark.parametrize("entry", ["channels_rabbitmq", "channels_rabbitmq.django_app"])
def test_either_installed_apps_entry_gives_the_checks_and_rabbitmq_check(entry: str, tmp_path: Path) -> None:
    """The documented entry goes through the shim ``channels_rabbitmq/apps.py`` to the app in
    ``channels_rabbitmq.django_app``; naming that package does the same. Without the shim,
    "channels_rabbitmq" would be a bare app: no checks, no command, and no error."""
    name = settings_module(
        tmp_path, "entry_settings", {"host": "http://localhost"}, installed_apps=["channels", entry]
    )
    described = run("-m", "django", "shell", "-c", DESCRIBE_APP, settings=name, directory=tmp_path)
    assert described.returncode == 0, described.stdout + described.stderr
    [app] = [line for line in described.stdout.splitlines() if line.startswith("app: ")]
    assert app.split()[1:] == [
        "channels_rabbitmq.django_app",
        "channels_rabbitmq",
        "channels_rabbitmq.django_app.apps",
        "channels_rabbitmq.django_app",
    ]
    checked = run("-m", "django", "check", settings=name, directory=tmp_path)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "(channels_rabbitmq.E004) host must start with amqp:// or amqps://" in checked.stderr
    command = run("-m", "django", "rabbitmq_check", settings=name, directory=tmp_path)
    assert command.returncode == 1, command.stdout + command.stderr
    first, *_, last = command.stdout.splitlines()
    assert first.startswith("FAIL  settings: the layer refuses the CONFIG of CHANNEL_LAYERS['default']")
    assert last == "1 problem found"


def steps(output: str) -> list[tuple[str, str]]:
    """(status, step) of each line: what both commands must agree on (timings differ)."""
    return [
        (line.split()[0], line.split()[1].rstrip(":"))
        for line in output.splitlines()
        if line and not line.startswith(" ") and line.split()[0] in ("ok", "FAIL", "skip")
    ]


def test_rabbitmq_check_is_the_command_line_check(broker: Broker) -> None:
    command = run("-m", "django", "rabbitmq_check", settings=SETTINGS_MODULE, broker=broker)
    cli = run("-m", "channels_rabbitmq", "check", settings=SETTINGS_MODULE, broker=broker)
    assert command.returncode == cli.returncode == 0, command.stdout + command.stderr
    assert steps(command.stdout) == steps(cli.stdout)
    assert [step for _status, step in steps(command.stdout)] == [
        "settings",
        "connect",
        "permissions",
        "versions",
        "layer",
        "layer",
        "layer",
        "latency",
    ]
    assert command.stdout.splitlines()[-1] == cli.stdout.splitlines()[-1] == "all checks passed"
    assert "\n\n" not in command.stdout


def test_rabbitmq_check_fails_like_the_command_line_check_and_hides_the_password(
    broker: Broker, tmp_path: Path
) -> None:
    host = broker.url_for(username="guest", password=PASSWORD)
    name = settings_module(tmp_path, "wrong_password_settings", {"host": host})
    command = run("-m", "django", "rabbitmq_check", settings=name, directory=tmp_path)
    cli = run("-m", "channels_rabbitmq", "check", settings=name, directory=tmp_path)
    assert command.returncode == cli.returncode == 1, command.stdout + command.stderr
    assert steps(command.stdout) == steps(cli.stdout)
    assert ("FAIL", "connect") in steps(command.stdout)
    assert "login refused" in command.stdout
    assert command.stdout.splitlines()[-1] == "1 problem found"
    for output in (command.stdout + command.stderr, cli.stdout + cli.stderr):
        assert PASSWORD not in output
        assert URL_PASSWORD not in output
