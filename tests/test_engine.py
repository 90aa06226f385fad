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

    # transformers' loader: these tests compare the engine with transformers' own forward pass and
    # generate. tests/test_llama.py checks that the plain loader gives the engine the same weights.
    return LanguageModel(load_settings(max_new_tokens=24, model_loader="transformers"))


def _request(lm, question: str, max_new: int = 24):  # type: ignore[no-untyped-def]
    from model.engine import Request

    return Request(ids=lm.render(build_messages(question=question)), max_new_tokens=max_new,
                   deadline=time.monotonic() + 600)


def _engine(lm, **kwargs):  # type: ignore[no-untyped-def]
    from model.engine import Engine

    return Engine(lm.model, eos_ids=lm._eos_ids(), sampling=lm.sampling(), **kwargs)


def _forms() -> list[tuple[str, float]]:
    """The CPU weight forms this machine runs, each with how far its logits may be from transformers'
    fp32 forward (logits here are about 30 in size)."""
    from model.engine import bf16_kernels_available, fp16_kernels_available

    forms = [("fp32", 1e-3)]
    if fp16_kernels_available():
        forms.append(("fp16", 0.1))  # fp16 weights, fp32 products
    if bf16_kernels_available():
        forms.append(("bf16", 0.5))  # bf16 weights and product inputs: 8 bits of mantissa (0.15-0.25 seen)
    return forms


def test_forward_matches_transformers(lm):
    import torch

    ids = lm.render(build_messages(question=QUESTIONS[0]))
    with torch.inference_mode():
        reference = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    # fp32 weights: the same numbers as transformers' forward (several chunks: the boundaries count too).
    # fp16 / bf16 weights (the CPU defaults): within their rounding, and the same greedy token.
    for weights, tolerance in _forms():
        engine = _engine(lm, prefill_chunk=32, cpu_weights=weights)
        assert engine.weight_form == weights  # the form asked for, not a fallback
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


def _last_token_step(engine, ids: list[int]):  # type: ignore[no-untyped-def]
    """Prefill all of ``ids`` but the last token in cache row 0, then that token as one one-row decode
    step: its logits ([1, vocab])."""
    import torch

    with torch.inference_mode():
        engine._ensure_capacity(len(ids))
        engine._forward(torch.tensor([ids[:-1]]), rows=[0], starts=[0], last_only=True)
        return engine._forward(torch.tensor([ids[-1:]]), rows=[0], starts=[len(ids) - 1], last_only=True)


def test_one_row_decode_step_matches_transformers(lm):
    """The step one user at a time gets: one row, attention without a mask, and with bf16 weights the
    fp16 copy kept for one-row steps. Its logits against transformers' forward at the same position."""
    import torch

    from model.engine import bf16_kernels_available

    ids = lm.render(build_messages(question=QUESTIONS[2]))
    with torch.inference_mode():
        reference = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    cases = [(form, tolerance, "fp16") for form, tolerance in _forms()]
    if bf16_kernels_available():
        cases.append(("bf16", 0.5, "off"))  # the bf16 kernels on one row (padded to four)
    for form, tolerance, row in cases:
        engine = _engine(lm, cpu_weights=form, row_weights=row)
        assert engine.row_form == ("fp16" if form == "bf16" and row == "fp16" else None)  # a copy for bf16 only
        step = _last_token_step(engine, ids)[0]
        assert torch.allclose(step, reference, atol=tolerance), (form, row, (step - reference).abs().max())
        assert int(step.argmax()) == int(reference.argmax())


def test_the_one_row_step_computes_what_a_batch_step_does_for_that_row(lm):
    """One user decoding alone takes its own lean path (``_row_step``: 2-D tensors, no index tensors or
    mask); the same token as one row of a two-row batch step goes through the batch path. Both give the
    same logits in each weight form. The fp16 copy serves one-row steps only: with it, the lean path is
    checked against the batch path's code run for one row (as beside a layer that cannot be fused)."""
    import torch

    from model.engine import bf16_kernels_available

    ids = lm.render(build_messages(question=QUESTIONS[4]))
    position = len(ids) - 1
    cases = [(form, "off") for form, _ in _forms()]
    if bf16_kernels_available():
        cases.append(("bf16", "fp16"))
    for form, row in cases:
        engine = _engine(lm, cpu_weights=form, row_weights=row)
        assert not engine._any_unfused  # every layer fused: a one-row step takes _row_step
        with torch.inference_mode():
            engine._ensure_capacity(len(ids))
            for cache_row in (0, 1):  # the same prompt in two cache rows
                engine._forward(torch.tensor([ids[:-1]]), rows=[cache_row], starts=[0], last_only=True)
            alone = engine._forward(torch.tensor([ids[-1:]]), rows=[0], starts=[position], last_only=True)
            if row == "off":
                other = engine._forward(torch.tensor([ids[-1:]] * 2), rows=[0, 1], starts=[position] * 2,
                                        last_only=True)[:1]  # fmt: skip
            else:
                engine._any_unfused = True  # the batch path's code, for one row
                other = engine._forward(torch.tensor([ids[-1:]]), rows=[0], starts=[position], last_only=True)
        assert alone.shape == other.shape == (1, lm.model.config.vocab_size)
        assert torch.allclose(alone, other, atol=1e-4), (form, row, (alone - other).abs().max())  # 0-5e-5 seen
        assert int(alone.argmax()) == int(other.argmax())


def test_one_row_copy_is_kept_where_memory_allows(lm, monkeypatch):
    from model import engine as engine_module
    from model.engine import bf16_kernels_available

    if not bf16_kernels_available():
        pytest.skip("this CPU has no native bf16 kernels: the fp16 one-row copy is made for the bf16 form only")
    weights = sum(p.numel() for p in lm.model.parameters()) * 2  # the copy's bytes, about (tied head: once)
    monkeypatch.setattr(engine_module, "_memory_bytes", lambda: weights * 32)
    assert _engine(lm, cpu_weights="bf16").row_form == "fp16"
    monkeypatch.setattr(engine_module, "_memory_bytes", lambda: weights * 4)  # the copy would take 1/4
    assert _engine(lm, cpu_weights="bf16").row_form is None
    assert _engine(lm, cpu_weights="bf16", row_weights="fp16").row_form == "fp16"  # asked for: kept


def test_a_one_row_step_that_overflows_fp16_is_redone_in_bf16(lm, caplog, compiled_dir):
    """A model whose activations pass fp16's range would turn the copy's results into inf: the engine
    notices on the step's logits, drops the copy and gives the bf16 step's numbers instead."""
    import torch

    from model.engine import bf16_kernels_available

    if not bf16_kernels_available():
        pytest.skip("this CPU has no native bf16 kernels: the fp16 one-row copy is made for the bf16 form only")
    ids = lm.render(build_messages(question=QUESTIONS[1]))
    plain = _last_token_step(_engine(lm, cpu_weights="bf16", row_weights="off"), ids)
    # The lean one-row path, the batch path's code for one row (a model with a layer that cannot be
    # fused) and the compiled layer: the copy serves all three.
    for unfused, folder in ((False, None), (True, None), (False, compiled_dir)):
        caplog.clear()
        engine = _engine(lm, cpu_weights="bf16", row_weights="fp16", compiled_dir=folder)
        assert engine.step_form == ("compiled" if folder else "eager")
        engine._any_unfused = unfused
        engine.layers[3].down.row.fill_(60000.0)  # the copy only: its products overflow, bf16's do not
        step = _last_token_step(engine, ids)
        assert engine.row_form is None and engine.layers[3].down.row is None and engine._compiled is None
        assert "overflowed fp16" in caplog.text
        assert torch.isfinite(step).all()
        assert torch.equal(step, plain), (unfused, folder, (step - plain).abs().max())  # the same bf16 step, same cache


@pytest.fixture(scope="module")
def compiled_dir(lm):
    """The folder holding the compiled one-row layer for the embedded model, built as `supportbot model
    prepare` builds it (kept in the model cache: built once per machine)."""
    from core.settings import load_settings
    from model import compiled
    from model.engine import bf16_kernels_available

    if not bf16_kernels_available():
        pytest.skip("this CPU has no native bf16 kernels: the compiled layer serves the fp16 one-row copy of bf16")
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - whatever inductor's probe raises
        pytest.skip("no C++ compiler here: the compiled layer cannot be built (one-row steps run eagerly)")
    folder = load_settings().compiled_dir
    assert compiled.prepare(folder, lm.model.config) is not None
    return folder


def _teacher_forced(engine, tokens: list[int], prompt: int):  # type: ignore[no-untyped-def]
    """Prefill ``tokens[:prompt - 1]`` in cache row 0, then feed the rest one token at a time as one-row
    steps: their logits, [len(tokens) - prompt + 1, vocab]."""
    import torch

    with torch.inference_mode():
        engine._ensure_capacity(len(tokens))
        engine._forward(torch.tensor([tokens[: prompt - 1]]), rows=[0], starts=[0], last_only=True)
        steps = [engine._forward(torch.tensor([[tokens[p]]]), rows=[0], starts=[p], last_only=True)[0]
                 for p in range(prompt - 1, len(tokens))]  # fmt: skip
    return torch.stack(steps)


def test_the_compiled_one_row_layer_computes_what_the_eager_one_does(lm, compiled_dir):
    """One user decoding alone goes through the layer `model prepare` compiled (model/compiled.py): the
    same arithmetic fused into a few C++ loops, so the same numbers within fp16 rounding, as close to
    transformers' fp32 forward as the eager step, and the same cache contents, in any cache row."""
    import torch

    eager = _engine(lm, cpu_weights="bf16", row_weights="fp16")
    fast = _engine(lm, cpu_weights="bf16", row_weights="fp16", compiled_dir=compiled_dir)
    assert (eager.step_form, fast.step_form) == ("eager", "compiled")
    ids = lm.render(build_messages(question=QUESTIONS[0]))
    request = _request(lm, QUESTIONS[0], max_new=12)
    eager.run([request])
    tokens = ids + request.generated
    with torch.inference_mode():
        reference = lm.model(input_ids=torch.tensor([tokens])).logits[0, len(ids) - 1 :]
    ours, theirs = _teacher_forced(fast, tokens, len(ids)), _teacher_forced(eager, tokens, len(ids))
    assert fast.step_form == "compiled"  # it served every step (no fallback on the way)
    # 0.045-0.055 apart over 64 steps of three answers, each 0.15 at most from fp32 (mean 0.02-0.03).
    assert torch.allclose(ours, theirs, atol=0.1), (ours - theirs).abs().max()
    assert torch.allclose(ours, reference, atol=0.5), (ours - reference).abs().max()
    top2 = reference.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.5  # where fp32 itself is not torn between two tokens
    assert clear.any() and torch.equal(ours.argmax(-1)[clear], reference.argmax(-1)[clear])
    for fast_keys, eager_keys, fast_values, eager_values in zip(fast._keys, eager._keys, fast._values, eager._values):
        assert torch.allclose(fast_keys[0, :, : len(tokens)], eager_keys[0, :, : len(tokens)], atol=0.1)
        assert torch.allclose(fast_values[0, :, : len(tokens)], eager_values[0, :, : len(tokens)], atol=0.1)
    # Another cache row, with tokens no other row holds at these positions: a row's first token runs
    # eagerly, its second through the compiled layer, which must read and write row 3's cache only.
    pair = [ids[7], ids[12]]
    with torch.inference_mode():
        second = []
        for engine in (fast, eager):
            engine._forward(torch.tensor([pair[:1]]), rows=[3], starts=[0], last_only=True)
            second.append(engine._forward(torch.tensor([pair[1:]]), rows=[3], starts=[1], last_only=True))
    assert torch.allclose(second[0], second[1], atol=0.1), (second[0] - second[1]).abs().max()
    for fast_keys, eager_keys in zip(fast._keys, eager._keys):
        assert torch.allclose(fast_keys[3, :, :2], eager_keys[3, :, :2], atol=0.1)
        assert not torch.allclose(fast_keys[3, :, 1], fast_keys[0, :, 1], atol=0.1)  # not row 0's key


def test_a_compiled_layer_that_fails_leaves_one_row_steps_to_the_eager_path(lm, compiled_dir, caplog):
    import torch

    def broken(inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("the runner's own error")

    ids = lm.render(build_messages(question=QUESTIONS[3]))
    expected = _last_token_step(_engine(lm, cpu_weights="bf16", row_weights="fp16"), ids)
    engine = _engine(lm, cpu_weights="bf16", row_weights="fp16", compiled_dir=compiled_dir)
    engine._compiled = broken
    step = _last_token_step(engine, ids)
    assert engine.step_form == "eager" and "the compiled one-row layer failed" in caplog.text
    assert torch.equal(step, expected)  # the eager step's numbers, the same cache slots rewritten


def test_the_compiled_layer_reads_the_weights_it_is_given(lm, compiled_dir):
    """The compiled layer takes the weights as inputs, so one file serves every layer and every adapter:
    changed weights change its numbers as they change the eager step's, and a reload (what an adapter
    change calls) gives it the model's weights again."""
    import torch

    ids = lm.render(build_messages(question=QUESTIONS[1]))
    fast = _engine(lm, cpu_weights="bf16", row_weights="fp16", compiled_dir=compiled_dir)
    eager = _engine(lm, cpu_weights="bf16", row_weights="fp16")
    before = _last_token_step(fast, ids)
    for engine in (fast, eager):
        engine.layers[4].gate_up.row.mul_(0.5)
        engine.layers[9].qkv.row.mul_(1.5)
    changed, expected = _last_token_step(fast, ids), _last_token_step(eager, ids)
    assert (changed - before).abs().max() > 1.0
    assert torch.allclose(changed, expected, atol=0.1), (changed - expected).abs().max()
    fast.reload()
    assert fast.step_form == "compiled"
    assert torch.allclose(_last_token_step(fast, ids), before, atol=1e-5)


def test_without_a_usable_compiled_layer_one_row_steps_run_eagerly(lm, compiled_dir, tmp_path: Path, caplog):
    from model import compiled

    assert _engine(lm, cpu_weights="bf16", row_weights="fp16", compiled_dir=tmp_path).step_form == "eager"  # none built
    damaged = compiled.artifact(tmp_path, compiled.LayerShape.of(lm.model.config))  # type: ignore[arg-type]
    damaged.write_bytes(b"not a compiled package")
    assert _engine(lm, cpu_weights="bf16", row_weights="fp16", compiled_dir=tmp_path).step_form == "eager"
    assert "could not load the compiled one-row decode layer" in caplog.text
    # It serves the fp16 copy only: the bf16 or fp32 one-row steps and unfused layers stay as they are.
    assert _engine(lm, cpu_weights="bf16", row_weights="off", compiled_dir=compiled_dir).step_form == "eager"
    assert _engine(lm, cpu_weights="fp32", compiled_dir=compiled_dir).step_form == "eager"


def test_the_worker_model_takes_the_compiled_layer_model_prepare_built(compiled_dir, tmp_path: Path, monkeypatch):
    import torch._inductor

    from core.settings import load_settings
    from model.compiled import prepare_for
    from model.embedded import resolve_base
    from model.runtime import LanguageModel

    # The copy kept whatever this machine's memory (auto keeps it where it takes at most 1/16).
    settings = load_settings(max_new_tokens=4, cpu_row_weights="fp16", cpu_compiled_step="auto")
    assert LanguageModel(settings).engine.step_form == "compiled"
    off = settings.model_copy(update={"cpu_compiled_step": "off"})
    assert LanguageModel(off).engine.step_form == "eager"
    assert "off" in prepare_for(off, Path("unused"))
    fp32 = settings.model_copy(update={"cpu_weights": "fp32"})
    assert "not used here" in prepare_for(fp32, Path("unused"))

    def no_compiler(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("g++ not found")

    # A compiler that fails: prepare says so and leaves nothing behind; the model still serves.
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    bare = settings.model_copy(update={"model_cache": tmp_path})
    said = prepare_for(bare, resolve_base(settings))
    assert "not built, one-row steps run eagerly" in said and "g++ not found" in said
    assert not any(tmp_path.rglob("*.pt2")) and not any(tmp_path.rglob("*.so"))
    # No compiler at all: said at once, before any export.
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    from torch._inductor import cpp_builder

    cpp_builder.cpp_compiler_search.cache_clear()
    try:
        assert "no C++ compiler here" in prepare_for(bare, resolve_base(settings))
    finally:
        cpp_builder.cpp_compiler_search.cache_clear()


def test_layers_that_cannot_be_fused_run_as_modules_beside_fused_ones(lm, monkeypatch):
    """Fusing is decided per layer: a layer whose projections the engine cannot read (a bias, a module
    type it does not know) runs as its modules, with the rotary tables it needs, beside fused ones."""
    import torch

    from model import engine as engine_module

    target = lm.model.model.layers[2].self_attn.q_proj
    original = engine_module._dense_weight
    monkeypatch.setattr(engine_module, "_dense_weight", lambda m: None if m is target else original(m))
    engine = _engine(lm, cpu_weights="fp32", prefill_chunk=32)
    assert engine.layers[2].qkv is None and engine.layers[0].qkv is not None
    ids = lm.render(build_messages(question=QUESTIONS[3]))
    with torch.inference_mode():
        reference = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    step = _last_token_step(engine, ids)[0]
    assert torch.allclose(step, reference, atol=1e-3), (step - reference).abs().max()


def _run_joining(engine, requests):  # type: ignore[no-untyped-def]
    """Requests join while others are decoding (one every third step) and leave when they are done;
    returns the most rows that shared a decode step."""
    pending = list(requests)
    peak = 0
    while any(not r.done for r in requests):
        if pending and engine.steps % 3 == 0:
            engine.add(pending.pop(0))
        engine.step()
        peak = max(peak, len(engine.running))
    return peak


@pytest.mark.parametrize("form, row, compiled", [("fp32", "off", False), ("fp16", "off", False), ("bf16", "off", False),
                                                  ("bf16", "fp16", False), ("bf16", "fp16", True)])  # fmt: skip
def test_continuous_batching_gives_each_request_its_text_alone(lm, form, row, compiled, request):
    from model.engine import Sampling, cpu_weight_form

    if cpu_weight_form(form) != form:
        pytest.skip(f"this CPU has no native {form} kernels (the engine would fall back)")
    # With the compiled one-row layer a request alone decodes through it, in a batch through bf16.
    folder = request.getfixturevalue("compiled_dir") if compiled else None
    # bf16 products round their inputs to 8 bits of mantissa: a row's attention over a batch's longer
    # keys (masked to zero) sums in another order, and where two tokens are almost tied that rounding
    # can pick the other. So for bf16 the check is on plain greedy decoding, where such a tie is
    # visible in the model's own log-probabilities; fp32 and fp16 must give exactly the same text.
    # With the fp16 one-row copy a request alone decodes in fp16 and in a batch in bf16: the two
    # roundings part more often, each time at a near-tie (0.5, as for bf16).
    exact = form != "bf16"
    sampling = lm.sampling() if exact else Sampling()
    alone = []
    for q in QUESTIONS:
        engine = _engine(lm, prefix_cache=0, cpu_weights=form, row_weights=row, compiled_dir=folder)
        assert engine.step_form == ("compiled" if compiled else "eager")
        engine.sampling = sampling
        r = _request(lm, q)
        engine.run([r])
        alone.append(r)
    assert all(r.generated for r in alone)

    engine = _engine(lm, prefill_chunk=64, cpu_weights=form, row_weights=row, compiled_dir=folder)
    engine.sampling = sampling
    requests = [_request(lm, q) for q in QUESTIONS]
    assert _run_joining(engine, requests) > 1  # they really shared decode steps
    # The opening two prompts share is found when the second is prefilled; every later one reuses it.
    assert engine.prefix_hits == len(QUESTIONS) - 2
    if exact:
        assert [r.generated for r in requests] == [r.generated for r in alone]
        return
    same = 0
    for batched, single in zip(requests, alone):
        n = next((i for i, (a, b) in enumerate(zip(batched.generated, single.generated)) if a != b), None)
        if n is None:
            assert batched.generated == single.generated
            same += 1
            continue
        # Where they part, the model alone rated both tokens within bf16 rounding (0.5, as above) of each other.
        prefix = single.ids + single.generated[:n]
        other = engine.score(prefix, [[batched.generated[n]]])[0]
        assert single.logprobs[n] - other < 0.5, (n, single.logprobs[n], other)
    if row == "off":
        assert same >= len(QUESTIONS) - 2  # a near-tie is the exception, not the rule


def test_the_cpu_weight_form_falls_back_to_what_the_machine_runs(monkeypatch):
    import model.engine as engine

    for bf16, fp16, asked, expected in [
        (True, True, "auto", "bf16"), (False, True, "auto", "fp16"), (False, False, "auto", "fp32"),
        (False, True, "bf16", "fp16"), (True, True, "fp16", "fp16"), (True, True, "fp32", "fp32"),
    ]:
        monkeypatch.setattr(engine, "bf16_kernels_available", lambda bf16=bf16: bf16)
        monkeypatch.setattr(engine, "fp16_kernels_available", lambda fp16=fp16: fp16)
        assert engine.cpu_weight_form(asked) == expected, (bf16, fp16, asked)


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

    # An adapter that really changes the model (a fresh LoRA's B is zero, which would change nothing).
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    lm.model = peft_model.unload()

    loaded = {}
    for loader in ("auto", "transformers"):  # the worker's default (plain, LoRA merged) and peft's
        model = LanguageModel(load_settings(max_new_tokens=12, model_loader=loader))
        assert model.plain == (loader == "auto")
        prompt = build_messages(question=QUESTIONS[0])
        model.generate([prompt])
        model.generate([build_messages(question=QUESTIONS[1])])  # shares the system prompt: a prefix is kept
        assert model.engine._prefixes

        model.use_adapter(str(adapter))
        assert not model.engine._prefixes  # keys and values of the old weights are gone
        with_adapter = model.generate([prompt])[0].text

        fresh = loaded[loader] = LanguageModel(load_settings(max_new_tokens=12, adapter=str(adapter), model_loader=loader))
        assert fresh.generate([prompt])[0].text == with_adapter  # same text as a model loaded with the adapter
        model.use_adapter(None)
        assert not model.engine._prefixes
    # The plain loader's merged LoRA in the engine's fused weights against peft's own forward, LoRA unmerged.
    exact = _engine(loaded["auto"], cpu_weights="fp32")
    with torch.inference_mode():
        ids = torch.tensor([loaded["auto"].render(prompt)])
        reference = loaded["transformers"].model(input_ids=ids).logits[0, -1]
        exact._ensure_capacity(ids.shape[1])
        ours = exact._forward(ids, rows=[exact.max_batch], starts=[0], last_only=True)[0]
    assert torch.allclose(ours, reference, atol=1e-3)


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
    # The served weights (bf16 where the CPU computes it natively, else fp16) are within their rounding.
    # Over 16 question/answer pairs the summed log-probability of bf16 was 0.08-0.10 off on average and
    # at most 0.31 (rounding noise: the same code with the rotary product written another way gave a
    # maximum of 0.18); fp16 0.011 on average, 0.023 at most.
    served = {"bf16": 0.4, "fp16": 0.05}.get(lm.engine.weight_form or "", 2e-3)
    assert lm.score(messages, answers[:2]) == pytest.approx(expected[:2], abs=served)
