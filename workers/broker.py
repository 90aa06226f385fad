"""The embedded broker: kombu's filesystem transport with whole messages only.

kombu's ``_put`` creates the ``.msg`` file and then writes into it; a consumer polling in between renames
the still-empty file away, fails to parse it (the worker's consumer loop dies on the JSONDecodeError) and
the producer's bytes land in a file nobody reads. Here a message is written under a name no consumer
matches and renamed into place once complete (``os.replace`` is atomic on one filesystem), so a
consumer sees either no message or all of it. Registered for ``filesystem://`` by ``workers.app``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        # The same name kombu gives it (time order, then a uuid), so consumers read in the same order.
        name = f"{int(round(monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        partial = final + ".part"  # "<…>.<queue>.msg.part" is not "<queue>.msg": consumers skip it
        try:
            with open(partial, "wb") as handle:
                handle.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
