"""The anonymizer on chat text: real Presidio, the real small spaCy model, no network."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.privacy import Anonymizer, PrivacyConfig
from bot.privacy.structured import StructuredRedactor, find_ibans, find_long_numbers, luhn_valid
from core.errors import PrivacyError
from core.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


class NoNetwork(Exception):
    pass


def _refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise NoNetwork(f"network call attempted: {args!r}")


@pytest.fixture(scope="module")
def anonymizer() -> Anonymizer:
    # Loading and a first email (tldextract's suffix list) must not touch the network.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _refuse)
        mp.setattr(socket, "create_connection", _refuse)
        mp.setattr(socket, "getaddrinfo", _refuse)
        built = Anonymizer(
            PrivacyConfig(badge_patterns=(r"\bbadge\s*#?\s*(\d{5,8})\b", r"\b(B-\d{6})\b"), max_chars=50_000)
        )
        built.anonymize("mail me at alex.smith@example.co.uk or see https://intranet.example.com")
    return built


def masked_values(text: str, result) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(e.type, text[e.start : e.end]) for e in result.entities]


def test_same_value_same_placeholder_across_turns(anonymizer: Anonymizer) -> None:
    scope = "slack:C1:1700000.1"
    first = anonymizer.anonymize("Hi, I'm Priya Raman, reach me at priya.raman@example.com", scope=scope)
    second = anonymizer.anonymize("priya.raman@example.com still gets no mail, Priya here", scope=scope)
    assert "Priya" not in first.text and "priya.raman@example.com" not in first.text
    assert "<PERSON_1>" in first.text and "<EMAIL_ADDRESS_1>" in first.text
    assert second.text.startswith("<EMAIL_ADDRESS_1>")
    assert "<PERSON_1>" in second.text  # "Priya" alone is the same person as "Priya Raman"
    other = anonymizer.anonymize("Tomasz and Priya Raman", scope="slack:C2:1")
    assert other.text == "<PERSON_1> and <PERSON_2>"  # counters are per conversation


def test_entities_point_into_the_original(anonymizer: Anonymizer) -> None:
    text = "call me on +49 30 1234567 or mail j.doe@corp.example.com"
    result = anonymizer.anonymize(text, scope="t")
    assert masked_values(text, result) == [
        ("PHONE_NUMBER", "+49 30 1234567"),
        ("EMAIL_ADDRESS", "j.doe@corp.example.com"),
    ]


def test_allow_list_keeps_models_parts_and_error_codes(anonymizer: Anonymizer) -> None:
    for text in (
        "The HP LaserJet M404 shows E-502 again",
        "LIC017 license server is down",
        "Dell Latitude 5420 docking station, Windows says error 0x80070005",
        "Teams and Outlook crash on the ThinkPad",
    ):
        assert anonymizer.anonymize(text).text == text


def test_lowercase_names_nicknames_and_cues(anonymizer: Anonymizer) -> None:
    for text, name in (
        ("ask emma about the printer", "emma"),
        ("my name is ahmed and my laptop is broken", "ahmed"),
        ("cc @jdoe on the ticket please", "jdoe"),
        ("thanks kenny, the vpn works now", "kenny"),
        ("I talked to Justin Bieber yesterday", "Justin Bieber"),
    ):
        result = anonymizer.anonymize(text)
        assert name not in result.text, result.text
        assert "<PERSON" in result.text


def test_handles_keep_the_at_sign(anonymizer: Anonymizer) -> None:
    result = anonymizer.anonymize("@maria_k can you reset it?", scope="h")
    assert result.text == "@<PERSON_1> can you reset it?"


def test_member_directory_is_a_deny_list(anonymizer: Anonymizer) -> None:
    text = "wieczorek said zyx_admin rebooted it"
    assert "zyx_admin" in anonymizer.anonymize(text).text  # a user name no detector knows stays...
    anonymizer.add_known_names(["Tomasz Wieczorek", "zyx_admin"])
    result = anonymizer.anonymize(text, scope="m")
    assert "wieczorek" not in result.text.lower() and "zyx_admin" not in result.text
    assert result.text.count("<PERSON_") == 2


NAMES_ONLY_THE_MODEL_FINDS = [
    ("wieczorek said he rebooted it", "wieczorek"),
    ("Thandiwe fixed it last week but it broke again", "Thandiwe"),
]
# IT words that look like names to a tagger; the learned model must leave them alone.
SUPPORT_TEXT = [
    "The PowerEdge R740 shows an amber light after the BIOS update",
    "Outlook crashes when I open attachments from Teams",
    "Enable Resizable BAR in the BIOS setup",
    "the docking station flickers, Latitude 7420, since Monday",
    "printer on floor 3 says Paper Jam in Tray 2",
    "Kerberos ticket expired, klist shows nothing",
    "Grafana dashboard empty after Prometheus restart",
]


@pytest.fixture(scope="module")
def rules_only() -> Anonymizer:
    return Anonymizer(PrivacyConfig(name_model=False))


@pytest.mark.parametrize(("text", "name"), NAMES_ONLY_THE_MODEL_FINDS)
def test_name_model_finds_names_the_rules_miss(
    anonymizer: Anonymizer, rules_only: Anonymizer, text: str, name: str
) -> None:
    assert name in rules_only.anonymize(text).text
    result = anonymizer.anonymize(text, scope=text)
    assert name not in result.text and "<PERSON_1>" in result.text


@pytest.mark.parametrize("text", SUPPORT_TEXT)
def test_support_vocabulary_is_never_a_name(anonymizer: Anonymizer, text: str) -> None:
    assert anonymizer.anonymize(text, scope="it").text == text


def test_badge_and_hostname_patterns(anonymizer: Anonymizer) -> None:
    text = "badge #4412345 is blocked, also B-123456; build01.corp does not answer"
    result = anonymizer.anonymize(text, scope="b")
    assert masked_values(text, result) == [
        ("BADGE_ID", "4412345"),
        ("BADGE_ID", "B-123456"),
        ("HOSTNAME", "build01.corp"),
    ]
    assert result.text.startswith("badge #<BADGE_ID_1>")


def test_shouting_maintenance_text_is_left_alone(anonymizer: Anonymizer) -> None:
    text = "REMOVED & REPLACED ROD END. HOSE CLAMP LOOSE ON #2 CYLINDER, RTV APPLIED"
    assert anonymizer.anonymize(text).text == text


def test_dates_versions_and_times_are_not_phone_numbers() -> None:
    assert find_long_numbers("on 2023-08-28 12:30 firmware 2.21.21.21 build 1.2.3") == []
    assert find_long_numbers("(37) 788-063-Office") == [("PHONE_NUMBER", 0, 12)]
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert find_ibans("iban gb82 west 1234 5698 7654 32 thanks") == [("IBAN_CODE", 5, 32)]


def test_reveal_and_encrypted_persistence(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, privacy_key="correct horse battery staple")
    first = Anonymizer.from_settings(settings)
    assert Anonymizer.from_settings(settings) is first  # loaded once per process
    result = first.anonymize("mail lena.berg@example.org", scope="tg:42")
    assert first.reveal(result.text, scope="tg:42") == "mail lena.berg@example.org"
    files = list((tmp_path / "privacy").iterdir())
    assert files and all(b"lena" not in f.read_bytes() and "tg:42" not in f.name for f in files)

    # A fresh process (new store) with the same key sees the same map; another key cannot read it.
    from bot.privacy.pseudonyms import PseudonymStore

    again = PseudonymStore(tmp_path / "privacy", "correct horse battery staple")
    assert again.get("tg:42").originals == {"<EMAIL_ADDRESS_1>": "lena.berg@example.org"}
    assert PseudonymStore(tmp_path / "privacy", "another key").get("tg:42").originals == {}
    files[0].write_bytes(b"tampered")
    with pytest.raises(PrivacyError):
        PseudonymStore(tmp_path / "privacy", "correct horse battery staple").get("tg:42")


def test_scrub_masks_leftovers_and_keeps_placeholders(anonymizer: Anonymizer) -> None:
    text = "<PERSON_1> wrote to help@example.com from 10.1.2.3"
    assert anonymizer.scrub(text) == "<PERSON_1> wrote to <EMAIL_ADDRESS> from <IP_ADDRESS>"


def test_oversized_and_binary_input_in_bounded_time(anonymizer: Anonymizer) -> None:
    blob = (FIXTURES / "privacy_binary.bin").read_bytes().decode("utf-8", errors="replace")
    started = time.monotonic()
    result = anonymizer.anonymize(blob * 20, scope="bin")
    assert "\x00" not in result.text
    huge = ("printer jam again " * 4000) + "x" * 200_000 + " mail a@example.com"
    result = anonymizer.anonymize(huge)
    assert len(result.text) <= 50_000  # cut like the store cuts it
    assert time.monotonic() - started < 60


def test_failure_raises_privacy_error(anonymizer: Anonymizer) -> None:
    with pytest.raises(PrivacyError):
        anonymizer.anonymize(b"bytes are not text")  # type: ignore[arg-type]


def test_log_filter_redacts_structured_values_and_known_names(anonymizer: Anonymizer) -> None:
    from bot.privacy.logs import install_log_redaction

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    install_log_redaction(handler)
    install_log_redaction(handler)  # twice is harmless
    logger = logging.getLogger("test_privacy_logs")
    logger.addHandler(handler)
    logger.propagate = False
    anonymizer.add_known_names(["Zofia Kwiatkowska"])
    try:
        logger.warning("user %s <%s> phone %s", "Zofia Kwiatkowska", "zofia@example.com", "+44 20 7946 0958")
        try:
            raise ValueError("card 4111 1111 1111 1111 declined")
        except ValueError:
            logger.exception("failed for 10.0.0.7")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    for secret in ("Zofia", "zofia@example.com", "7946", "4111", "10.0.0.7"):
        assert secret not in out
    assert "<EMAIL_ADDRESS>" in out and "ValueError" in out


def test_task_ids_in_logs_stay_whole_and_numbers_beside_them_do_not() -> None:
    """Celery task ids are UUIDs whose first group can be all digits: not a phone number."""
    redactor = StructuredRedactor()
    line = "Task supportbot.answer[58120934-e84e-4774-b830-10c9ba9cb5bd] received"
    assert redactor.redact(line) == line
    assert redactor.redact("id 58120934-E84E-4774-B830-102934567812 done") == "id 58120934-E84E-4774-B830-102934567812 done"
    # The same digits outside an id, or a number next to one, are still masked.
    for text in ("call 58120934 now", "task 58120934-e84e-4774-b830-10c9ba9cb5bd for +44 20 7946 0958",
                 "58120934-e84e-4774 is not a whole id"):
        out = redactor.redact(text)
        assert "0958" not in out and ("58120934" not in out or "-b830-" in out), out


def test_log_redactor_is_cheap() -> None:
    redactor = StructuredRedactor()
    line = "worker 3 answered message 812 for conversation 77 in 1.23 s " * 10
    started = time.perf_counter()
    for _ in range(200):
        redactor.redact(line)
    assert (time.perf_counter() - started) / 200 < 0.005


def test_cli_anonymize_json(anonymizer: Anonymizer, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from bot.privacy import anonymizer as module
    from bot.privacy.cli import anonymize_command

    monkeypatch.setattr(module, "_cache", {})
    monkeypatch.setattr(Anonymizer, "from_settings", classmethod(lambda cls, settings: anonymizer))
    lines = "ask emma about it\nmail emma.w@example.com\n\xff\x00 broken bytes\n".encode("latin-1")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines)))
    args = type("Args", (), {"json": True, "scope": "cli-test"})()
    assert anonymize_command(args, load_settings()) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["text"] == "ask <PERSON_1> about it"
    assert rows[0]["entities"] == [{"type": "PERSON", "start": 4, "end": 8}]
    assert rows[1]["text"] == "mail <EMAIL_ADDRESS_1>" and len(rows) == 3


@pytest.mark.slow
def test_rules_only_keeps_torch_out() -> None:
    # The name model needs MiniLM (torch); with it switched off an adapter stays light.
    code = (
        "import sys; from bot.privacy import Anonymizer, PrivacyConfig;"
        "Anonymizer(PrivacyConfig(name_model=False)).anonymize('ask emma');"
        "print(sorted(m for m in ('torch', 'transformers') if sys.modules.get(m) is not None))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_shipped_name_model_matches_the_encoder(tmp_path: Path) -> None:
    from bot.privacy.encoder import shared_encoder
    from bot.privacy.person_model import PersonModel, load_person_model

    model = load_person_model()
    assert shared_encoder(model).width == 1  # loads: the fingerprint of the embedded MiniLM matches
    assert 0.0 < model.threshold < 1.0 and len(model.tensors) >= 18  # at least one layer (16) and the head
    other = tmp_path / "other.safetensors"
    PersonModel(model.tensors, model.threshold, "not-this-encoder").save(other)
    with pytest.raises(PrivacyError, match="retrain"):
        Anonymizer(PrivacyConfig(name_model_path=other))  # weights for another encoder: a clear error


def test_swapped_names_keep_their_spans() -> None:
    import random

    from bot.privacy.train_names import swap_names

    text = "ask emma and Tom Jones about it"
    gold = [(4, 8), (13, 22)]
    names = (["Anna", "Bogdan"], ["Nowak", "Dlamini"])
    for seed in range(20):
        swapped, spans = swap_names(text, gold, names, random.Random(seed))
        assert swapped.startswith("ask ") and swapped.endswith(" about it")
        words = [swapped[s:e] for s, e in spans]
        assert len(words) == 2 and all(w.replace(" ", "").isalpha() for w in words)
        assert swapped[spans[0][1] : spans[1][0]] == " and "


@pytest.mark.slow
def test_train_names_writes_a_model_the_engine_loads(tmp_path: Path) -> None:
    from bot.privacy.person_model import load_person_model

    out = tmp_path / "names.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "bot.privacy.train_names", str(FIXTURES / "names_train.conll"),
         "--folds", "2", "--copies", "1", "--max-steps", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    trained = Anonymizer(PrivacyConfig(name_model_path=out))
    assert "<PERSON_1>" in trained.anonymize("ask emma about it").text  # the rules still run
    assert 0.0 < load_person_model(out).threshold < 1.0


def test_eval_privacy_reports_every_part(anonymizer: Anonymizer, settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from bot.privacy.evaluate import evaluate, render

    synth = tmp_path / "synth.json"
    synth.write_text(json.dumps([{
        "full_text": "Mail ana@example.com or call Ana Silva",
        "spans": [
            {"entity_type": "EMAIL_ADDRESS", "start_position": 5, "end_position": 20},
            {"entity_type": "PERSON", "start_position": 29, "end_position": 38},
        ],
    }]))  # fmt: skip
    wnut = tmp_path / "wnut"
    wnut.mkdir()
    (wnut / "emerging.dev.conll").write_text((FIXTURES / "names_train.conll").read_text())
    tickets = tmp_path / "tickets.jsonl"
    tickets.write_text(json.dumps({"title": "ENGINE ROCKER COVER LEAK", "work_performed": "REPLACED GASKET"}) + "\n")
    support = tmp_path / "support.jsonl"
    rows = [
        ("printer jams on every page", "clean the pickup roller"),
        ("laptop will not charge", "replace the power adapter"),
        ("vpn drops every hour", "update the vpn client"),
        ("outlook asks for the password again and again, Maria says hers too", "clear the credential cache"),
    ]
    support.write_text("".join(json.dumps({"question": q, "solution": a}) + "\n" for q, a in rows))
    # The synthetic set's odd rows are reported (the even rows tune the score threshold).
    synth.write_text(json.dumps([{"full_text": "tuning row", "spans": []}] + json.loads(synth.read_text())))
    report = evaluate(
        anonymizer, synth=synth, wnut_dir=wnut, tickets=tickets, support=support, retrieval_settings=settings,
        generated=3,
    )  # fmt: skip
    assert report["synth"]["sentences"] == 1
    assert report["synth"]["recall"]["EMAIL_ADDRESS"]["recall"] == 1.0
    assert report["wnut17_dev"]["persons"] == 7 and report["wnut17_dev"]["person_recall"] >= 5 / 7
    assert report["tickets"]["masked_share"] == 0.0
    assert report["support"]["tickets"] == 2  # the odd rows only: the name model trains on the even ones
    assert report["retrieval"]["questions"] == 2
    assert report["retrieval"]["raw"]["recall@5"] == 1.0  # four answers: every one is in the top five
    assert report["secrets"]["planted"] == 36 and report["secrets"]["recall"] >= 0.9
    assert [row["rows"] for row in report["secret_false_positives"]] == [1, 4]
    assert report["scripts"]["names"] == 18 and report["scripts"]["name_free_sentences"] > 0
    assert report["long_paste"]["chars"] == 100_000 and report["long_paste"]["planted_masked"]
    assert report["long_paste"]["kept_chars"] <= anonymizer.config.max_chars
    assert "Retrieval of held-out support questions" in render(report) and not report["skipped"]


def test_names_after_a_long_paste_and_common_surnames_are_masked(anonymizer: Anonymizer) -> None:
    pasted = "ERR 0x" + "4f" * 700 + "\nThandiwe fixed it last week but it broke again"
    assert "Thandiwe" not in anonymizer.anonymize(pasted, scope="paste").text  # past MiniLM's first windows
    assert "Jenkins" not in anonymizer.anonymize("please ask Sarah Jenkins about the VPN", scope="j").text


def test_from_settings_tells_name_model_settings_apart() -> None:
    rules = Anonymizer.from_settings(load_settings(privacy_name_model_enabled=False))
    full = Anonymizer.from_settings(load_settings())
    assert rules is not full
    assert rules.engine.name_finder.model is None and full.engine.name_finder.model is not None
