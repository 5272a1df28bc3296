"""The support matrix (``make test-matrix``): every supported Python with every Django it can run.

Each session installs the project from this checkout as a user would (``pip install .[test,prometheus]``,
not editable), pins one Django series, and runs the unit tests and the core integration tests
against the broker at ``AMQP_URL``. Channels is the newest 4.x (``channels>=4.2.2,<5``).

Django 5.2 (the LTS) runs on Python 3.10 to 3.13. Django 6.1 (the latest release) needs
Python 3.12 or later, so "Python 3.10 with Django 6.1" and "Python 3.11 with Django 6.1"
cannot exist: they are not sessions (pip would refuse to install them), and nothing else is
left out. A missing interpreter is an error, not a skip.

The interpreters are looked up on ``PATH`` as ``python3.X``; the pyenv installs under
``$PYENV_ROOT/versions`` (default ``~/.pyenv``) come first, since pyenv's own shims answer
only for the versions it is told to use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox

PYTHONS = ("3.10", "3.11", "3.12", "3.13")

#: Each Django series tested, with the oldest Python it supports.
DJANGO_SERIES = {"5.2": "3.10", "6.1": "3.12"}

#: The integration tests of the layer's API, of event loops and threads, and of Django (uvicorn
#: servers, websockets, the test communicator, the system checks and the rabbitmq_check command, the
#: Prometheus endpoint), each on asyncio's loop and on uvloop. The other
#: integration modules run in ``make test`` only, on the project's own Python: broker faults,
#: clusters, TLS, the browser, the benchmark, the CLI and scripts/with-broker test this machine's
#: set-up and the broker more than the interpreter, and the matrix must stay well under 25 minutes
#: (test_normal_channels.py alone would add a minute and a half to each session: mostly sleeps).
#: Two pytest-xdist workers, each with whole files and a vhost of its own: the tests mostly wait
#: (on the broker, rabbitmqctl, servers starting), so this halves a session's time on two cores.
PYTEST_OPTIONS = ("-q", "-n", "2", "--dist", "loadfile")
CORE_INTEGRATION = (
    "tests/integration/test_layer.py",
    "tests/integration/test_loops_and_threads.py",
    "tests/integration/test_django.py",
    "tests/integration/test_django_checks.py",
    "tests/integration/test_prometheus.py",
)

nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = True
nox.options.reuse_venv = "no"  # a fresh environment: the project is installed, not linked


def version_key(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def pyenv_binary_folders() -> list[str]:
    """The ``bin`` folder of the newest pyenv install of each Python in PYTHONS, where there is one."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    folders = []
    for series in PYTHONS:
        releases = [
            path.name
            for path in root.glob(f"{series}.*")
            if re.fullmatch(rf"{re.escape(series)}\.\d+", path.name) and (path / "bin").is_dir()
        ]
        if releases:
            folders.append(str(root / max(releases, key=version_key) / "bin"))
    return folders


os.environ["PATH"] = os.pathsep.join([*pyenv_binary_folders(), os.environ.get("PATH", "")])


#: (Python, Django series) of every session: each pair where that Django supports that Python.
COMBINATIONS = [
    (python, django)
    for python in PYTHONS
    for django, oldest_python in DJANGO_SERIES.items()
    if version_key(python) >= version_key(oldest_python)
]

#: Printed first in each session, so its log says what was really installed.
PRINT_VERSIONS = (
    "import sys, django, channels; print('Python', sys.version.split()[0], "
    "'| Django', django.__version__, '| Channels', channels.__version__)"
)


@nox.session
@nox.parametrize(
    ("python", "django"),
    COMBINATIONS,
    ids=[f"{python}-django{django}" for python, django in COMBINATIONS],
)
def tests(session: nox.Session, django: str) -> None:
    """Install the project with one Django series; run the unit and the core integration tests.

    Arguments after ``--`` replace the test paths and options given to pytest.
    """
    # prometheus: the test project serves /metrics, and the collector is tested on every Python too.
    session.install(".[test,prometheus]", f"django~={django}.0")
    session.run("python", "-c", PRINT_VERSIONS)
    session.run(
        "python", "-m", "pytest", *(session.posargs or [*PYTEST_OPTIONS, "tests/unit", *CORE_INTEGRATION])
    )
