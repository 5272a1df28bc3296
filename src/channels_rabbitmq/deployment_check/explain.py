"""The layer's errors in plain words, with what to do about them.

Every decision here is made on the error's type and fields (reply codes, errno, X.509
and OpenSSL codes), never on its message: messages are for people and may change.
"""

from __future__ import annotations

import errno
import re
import shlex
import ssl

from ..config import BrokerAddress, LayerConfig
from ..exceptions import (
    BrokerAccessRefusedError,
    BrokerConnectionError,
    BrokerConnectionLostError,
    BrokerLoginRefusedError,
    BrokerProtocolError,
    BrokerRefusedError,
    BrokerTimeoutError,
    BrokerTLSError,
    BrokerUnreachableError,
    BrokerVhostRefusedError,
    ReplyCode,
)

# OpenSSL's X.509 verification codes (``verify_code``) told apart below.
X509_CERT_NOT_YET_VALID = 9
X509_CERT_HAS_EXPIRED = 10
X509_HOSTNAME_MISMATCH = 62
X509_IP_ADDRESS_MISMATCH = 64
NAME_MISMATCH = {X509_HOSTNAME_MISMATCH, X509_IP_ADDRESS_MISMATCH}

# OpenSSL's reason codes (``reason``): the broker's alerts, and what a peer without TLS causes.
CLIENT_CERTIFICATE_REQUIRED = {"TLSV13_ALERT_CERTIFICATE_REQUIRED"}
CLIENT_CERTIFICATE_REFUSED = {
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_REVOKED",
}
NOT_TLS = {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"}

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def plain_reason(error: BaseException) -> str:
    """The short reason of an OS or TLS error (``strerror``, OpenSSL's reason), for messages."""
    if isinstance(error, ssl.SSLError) and error.reason:
        return str(error.reason)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def is_access_refused(error: BaseException) -> bool:
    """RabbitMQ's 403 ACCESS_REFUSED to a request: a permission the user lacks.

    A refused request (:class:`BrokerRefusedError`), a refused set-up of the layer
    (:class:`BrokerAccessRefusedError`), or a refused publish, which closes the publishing
    channel (:class:`BrokerConnectionLostError`). A refused login is not one of them.
    """
    return (
        isinstance(error, BrokerRefusedError | BrokerAccessRefusedError | BrokerConnectionLostError)
        and error.reply_code == ReplyCode.ACCESS_REFUSED
    )


def explain_connection_error(
    error: BrokerConnectionError, address: BrokerAddress, config: LayerConfig
) -> tuple[str, list[str]]:
    """What went wrong connecting to ``address``, in plain words, and the hint lines that say
    what to do about it."""
    where = f"{address.host}:{address.port}"
    if isinstance(error, BrokerTLSError):
        return explain_tls_error(error, address, where)
    if isinstance(error, BrokerLoginRefusedError):
        hint = (
            "hint: check the user name and password of the URL (write a '%' in the password as %25); "
            "on the broker: rabbitmqctl list_users, rabbitmqctl authenticate_user USER PASSWORD"
        )
        if address.username == "guest" and address.host not in LOOPBACK:
            hint += "; the user 'guest' may only log in from the broker's own machine (loopback_users)"
        return "login refused: wrong user name or password, or no such user", [hint]
    if isinstance(error, BrokerVhostRefusedError):
        return explain_vhost_refused(error.virtual_host or address.virtual_host, address, config)
    if isinstance(error, BrokerUnreachableError):
        if error.errno == errno.ECONNREFUSED:
            return f"nothing is listening at {where}", [
                "hint: is RabbitMQ running there, and is the port right? (5672 for amqp://, 5671 for amqps://)"
            ]
        return f"cannot connect to {where}: {error.reason}", ["hint: check the network route and firewalls"]
    if isinstance(error, BrokerTimeoutError):
        return f"timed out: no answer within {config.connect_timeout:g}s", [
            "hint: a firewall may drop the packets, the host may be down, or what listens there is not "
            "RabbitMQ; raise --timeout (or connect_timeout) if the network is just slow"
        ]
    if isinstance(error, BrokerConnectionLostError) and error.reply_code is not None:
        return f"RabbitMQ closed the connection: {int(error.reply_code)} {error.reply_text}", [
            "hint: the broker's log says why"
        ]
    if isinstance(error, BrokerProtocolError) or (
        isinstance(error, BrokerConnectionLostError) and error.during_handshake
    ):
        return f"what answers at {where} is not an AMQP 0-9-1 broker, or hung up", [
            "hint: if this is a TLS port, use amqps://; otherwise the broker's log says why"
        ]
    return "cannot connect", []


def explain_tls_error(error: BrokerTLSError, address: BrokerAddress, where: str) -> tuple[str, list[str]]:
    """A failed TLS handshake, told apart by the X.509 verification code and OpenSSL's reason."""
    if error.verify_code in NAME_MISMATCH:
        return f"TLS: the broker's certificate does not name the host {address.host!r}", [
            "hint: connect with a name the certificate was issued for, or give the broker a "
            f"certificate that names {address.host}"
        ]
    if error.verify_code == X509_CERT_HAS_EXPIRED:
        return "TLS: the broker's certificate has expired", ["hint: renew the broker's certificate"]
    if error.verify_code == X509_CERT_NOT_YET_VALID:
        return "TLS: the broker's certificate is not valid yet", [
            "hint: check the clock of this machine and of the broker's"
        ]
    if error.verify_code is not None:
        return "TLS: the broker's certificate is not trusted", [
            "hint: give the CA certificate that signed it: --cafile, or "
            "ssl.create_default_context(cafile=...) in the settings"
        ]
    if error.reason in CLIENT_CERTIFICATE_REQUIRED:
        return "TLS: the broker requires a client certificate", [
            "hint: give one: --certfile and --keyfile, or context.load_cert_chain(certfile, keyfile) "
            "in the settings"
        ]
    if error.reason in CLIENT_CERTIFICATE_REFUSED:
        return "TLS: the broker does not accept the client certificate", [
            "hint: use a client certificate signed by a CA the broker trusts (its ssl_options.cacertfile)"
        ]
    if error.reason in NOT_TLS:
        return f"TLS: {where} does not speak TLS", [
            "hint: use amqp:// for this port, or the broker's TLS port (5671 by default)"
        ]
    return "TLS: the handshake failed", [
        "hint: the broker may require a client certificate (--certfile, --keyfile) or share no "
        "TLS version with this client; the broker's log says which"
    ]


def explain_vhost_refused(vhost: str, address: BrokerAddress, config: LayerConfig) -> tuple[str, list[str]]:
    """RabbitMQ gives a missing vhost and a user without permissions on it the same answer
    (530 NOT_ALLOWED): one explanation covers both, with the commands that tell them apart."""
    quoted = shlex.quote(vhost)
    return (
        f"vhost refused: the vhost {vhost!r} does not exist, or the user {address.username!r} may not use it",
        [
            "hint: RabbitMQ answers both the same way; on the broker, see which:",
            f"  rabbitmqctl list_vhosts    and    rabbitmqctl list_permissions -p {quoted}",
            f"hint: if the vhost is missing, create it (rabbitmqctl add_vhost {quoted}), or fix the URL's "
            "path: it is the vhost, URL-encoded (/%2F is the vhost '/')",
            *permissions_needed(
                address, config.groups_exchange, when="if the user has no permissions there: "
            ),
        ],
    )


def permissions_needed(address: BrokerAddress, exchange: str, when: str = "") -> list[str]:
    """The hint for missing permissions: what the layer needs, and the command that grants it
    (``when`` says in which case the hint applies)."""
    names = f"{re.escape(exchange)}|channels\\..*"
    configure = f"^({names})$"
    write = f"^({re.escape(exchange)}|amq\\.default|channels\\..*)$"
    command = " ".join(
        shlex.quote(part)
        for part in (
            "rabbitmqctl",
            "set_permissions",
            "-p",
            address.virtual_host,
            address.username,
            configure,
            write,
            configure,
        )
    )
    return [
        f"hint: {when}on vhost {address.virtual_host!r} the layer needs configure on the exchange "
        f"{exchange!r} and on queues named channels.*, write on them and on amq.default, read on them; "
        "this grants exactly that:",
        f"  {command}",
    ]
