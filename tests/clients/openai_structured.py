"""The official `openai` Python client asking `corral serve`'s local model for JSON (argv: base
URL, key): a `json_schema` with nested objects, arrays and enums whose answers validate against
the schema (checked with the `jsonschema` package), `json_object`, and a schema keyword outside
corral's subset refused with a typed 400 naming it. Prints one line per check.
"""
import json
import sys

import jsonschema
import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population_millions": {"type": "number", "minimum": 0, "maximum": 50},
        "sights": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40},
                           "kind": {"enum": ["museum", "tower", "park", "church", "other"]}},
            "required": ["name", "kind"], "additionalProperties": False}},
    },
    "required": ["city", "country", "population_millions", "sights"],
    "additionalProperties": False,
}
msgs = [{"role": "user", "content": "Describe Paris as JSON: city, country, population and sights."}]
for seed in (None, 1, 2):
    kw = {"temperature": 0} if seed is None else {"temperature": 1, "seed": seed}
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=msgs, max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}, **kw)
    r = raw.parse()
    assert raw.headers["x-corral-route"] == "slm", dict(raw.headers)
    assert r.choices[0].finish_reason == "stop", r
    answer = json.loads(r.choices[0].message.content)
    jsonschema.validate(answer, schema)
    # corral's own field: each top-level field's confidence (None when the schema forced it all).
    fields = raw.http_response.json()["corral"]["field_confidence"]
    assert set(fields) == set(answer), (fields, answer)
    assert all(v is None or 0 <= v <= 1 for v in fields.values()), fields
print("json_schema ok", json.dumps(answer))

r = client.chat.completions.create(model="auto", messages=msgs, max_tokens=120, temperature=0,
                                   response_format={"type": "json_object"})
if r.choices[0].finish_reason == "stop":
    assert isinstance(json.loads(r.choices[0].message.content), dict), r
print("json_object ok")

try:
    client.chat.completions.create(
        model="auto", messages=msgs, max_tokens=20,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}})
    raise SystemExit("an unsupported keyword was accepted")
except openai.BadRequestError as e:
    assert "uniqueItems" in e.body["message"], e.body
print("unsupported keyword ok")
