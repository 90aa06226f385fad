"""The embedded broker: kombu's filesystem transport with whole messages only.

kombu's ``_put`` creates the ``.msg`` file and then writes into it; a consumer polling in between renames
the still-empty file away, fails to parse it (the worker's consumer loop dies on the JSONDecodeError) and
the producer's bytes land in a file nobody reads. Here a message is written under a name no consumer
matches and renamed into place once complete (``os.replace`` is atomic on one filesystem), so a
consumer sees either no message or all of it. Registered for ``filesystem://`` by ``workers.app``.

The exchange table (which queue an exchange routes to, a file in the control folder) has the same race:
kombu's ``_queue_bind`` creates or truncates the file and then locks it, so a publisher reading the
table in between read an empty file and failed with a JSONDecodeError (two processes declaring the
queue at the same start-up: the intake and a worker). Here a bind takes a lock of its own for the
read-modify-write and renames a whole new table into place.

A producer that dies mid-write leaves its ``.part`` file behind. Nothing would ever finish or read it
(the sweeper re-queues the message itself from SQL), so a channel that opens removes those older than
``STALE_PART_S``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

log = logging.getLogger(__name__)

PART = ".part"
# A live producer writes a message in milliseconds; a part file this old belongs to one that died.
STALE_PART_S = 3600.0


class Channel(filesystem.Channel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drop_stale_parts()

    def _drop_stale_parts(self) -> None:
        cutoff = time.time() - STALE_PART_S
        dropped = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.data_folder_out):
                if not entry.name.endswith(".msg" + PART):
                    continue
                with contextlib.suppress(OSError):  # another channel may be removing it right now
                    if entry.stat().st_mtime < cutoff:
                        os.remove(entry.path)
                        dropped += 1
        if dropped:
            log.warning("embedded broker: removed %d unfinished message file(s) of producers that died", dropped)

    def queue_bind(self, queue: str, exchange: str | None = None, routing_key: str = "", arguments: Any = None,
                   **kwargs: Any) -> None:
        super().queue_bind(queue, exchange, routing_key, arguments, **kwargs)
        # kombu writes the table only for the first bind its process state sees; another thread of the
        # process may publish before that first bind has written it. Writing is idempotent, so always.
        exchange = exchange or "amq.direct"
        self._queue_bind(exchange, *self.typeof(exchange).prepare_bind(queue, exchange, routing_key, arguments))

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        table = self._exchange_file(exchange)
        self.control_folder.mkdir(exist_ok=True)
        entry = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            with open(table.with_name(table.name + ".lock"), "a") as guard:
                filesystem.lock(guard, filesystem.LOCK_EX)  # one binder at a time reads and rewrites it
                try:
                    queues = self.get_table(exchange)
                    if entry in queues:
                        return
                    queues.insert(0, entry)
                    partial = table.with_name(f"{table.name}.{uuid.uuid4().hex}{PART}")
                    partial.write_bytes(str_to_bytes(dumps(queues)))
                    os.replace(partial, table)  # readers see the old table or the new one, whole
                finally:
                    filesystem.unlock(guard)
        except OSError as exc:
            raise ChannelError(f"Cannot open {table}") from exc

    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # The same name kombu gives it (time order, then a uuid), so consumers read in the same order.
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + PART  # "<…>.<queue>.msg.part" is not "<queue>.msg": consumers skip it
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    """kombu keeps one binding state for every filesystem connection of a process, whatever its folder:
    once one broker folder had the ``answer`` binding, a connection to another folder skipped writing
    its exchange table, and what it published there went nowhere. Here the state is per control folder
    (a process talks to one broker in production; tests and benches open several)."""

    Channel = Channel
    _states: dict[str, virtual.BrokerState] = {}
    _states_lock = threading.Lock()

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        folder = os.path.abspath(client.transport_options.get("control_folder", "control"))
        with self._states_lock:
            self.state = self._states.setdefault(folder, virtual.BrokerState())
