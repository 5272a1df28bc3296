"""What every part of a broker link has: one small lifecycle, which the link drives for all of them.

A :class:`~.link.BrokerLink` is made of parts, each owning one thing: :mod:`.topology` (what is
declared and bound), :mod:`.inbound` (deliveries, acknowledgements), :mod:`.control` (requests
between processes), :mod:`.normal` (normal channels), :mod:`.notice` (the reconnect notice) and
:mod:`.roll_call` (the link's place in ``flush()``'s roll call). The link tells each of them, in
one loop, when its consuming connection comes up or goes down and when the link closes; a part
that has nothing to do then keeps the default. No part changes another's state: what one needs
of another it is given at construction, and asks for through a named method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..amqp.connection import AmqpConnection


class LinkPart:
    """One part of a broker link; every method runs on the link's loop."""

    def consuming_up(self, connection: AmqpConnection) -> None:
        """The consuming connection is set up (queue declared, groups bound, consuming) and in use."""

    def consuming_down(self) -> None:
        """The consuming connection was lost, and the link's queue and bindings with it."""

    def close(self) -> None:
        """The link is closing: stop timers and tasks, and fail or end what waits."""
