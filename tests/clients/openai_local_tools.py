"""The official `openai` Python client calling tools on `corral serve`'s own local model (argv:
base URL, key). No remote provider is configured, so every answer is the SLM's.

Checks that a forced call (`required`, and a named function) comes back as `tool_calls` whose
arguments validate against the function's schema (the `jsonschema` package), that parallel calls
are each complete, valid and distinct, that `auto` answers either text or valid calls, that streamed
deltas reassemble to the same call as the non-streamed answer, that a conversation with a tool's
result is answered, and that parameters outside corral's schema subset are a 400 naming the
keyword. Prints one line per check; exits non-zero on failure.
"""
import json
import sys

import jsonschema
import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
forecast = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "details": {"type": "object", "properties": {
            "wind": {"type": "boolean"}, "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3}},
            "required": ["wind"], "additionalProperties": False},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
clock = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}}, "required": ["timezone"]}
tools = [
    {"type": "function", "function": {"name": "get_forecast", "description": "The weather forecast for a city", "parameters": forecast}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone", "parameters": clock}},
]
schemas = {"get_forecast": forecast, "get_time": clock}
msgs = [{"role": "user", "content": "What will the weather be in Lisbon over the next three days?"}]


def check_calls(message):
    assert message.tool_calls, message
    for c in message.tool_calls:
        assert c.type == "function" and c.id.startswith("call_"), c
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    return message.tool_calls


# One call per answer: it ends when the call does.
for seed in (None, 1):
    kw = {"temperature": 0} if seed is None else {"temperature": 1, "seed": seed}
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=msgs, tools=tools, tool_choice="required", parallel_tool_calls=False,
        max_tokens=150, **kw)
    r = raw.parse()
    assert raw.headers["x-corral-route"] == "slm", dict(raw.headers)
    assert r.choices[0].finish_reason == "tool_calls", r
    assert not r.choices[0].message.content, r
    assert len(check_calls(r.choices[0].message)) == 1, r
print("required ok", r.choices[0].message.tool_calls[0].function.arguments)

# Parallel calls (the default): a small model may go on calling until max_tokens; every call
# that came back is complete and valid, and `length` says the answer was cut.
for seed in (3,):
    r = client.chat.completions.create(model="auto", messages=msgs, tools=tools, tool_choice="required",
                                       max_tokens=100, temperature=1, seed=seed)
    assert r.choices[0].finish_reason in ("tool_calls", "length"), r
    calls = check_calls(r.choices[0].message)
    assert len({(c.function.name, c.function.arguments) for c in calls}) == len(calls), calls
print("parallel ok", len(calls))

r = client.chat.completions.create(
    model="auto", messages=msgs, tools=tools, max_tokens=150, temperature=0,
    tool_choice={"type": "function", "function": {"name": "get_time"}})
calls = check_calls(r.choices[0].message)
assert [c.function.name for c in calls] == ["get_time"], calls
print("named function ok", calls[0].function.arguments)


for seed in (3, 4):
    r = client.chat.completions.create(model="auto", messages=msgs, tools=tools, max_tokens=30,
                                       temperature=1, seed=seed)
    m = r.choices[0].message
    if m.tool_calls:
        check_calls(m)
        assert r.choices[0].finish_reason == "tool_calls", r
    else:
        assert m.content is not None and r.choices[0].finish_reason in ("stop", "length"), r
print("auto ok")

whole = client.chat.completions.create(model="auto", messages=msgs, tools=tools, tool_choice="required",
                                       max_tokens=150, temperature=0, parallel_tool_calls=False)
streamed, finish = {}, None
for chunk in client.chat.completions.create(model="auto", messages=msgs, tools=tools, tool_choice="required",
                                            max_tokens=150, temperature=0, parallel_tool_calls=False, stream=True):
    if not chunk.choices:
        continue
    finish = chunk.choices[0].finish_reason or finish
    for d in chunk.choices[0].delta.tool_calls or []:
        c = streamed.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
        c["id"] = d.id or c["id"]
        if d.function and d.function.name:
            c["name"] += d.function.name
        if d.function and d.function.arguments:
            c["arguments"] += d.function.arguments
want = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
got = [(streamed[i]["name"], streamed[i]["arguments"]) for i in sorted(streamed)]
assert got == want and finish == "tool_calls", (got, want, finish)
assert all(streamed[i]["id"].startswith("call_") for i in streamed), streamed
print("streamed tool call ok")

call = whole.choices[0].message.tool_calls[0]
followup = msgs + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": ["sun", "sun", "rain"]})},
]
raw = client.chat.completions.with_raw_response.create(model="auto", messages=followup, tools=tools,
                                                       max_tokens=40, temperature=0)
r = raw.parse()
assert r.choices[0].message.content or r.choices[0].message.tool_calls, r
assert r.usage.prompt_tokens > 150, r.usage  # the tools, the call and its result were in the prompt
print("tool result conversation ok")

try:
    client.chat.completions.create(model="auto", messages=msgs, max_tokens=20, tool_choice="required", tools=[
        {"type": "function", "function": {"name": "tag", "parameters": {
            "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}}])
    raise SystemExit("an unsupported keyword was accepted")
except openai.BadRequestError as e:
    assert "uniqueItems" in e.body["message"] and "tag" in e.body["message"], e.body
print("unsupported keyword ok")
