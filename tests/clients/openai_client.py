"""The official `openai` Python client against a running `corral serve` (argv: base URL, key).

Exercises what users' code does: chat (plain, streamed with usage, with logprobs), legacy
completions, the model list, and the typed errors for a bad key and an unsupported parameter.
Prints one line per check; exits non-zero on the first failure.
"""
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)

models = [m.id for m in client.models.list()]
assert "auto" in models and "smollm2-135m-instruct" in models, models
print("models ok", models)

msgs = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model="auto", messages=msgs, temperature=0, max_tokens=16,
                                   logprobs=True, top_logprobs=2)
text = r.choices[0].message.content
assert text, r
assert r.usage.completion_tokens == len(r.choices[0].logprobs.content), r
assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
raw = client.chat.completions.with_raw_response.create(model="auto", messages=msgs, temperature=0, max_tokens=16)
assert raw.headers["x-corral-route"] == "slm", dict(raw.headers)
print("chat ok", repr(text))

stream = client.chat.completions.create(model="auto", messages=msgs, temperature=0, max_tokens=16,
                                        stream=True, stream_options={"include_usage": True})
parts, usage = [], None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == text, (parts, text)
assert usage and usage.completion_tokens == r.usage.completion_tokens, usage
print("stream ok")

c = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                              max_tokens=4, temperature=0, logprobs=1)
assert c.choices[0].text and len(c.choices[0].logprobs.tokens) == 4, c
print("completions ok", repr(c.choices[0].text))

try:
    openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0).chat.completions.create(
        model="auto", messages=msgs)
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
print("auth error ok")

try:
    client.chat.completions.create(model="auto", messages=msgs, n=2)
    raise SystemExit("n=2 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "n", e.body
print("unsupported parameter ok")
