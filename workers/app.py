"""The Celery app. Created bare at import; ``configure`` applies the Settings at start-up.

Queues: ``answer`` (model workers), ``light`` (ingest, index, export), ``train`` (one at a time).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from core.settings import Settings

app = Celery("supportbot", include=["workers.tasks", "workers.train_tasks", "workers.desk_tasks", "workers.retrain_tasks"])

ANSWER_QUEUE = "answer"
LIGHT_QUEUE = "light"
TRAIN_QUEUE = "train"

_settings: Settings | None = None


def configure(settings: Settings) -> Celery:
    """Apply the settings to the app; every process (CLI, worker, beat) calls this once."""
    global _settings
    _settings = settings
    settings.ensure_dirs()
    conf: dict[str, object] = dict(
        broker_url=settings.celery_broker_url,
        task_ignore_result=True,  # answers live in SQL, not in a result backend
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        # A task is acknowledged only after it finished, and re-queued if its worker died: a killed
        # worker never loses a question (the task itself is idempotent).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=ANSWER_QUEUE,
        task_queues=[Queue(ANSWER_QUEUE), Queue(LIGHT_QUEUE), Queue(TRAIN_QUEUE)],
        task_routes={
            "supportbot.answer": {"queue": ANSWER_QUEUE},
            "supportbot.train": {"queue": TRAIN_QUEUE},
            "supportbot.retrain": {"queue": TRAIN_QUEUE},
            "supportbot.light.*": {"queue": LIGHT_QUEUE},
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        enable_utc=True,
        # The sweeper is not here: every worker runs it in a thread under a lease (workers/leader.py),
        # so recovery does not depend on someone starting the beat.
        beat_schedule={
            "export-training-data": {
                "task": "supportbot.light.export",
                "schedule": 24 * 3600.0,
                "options": {"queue": LIGHT_QUEUE},
            },
            # Retrain when enough new ratings came in (workers/retrain_tasks.py); the gate and an admin
            # still decide whether the candidate serves.
            "retrain-when-rated": {
                "task": "supportbot.light.retrain_check",
                "schedule": settings.retrain_check_every_s,
                "options": {"queue": LIGHT_QUEUE},
            },
            # Unclaimed and idle escalations (workers/desk_tasks.py); each is pinged once per period.
            "escalation-pings": {
                "task": "supportbot.light.escalation_pings",
                "schedule": settings.escalation_check_every_s,
                "options": {"queue": LIGHT_QUEUE},
            },
        },
    )
    if settings.embedded_broker:
        from kombu.transport import TRANSPORT_ALIASES

        # Whole messages only (workers/broker.py): kombu's own can hand a worker a half-written file.
        TRANSPORT_ALIASES["filesystem"] = "workers.broker:Transport"
        folder = str(settings.broker_dir / "in")
        conf["broker_transport_options"] = {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "processed_folder": str(settings.broker_dir / "processed"),
            # Broadcast (pidbox) files; kombu's default is ./control in the working directory.
            "control_folder": str(settings.broker_dir / "control"),
            "store_processed": False,
            "polling_interval": 0.05,
        }
    else:
        conf["broker_transport_options"] = {
            # Redis: an unacknowledged task comes back after this long if its worker vanished.
            "visibility_timeout": settings.visibility_timeout_s,
        }
    app.conf.update(conf)
    # A process that configures twice (tests switching brokers) must not keep publishing through
    # the connection pool of the previous broker.
    app._after_fork()
    return app


def settings() -> Settings:
    """The settings this process was configured with (tasks call this; they never read env)."""
    if _settings is None:
        from core.settings import load_settings

        configure(load_settings())
    assert _settings is not None
    return _settings
