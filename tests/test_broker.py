"""The embedded broker never hands out a half-written message (workers/broker.py)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from kombu import Connection, Exchange, Queue


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


def test_a_channel_removes_what_dead_producers_left_half_written(tmp_path: Path) -> None:
    import os

    from workers.broker import STALE_PART_S

    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "processed").mkdir()
    stale = folder / "1_dead.answer.msg.part"
    fresh = folder / "2_writing.answer.msg.part"  # a live producer may be writing this one right now
    message = folder / "3_whole.answer.msg"
    for path in (stale, fresh, message):
        path.write_text("{}")
    old = time.time() - STALE_PART_S - 60
    os.utime(stale, (old, old))
    with _connection(folder) as conn:
        assert conn.default_channel is not None  # opening a channel cleans up
    assert not stale.exists()
    assert fresh.exists() and message.exists()  # nothing a producer or a consumer still needs


def test_queue_declarations_racing_never_show_a_half_written_exchange_table(tmp_path: Path) -> None:
    """Processes starting together (the intake and workers) declare the same queues while others publish."""
    folder = tmp_path / "in"
    folder.mkdir()
    (tmp_path / "processed").mkdir()
    errors: list[BaseException] = []

    def declare_and_publish(n: int) -> None:
        try:
            with _connection(folder) as conn:
                # A producer only (a SimpleQueue would also consume, and may take messages itself).
                queue = Queue(f"q{n % 4}", Exchange(f"q{n % 4}"), routing_key=f"q{n % 4}")
                conn.Producer().publish({"n": n}, exchange=queue.exchange, routing_key=queue.routing_key,
                                        declare=[queue])
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=declare_and_publish, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(list(folder.glob("*.msg"))) == 40  # every publish found its queue
    assert not list((tmp_path / "control").glob("*.part"))


def test_each_broker_folder_of_a_process_gets_its_own_routing(tmp_path: Path) -> None:
    """kombu keeps one binding state per process: a second folder never got its exchange table, and what
    was published there went nowhere (tests and benches open several brokers in one process)."""
    for name in ("first", "second"):
        folder = tmp_path / name / "in"
        folder.mkdir(parents=True)
        (tmp_path / name / "processed").mkdir()
        with _connection(folder) as conn:
            queue = conn.SimpleQueue("answer")
            queue.put({"broker": name})
            assert queue.get(timeout=5).payload == {"broker": name}
            queue.close()
