"""OpenAI's sampling fields beyond the grammar (docs/structured.md): logprobs and top_logprobs,
frequency_penalty and presence_penalty, logit_bias; in the Python API and through the server
with the official openai client, valid and invalid. The log probabilities are checked against
the decoder's own logits of the same positions (teacher forcing), not against themselves."""

from __future__ import annotations

import json
import math
import urllib.request

import numpy as np
import pytest

from owl2_edge.errors import ArgumentError
from owl2_edge.sampling import SamplingParams, biased

QUESTION = "Describe the picture."


def _picture(seed: int = 0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_logprobs_are_the_decoders_own_distribution(owl):
    from owl2_edge.prompt import Turn, render
    image = _picture(1)
    owl.ask(image, QUESTION, temperature=0, max_tokens=6, ignore_eos=True, logprobs=True,
            top_logprobs=3)
    stats = owl.stats
    assert len(stats.logprobs) == stats.generated_tokens == 6
    prompt = render([Turn(QUESTION)], 1)
    # Every position's logits of the prompt and the answer, evaluated from an empty cache.
    rows = owl.logits(prompt, [image], continuation=stats.tokens)
    n_prompt = rows.shape[0] - len(stats.tokens)
    eos = owl.tokenizer.eos_id
    for k, entry in enumerate(stats.logprobs):
        row = rows[n_prompt - 1 + k].copy()
        row[eos] = -np.inf  # ignore_eos: the end was never possible
        expected = _log_softmax(row)
        assert entry.token == stats.tokens[k]
        assert entry.logprob == pytest.approx(expected[entry.token], abs=2e-4)
        # greedy: the chosen token is the likeliest, and the top list is in order
        assert entry.top[0][0] == entry.token and len(entry.top) == 3
        assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        for token, lp in entry.top:
            assert lp == pytest.approx(expected[token], abs=2e-4)


def test_logit_bias_forces_or_bans_a_token(owl):
    image = _picture(2)
    owl.ask(image, QUESTION, temperature=0, max_tokens=3, ignore_eos=True)
    free = owl.stats.tokens
    forced = 7 if free[0] != 7 else 8
    owl.ask(image, QUESTION, temperature=0, max_tokens=3, ignore_eos=True,
            logit_bias={forced: 100})
    assert owl.stats.tokens == [forced] * 3
    owl.ask(image, QUESTION, temperature=0, max_tokens=1, ignore_eos=True,
            logit_bias={str(free[0]): -100})   # JSON's string keys work too
    assert owl.stats.tokens[0] != free[0]
    with pytest.raises(ArgumentError, match="outside the vocabulary"):
        owl.ask(image, QUESTION, logit_bias={owl.tokenizer.n_vocab: 1})


def test_frequency_and_presence_penalties_as_openai_defines_them():
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={3: 2.0})
    logits = np.zeros(10, dtype=np.float32)
    out = biased(params, logits, [5, 5, 7])
    expected = np.zeros(10)
    expected[3] = 2.0
    expected[5] = -(2 * 0.5 + 0.25)
    expected[7] = -(0.5 + 0.25)
    np.testing.assert_allclose(out, expected)
    assert biased(SamplingParams(), logits, [5]) is logits   # nothing asked: no copy


def test_penalties_change_a_repetitive_answer(owl):
    image = _picture(3)
    owl.ask(image, QUESTION, temperature=0, max_tokens=24, ignore_eos=True)
    plain = owl.stats.tokens
    # The greedy answer repeats a token (the premise: else no penalty has anything to change).
    first_repeat = next(k for k, t in enumerate(plain) if t in plain[:k])
    for penalties in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                      {"frequency_penalty": 2.0, "presence_penalty": 2.0}):
        owl.ask(image, QUESTION, temperature=0, max_tokens=24, ignore_eos=True, **penalties)
        penalised = owl.stats.tokens
        # Penalties lower only tokens already in the answer: greedy picks what it picked until
        # the first repeat, and there (a penalty of 2 outweighs this model's margins) another.
        assert penalised[:first_repeat] == plain[:first_repeat], penalties
        assert penalised[first_repeat] != plain[first_repeat], penalties
        assert len(set(penalised)) > len(set(plain)), penalties


@pytest.mark.parametrize("kwargs, message", [
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -2.1}, "presence"),
    ({"logit_bias": {"x": 1}}, "not a token id"), ({"logit_bias": {1: 101}}, "logit_bias"),
    ({"logit_bias": [1]}, "must be an object"), ({"top_logprobs": 3}, "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_values_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ArgumentError, match=message):
        SamplingParams(**kwargs)


def test_chat_completion_api_returns_logprobs_streamed_and_not(owl):
    messages = [{"role": "user", "content": "Say something."}]
    reply = owl.create_chat_completion(messages, temperature=0, max_tokens=5, logprobs=True,
                                       top_logprobs=2, ignore_eos=True)
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(e["top_logprobs"]) == 2 for e in content)
    # The tokens' texts join to the content (its end whitespace aside, which the content drops):
    # the first token's word-start space is dropped from its text as from the content.
    assert "".join(e["token"] for e in content).rstrip() == reply["choices"][0]["message"]["content"]
    chunks = list(owl.create_chat_completion(messages, temperature=0, max_tokens=5, logprobs=True,
                                             ignore_eos=True, stream=True))
    streamed = [e for c in chunks if c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    plain = owl.create_chat_completion(messages, temperature=0, max_tokens=2)
    assert plain["choices"][0]["logprobs"] is None


# -- the server, through the openai client --------------------------------------------------------

openai = pytest.importorskip("openai", reason="needs the openai client (the dev extra)")


@pytest.fixture(scope="module")
def api(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


def test_the_server_returns_chat_logprobs_streamed_and_not(api):
    messages = [{"role": "user", "content": "Say something."}]
    reply = api.chat.completions.create(model="owl2", messages=messages, temperature=0,
                                        max_tokens=6, logprobs=True, top_logprobs=3,
                                        extra_body={"ignore_eos": True})
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 6 and reply.usage.completion_tokens == 6
    for k, e in enumerate(entries):
        assert e.logprob <= 0 and len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token
        text = bytes(e.bytes).decode("utf-8", "replace")  # the token's own bytes
        assert (text.lstrip() if k == 0 else text) == e.token
        assert math.isclose(sum(math.exp(t.logprob) for t in e.top_logprobs[:1]),
                            math.exp(e.logprob), rel_tol=1e-6)
    stream = api.chat.completions.create(model="owl2", messages=messages, temperature=0,
                                         max_tokens=6, logprobs=True, stream=True,
                                         extra_body={"ignore_eos": True})
    streamed = [e.token for c in stream if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in entries]


def test_the_server_returns_completion_logprobs(api):
    reply = api.completions.create(model="owl2", prompt="USER: Hello ASSISTANT:", temperature=0,
                                   max_tokens=5, logprobs=2, extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(5)]
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_the_server_applies_penalties_and_bias(api):
    messages = [{"role": "user", "content": "Say something."}]
    base = dict(model="owl2", messages=messages, temperature=0, max_tokens=4)
    forced = api.chat.completions.create(**base, logit_bias={"7": 100},
                                         extra_body={"ignore_eos": True}, logprobs=True)
    assert [e.token for e in forced.choices[0].logprobs.content] == \
        [forced.choices[0].logprobs.content[0].token] * 4
    # "Name a colour." makes the tiny model say one token over and over (greedy). Each penalty
    # must change the second token, and by exactly its amount: the logprobs are read after the
    # penalties (docs/structured.md), so at the second step every token but the repeated one
    # gains -log(1 - p + p·exp(-amount)), p the repeated token's unpenalised probability there.
    repeat = dict(model="owl2", messages=[{"role": "user", "content": "Name a colour."}],
                  temperature=0, max_tokens=4, logprobs=True, top_logprobs=5)
    plain = api.chat.completions.create(**repeat)
    steps = plain.choices[0].logprobs.content
    assert len(steps) == 4 and len({e.token for e in steps}) == 1, steps
    p = math.exp(steps[1].logprob)
    for penalties, amount in (({"frequency_penalty": 1.5}, 1.5), ({"presence_penalty": 1.0}, 1.0),
                              ({"frequency_penalty": 1.5, "presence_penalty": 1.0}, 2.5)):
        penalised = api.chat.completions.create(**repeat, **penalties)
        got = penalised.choices[0].logprobs.content
        assert penalised.choices[0].message.content != plain.choices[0].message.content
        # Nothing to penalise at the first step: the same token, the same logprob.
        assert got[0].token == steps[0].token, penalties
        assert got[0].logprob == pytest.approx(steps[0].logprob, abs=1e-5), penalties
        assert got[1].token != steps[0].token, penalties
        before = {t.token: t.logprob for t in steps[1].top_logprobs}[got[1].token]
        gain = -math.log(1 - p + p * math.exp(-amount))
        assert got[1].logprob - before == pytest.approx(gain, abs=1e-4), penalties
    # Penalties too small to change that answer still lower the repeated token at step k (it
    # was generated k times before) by d = k·frequency + (k > 0)·presence, renormalised: its
    # logprob becomes logprob - d - log(1 - P + P·exp(-d)), P its unpenalised probability.
    # Counts that grow tell frequency from presence (a swap of the two fails here).
    for frequency, presence in ((0.05, 0.0), (0.0, 0.1), (0.05, 0.1)):
        small = api.chat.completions.create(**repeat, frequency_penalty=frequency,
                                            presence_penalty=presence)
        got = small.choices[0].logprobs.content
        assert [e.token for e in got] == [e.token for e in steps], (frequency, presence)
        for k, (e, before) in enumerate(zip(got, steps)):
            d, prob = k * frequency + (k > 0) * presence, math.exp(before.logprob)
            expected = before.logprob - d - math.log(1 - prob + prob * math.exp(-d))
            assert e.logprob == pytest.approx(expected, abs=1e-4), (frequency, presence, k)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(**base, logit_bias={"7": 500})
    assert e.value.body["param"] == "logit_bias"


def test_n_choices_share_the_prompt_each_its_own_seed(api, tiny_server):
    messages = [{"role": "user", "content": "Say something."}]
    base = dict(model="owl2", messages=messages, temperature=1.0, max_tokens=8, seed=11)
    reply = api.chat.completions.create(**base, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = [c.message.content for c in reply.choices]
    # Choice k is what a request with seed 11 + k gets alone (each its own seed, reproducible).
    for k, text in enumerate(texts):
        alone = api.chat.completions.create(**{**base, "seed": 11 + k})
        assert alone.choices[0].message.content == text
    assert reply.usage.completion_tokens == sum(
        api.chat.completions.create(**{**base, "seed": 11 + k}).usage.completion_tokens
        for k in range(3))
    stream = api.chat.completions.create(**base, n=3, stream=True)
    streamed = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert [streamed[k].strip() for k in range(3)] == texts
    greedy = api.completions.create(model="owl2", prompt="USER: Hi ASSISTANT:", temperature=0,
                                    max_tokens=5, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_every_response_names_the_model_as_v1_models_lists_it(api):
    listed = api.models.list().data[0].id
    chat = api.chat.completions.create(model="gpt-4o", temperature=0, max_tokens=2,
                                       messages=[{"role": "user", "content": "Hi"}])
    text = api.completions.create(model="whatever", prompt="Hi", temperature=0, max_tokens=2)
    assert chat.model == text.model == listed


def test_the_first_token_s_text_loses_the_space_the_content_drops(api, tiny_server):
    """The content drops sentencepiece's word-start space: so does the first token's text, and
    the tokens then join to the content (streamed and not; an answer whose tokens are each
    whole characters: a byte token's text alone is a replacement character, as OpenAI's)."""
    messages = [{"role": "user", "content": "Say something."}]
    owl = tiny_server.owl

    def whole(entry) -> bool:
        try:
            bytes(entry.bytes).decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False
    for seed in range(40):  # answers whose first token starts a word
        reply = api.chat.completions.create(model="owl2", messages=messages, temperature=0.9,
                                            seed=seed, max_tokens=6, logprobs=True)
        entries = reply.choices[0].logprobs.content
        if not all(whole(e) for e in entries):
            continue
        raw = bytes(entries[0].bytes).decode("utf-8")
        joined = "".join(e.token for e in entries)
        assert joined.rstrip() == reply.choices[0].message.content
        if raw.startswith(" "):
            assert entries[0].token == raw.lstrip()
            break
    else:
        pytest.skip("no answer began with a word-start token")
    stream = api.chat.completions.create(model="owl2", messages=messages, temperature=0.9,
                                         seed=seed, max_tokens=6, logprobs=True, stream=True)
    chunks = [c for c in stream if c.choices]
    assert "".join(e.token for c in chunks if c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content) == joined
    assert owl.engine.n_running == 0


def test_fields_whose_values_ask_for_nothing_are_taken_and_others_refused(api):
    messages = [{"role": "user", "content": "Say something."}]
    base = dict(model="owl2", messages=messages, temperature=0, max_tokens=4)
    plain = api.chat.completions.create(**base).choices[0].message.content
    taken = api.chat.completions.create(**base, metadata={"app": "test"}, store=False,
                                        service_tier="auto", parallel_tool_calls=False)
    assert taken.choices[0].message.content == plain
    for kwargs, param in (({"store": True}, "store"), ({"service_tier": "flex"}, "service_tier"),
                          ({"metadata": {"k": 5}}, "metadata"),
                          ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
                          ({"extra_body": {"parallel_tool_calls": "yes"}}, "parallel_tool_calls")):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(**base, **kwargs)
        assert e.value.body["param"] == param, e.value.body


def test_json_object_with_llama_cpp_s_schema_key_follows_the_schema(api):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Yes or no?"}]
    reply = api.chat.completions.create(
        model="owl2", messages=messages, temperature=0, max_tokens=30,
        response_format={"type": "json_object", "schema": schema})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(model="owl2", messages=messages, max_tokens=4,
                                    response_format={"type": "json_object",
                                                     "schema": {"type": "objekt"}})
    assert e.value.body["param"] == "response_format.schema", e.value.body


def test_timings_per_token_puts_timings_in_every_streamed_chunk(api):
    stream = api.chat.completions.create(
        model="owl2", messages=[{"role": "user", "content": "Say something."}], temperature=0,
        max_tokens=5, stream=True, extra_body={"ignore_eos": True, "timings_per_token": True})
    content = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert content and all(c.model_extra["timings"]["predicted_n"] >= 1 for c in content)
    counts = [c.model_extra["timings"]["predicted_n"] for c in content]
    assert counts == sorted(counts)


def test_each_field_is_declared_once_and_props_lists_the_table(tiny_server):
    """serve/field_table.py: one entry per name and route, each sampling field a
    SamplingParams field, and /props' lists made from it."""
    import dataclasses

    from owl2_edge.sampling import SamplingParams
    from owl2_edge.serve import field_table
    for route in field_table.EVERY:
        names = [f.name for f in field_table.FIELDS if route in f.routes]
        assert len(names) == len(set(names)), route
    params = {f.name for f in dataclasses.fields(SamplingParams)}
    assert {f.sets for f in field_table.FIELDS if f.sets} <= params
    props = json.loads(urllib.request.urlopen(tiny_server.url + "/props", timeout=30).read())
    assert props["supported_fields"] == field_table.acted_on()
    assert set(props["unsupported_fields"]) == {
        f.name for f in field_table.FIELDS if f.neutral and set(f.routes) & {"chat", "completions"}}
    assert "store" in props["responses_fields"]["unsupported"]
    assert any(line.startswith("instructions:") for line in props["responses_fields"]["supported"])
