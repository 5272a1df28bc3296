"""The layer's own I/O thread, for callers whose event loops come and go.

``async_to_sync(layer.group_send)(...)`` from a Celery task, a management command or any
plain thread runs on a brand-new event loop that asgiref closes after the call. A
connection made on such a loop would die with it, so these callers share one
long-lived :class:`~.broker.BrokerLink` that lives on this thread's loop; their calls
travel there with ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

logger = logging.getLogger(__name__)


class BackgroundLoop:
    """An event loop running forever in a daemon thread, until :meth:`stop`.

    The loop comes from the event loop policy: asyncio's own, or uvloop's after
    ``uvloop.install()``; the layer works on both.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())  # getaddrinfo's threads
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            self._stopped.set_result(None)

    @property
    def is_running(self) -> bool:
        return not self._stopped.done()

    async def stop(self) -> None:
        """Stop the loop (its tasks are cancelled) and wait for the thread to end."""
        if not self._stopped.done():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:
                pass  # already closed
            await asyncio.wrap_future(self._stopped)
        self._thread.join(timeout=5)
