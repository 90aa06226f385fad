"""Credentials: every kind is masked as a bare <SECRET>, wins over other types and is never kept."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bot.privacy import Anonymizer, PrivacyConfig
from bot.privacy.eval_sets import _value, planted_secrets
from bot.privacy.secrets import contains_secret, find_secrets, mask_secrets
from bot.privacy.structured import StructuredRedactor

KINDS = (
    "password",
    "pin",
    "aws_access_key_id",
    "aws_secret_key",
    "slack_token",
    "github_token",
    "stripe_key",
    "generic_key",
    "jwt",
    "private_key",
    "connection_string",
    "basic_auth_url",
)


@pytest.fixture(scope="module")
def anonymizer() -> Anonymizer:
    # Rules only: the secret layer does not depend on the name model, and this keeps torch out.
    return Anonymizer(PrivacyConfig(name_model=False))


def masked(text: str, spans: list[tuple[int, int]]) -> bool:
    found = find_secrets(text)
    return all(any(s <= start and end <= e for s, e in found) for start, end in spans)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_with_random_values(kind: str) -> None:
    rows = [row for row in planted_secrets(per_kind=25, seed=2024) if row[0] == kind]
    assert rows
    for _, text, spans in rows:
        assert masked(text, spans), text


def test_values_from_another_seed_in_plain_sentences() -> None:
    rng = random.Random(7)
    for kind in ("aws_access_key_id", "slack_token", "github_token", "stripe_key", "jwt", "private_key"):
        for _ in range(10):
            value = _value(kind, rng)
            text = f"fyi {value} was pasted in the channel"
            assert mask_secrets(text).count("<SECRET>") == 1, text
            assert value not in mask_secrets(text)


@pytest.mark.parametrize(
    "text",
    [
        "my password is expired",
        "password reset does not work",
        "the password is wrong again",
        "pin 3 on the connector is bent",
        "the key is under the keyboard",
        "token expired, please log in again",
        "REMOVED & REPLACED ROD END. HOSE CLAMP LOOSE ON #2 CYLINDER",
        "Dell Latitude 5420, BIOS 1.21.0, error 0x80070005",
        "see https://support.example.com/kb/12345 for the driver",
    ],
)
def test_ordinary_support_text_has_no_secret(text: str) -> None:
    assert not contains_secret(text)


def test_secret_wins_over_names_emails_and_urls(anonymizer: Anonymizer) -> None:
    text = "the password is Priya and the db is postgres://jane.doe:Xy7pass@db.example.com/prod"
    result = anonymizer.anonymize(text, scope="secret-overlap")
    assert result.text == "the password is <SECRET> and the db is <SECRET>"
    assert {e.type for e in result.entities} == {"SECRET"}
    url = "open https://bob:pw12345@intranet.example.com/wiki"
    assert anonymizer.anonymize(url).text == "open <SECRET>"


def test_allow_list_and_code_filters_never_drop_a_secret(anonymizer: Anonymizer) -> None:
    # "Zoom2024" looks like a product code and "dell" is on the allow-list: as passwords they go.
    assert anonymizer.anonymize("pwd: Zoom2024").text == "pwd: <SECRET>"
    assert anonymizer.anonymize('password is "dell"').text == "password is <SECRET>"


def test_secrets_are_never_kept_or_revealed(tmp_path: Path) -> None:
    from core.settings import load_settings

    settings = load_settings(data_dir=tmp_path, privacy_key="k", privacy_name_model_enabled=False)
    anonymizer = Anonymizer.from_settings(settings)
    key = "AKIA" + "".join(random.Random(1).choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16))
    text = f"Hi, I'm Lena Berg, my password is Hunter2! and the key is {key}"
    result = anonymizer.anonymize(text, scope="tg:secret")
    assert "Hunter2" not in result.text and key not in result.text
    assert result.text.count("<SECRET>") == 2 and "<SECRET_" not in result.text
    mapping = anonymizer.store.get("tg:secret")
    assert "Hunter2!" not in str(mapping.to_dict()) and key not in str(mapping.to_dict())
    revealed = anonymizer.reveal(result.text, scope="tg:secret")
    assert "Lena Berg" in revealed and "Hunter2" not in revealed and key not in revealed
    assert all(b"Hunter2" not in f.read_bytes() for f in (tmp_path / "privacy").iterdir())


def test_scrub_and_log_redactor_mask_secrets(anonymizer: Anonymizer) -> None:
    assert anonymizer.scrub("token xoxb-1234567890-1234567890123-abcdefABCDEF") == "token <SECRET>"
    line = "login failed for admin, password: S3cr3t!x from 10.0.0.7"
    assert StructuredRedactor().redact(line) == "login failed for admin, password: <SECRET> from <IP_ADDRESS>"


def test_a_cut_off_private_key_is_masked_to_the_end() -> None:
    text = "my key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"
    assert mask_secrets(text) == "my key:\n<SECRET>"


def test_a_plain_word_after_a_cue_stays_even_before_a_full_stop() -> None:
    assert (
        mask_secrets("KNOCKING NOISE FROM PASS DOWN. FOUND LOOSE")
        == "KNOCKING NOISE FROM PASS DOWN. FOUND LOOSE"
    )
    assert mask_secrets("login admin password Tr0ub4dor&3.") == "login admin password <SECRET>."
