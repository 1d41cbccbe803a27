"""An MQTT broker inside this process, for ``propctl quickstart`` only: amqtt on loopback.

It runs on its own asyncio loop in a background thread, listens on 127.0.0.1 (a free port unless
one is given), allows anonymous MQTT 3.1.1 clients and keeps nothing on disk. Real fleets use
Mosquitto or any other broker; this one exists so that the quickstart needs nothing installed.

amqtt 0.12.1 gets two things wrong that the fleet relies on, and ``_FleetBroker`` fixes both:

- On every CONNECT it sends the new client the retained messages of every topic filter that any
  client subscribed to, whether or not the new client subscribed to it. A proplet would receive
  the whole fleet's state. Retained messages now go only with the client's own subscriptions.
- It queues a client's SUBSCRIBE and PUBLISH packets separately and may handle a PUBLISH before
  SUBSCRIBEs the client sent earlier. An observer's end-of-snapshot marker then arrives before
  the retained messages of its last subscriptions, and the snapshot misses them. SUBSCRIBEs
  already received are now handled before a PUBLISH from the same client.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from types import TracebackType
from typing import Any

from amqtt.broker import Broker

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_ANONYMOUS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}


class EmbeddedBrokerError(Exception):
    """The embedded broker could not start."""


class _FleetBroker(Broker):  # type: ignore[misc]
    """amqtt's broker with the two fixes described in the module docstring."""

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Any
    ) -> None:
        topic_filter = subscription[0]
        holders = self.subscriptions.get(topic_filter, [])
        if any(held.client_id == session.client_id for held, _qos in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _handle_message_delivery(
        self, client_session: Any, handler: Any, wait_deliver: asyncio.Future[Any]
    ) -> bool:
        # Take every queued SUBSCRIBE before awaiting anything: once this coroutine yields,
        # amqtt's own subscription waiter could take one and handle it after this PUBLISH.
        queue: asyncio.Queue[Any] = handler._pending_subscriptions
        earlier = [queue.get_nowait() for _ in range(queue.qsize())]
        loop = asyncio.get_running_loop()
        for subscription in earlier:
            done: asyncio.Future[Any] = loop.create_future()
            done.set_result(subscription)
            await self._handle_subscription(client_session, handler, done)
        delivered: bool = await super()._handle_message_delivery(
            client_session, handler, wait_deliver
        )
        return delivered


class EmbeddedBroker:
    """amqtt in a background thread: ``start()``, then ``url``; ``stop()`` closes every socket."""

    def __init__(self, host: str = LOOPBACK, port: int = 0) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: _FleetBroker | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Listen and serve; raises ``EmbeddedBrokerError`` when it cannot."""
        if self._thread is not None:
            raise RuntimeError("the embedded broker was already started")
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise EmbeddedBrokerError(f"the embedded broker did not start in {timeout}s")
        if self._error is not None:
            self._thread.join(timeout)
            raise EmbeddedBrokerError(
                f"cannot start the embedded broker on {self.host}:{self.port}: {self._error}"
            ) from self._error

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client, close the listening socket and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        if self._broker is not None:
            shutdown = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
            try:
                shutdown.result(timeout)
            except Exception as exc:  # shut down anyway: the loop below closes the sockets
                log.warning("embedded broker shutdown: %s: %s", type(exc).__name__, exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the embedded broker thread did not end in %ss", timeout)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # The broker thread.
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(_log_loop_error)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            _close(loop)
            return
        self._started.set()
        try:
            loop.run_forever()
        finally:
            _close(loop)

    async def _serve(self) -> None:
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": _ANONYMOUS,
        }
        broker = _FleetBroker(config, loop=asyncio.get_running_loop())
        await broker.start()
        self._broker = broker
        if self.port == 0:
            server = broker._servers["default"].instance
            self.port = int(server.sockets[0].getsockname()[1])


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the loop (client handlers, amqtt's monitors) and close it."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def _log_loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    # amqtt leaves failed delivery tasks unretrieved, e.g. a QoS 1 message to a client that
    # disconnected before its PUBACK; asyncio would print each with a traceback.
    log.debug("embedded broker: %s", context.get("exception") or context.get("message"))
