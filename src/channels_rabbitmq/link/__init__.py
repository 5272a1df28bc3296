"""A broker link: one event loop's queue and connections (:class:`BrokerLink`), in rooms:

- :mod:`.link`: the layer's operations on one loop;
- :mod:`.supervisor`: one connection kept up (states, backoff, failover);
- :mod:`.connector`: opening a connection as the layer does (shared with ``check``);
- :mod:`.topology`: the exchange, the queue, group bindings and the probe;
- :mod:`.inbound`: deliveries into the router, acknowledgements, expiry;
- :mod:`.control`: control messages: group calls for other processes' channels, flush() everywhere;
- :mod:`.errors`: the AMQP client's errors mapped to the layer's.
"""

from .link import BrokerLink

__all__ = ["BrokerLink"]
