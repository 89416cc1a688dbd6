"""The real default model (SmolLM2-135M-Instruct) behind the API: answers that must make sense."""

from __future__ import annotations

import openai
import pytest

from tests.api.conftest import running

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(default_text_model):
    with running(default_text_model, parallel=1) as s:
        yield s


def ask(server, model, content: str, **options):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return c.chat.completions.create(model=model.name, messages=[{"role": "user", "content": content}], **options)


def test_real_answer(server, default_text_model):
    r = ask(server, default_text_model, FRANCE, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # the model ended its turn (<|im_end|>)

