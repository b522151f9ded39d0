"""The official `anthropic` Python client against `corral serve`'s /v1/messages (argv: base URL,
key), the default local model answering.

Checks a message and a streamed message (text, stop reason, usage, the final message the SDK
assembles from the events), a system prompt as blocks, a forced tool call whose input is valid
against its schema (non-streamed and streamed), a conversation carrying a tool result, and that
errors come back as the SDK's typed exceptions (bad key, unknown model, unsupported parameter).
Prints one line per check; exits non-zero on failure.
"""
import json
import sys

import anthropic

base, key = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
# The SDK no longer has `temperature`; corral still takes it. Greedy answers keep the small
# model's forced tool calls short enough to finish within max_tokens.
greedy = {"temperature": 0}
ask = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

raw = client.messages.with_raw_response.create(model="auto", max_tokens=12, messages=ask,
                                               system="You are terse.")
m = raw.parse()
assert raw.headers["x-corral-route"] == "slm", dict(raw.headers)
assert m.type == "message" and m.role == "assistant", m
assert m.content and m.content[0].type == "text" and m.content[0].text.strip(), m
assert m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason
assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 12, m.usage
print("message ok", repr(m.content[0].text))

with client.messages.stream(model="auto", max_tokens=12, messages=ask,
                            system=[{"type": "text", "text": "You are terse."}]) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text.strip() and final.content[0].text == text, (text, final)
assert final.stop_reason in ("end_turn", "max_tokens"), final.stop_reason
assert final.usage.output_tokens > 0, final.usage
print("stream ok", repr(text))

schema = {"type": "object", "properties": {"capital": {"type": "string"}, "population_millions": {"type": "number"}},
          "required": ["capital", "population_millions"]}
m = client.messages.create(model="auto", max_tokens=48, messages=ask, extra_body=greedy,
                           output_config={"format": {"type": "json_schema", "schema": schema}})
answer = json.loads(m.content[0].text)
assert set(answer) == {"capital", "population_millions"} and isinstance(answer["capital"], str), answer
print("structured output ok", answer)

tools = [{"name": "get_weather", "description": "Current weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"},
                                                            "unit": {"enum": ["c", "f"]}},
                           "required": ["city", "unit"]}}]
weather = [{"role": "user", "content": "What is the weather in Lyon, in celsius?"}]
m = client.messages.create(model="auto", max_tokens=64, messages=weather, tools=tools,
                           tool_choice={"type": "tool", "name": "get_weather"}, extra_body=greedy)
uses = [b for b in m.content if b.type == "tool_use"]
assert m.stop_reason == "tool_use" and len(uses) == 1, m
use = uses[0]
assert use.name == "get_weather" and isinstance(use.input["city"], str) and use.input["unit"] in ("c", "f"), use
print("tool use ok", use.input)

with client.messages.stream(model="auto", max_tokens=64, messages=weather, tools=tools,
                            tool_choice={"type": "tool", "name": "get_weather"}, extra_body=greedy) as stream:
    final = stream.get_final_message()
suses = [b for b in final.content if b.type == "tool_use"]
assert final.stop_reason == "tool_use" and suses and suses[0].input.get("unit") in ("c", "f"), final
print("streamed tool use ok")

followup = weather + [
    {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C, sunny"}]},
]
m = client.messages.create(model="auto", max_tokens=16, messages=followup, tools=tools)
assert m.content, m
print("tool result conversation ok")

try:
    anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0).messages.create(
        model="auto", max_tokens=4, messages=ask)
    raise SystemExit("a wrong key was accepted")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
print("auth error ok")

try:
    client.messages.create(model="no-such-model", max_tokens=4, messages=ask)
    raise SystemExit("an unknown model was accepted")
except anthropic.NotFoundError as e:
    assert e.body["type"] == "error" and e.body["error"]["type"] == "not_found_error", e.body
print("unknown model ok")

try:
    client.messages.create(model="auto", max_tokens=4, messages=ask, extra_body={"top_k": 5})
    raise SystemExit("top_k was accepted")
except anthropic.BadRequestError as e:
    assert "top_k" in e.body["error"]["message"], e.body
print("unsupported parameter ok")
