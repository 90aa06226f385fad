"""The decode engine on the real embedded model: its forward pass against transformers', continuous
batching against requests run alone, prefix reuse, and the prefix cache against adapter changes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from model.prompt import build_messages

QUESTIONS = [
    "Our printer keeps jamming on every page and shows error E-502. What should I do?",
    "The VPN disconnects every few minutes when I work from home.",
    "My laptop dock does not detect the external monitors.",
    "Wi-Fi keeps dropping in the meeting room.",
    "The badge reader at the warehouse door shows a red light.",
]


@pytest.fixture(scope="module")
def lm():
    from core.settings import load_settings
    from model.runtime import LanguageModel

    return LanguageModel(load_settings(max_new_tokens=24))


def _request(lm, question: str, max_new: int = 24):  # type: ignore[no-untyped-def]
    from model.engine import Request

    return Request(ids=lm.render(build_messages(question=question)), max_new_tokens=max_new,
                   deadline=time.monotonic() + 600)


def _engine(lm, **kwargs):  # type: ignore[no-untyped-def]
    from model.engine import Engine

    return Engine(lm.model, eos_ids=lm._eos_ids(), sampling=lm.sampling(), **kwargs)


def test_forward_matches_transformers(lm):
    import torch

    ids = lm.render(build_messages(question=QUESTIONS[0]))
    with torch.inference_mode():
        reference = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    # fp32 weights: the same numbers as transformers' forward (several chunks: the boundaries count too).
    # fp16 weights (the CPU default): within fp16 rounding, and the same greedy token.
    for weights, tolerance in (("fp32", 1e-3), ("fp16", 0.1)):
        engine = _engine(lm, prefill_chunk=32, cpu_weights=weights)
        with torch.inference_mode():
            engine._ensure_capacity(len(ids))
            ours = engine._forward(torch.tensor([ids]), rows=[engine.max_batch], starts=[0], last_only=True)[0]
        assert torch.allclose(ours, reference, atol=tolerance), (weights, (ours - reference).abs().max())
        assert int(ours.argmax()) == int(reference.argmax())
        # Decoding goes through the one-query attention path: check it against a full forward too.
        request = _request(lm, QUESTIONS[0], max_new=4)
        engine.run([request])
        with torch.inference_mode():
            full = lm.model(input_ids=torch.tensor([ids + request.generated[:3]])).logits[0, -1]
            step = engine._forward(torch.tensor([ids + request.generated[:3]]), rows=[engine.max_batch], starts=[0],
                                   last_only=True)[0]
        assert torch.allclose(step, full, atol=tolerance)


def test_continuous_batching_gives_each_request_its_text_alone(lm):
    alone = []
    for q in QUESTIONS:
        engine = _engine(lm, prefix_cache=0)
        r = _request(lm, q)
        engine.run([r])
        alone.append(r.generated)
    assert all(alone)

    # Requests join while others are decoding (one every third step) and leave when they are done.
    engine = _engine(lm, prefill_chunk=64)
    requests = [_request(lm, q) for q in QUESTIONS]
    pending = list(requests)
    peak = 0
    while any(not r.done for r in requests):
        if pending and engine.steps % 3 == 0:
            engine.add(pending.pop(0))
        engine.step()
        peak = max(peak, len(engine.running))
    assert peak > 1  # they really shared decode steps
    # The opening two prompts share is found when the second is prefilled; every later one reuses it.
    assert engine.prefix_hits == len(QUESTIONS) - 2
    assert [r.generated for r in requests] == alone


def test_a_request_leaves_at_its_own_limit_and_deadline(lm):
    engine = _engine(lm)
    short, long_ = _request(lm, QUESTIONS[0], max_new=3), _request(lm, QUESTIONS[1], max_new=20)
    late = _request(lm, QUESTIONS[2], max_new=20)
    late.deadline = time.monotonic() - 1  # its caller's time is up before it starts
    engine.run([short, long_, late])
    assert len(short.generated) == 3 and not short.timed_out
    assert long_.done and len(long_.generated) > 3
    assert late.timed_out and late.generated == []
    assert not engine.running and not engine.waiting


def test_prefix_cache_is_dropped_when_the_adapter_changes(lm, tmp_path: Path):
    import torch
    from peft import LoraConfig, get_peft_model

    from core.settings import load_settings
    from model.runtime import LanguageModel

    model = LanguageModel(load_settings(max_new_tokens=12))
    prompt = build_messages(question=QUESTIONS[0])
    model.generate([prompt])
    model.generate([build_messages(question=QUESTIONS[1])])  # shares the system prompt: a prefix is kept
    assert model.engine._prefixes

    # An adapter that really changes the model (a fresh LoRA's B is zero, which would change nothing).
    peft_model = get_peft_model(model.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    model.model = peft_model.unload()

    model.use_adapter(str(adapter))
    assert not model.engine._prefixes  # keys and values of the old weights are gone
    with_adapter = model.generate([prompt])[0].text

    fresh = LanguageModel(load_settings(max_new_tokens=12, adapter=str(adapter)))
    assert fresh.generate([prompt])[0].text == with_adapter  # same text as a model loaded with the adapter
    exact = _engine(fresh, cpu_weights="fp32")
    with torch.inference_mode():
        ids = torch.tensor([fresh.render(prompt)])
        reference = fresh.model(input_ids=ids).logits[0, -1]  # peft's own forward, LoRA unmerged
        exact._ensure_capacity(ids.shape[1])
        ours = exact._forward(ids, rows=[exact.max_batch], starts=[0], last_only=True)[0]
    assert torch.allclose(ours, reference, atol=1e-3)  # the merged LoRA in the fused weights is right

    model.use_adapter(None)
    assert not model.engine._prefixes


def test_penalties_match_transformers_generate(lm):
    """Repetition penalty and the n-gram ban, as ``generate`` applies them (exact fp32 weights)."""
    import torch

    engine = _engine(lm, cpu_weights="fp32")
    request = _request(lm, QUESTIONS[1], max_new=40)
    engine.run([request])
    s = lm.settings
    assert s.repetition_penalty != 1.0 and s.no_repeat_ngram_size > 0
    ids = torch.tensor([request.ids])
    with torch.inference_mode():
        out = lm.model.generate(
            ids, max_new_tokens=40, do_sample=False, temperature=None, top_p=None, top_k=None,
            pad_token_id=lm.tokenizer.pad_token_id, repetition_penalty=s.repetition_penalty,
            no_repeat_ngram_size=s.no_repeat_ngram_size,
        )
    reference = [t for t in out[0, ids.shape[1]:].tolist() if t not in lm._eos_ids()]
    assert request.generated == reference[: len(request.generated)] and request.generated


def test_score_is_the_models_log_probability_and_leaves_running_requests_alone(lm):
    import torch

    messages = build_messages(question=QUESTIONS[0])
    prompt = lm.render(messages)
    answers = ["Replace the fuser unit.", "Clear the paper path and reseat the tray.", "x"]
    expected = []
    for answer in answers:
        tokens = lm.tokenizer(answer, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        expected.append(float(torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens)[:, None]).sum()))

    engine = _engine(lm, prefill_chunk=32, cpu_weights="fp32")
    alone = _request(lm, QUESTIONS[1])
    engine.run([alone])
    # Scored while another request is half prefilled and a third is decoding: both keep their text.
    engine = _engine(lm, prefill_chunk=32, cpu_weights="fp32")
    decoding, prefilling = _request(lm, QUESTIONS[1]), _request(lm, QUESTIONS[1])
    engine.add(decoding)
    while not decoding.generated:
        engine.step()
    engine.add(prefilling)
    engine.step()
    assert 0 < prefilling._prefilled < len(prefilling.ids)
    scores = engine.score(prompt, [lm.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers])
    assert scores == pytest.approx(expected, abs=2e-3)
    while not (decoding.done and prefilling.done):
        engine.step()
    assert decoding.generated == alone.generated == prefilling.generated
    # Each generated token carries the model's own log-probability of it (before the penalties): summed,
    # what scoring the same tokens gives.
    assert len(alone.logprobs) == len(alone.generated) and all(p <= 0 for p in alone.logprobs)
    assert sum(alone.logprobs) == pytest.approx(engine.score(alone.ids, [alone.generated])[0], abs=2e-3)
    # Once more: the prompt's keys and values now come from the prefix cache, with the same result.
    hits = engine.prefix_hits
    assert engine.score(prompt, [lm.tokenizer(answers[0], add_special_tokens=False)["input_ids"]]) == pytest.approx(
        expected[:1], abs=2e-3)
    assert engine.prefix_hits == hits + 1
    assert lm.score(messages, answers[:2]) == pytest.approx(expected[:2], abs=0.2)  # the served fp16 weights
