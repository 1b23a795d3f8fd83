"""The official `openai` Python client against `switchyard serve`: what a user's code
would do, end to end."""

import openai
import pytest

MESSAGES = [{"role": "user", "content": "Say something."}]


def test_models_list(client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert client.models.retrieve(model).id == model


def test_chat_completion(client, model):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, extra_body={"ignore_eos": True}
    )
    choice = r.choices[0]
    assert r.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_completion_text_and_token_prompts(client, model):
    r = client.completions.create(
        model=model, prompt="The switchyard", max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    r = client.completions.create(
        model=model, prompt=[1, 2, 3], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert r.usage.prompt_tokens == 3
    assert r.usage.completion_tokens == 3


def test_chat_streaming_with_usage_matches_non_streaming(client, model):
    kwargs = dict(
        model=model,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0.8,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    whole = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_streaming(client, model):
    stream = client.completions.create(
        model=model,
        prompt="hello",
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_stop_strings(client, model):
    base = dict(model=model, prompt="Once upon", max_tokens=40, temperature=0)
    text = client.completions.create(extra_body={"ignore_eos": True}, **base).choices[0].text
    middle = len(text) // 2
    stop = text[middle : middle + 2]
    expected = text[: text.index(stop)]
    r = client.completions.create(stop=[stop], extra_body={"ignore_eos": True}, **base)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    streamed = client.completions.create(
        stop=stop, stream=True, extra_body={"ignore_eos": True}, **base
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducibility(client, model):
    def sample(seed):
        return (
            client.chat.completions.create(
                model=model,
                messages=MESSAGES,
                max_tokens=32,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .message.content
        )

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_logprobs_and_n(client, model):
    r = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert len(c.logprobs.content) == 4
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)
    assert r.usage.completion_tokens == 8


def test_invalid_parameter_is_bad_request(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=-1)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert e.value.status_code == 404
    assert e.value.body["code"] == "model_not_found"
