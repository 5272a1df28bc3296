"""Background workers on normal channels: a Django view sends jobs, two ``manage.py runworker``
processes handle them, each job exactly once; a worker killed mid-run loses only what
docs/normal-channels.md says it may: the jobs it had received and not handled (runworker receives ahead),
at most the one it was handling for a worker that receives one job at a time."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import IO

import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from tests.conftest import Broker, LayerFactory, rabbitmqctl
from tests.integration.test_django import REPO, SETTINGS_MODULE, UvicornServer, get_json

JOBS_QUEUE = "channels.normal.thumbnails"
START_TIMEOUT = 30.0


class Worker:
    """One ``python -m django runworker thumbnails`` process on the run's vhost."""

    def __init__(self, name: str, broker_url: str) -> None:
        self.name = name
        self.log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "CHANNELS_RABBITMQ_TEST_URL": broker_url,
            "SERVER_NAME": name,
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "django", "runworker", "thumbnails"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        output = self.output()
        self.log.close()
        return output


def consumers_of(broker: Broker, queue: str) -> int:
    rows = json.loads(
        rabbitmqctl("list_queues", "-p", broker.vhost, "name", "consumers", "--formatter", "json") or "[]"
    )
    return next((row["consumers"] for row in rows if row["name"] == queue), 0)


@pytest.fixture
def site(broker: Broker) -> Iterator[tuple[UvicornServer, list[Worker]]]:
    """A uvicorn server for the view and two runworker processes, all reading the jobs channel."""
    server = UvicornServer("web", broker.url, "asyncio")
    workers = [Worker("worker-1", broker.url), Worker("worker-2", broker.url)]
    try:
        server.wait_until_ready()
        deadline = time.monotonic() + START_TIMEOUT
        while consumers_of(broker, JOBS_QUEUE) < 2:  # each idle worker waits in a receive()
            for worker in workers:
                if worker.process.poll() is not None:
                    pytest.fail(f"{worker.name} exited:\n{worker.output()}")
            if time.monotonic() > deadline:
                pytest.fail("the workers did not start receiving:\n" + "\n".join(w.output() for w in workers))
            time.sleep(0.2)
        yield server, workers
    finally:
        server.stop()
        outputs = {worker.name: worker.stop() for worker in workers}
    for name, output in outputs.items():
        assert "Traceback" not in output, f"{name} logged an error:\n{output}"


async def collect(
    layer: RabbitmqChannelLayer, count: int, quiet: float, channel: str = "thumbnail-results"
) -> list[dict]:
    """Results from the workers, until ``count`` arrived or none came for ``quiet`` seconds."""
    results = []
    while len(results) < count:
        try:
            results.append(await asyncio.wait_for(layer.receive(channel), quiet))
        except asyncio.TimeoutError:
            break
    return results


async def test_runworker_processes_share_the_jobs_of_a_view_each_job_handled_once(
    site: tuple[UvicornServer, list[Worker]], make_layer: LayerFactory
) -> None:
    server, _workers = site
    results_reader = make_layer()
    answer = await asyncio.to_thread(get_json, f"{server.http}/enqueue?first=1&last=100&seconds=0.02", 30)
    assert answer == {"sent": 100}
    results = await collect(results_reader, 100, quiet=10)
    handled = collections.Counter(result["id"] for result in results)
    assert sorted(handled) == list(range(1, 101))  # every job handled...
    assert set(handled.values()) == {1}  # ...once
    by_worker = collections.Counter(result["worker"] for result in results)
    assert set(by_worker) == {"worker-1", "worker-2"}, by_worker  # both did work


async def test_a_runworker_killed_mid_run_loses_only_jobs_it_had_received(
    site: tuple[UvicornServer, list[Worker]], make_layer: LayerFactory, broker: Broker
) -> None:
    """Channels' runworker receives as fast as jobs come and queues them for its consumer, so a
    killed worker loses what it had received and not handled; nothing else. The survivor handles
    every job still in the queue, and nothing is handled twice."""
    server, workers = site
    results_reader = make_layer()
    answer = await asyncio.to_thread(get_json, f"{server.http}/enqueue?first=1&last=120&seconds=0.03", 30)
    assert answer == {"sent": 120}
    before_kill = await collect(results_reader, 20, quiet=10)
    killed_at = time.time()
    workers[0].process.send_signal(signal.SIGKILL)
    workers[0].process.wait()
    after_kill = await collect(results_reader, 120 - len(before_kill), quiet=5)
    results = before_kill + after_kill
    handled = collections.Counter(result["id"] for result in results)
    assert set(handled.values()) == {1}, "a job was handled twice"
    # Results the killed worker published just before its death may still be on their way when the
    # kill lands, so the order of arrival says nothing; the time each job was handled does.
    handled_after_kill = [result for result in results if result["handled_at"] > killed_at]
    assert handled_after_kill, "nobody handled the jobs left in the queue"
    assert {result["worker"] for result in handled_after_kill} == {"worker-2"}
    facts = json.loads(
        rabbitmqctl("list_queues", "-p", broker.vhost, "name", "messages", "consumers", "--formatter", "json")
    )
    jobs = next(row for row in facts if row["name"] == JOBS_QUEUE)
    assert (jobs["messages"], jobs["consumers"]) == (0, 1)  # nothing left behind, nothing held
    lost = sorted(set(range(1, 121)) - set(handled))
    print(f"\nthe killed runworker had received and not handled {len(lost)} job(s): {lost}")


WORKER_SCRIPT = """
import asyncio, os, sys
from channels_rabbitmq.core import RabbitmqChannelLayer

async def main():
    layer = RabbitmqChannelLayer(host=sys.argv[1])
    while True:  # one job at a time: receive it, handle it, report it
        job = await layer.receive(sys.argv[2])
        await asyncio.sleep(job["seconds"])
        await layer.send(sys.argv[3], {"type": "done", "id": job["id"], "worker": sys.argv[4]})

asyncio.run(main())
"""


def start_plain_worker(url: str, jobs: str, results: str, name: str) -> subprocess.Popen[bytes]:
    """A process that uses the layer directly, as a job queue: see ``WORKER_SCRIPT``."""
    command = [sys.executable, "-c", WORKER_SCRIPT, url, jobs, results, name]
    return subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL)


async def test_a_worker_receiving_one_job_at_a_time_killed_loses_at_most_the_job_it_was_handling(
    broker: Broker, make_layer: LayerFactory
) -> None:
    jobs, results = f"jobs-{os.getpid()}-{time.monotonic_ns()}", f"results-{time.monotonic_ns()}"
    workers = [start_plain_worker(broker.url, jobs, results, name) for name in ("first", "second")]
    try:
        sender = make_layer()
        deadline = time.monotonic() + START_TIMEOUT
        while consumers_of(broker, f"channels.normal.{jobs}") < 2:
            assert time.monotonic() < deadline, "the workers did not start receiving"
            await asyncio.sleep(0.1)
        for job in range(60):
            await sender.send(jobs, {"type": "job", "id": job, "seconds": 0.03})
        before_kill = await collect(sender, 10, quiet=10, channel=results)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        after_kill = await collect(sender, 60 - len(before_kill), quiet=5, channel=results)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    handled = collections.Counter(result["id"] for result in before_kill + after_kill)
    assert set(handled.values()) == {1}, "a job was handled twice"
    lost = set(range(60)) - set(handled)
    assert len(lost) <= 1, f"lost {sorted(lost)}: more than the one job the killed worker was handling"
