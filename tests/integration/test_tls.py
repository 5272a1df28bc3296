"""TLS (amqps://) against real RabbitMQ nodes with a test CA: server checks, client certificates.

Two extra nodes on this machine (:mod:`testbed.brokers.nodes`), TLS listeners only, both
trusting the test CA for client certificates (``verify_peer``): ``optional`` accepts
clients without a certificate, ``mutual`` requires one (``fail_if_no_peer_cert``). The
user has a password of its own, so the tests can check that no error message shows it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from channels_rabbitmq.core import RabbitmqChannelLayer
from channels_rabbitmq.exceptions import BrokerConnectionError, BrokerTLSError
from testbed.brokers.certs import CertificateAuthority, Issued
from testbed.brokers.nodes import Node, NodeError, Nodes, unavailable_reason
from tests.conftest import link_of

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("loop_kind")]  # on asyncio and uvloop

USERNAME = "tls-user"
PASSWORD = "Pa55-for-tls-only"


@dataclass
class TlsBrokers:
    ca: CertificateAuthority
    other_ca: CertificateAuthority  # signs nothing the brokers trust
    client: Issued
    stranger: Issued  # a client certificate from other_ca
    optional: Node  # client certificate optional
    mutual: Node  # client certificate required

    def url(self, node: Node, host: str = "localhost") -> str:
        return node.url(host=host, username=USERNAME, password=PASSWORD)

    def context(self, *, cafile: Any = None, client: Issued | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=cafile or self.ca.cert)
        if client is not None:
            context.load_cert_chain(client.cert, client.key)
        return context


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsBrokers]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"cannot run extra RabbitMQ nodes: {reason}")
    with Nodes("tls") as nodes:
        certs = nodes.directory / "certs"  # handed to the rabbitmq user with the nodes' files
        ca = CertificateAuthority(certs, "channels-rabbitmq-test-ca")
        other_ca = CertificateAuthority(certs, "some-other-ca")
        server = ca.issue(
            "server", "localhost", server=True, dns_names=("localhost",), ip_addresses=("127.0.0.1", "::1")
        )
        settings = {
            "ssl_options.cacertfile": nodes.distribution.inside(ca.cert),
            "ssl_options.certfile": nodes.distribution.inside(server.cert),
            "ssl_options.keyfile": nodes.distribution.inside(server.key),
            "ssl_options.verify": "verify_peer",
            "default_user": USERNAME,
            "default_pass": PASSWORD,
        }
        brokers = TlsBrokers(
            ca=ca,
            other_ca=other_ca,
            client=ca.issue("client", "channels-rabbitmq-test-client", server=False),
            stranger=other_ca.issue("stranger", "stranger", server=False),
            optional=nodes.add(tls=True, settings={**settings, "ssl_options.fail_if_no_peer_cert": "false"}),
            mutual=nodes.add(tls=True, settings={**settings, "ssl_options.fail_if_no_peer_cert": "true"}),
        )
        try:
            nodes.start()
        except NodeError as error:
            pytest.fail(f"the TLS test nodes did not come up: {error}", pytrace=False)
        print(f"\n2 TLS nodes started in {nodes.started_seconds:.1f}s")
        yield brokers


LayerFactory = Callable[..., RabbitmqChannelLayer]


@pytest.fixture
async def make_tls_layer() -> AsyncIterator[LayerFactory]:
    layers: list[RabbitmqChannelLayer] = []

    def make(host: str | list[str], **config: Any) -> RabbitmqChannelLayer:
        layer = RabbitmqChannelLayer(host, **config)
        layers.append(layer)
        return layer

    yield make
    for layer in layers:
        await layer.close()


def tls_connections(node: Node) -> list[dict[str, Any]]:
    """The node's connections as it sees them: TLS or not, protocol, client certificate."""
    output = node.ctl(
        "list_connections",
        "ssl",
        "ssl_protocol",
        "peer_cert_subject",
        "client_properties",
        "--formatter",
        "json",
    )
    rows = json.loads(output or "[]")
    for row in rows:
        row["client_properties"] = {key: value for key, _type, value in row["client_properties"]}
    return rows


def connection_of(node: Node, layer: RabbitmqChannelLayer) -> dict[str, Any]:
    name = f"channels_rabbitmq {link_of(layer).queue_name}"
    (row,) = [row for row in tls_connections(node) if row["client_properties"]["connection_name"] == name]
    return row


async def round_trip(layer: RabbitmqChannelLayer) -> None:
    channel = await layer.new_channel()
    await layer.group_add("secure", channel)
    await layer.send(channel, {"type": "direct", "payload": b"\x00secret"})
    await layer.group_send("secure", {"type": "group"})
    assert await asyncio.wait_for(layer.receive(channel), 10) == {"type": "direct", "payload": b"\x00secret"}
    assert await asyncio.wait_for(layer.receive(channel), 10) == {"type": "group"}


# OpenSSL's X.509 verification codes: the broker's certificate is not signed by a CA we trust.
UNTRUSTED = {
    18,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
}
X509_HOSTNAME_MISMATCH = 62


async def refusal(layer: RabbitmqChannelLayer) -> BrokerTLSError:
    """The error that connecting raises, at once: a BrokerTLSError (still a BrokerConnectionError),
    whose message is checked for secrets."""
    started = time.monotonic()
    with pytest.raises(BrokerConnectionError) as caught:
        await layer.new_channel()
    assert time.monotonic() - started < 5, "a TLS refusal is immediate: no waiting for connect_timeout"
    error = caught.value
    assert PASSWORD not in str(error)
    assert PASSWORD not in repr(error)
    assert isinstance(error, BrokerTLSError), f"{type(error).__name__}: {error}"
    assert error.url is not None
    assert PASSWORD not in error.url
    return error


# Configuration ------------------------------------------------------------------------------------


def test_amqps_without_an_ssl_context_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="ssl_context") as caught:
        RabbitmqChannelLayer(f"amqps://{USERNAME}:{PASSWORD}@localhost:5671/%2F")
    assert PASSWORD not in str(caught.value)


def test_an_ssl_context_with_plain_amqp_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="amqps://"):
        RabbitmqChannelLayer(
            "amqp://guest:guest@localhost:5672/%2F", ssl_context=ssl.create_default_context()
        )


# Server certificate -------------------------------------------------------------------------------


async def test_the_right_ca_connects_and_messages_flow(tls: TlsBrokers, make_tls_layer: LayerFactory) -> None:
    layer = make_tls_layer(tls.url(tls.optional), ssl_context=tls.context(), connect_timeout=30)
    await round_trip(layer)
    seen = connection_of(tls.optional, layer)
    assert seen["ssl"] is True
    assert seen["ssl_protocol"] in ("tlsv1.2", "tlsv1.3")
    assert not seen["peer_cert_subject"]  # no client certificate presented


async def test_an_ip_address_url_is_checked_against_the_certificate_ip(
    tls: TlsBrokers, make_tls_layer: LayerFactory
) -> None:
    layer = make_tls_layer(
        tls.url(tls.optional, host="127.0.0.1"), ssl_context=tls.context(), connect_timeout=30
    )
    await round_trip(layer)


async def test_a_wrong_ca_is_refused_naming_the_certificate_not_the_password(
    tls: TlsBrokers, make_tls_layer: LayerFactory
) -> None:
    layer = make_tls_layer(
        tls.url(tls.optional), ssl_context=tls.context(cafile=tls.other_ca.cert), connect_timeout=30
    )
    error = await refusal(layer)
    assert error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert error.verify_code in UNTRUSTED
    assert error.verify_message
    assert error.address == f"127.0.0.1:{tls.optional.port}"
    message = str(error)
    assert "TLS" in message
    assert "certificate" in message
    assert f"localhost:{tls.optional.port}" in message


async def test_a_host_name_the_certificate_does_not_name_is_refused(
    tls: TlsBrokers, make_tls_layer: LayerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate is checked against the URL's host name, not the address it resolved to."""
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def resolve_imposter(host: str, port: int, **kwargs: Any) -> list[Any]:
        if host == "imposter.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        return await resolve(host, port, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", resolve_imposter)
    layer = make_tls_layer(
        tls.url(tls.optional, host="imposter.test"), ssl_context=tls.context(), connect_timeout=30
    )
    error = await refusal(layer)
    assert error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert error.verify_code == X509_HOSTNAME_MISMATCH
    message = str(error)
    assert "TLS" in message
    assert "certificate" in message
    assert "imposter.test" in message


# Client certificates ------------------------------------------------------------------------------


async def test_mutual_tls_with_a_client_certificate_connects(
    tls: TlsBrokers, make_tls_layer: LayerFactory
) -> None:
    layer = make_tls_layer(
        tls.url(tls.mutual), ssl_context=tls.context(client=tls.client), connect_timeout=30
    )
    await round_trip(layer)
    seen = connection_of(tls.mutual, layer)
    assert seen["ssl"] is True
    assert seen["peer_cert_subject"] == "CN=channels-rabbitmq-test-client"


async def test_a_client_certificate_is_also_checked_where_it_is_optional(
    tls: TlsBrokers, make_tls_layer: LayerFactory
) -> None:
    good = make_tls_layer(
        tls.url(tls.optional), ssl_context=tls.context(client=tls.client), connect_timeout=30
    )
    await round_trip(good)
    assert connection_of(tls.optional, good)["peer_cert_subject"] == "CN=channels-rabbitmq-test-client"
    stranger = make_tls_layer(
        tls.url(tls.optional), ssl_context=tls.context(client=tls.stranger), connect_timeout=30
    )
    error = await refusal(stranger)
    assert error.reason == "TLSV1_ALERT_UNKNOWN_CA"  # the broker's alert
    assert error.verify_code is None  # the broker's certificate was fine
    assert "unknown ca" in str(error).lower()


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=lambda version: version.name
)
async def test_mutual_tls_without_a_client_certificate_is_refused_clearly(
    tls: TlsBrokers, make_tls_layer: LayerFactory, version: ssl.TLSVersion
) -> None:
    context = tls.context()
    context.minimum_version = context.maximum_version = version
    layer = make_tls_layer(tls.url(tls.mutual), ssl_context=context, connect_timeout=30)
    error = await refusal(layer)
    message = str(error)
    assert f"localhost:{tls.mutual.port}" in message
    assert error.verify_code is None
    if version is ssl.TLSVersion.TLSv1_3:
        # TLS 1.3: the client's side of the handshake is done before the server checks the
        # client's certificate; the server's alert says what was missing.
        assert error.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
        assert "certificate required" in message.lower()
    else:
        # TLS 1.2: the server aborts the handshake with a generic alert.
        assert error.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
        assert "TLS handshake" in message


async def test_mutual_tls_with_a_certificate_from_another_ca_is_refused(
    tls: TlsBrokers, make_tls_layer: LayerFactory
) -> None:
    layer = make_tls_layer(
        tls.url(tls.mutual), ssl_context=tls.context(client=tls.stranger), connect_timeout=30
    )
    error = await refusal(layer)
    assert error.reason == "TLSV1_ALERT_UNKNOWN_CA"
    assert "unknown ca" in str(error).lower()


async def test_after_refusals_the_node_still_serves_good_clients(
    tls: TlsBrokers, make_tls_layer: LayerFactory
) -> None:
    for node in (tls.optional, tls.mutual):
        layer = make_tls_layer(tls.url(node), ssl_context=tls.context(client=tls.client), connect_timeout=30)
        await round_trip(layer)
