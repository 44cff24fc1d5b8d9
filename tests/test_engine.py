"""The continuous-batching engine: requests that join and leave between decode steps get exactly
offline `generate`'s tokens (greedy, and seeded samples with top-k / top-p); stop ids, stop
strings, budgets and cancellation; traffic never compiles; bad requests are RequestErrors."""

import functools
import types

import jax
import numpy as np
import pytest
from flax import nnx

from jaxnv.models.generate import generate
from jaxnv.models.transformer import Transformer
from jaxnv.serve.engine import Engine, RequestError, SamplingParams, _Slot

VOCAB, MAX_LEN = 61, 48


@functools.lru_cache
def _engine(slots=3):
    model = Transformer(VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                        mlp_dim=64, max_seq_len=MAX_LEN, rngs=nnx.Rngs(1))  # fmt: skip
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # text: one letter per id, so that stop strings and held-back text can be checked by hand
    detok = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    engine = Engine(graphdef, params, rest, slots=slots, max_len=MAX_LEN, detokenize=detok)
    engine.compile()
    return engine


def _reference(engine, prompt, sampling: SamplingParams):
    rng = jax.random.key(sampling.seed) if sampling.temperature > 0 else None
    return generate(engine.graphdef, engine.params, [prompt], sampling.max_tokens, rng=rng,
                    temperature=sampling.temperature, top_k=sampling.top_k,
                    top_p=sampling.top_p, stop_ids=sampling.stop_ids,
                    model_state=engine.model_state)[0].tolist()  # fmt: skip


def _drive(engine, requests):
    """Run (id, prompt, sampling) requests through the engine, admitting them as slots free up
    between steps; returns {id: [events]}."""
    pending, events = list(requests), {}
    while pending or engine.active:
        while pending and engine.free_slots:
            rid, prompt, sampling = pending.pop(0)
            events[rid] = [engine.insert(rid, prompt, sampling)]
        for event in engine.step():
            events[event.request_id].append(event)
    return events


@pytest.mark.slow  # the engine and ~6 generate compilations: ~35 s on 2 busy cores
def test_continuous_batching_equals_offline_generate_greedy_and_seeded():
    engine = _engine()
    before = engine.compilations()
    rng = np.random.default_rng(0)
    requests = []
    for i in range(10):  # more requests than slots, of mixed lengths: they join and leave
        prompt = rng.integers(0, VOCAB, int(rng.integers(1, 30))).tolist()
        if i % 3 == 2:
            sampling = SamplingParams(9, temperature=0.8, top_k=12, top_p=0.9, seed=i)
        else:
            sampling = SamplingParams(max_tokens=int(rng.choice([2, 17])))
        requests.append((f"r{i}", prompt, sampling))
    events = _drive(engine, requests)
    assert sorted(events) == sorted(r[0] for r in requests)
    want = {}
    for n in (2, 17):  # greedy: one batched generate per length (each row = that prompt alone)
        group = [r for r in requests if r[2].temperature == 0 and r[2].max_tokens == n]
        rows = generate(engine.graphdef, engine.params, [r[1] for r in group], n,
                        temperature=0.0, model_state=engine.model_state)  # fmt: skip
        want.update({r[0]: row.tolist() for r, row in zip(group, rows, strict=True)})
    for rid, prompt, sampling in requests:
        if sampling.temperature > 0:  # a seeded sample: generate's draw for that prompt alone
            want[rid] = _reference(engine, prompt, sampling)
        got = [e.token for e in events[rid]]
        assert got == want[rid], rid
        assert [e.finish_reason for e in events[rid]] == [None] * (len(got) - 1) + ["length"]
        assert "".join(e.text for e in events[rid]) == engine.detokenize(got)
    assert engine.active == 0 and engine.free_slots == engine.slots
    assert engine.compilations() == before  # every bucket and the step were compiled up front


def test_stop_ids_and_stop_strings_end_a_request_and_text_is_held_back():
    engine = _engine()
    prompt = [3, 1, 4, 1, 5]
    free = _reference(engine, prompt, SamplingParams(max_tokens=12))
    # a stop id: the 4th token; it is kept in the tokens, not in the text
    stop_id = free[3]
    events = _drive(engine, [("a", prompt, SamplingParams(max_tokens=12, stop_ids=(stop_id,)))])
    tokens = [e.token for e in events["a"]]
    assert tokens == free[: free.index(stop_id) + 1]
    assert events["a"][-1].finish_reason == "stop"
    assert "".join(e.text for e in events["a"]) == engine.detokenize(tokens[:-1])
    # a stop string spanning tokens 3..5: the text ends right before it, never showing its start
    text = engine.detokenize(free)
    stop = text[3:6]
    events = _drive(engine, [("b", prompt, SamplingParams(max_tokens=12, stop=(stop,)))])
    assert "".join(e.text for e in events["b"]) == text[: text.find(stop)]
    assert events["b"][-1].finish_reason == "stop"
    assert len(events["b"]) == text.find(stop) + len(stop)  # it stopped at the string's end
    sent = ""
    for e in events["b"]:
        sent += e.text
        assert len(sent) <= text.find(stop)  # the stop's start is never handed out


def test_held_back_text_is_the_longest_end_that_begins_a_stop():
    detok = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    host = types.SimpleNamespace(detokenize=detok)  # _text needs only the detokenizer
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, 2, int(rng.integers(1, 12))).tolist()  # "a" and "b"
        stops = tuple("".join(rng.choice(["a", "b"], int(rng.integers(1, 6)))) for _ in range(2))
        text = detok(ids)
        if any(stop in text for stop in stops):
            continue
        held = max(k for stop in stops for k in range(len(stop)) if text.endswith(stop[:k]))
        slot = _Slot("r", SamplingParams(stop=stops), frozenset(), ids)
        assert Engine._text(host, slot, None) == (text[: len(text) - held], None)
    # a long stop whose start the text keeps ending with: all of the text is held back (its
    # cost per token is the server's to bound: api.MAX_STOP_CHARS; no timing in unit tests)
    stop = "a" * 10_000 + "b"
    slot = _Slot("r", SamplingParams(stop=(stop,)), frozenset(), [0] * 2000)
    for _ in range(3):
        slot.ids.append(0)
        assert Engine._text(host, slot, None) == ("", None)


def test_cancel_frees_the_slot_and_other_requests_are_unaffected():
    engine = _engine()
    a, b = [7, 7, 2], [9, 8, 7, 6, 5, 4]
    first = engine.insert("a", a, SamplingParams(max_tokens=20))
    engine.insert("b", b, SamplingParams(max_tokens=10))
    b_tokens = []
    for step in range(10):
        events = {e.request_id: e for e in engine.step()}
        b_tokens.append(events["b"].token)
        if step == 2:
            assert engine.cancel("a") and not engine.cancel("a")
            assert engine.request_ids() == ["b"] and engine.free_slots == engine.slots - 1
        if events["b"].finish_reason:
            break
    assert first.finish_reason is None and engine.active == 0
    ref = _reference(engine, b, SamplingParams(max_tokens=10))
    assert engine.step() == [] and [ref[0], *b_tokens] == ref


@pytest.mark.parametrize(
    "prompt, kw, param",
    [
        ([], {}, "prompt"),
        ([1, VOCAB], {}, "prompt"),
        ([1] * MAX_LEN, {}, "prompt"),  # no room left for a token
        ([1, 2], dict(max_tokens=0), "max_tokens"),
        ([1, 2], dict(max_tokens=MAX_LEN - 1), "max_tokens"),
        ([1, 2], dict(temperature=-0.5), "temperature"),
        ([1, 2], dict(top_p=0.0), "top_p"),
        ([1, 2], dict(top_k=VOCAB + 1), "top_k"),
        ([1, 2], dict(seed=-1), "seed"),
    ],
)
def test_bad_requests_are_request_errors_naming_the_field(prompt, kw, param):
    engine = _engine()
    with pytest.raises(RequestError) as info:
        engine.insert("x", prompt, SamplingParams(**kw))
    assert info.value.param == param and "\n" not in str(info.value)
    assert engine.active == 0  # nothing was admitted


def test_engine_arguments_are_checked():
    engine = _engine()
    with pytest.raises(ValueError, match="max_len"):
        Engine(engine.graphdef, engine.params, engine.model_state, max_len=MAX_LEN + 1)
    with pytest.raises(ValueError, match="slots"):
        Engine(engine.graphdef, engine.params, engine.model_state, slots=0)
