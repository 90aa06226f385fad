"""The embedded broker never hands out a half-written message (workers/broker.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from kombu import Connection


def _connection(folder: Path, transport: str = "workers.broker:Transport") -> Connection:
    # control_folder too: kombu's default is ./control in the working directory (the repository).
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder),
               "processed_folder": str(folder.parent / "processed"), "store_processed": False,
               "control_folder": str(folder.parent / "control")}
    return Connection(transport=transport, transport_options=options)


def test_a_consumer_polling_during_puts_gets_every_message_whole(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "processed").mkdir()
    big = "x" * 200_000  # long enough that a write is not one instant
    sent = 200
    done = threading.Event()

    def produce() -> None:
        with _connection(folder) as conn:
            queue = conn.SimpleQueue("answer")
            for n in range(sent):
                queue.put({"n": n, "body": big})
            queue.close()
        done.set()

    received: list[int] = []
    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 60
    with _connection(folder) as conn:
        queue = conn.SimpleQueue("answer")
        while len(received) < sent and time.monotonic() < deadline:
            try:
                message = queue.get(block=True, timeout=0.01)  # polls while files are being written
            except queue.Empty:
                continue
            assert message.payload["body"] == big  # whole, never empty or cut
            received.append(message.payload["n"])
            message.ack()
        queue.close()
    producer.join()
    assert sorted(received) == list(range(sent))
    assert not list(folder.glob("*.part"))


def test_the_app_uses_it_for_the_embedded_broker(tmp_path: Path) -> None:
    from kombu.transport import resolve_transport

    from core.settings import Settings
    from workers.app import configure

    configure(Settings(data_dir=tmp_path))
    assert resolve_transport("filesystem").__module__ == "workers.broker"
