"""The official `openai` Python client calling tools through `corral serve` (argv: base URL,
key). The server's fallback chain is a loopback OpenAI-compatible provider that answers with a
`get_weather` call, and a policy sends every request with tools (capability ToolUse) remote.

Checks that the client's typed objects carry the call (non-streamed and reassembled from
streamed deltas), that a conversation with the tool's result is accepted, and that a malformed
tool is the typed 400 naming the field. Prints one line per check; exits non-zero on failure.
"""
import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
msgs = [{"role": "user", "content": "What is the weather in Lyon?"}]

raw = client.chat.completions.with_raw_response.create(model="auto", messages=msgs, tools=tools,
                                                       tool_choice="auto")
r = raw.parse()
assert raw.headers["x-corral-route"] == "llm", dict(raw.headers)
call = r.choices[0].message.tool_calls[0]
assert r.choices[0].finish_reason == "tool_calls", r
assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Lyon"}, call
print("tool call ok", call.id)

calls = {}
for chunk in client.chat.completions.create(model="auto", messages=msgs, tools=tools, stream=True):
    for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
        c["id"] = d.id or c["id"]
        if d.function and d.function.name:
            c["name"] += d.function.name
        if d.function and d.function.arguments:
            c["arguments"] += d.function.arguments
assert calls == {0: {"id": call.id, "name": "get_weather", "arguments": call.function.arguments}}, calls
print("streamed tool call ok")

followup = msgs + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})},
]
r = client.chat.completions.create(model="auto", messages=followup, tools=tools)
assert r.choices[0].message.tool_calls, r
print("tool result conversation ok")

try:
    client.chat.completions.create(model="auto", messages=msgs, tools=[{"type": "function", "function": {"name": "bad name!"}}])
    raise SystemExit("a malformed tool was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "tools[0].function.name", e.body
print("malformed tool ok")
