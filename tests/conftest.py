"""Shared fixtures: real services (SQLite/PostgreSQL, redis-server, Celery worker processes), tiny real models."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from core.db import Database, upgrade  # noqa: E402
from core.settings import Settings, load_settings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment for a subprocess (worker, CLI) that must see the same settings as the test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTBOT_")}
    env["SUPPORTBOT_DATA_DIR"] = str(settings.data_dir)
    if settings.database_url:
        env["SUPPORTBOT_DATABASE_URL"] = settings.database_url
    if settings.broker_url:
        env["SUPPORTBOT_BROKER_URL"] = settings.broker_url
    env["SUPPORTBOT_MODEL_CACHE"] = str(settings.model_cache_dir)
    env["SUPPORTBOT_MAX_NEW_TOKENS"] = str(settings.max_new_tokens)
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Short answers keep the suite fast; the model, the path and the code are the real ones.
    return load_settings(data_dir=tmp_path / "data", max_new_tokens=24, environment="test")


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    upgrade(settings.db_url)
    database = Database.from_settings(settings)
    yield database
    database.engine.dispose()


@pytest.fixture
def env(settings: Settings, db: Database) -> tuple[Settings, Database]:
    """A fresh, migrated store and its settings, as one pair."""
    return settings, db


class RedisServer:
    """A private redis-server on a free port (tests, benchmarks). ``durable``: an append-only file synced on
    every write, so a stop and start keeps what was queued."""

    def __init__(self, folder: Path, *, durable: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; .ci/run does this)")
        self.port = free_port()
        self.argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
        self.argv += ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a normal shutdown, redis flushes its append-only file
            self.proc.wait(30)


def need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does this)")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    need_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url()
    server.stop()


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql; .ci/run does this)")
    folder = tmp_path_factory.mktemp("pg")
    data = folder / "data"
    port = free_port()
    # PostgreSQL refuses to run as root; run it as the postgres system user when we are root.
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
        os.chmod(folder, 0o777)
        for parent in list(folder.parents)[:3]:
            os.chmod(parent, os.stat(parent).st_mode | 0o755)
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "supportbot", "--auth=trust"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(
        [*prefix, pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w",
         "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
        check=True, stdout=subprocess.DEVNULL,
    )
    try:
        subprocess.run([_pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "supportbot",
                        "supportbot"], check=True)
        yield f"postgresql+psycopg://supportbot@127.0.0.1:{port}/supportbot"
    finally:
        # As root we can read the pid even where the postgres user lost access to pytest's tmp dirs.
        pid_file = data / "postmaster.pid"
        if pid_file.exists():
            import signal

            os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)  # immediate shutdown


class WorkerProcess:
    """A real `supportbot worker` process on the test's settings."""

    def __init__(self, settings: Settings, *, name: str = "test", concurrency: int = 4, queues: str = "answer,light",
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log = settings.data_dir / f"worker-{name}.log"
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "worker", "--name", name, "--concurrency", str(concurrency),
             "--queues", queues, *(extra or [])],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env={**settings_env(settings), **(env or {})},
            cwd=ROOT,
        )

    def wait_ready(self, db: Database, timeout: float = 180.0) -> None:
        from bot.console import live_workers

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log.read_text()[-3000:]}")
            if live_workers(db):
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def seed_tickets(settings: Settings, db: Database) -> None:
    from retrieval.ingest import ingest_file

    ingest_file(settings=settings, db=db, path=FIXTURES / "spine_tickets.jsonl")
