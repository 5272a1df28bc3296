"""An outage as the operator sees it: the logs (one warning, one info line, never the password) and
``layer.stats()`` (the state, the outage time, the reconnections), through the fault proxy.

The layer logs in as a user with a password of its own, so that every log record of the whole
outage, at every level, can be searched for it in each spelling.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from testbed.faults.proxy import FaultProxy
from tests.conftest import Broker, eventually, rabbitmqctl

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("loop_kind")]  # on asyncio and uvloop

PASSWORD = "Outage/pw:S3cret@x"  # URL-encoding changes it: Outage%2Fpw%3AS3cret%40x
FAST = {"connect_timeout": 3, "reconnect_delay_min": 0.05, "reconnect_delay_max": 0.3, "connection_wait": 5}


@pytest.fixture(scope="module")
def user(broker: Broker) -> Iterator[str]:
    name = f"channels_rabbitmq_outage_{secrets.token_hex(3)}"
    rabbitmqctl("add_user", name, PASSWORD)
    rabbitmqctl("set_permissions", "-p", broker.vhost, name, ".*", ".*", ".*")
    try:
        yield name
    finally:
        rabbitmqctl("delete_user", name)


def layer_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("channels_rabbitmq") and record.levelno == level
    ]


async def test_an_outage_logs_one_warning_and_one_info_line_no_password_and_shows_in_stats(
    broker: Broker, user: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    url = proxy.url(broker.url_for(username=user, password=PASSWORD))
    layer = RabbitmqChannelLayer(url, **FAST)
    try:
        with caplog.at_level(logging.DEBUG, logger="channels_rabbitmq"):
            channel = await layer.new_channel()
            assert layer.stats().state == "up"
            proxy.refuse()  # each reconnection attempt fails at once: several retries
            proxy.cut()
            await eventually(lambda: layer.stats().state == "recovering", "the outage to show")
            retries_before = proxy.refused
            await eventually(lambda: proxy.refused >= retries_before + 3, "three failed retries")
            during = layer.stats()
            assert not during.is_up
            assert during.current_outage_seconds > 0
            assert during.outage_seconds >= during.current_outage_seconds
            assert (during.connections, during.reconnections) == (2, 0)
            proxy.accept()
            await eventually(lambda: layer.stats().state == "up", "the recovery")
            await layer.send(channel, {"type": "back"})
            assert await asyncio.wait_for(layer.receive(channel), 10) == {"type": "back"}
        after = layer.stats()
        assert (after.connections, after.reconnections) == (4, 2)  # both connections came back
        assert after.current_outage_seconds == 0
        assert after.outage_seconds >= during.outage_seconds
        [link] = after.links
        assert (link.consume_state, link.publish_state) == ("up", "up")

        warnings = layer_records(caplog, logging.WARNING)
        assert len(warnings) == 1, warnings
        assert "reconnecting" in warnings[0]
        infos = layer_records(caplog, logging.INFO)
        assert len(infos) == 1, infos
        assert infos[0].startswith("reconnected to")
        assert len(layer_records(caplog, logging.DEBUG)) >= 3  # the retries
        assert not layer_records(caplog, logging.ERROR)
        everything = "\n".join(
            f"{record.getMessage()} {record.args!r} {caplog.text}" for record in caplog.records
        )
        assert user in everything  # the user is named: the search below looks at the right text
        for spelling in (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD)):
            assert spelling not in everything
    finally:
        await layer.close()
