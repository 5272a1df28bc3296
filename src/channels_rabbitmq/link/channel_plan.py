"""Which AMQP channel does what on a link's connections, and the channel objects to use them.

Every connection of a link (and of the check command, which acts as one) uses the same numbers:
1 publishes (confirm mode), 2 consumes the link's queue, 3 runs declarations and purges (a
refused request there never disturbs publishing or consuming), 4 counts the roll call on the
consuming connection and holds its consumer on the roll call's own connection (a roll call that does
not answer holds up nothing else), 5 to 36 bind and unbind groups in
parallel, and normal channels' readers take numbers from 37 up to the connection's
``channel_max``, given back when they close.
"""

from __future__ import annotations

from ..amqp.channel import AmqpChannel
from ..amqp.connection import AmqpConnection
from ..config import LayerConfig

PUBLISH_CHANNEL = 1
CONSUME_CHANNEL = 2
CONTROL_CHANNEL = 3
ROLL_CALL_CHANNEL = 4
#: The channels that bind and unbind groups, in parallel (see Topology._binding_channel). 32: with
#: 10,000 new groups at once, a 3-node Khepri cluster bound them in 20.1 s over one channel, 10.1 s
#: over 5, 5.6 s over 16 and 4.4 s over 32 (RabbitMQ 3.10, one node, over one channel: 5.5 s).
BINDING_CHANNELS = tuple(range(5, 37))
#: Normal channels' readers: from here up to the connection's channel_max.
FIRST_NORMAL_CHANNEL_ID = BINDING_CHANNELS[-1] + 1


def channel(connection: AmqpConnection, number: int, config: LayerConfig) -> AmqpChannel:
    """Channel ``number`` of ``connection``; its requests fail after ``connect_timeout`` without progress."""
    return AmqpChannel(connection, number, stall_limit=config.connect_timeout)
