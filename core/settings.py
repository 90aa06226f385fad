"""The one typed settings object. Built once at start-up and passed down; nothing reads env at import."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"
PLACEHOLDER_SECRETS = {"changeme", "change-me", "secret", "changethis", "please-change-me"}


class Settings(BaseSettings):
    """Every knob of supportbot. Environment variables carry the ``SUPPORTBOT_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="SUPPORTBOT_", env_file=".env", extra="ignore")

    environment: str = Field("development", description="development, test or production")
    data_dir: Path = Field(Path(".data"), description="Where SQLite, the index, models and logs live")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under DATA_DIR")
    broker_url: str | None = Field(
        None, description="Celery broker; default an embedded file broker under DATA_DIR; prod redis://"
    )
    model_cache: Path | None = Field(
        None, description="Where the embedded model is converted once; default ~/.cache/supportbot"
    )

    # Model
    base_model: str = Field(EMBEDDED_MODEL, description="Embedded SmolLM2 or a local Llama checkpoint path")
    adapter: str | None = Field(None, description="Optional LoRA adapter folder applied on the base model")
    load_in_4bit: bool = Field(False, description="Load the base model in NF4 4-bit, double quant")
    device: str = Field("auto", description="auto, cpu or cuda")
    model_loader: Literal["auto", "transformers"] = Field(
        "auto",
        description="auto: a plain Llama folder served on the CPU is read without transformers (a worker starts "
        "seconds sooner); 4-bit, GPU and anything that reader does not know load with transformers",
    )
    torch_threads: int = Field(0, description="torch CPU threads; 0 keeps torch's default")
    max_new_tokens: int = Field(160, ge=1, le=4096, description="Answer length limit in tokens")
    max_prompt_tokens: int = Field(1536, ge=64, description="Prompt is trimmed (oldest history first) to fit")
    generation_timeout_s: float = Field(120.0, gt=0, description="Generation stops here; partial answer kept")
    temperature: float = Field(0.0, ge=0.0, description="0 gives greedy, repeatable answers")
    history_turns: int = Field(6, ge=0, description="Earlier turns of the conversation put in the prompt")
    repetition_penalty: float = Field(1.15, ge=1.0, description="Penalty on tokens already generated (1 is off)")
    no_repeat_ngram_size: int = Field(4, ge=0, description="No n-gram of this many tokens is generated twice; 0 is off")
    rank_fixes: Literal["off", "adapter", "always"] = Field(
        "off",
        description="Which confident ticket's fix leads the answer: the retriever's first (off), or the one the "
        "served model finds most likely (with an adapter, or always); turn on where `eval rag` shows it wins",
    )
    trusted_domains: list[str] = Field(
        default_factory=list,
        description='Company domains an answer may link or mail to, JSON: \'["acme.com"]\'; others are removed',
    )

    # Retrieval
    embedding_model: str = Field(EMBEDDED_EMBEDDER, description="Embedded MiniLM or a local folder")
    retrieval_k: int = Field(3, ge=1, le=50, description="Tickets put in the prompt")
    ann_threshold: int = Field(50_000, description="Above this many tickets an ANN index replaces exact search")
    min_confidence: float = Field(0.35, description="Below this the bot says it is not sure and offers escalation")

    # Input limits
    max_message_chars: int = Field(4000, ge=100, description="Longer messages are cut to this before the model")
    max_stored_chars: int = Field(100_000, description="Longer inputs are cut before storing")
    privacy_max_chars: int = Field(
        8_000, ge=100, description="Longer inputs are cut to this before anonymizing and storing (bounded time)"
    )

    # Workers
    rate_limit_per_minute: int = Field(20, ge=0, description="Questions one user may ask per minute; 0 is no limit")
    sweep_after_s: float = Field(180.0, gt=0, description="Unanswered messages older than this are re-queued")
    sweep_every_s: float = Field(
        30.0, gt=0, description="How often the sweeper runs (in every worker; one at a time holds its lease)"
    )
    worker_wait_s: float = Field(
        60.0, ge=0, description="How long `ask` waits for a worker that is still starting before giving up"
    )
    visibility_timeout_s: int = Field(600, ge=5, description="Redis: an unacknowledged task returns after this")
    answer_soft_limit_s: float = Field(300.0, gt=0, description="An answer task past this ends with a clear message")
    batch_max: int = Field(16, ge=1, description="Most conversations one forward pass serves")
    cpu_weights: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="CPU weight format of the decode engine: auto (bf16 where the CPU computes bf16 natively, "
        "else fp16), bf16 (oneDNN), fp16 (fbgemm, half the bytes of fp32) or exact fp32",
    )
    cpu_row_weights: Literal["auto", "fp16", "off"] = Field(
        "auto",
        description="With bf16 weights, a second fp16 copy for one-row decode steps (one user at a time: 1.4x "
        "faster); auto keeps it where it takes at most 1/16 of the memory",
    )
    cpu_compiled_step: Literal["auto", "off"] = Field(
        "auto",
        description="One-row decode steps (with the fp16 copy) through the layer `supportbot model prepare` "
        "compiles for this model and CPU; auto uses it where it was built, off always runs them eagerly",
    )
    prefill_chunk: int = Field(
        128, ge=8, description="Prompt tokens prefilled per engine step, so a long prompt never stalls running answers"
    )
    prefix_cache: int = Field(
        8, ge=0, description="Shared prompt openings whose keys and values are kept for reuse; 0 turns reuse off"
    )
    metrics_port: int = Field(0, ge=0, description="Prometheus metrics port of a worker; 0 is off")
    log_json: bool = Field(False, description="Structured JSON logs with conversation and message ids")

    # Console channel
    answer_wait_s: float = Field(300.0, description="How long `supportbot ask` waits for the worker")

    # Privacy
    privacy_key: SecretStr | None = Field(None, description="Key to encrypt pseudonym maps at rest")
    # Lists are JSON in the environment, e.g. SUPPORTBOT_PRIVACY_KNOWN_NAMES='["Priya Raman"]'.
    # None keeps bot/privacy's defaults; a list replaces them.
    privacy_known_names: list[str] = Field(default_factory=list, description="Member names always masked")
    privacy_allow_terms: list[str] = Field(default_factory=list, description="Extra words never masked")
    privacy_allow_patterns: list[str] | None = Field(None, description="Regexes never masked (part numbers)")
    privacy_badge_patterns: list[str] | None = Field(None, description="Regexes for badge ids")
    privacy_hostname_patterns: list[str] | None = Field(None, description="Regexes for internal hostnames")
    privacy_name_model: Path | None = Field(
        None, description="Weights of the learned name model (default: the shipped ones)"
    )
    privacy_name_model_enabled: bool = Field(True, description="Use the learned name model beside the rules")
    privacy_name_model_int8: bool = Field(
        False, description="Run the name model in dynamic int8 (faster on CPU; its threshold must be CV'd in int8)"
    )
    privacy_name_model_bf16: bool = Field(
        True, description="Run the name model in bfloat16 where the CPU has native bf16 (AVX512-BF16, AMX)"
    )

    # Platforms
    slack_bot_token: SecretStr | None = Field(None, description="Slack bot token (xoxb-)")
    slack_signing_secret: SecretStr | None = Field(None, description="Slack signing secret (HTTP Events API)")
    slack_app_token: SecretStr | None = Field(
        None, description="Slack app-level token (xapp-); when set, `supportbot slack` uses Socket Mode"
    )
    slack_api_url: str = Field("https://slack.com/api/", description="Slack Web API base URL")
    slack_members_refresh_s: float = Field(
        3600.0, gt=0, description="How often the member-name deny-list is re-read from Slack"
    )
    http_max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body the HTTP adapters take")
    http_read_timeout_s: float = Field(10.0, gt=0, description="A client slower than this sending its body gets 408")
    http_max_concurrency: int = Field(200, ge=1, description="Concurrent HTTP connections an adapter serves")
    telegram_bot_token: SecretStr | None = Field(None, description="Telegram bot token")
    telegram_api_url: str = Field("https://api.telegram.org/bot", description="Telegram Bot API base URL")
    telegram_webhook_url: str | None = Field(
        None, description="Public HTTPS URL for Telegram's webhook; unset means long polling"
    )
    telegram_webhook_secret: SecretStr | None = Field(
        None, description="Secret Telegram sends as X-Telegram-Bot-Api-Secret-Token; required for webhooks"
    )
    telegram_webhook_listen: str = Field("0.0.0.0", description="Address the webhook server binds")
    telegram_webhook_port: int = Field(8443, ge=1, le=65535, description="Port the webhook server binds")
    telegram_quiet_period_s: float = Field(
        4 * 3600.0, gt=0, description="A private chat quiet this long starts a new conversation"
    )
    delivery_order_wait_s: float = Field(
        20.0, ge=0, description="How long a reply waits for an earlier one of its thread to be posted first"
    )
    delivery_retries: int = Field(3, ge=0, description="Retries of a failed delivery (rate limits, network)")
    chat_platforms: list[str] = Field(
        default_factory=list,
        description='Chat platforms served, JSON: \'["slack", "telegram"]\'; a worker without their tokens refuses to start',
    )

    # Escalation desk (core/desk.py); who is a technician: `technicians` below and core/roles.py
    escalation_ping_after_s: float = Field(
        900.0, gt=0, description="An escalation nobody claimed this long is pinged again on the desk"
    )
    escalation_remind_after_s: float = Field(
        4 * 3600.0, gt=0, description="A claimed escalation idle this long is reminded to its technician"
    )
    escalation_check_every_s: float = Field(60.0, gt=0, description="How often the beat looks for those")
    slack_desk_channel: str | None = Field(
        None, description="Slack channel id where escalations are posted for the technicians (the desk)"
    )
    telegram_desk_chat: str | None = Field(
        None, description="Telegram chat id (a group) where escalations are posted for the technicians"
    )
    escalation_summary_writer: str = Field(
        "extractive",
        pattern="^(extractive|model)$",
        description="Who writes the desk summary's problem line: extractive (beat the lead baseline on "
        "held-out TweetSumm) or model (the base model; did not)",
    )

    # Retraining from chat and on schedule (model/retrain.py, bot/slack/admin.py, bot/telegram/admin.py)
    retrain_min_new_ratings: int = Field(
        20, ge=1, description="The beat retrains once at least this many ratings are newer than the last run"
    )
    retrain_check_every_s: float = Field(3600.0, gt=0, description="How often the beat counts new ratings")
    retrain_config: dict[str, Any] = Field(
        default_factory=dict,
        description='TrainConfig fields for retrains from chat or the beat, JSON: \'{"max_steps": 200}\'',
    )
    retrain_gate_margin: float = Field(
        0.01, ge=0, description="A retrained candidate must beat the active model (or the base) by this val_loss"
    )
    retrain_eval_limit: int = Field(
        200, ge=1, description="Validation conversations a retrain's evaluation reads (bounded time)"
    )

    # Roles (core/roles.py) and the web console (bot/web). Ids are platform-qualified, JSON in the
    # environment: SUPPORTBOT_ADMINS='["slack:U123", "telegram:42"]'.
    admins: list[str] = Field(default_factory=list, description="Platform-qualified ids of admins")
    technicians: list[str] = Field(default_factory=list, description="Platform-qualified ids of technicians")
    web_port: int = Field(8080, ge=1, le=65535, description="Port of the web console (`supportbot web`)")
    web_host: str = Field("127.0.0.1", description="Address the web console binds (0.0.0.0 in a container)")
    web_secret_key: SecretStr | None = Field(
        None, description="Signs web console sessions; required outside development (32+ random characters)"
    )

    @field_validator("admins", "technicians")
    @classmethod
    def _qualified_ids(cls, value: list[str]) -> list[str]:
        for entry in value:
            platform, _, external_id = entry.partition(":")
            if not platform or not external_id:
                raise ValueError(f"{entry!r} is not a platform-qualified id like 'slack:U123' or 'telegram:42'")
        return [entry.strip() for entry in value]

    @field_validator("retrain_config")
    @classmethod
    def _known_train_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        from model.train_config import TrainConfig  # torch-free; refused at start-up, not mid-retrain

        try:
            TrainConfig.from_dict(value).validate()
        except Exception as err:
            raise ValueError(f"retrain_config: {err}") from err
        return value

    @model_validator(mode="after")
    def _real_web_secret(self) -> Settings:
        # A missing key is refused where the console starts (bot/web/auth.py); other commands need none.
        if self.web_secret_key is not None and self.environment != "development":
            secret = self.web_secret_key.get_secret_value()
            if len(secret) < 32 or secret.lower() in PLACEHOLDER_SECRETS or len(set(secret)) < 8:
                raise ValueError("web_secret_key is a placeholder or too short; use 32+ random characters")
        return self

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'supportbot.db'}"

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url is None or self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def model_cache_dir(self) -> Path:
        return (self.model_cache or Path.home() / ".cache" / "supportbot").expanduser().resolve()

    @property
    def compiled_dir(self) -> Path:
        """Where `model prepare` keeps the compiled one-row decode layer (model/compiled.py)."""
        return self.model_cache_dir / "compiled"

    @property
    def index_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    def ensure_dirs(self) -> None:
        for path in (self.data_dir, self.index_dir, self.adapters_dir):
            path.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            for sub in ("in", "processed", "control"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment (and ``.env``), with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
