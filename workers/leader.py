"""One process at a time: the lease that makes a single worker the sweeper, whatever the broker.

Every worker runs the sweeper loop; only the holder of the lease sweeps. A lease is given up when its
holder dies, so a worker that comes back after a crash takes over without anyone passing a flag.

- embedded file broker: an exclusive ``flock`` on a file in DATA_DIR. The file broker lives on one
  machine, so every worker of a deployment shares that file; the kernel releases the lock the moment
  its holder exits, ``kill -9`` included.
- Redis: a key set with NX and a time to live, renewed by its holder every round. A holder that dies
  stops renewing and the key expires after ``ttl_s``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import uuid
from pathlib import Path
from typing import Protocol

from core.settings import Settings

log = logging.getLogger(__name__)

SWEEPER_KEY = "supportbot:sweeper-leader"


class Lease(Protocol):
    def hold(self) -> bool:
        """Take the lease or keep it; True while this process holds it. Never raises."""

    def release(self) -> None: ...


class FileLease:
    """An exclusive lock on a file, held until ``release`` or process exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def hold(self) -> bool:
        if self._fd is not None:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            log.warning("sweeper lease file %s unusable: %s", self.path, err)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process holds it
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who sweeps, for a person looking
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class RedisLease:
    """A Redis key owned by this process (a random token), renewed on every ``hold``."""

    def __init__(self, url: str, *, ttl_s: float, key: str = SWEEPER_KEY) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.key = key
        self.ttl_ms = max(int(ttl_s * 1000), 1000)
        self.token = uuid.uuid4().hex
        # Renew only our own key: compare and extend in one step on the server.
        self._renew = self.client.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
        )
        self._release = self.client.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
        )

    def hold(self) -> bool:
        try:
            if self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
                return True
            return bool(self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        except Exception as err:  # redis away: nobody can sweep anything now; try next round
            log.warning("sweeper lease in redis unavailable: %s", err)
            return False

    def release(self) -> None:
        with contextlib.suppress(Exception):  # the key expires by itself
            self._release(keys=[self.key], args=[self.token])


def sweeper_lease(settings: Settings) -> Lease:
    """The lease fitting the broker: a lock file for the embedded broker, a key in Redis otherwise."""
    url = settings.celery_broker_url
    if not settings.embedded_broker and url.startswith(("redis://", "rediss://", "unix://")):
        # Three missed rounds before another worker takes over a silent holder.
        return RedisLease(url, ttl_s=max(3 * settings.sweep_every_s, 10.0))
    return FileLease(settings.data_dir / "sweeper.lock")
