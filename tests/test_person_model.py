"""The fine-tuned MiniLM name tagger (bot/privacy/person_model.py, encoder.py, train_names.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bot.privacy import Anonymizer, PrivacyConfig
from bot.privacy.person_model import PersonModel, load_person_model
from core.errors import PrivacyError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Names written the way chat writes them, with no name-list entry or cue the rules use. Our own
# sentences, not from any evaluation set.
NAMES_THE_RULES_MISS = [
    ("went bowling with okonkwo and his cousin last night", "okonkwo"),
    ("cant believe tsvetanka won the whole tournament lol", "tsvetanka"),
    ("just saw Brekkenridge perform live, what a voice", "Brekkenridge"),
]
# Support text in chat spelling: product, place and tool names a tagger might take for people.
IT_SENTENCES = [
    "my outlook keeps crashing since the update, tried safe mode already",
    "the vpn client on my thinkpad drops every hour",
    "the build agent fails after the upgrade, logs attached",
    "Excel freezes when I paste from Chrome",
    "printer on the 3rd floor says paper jam in tray 2",
    "can someone reset the wifi router in the Berlin office",
]


@pytest.fixture(scope="module")
def full() -> Anonymizer:
    return Anonymizer(PrivacyConfig())


@pytest.fixture(scope="module")
def rules() -> Anonymizer:
    return Anonymizer(PrivacyConfig(name_model=False))


@pytest.mark.slow
@pytest.mark.parametrize(("text", "name"), NAMES_THE_RULES_MISS)
def test_tagger_finds_names_the_rules_miss(full: Anonymizer, rules: Anonymizer, text: str, name: str) -> None:
    assert name in rules.anonymize(text).text
    result = full.anonymize(text, scope=text)
    assert name not in result.text and "<PERSON_1>" in result.text, result.text


@pytest.mark.slow
@pytest.mark.parametrize("text", IT_SENTENCES)
def test_it_sentences_come_back_unchanged(full: Anonymizer, text: str) -> None:
    assert full.anonymize(text, scope="it").text == text


@pytest.mark.slow
def test_shipped_weights_load_and_match_the_encoder() -> None:
    from bot.privacy.encoder import TokenEncoder, fingerprint, load_base

    model = load_person_model()
    assert 0.0 < model.threshold < 1.0
    assert model.tensors["head.weight"].shape == (1, 384) and model.tensors["head.weight"].dtype == np.float16
    assert fingerprint(load_base()[1]) == model.base
    encoder = TokenEncoder(model)
    text = "ask okonkwo about the printer"
    probs, covered = encoder.vectors(text, [(4, 11), (22, 29)])  # "okonkwo", "printer"
    assert covered.all() and probs[0, 0] > probs[1, 0]


@pytest.mark.slow
def test_weights_for_another_encoder_are_refused(tmp_path: Path) -> None:
    model = load_person_model()
    other = tmp_path / "other.safetensors"
    PersonModel(model.tensors, model.threshold, "0123456789abcdef").save(other)
    with pytest.raises(PrivacyError, match="another base encoder.*retrain"):
        Anonymizer(PrivacyConfig(name_model_path=other))
    shrunk = tmp_path / "shrunk.safetensors"
    tensors = {k: v for k, v in model.tensors.items() if not k.startswith("encoder.layer.5.")}
    PersonModel(tensors, model.threshold, model.base).save(shrunk)
    with pytest.raises(PrivacyError, match="does not fit the encoder.*retrain"):
        Anonymizer(PrivacyConfig(name_model_path=shrunk))


def test_a_file_that_is_no_model_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    with pytest.raises(PrivacyError, match="name model could not be loaded"):
        load_person_model(junk)


@pytest.mark.slow
def test_trainer_runs_end_to_end_and_the_engine_loads_its_output(tmp_path: Path) -> None:
    out = tmp_path / "names.safetensors"
    negatives = tmp_path / "support.jsonl"
    negatives.write_text('{"question": "the vpn drops every hour"}\n{"question": "odd row, never read"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "bot.privacy.train_names", str(FIXTURES / "names_train.conll"),
         "--negatives", str(negatives), "--folds", "2", "--copies", "1", "--max-steps", "2", "--out", str(out),
         "--compare-fp32"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CV, rules alone" in done.stderr and "probe_recall" in done.stderr
    assert "int8 against fp32" in done.stderr
    model = load_person_model(out)
    assert 1 <= model.info["steps"] <= 2 and model.info["cv"]["folds"] == 2  # --max-steps caps it
    # The folds were scored the way the model ships (int8), and what fp32 would have done is kept beside.
    assert model.info["cv"]["scored_in"] == "int8"
    assert 0.0 <= model.info["cv"]["rows_with_same_masks_int8_fp32"] <= 1.0
    trained = Anonymizer(PrivacyConfig(name_model_path=out))
    assert trained.engine.name_finder.encoder is not None
    assert "<PERSON_1>" in trained.anonymize("ask emma about it").text  # the rules still run


@pytest.mark.slow
def test_int8_is_a_setting_and_keeps_the_ranking() -> None:
    from bot.privacy.encoder import TokenEncoder
    from core.settings import Settings

    assert PrivacyConfig.from_settings(Settings(privacy_name_model_int8=True)).name_model_int8 is True
    assert PrivacyConfig.from_settings(Settings(privacy_name_model_int8=False)).name_model_int8 is False
    model = load_person_model()
    int8, fp32 = TokenEncoder(model, int8=True), TokenEncoder(model)
    assert int8.int8 and not fp32.int8
    text = "ask okonkwo about the printer"
    for encoder in (int8, fp32):
        probs, covered = encoder.vectors(text, [(4, 11), (22, 29)])  # "okonkwo", "printer"
        assert covered.all() and probs[0, 0] > 2 * probs[1, 0]
    # Each precision gets its own engine: the anonymizer caches must not hand one the other's.
    assert (
        Anonymizer(PrivacyConfig(name_model_int8=False)).engine
        is not Anonymizer(PrivacyConfig(name_model_int8=True)).engine
    )


def test_bf16_is_used_only_where_native_and_changes_no_name_decision() -> None:
    from bot.privacy.encoder import TokenEncoder, native_bf16
    from core.settings import Settings

    assert PrivacyConfig.from_settings(Settings()).name_model_bf16 is True
    assert PrivacyConfig.from_settings(Settings(privacy_name_model_bf16=False)).name_model_bf16 is False
    model = load_person_model()
    bf16, fp32 = TokenEncoder(model, bf16=True), TokenEncoder(model)
    assert bf16.bf16 == native_bf16() and not fp32.bf16  # emulated bf16 would be slower than fp32
    texts = [text for text, _ in NAMES_THE_RULES_MISS] + IT_SENTENCES + ["Thandiwe fixed it last week"]
    for text in texts:
        words = [(m.start(), m.end()) for m in re.finditer(r"\w+", text)]
        low, _ = bf16.vectors(text, words)
        full_precision, _ = fp32.vectors(text, words)
        assert np.abs(low - full_precision).max() < 0.05, text
        assert ((low >= model.threshold) == (full_precision >= model.threshold)).all(), text


def test_the_name_model_beside_spacy_finds_the_same_and_leaves_nothing_behind(full: Anonymizer) -> None:
    engine = full.engine
    encoder = engine.name_finder.encoder
    texts = [text for text, _ in NAMES_THE_RULES_MISS] + IT_SENTENCES + [
        "Thandiwe fixed it last week but it broke again",
        "Hi, I'm Priya Raman\nREMOVED & REPLACED LEFT MAIN TIRE. SAFETIED.",
        "ask okonkwo " + "about the printer queue on floor 3 " * 80,  # more than one chunk
    ]
    assert engine.overlap
    beside = [engine.detect(text) for text in texts]
    assert not encoder._pending  # a piece whose names nobody asked for is not kept
    engine.overlap = False
    try:
        after = [engine.detect(text) for text in texts]
    finally:
        engine.overlap = True
    assert beside == after
    assert any(d.type == "PERSON" for d in beside[0])


def test_relabel_writes_a_cv_threshold_into_a_trained_model(tmp_path: Path) -> None:
    from bot.privacy.train_names import main as train_names

    cv = tmp_path / "cv.json"
    cv.write_text('{"folds": 2, "threshold": 0.3, "curve": {"0.3": {}}, "at_threshold": {"recall": 0.9}}')
    out = tmp_path / "relabelled.safetensors"
    shipped = load_person_model()
    assert train_names(["unused.conll", "--relabel", str(ROOT / "bot/privacy/person_model.safetensors"),
                        "--cv-from", str(cv), "--out", str(out)]) == 0  # fmt: skip
    model = load_person_model(out)
    assert model.threshold == 0.3 and model.info["cv"] == {"folds": 2, "threshold": 0.3, "at_threshold": {"recall": 0.9}}
    assert model.base == shipped.base and all(np.array_equal(model.tensors[k], v) for k, v in shipped.tensors.items())


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX only")
def test_a_forked_process_still_gets_its_names_found(full: Anonymizer) -> None:
    import os

    full.engine.detect("ask okonkwo about it")  # the parent's encoder thread exists now
    pid = os.fork()
    if pid == 0:  # the child: must not wait for the parent's thread, which it does not have
        found = full.engine.detect("went bowling with okonkwo and his cousin last night")
        os._exit(0 if any(d.type == "PERSON" for d in found) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("bf16", [False, True])
def test_the_plain_encoder_gives_transformers_probabilities(monkeypatch, bf16: bool) -> None:
    """The name encoder runs on retrieval/bert.py (no transformers import: a process that anonymizes starts
    seconds sooner); its probabilities are those of transformers' BertModel in the same precision."""
    from bot.privacy.encoder import TokenEncoder, native_bf16

    if bf16 and not native_bf16():
        pytest.skip("this CPU has no native bf16; the encoder runs fp32 there")
    model = load_person_model()
    plain = TokenEncoder(model, bf16=bf16)
    assert plain.plain is not None
    monkeypatch.setattr(TokenEncoder, "_plain", lambda self, model, model_dir: (None, None))
    reference = TokenEncoder(model, bf16=bf16)
    assert reference.plain is None
    long_text = " ".join(["Thandiwe", "reset", "the", "router", "in", "Zürich", "again"] * 60)  # windows
    texts = [text for text, _ in NAMES_THE_RULES_MISS] + IT_SENTENCES + ["Thandiwe fixed it last week", long_text]
    for text in texts:
        words = [(m.start(), m.end()) for m in re.finditer(r"\w+", text)]
        ours, covered = plain.vectors(text, words)
        theirs, covered_too = reference.vectors(text, words)
        assert (covered == covered_too).all()
        assert np.abs(ours - theirs).max() < (0.02 if bf16 else 1e-4), text
        assert ((ours >= model.threshold) == (theirs >= model.threshold)).all(), text
