#!/usr/bin/env python3
"""Golden renders of real chat templates, for runner/src/template.rs's test: each template in
tests/fixtures/templates (the `chat_template` of the model's Hugging Face tokenizer_config.json)
rendered by Jinja2 the way transformers' `apply_chat_template` renders it (a sandboxed
environment with trim_blocks and lstrip_blocks, the loop-controls extension, Python's json.dumps
as `tojson`, `raise_exception`, `strftime_now`), for a set of conversations in corral's message
shape, converted as corral converts them (runner/src/tools.rs: `template_message`,
`openai_tools`). Writes tests/fixtures/template-goldens.json (committed; needs only jinja2).

    python3 scripts/make-template-goldens.py
"""
import datetime, json, os

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIXTURES = os.path.join(ROOT, "tests/fixtures")
# strftime_now's clock in the goldens (the test pins corral's to the same instant).
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)

TEMPLATES = {
    # file: (bos, eos, renders tools)
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("", "<|im_end|>", True),
    "Qwen-Qwen3-0.6B.jinja": ("", "<|im_end|>", True),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>", True),
    # Renders tools in Mistral's [TOOL_CALLS] syntax, which corral does not read yet: corral
    # gives it its own tool prompt instead, so only its chats are compared.
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", "</s>", False),
    # Renders differently without trim_blocks/lstrip_blocks; this copy renders no tools.
    "HuggingFaceTB-SmolLM3-3B.jinja": ("", "<|im_end|>", False),
    "google-gemma-2-2b-it.jinja": ("<bos>", "<eos>", False),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>", False),
}

WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


CONVERSATIONS = {
    "user": ([msg("user", "What is the capital of France?")], None),
    "system_user": ([msg("system", "You are terse."), msg("user", "Name a prime number.")], None),
    "multi_turn": ([msg("user", "Hi!"), msg("assistant", "Hello! How can I help?"),
                    msg("user", "  Tell me a joke.  ")], None),
    "unicode": ([msg("user", "Écris « bonjour » en 日本語 🙂")], None),
    "tools_offered": ([msg("user", "What's the weather in Zürich?")], [WEATHER, TIME]),
    "tool_round_trip": ([
        msg("system", "Use tools when they help."),
        msg("user", "Weather in Paris, in celsius?"),
        msg("assistant", "", tool_calls=[{"id": "abc123def", "name": "get_weather",
                                          "arguments": {"city": "Paris", "unit": "celsius"}}]),
        msg("tool", "{\"temperature\": 21, \"sky\": \"clear\"}", tool_call_id="abc123def", name="get_weather"),
    ], [WEATHER]),
}


def template_message(m):
    """corral's message as a template sees it (runner/src/tools.rs `template_message`)."""
    v = {"role": m["role"], "content": m["content"]}
    if m.get("tool_calls"):
        v["tool_calls"] = [{"id": c["id"], "type": "function",
                            "function": {"name": c["name"], "arguments": c["arguments"]}}
                           for c in m["tool_calls"]]
    if "tool_call_id" in m:
        v["tool_call_id"] = m["tool_call_id"]
    if "name" in m:
        v["name"] = m["name"]
    return v


def openai_tools(fs):
    return [{"type": "function", "function": f} for f in fs]


def environment():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: NOW.strftime(fmt)
    return env


def main():
    env = environment()
    out = {"now_unix": int(NOW.timestamp()), "templates": []}
    for name, (bos, eos, native_tools) in TEMPLATES.items():
        with open(os.path.join(FIXTURES, "templates", name)) as f:
            source = f.read()
        tmpl = env.from_string(source)
        cases = []
        for cname, (messages, tools) in CONVERSATIONS.items():
            uses_tools = tools is not None
            if uses_tools and not native_tools:
                continue  # corral writes its own tool prompt for these (tests/runner.rs)
            ctx = {"messages": [template_message(m) if uses_tools else {"role": m["role"], "content": m["content"]}
                                for m in messages],
                   "tools": openai_tools(tools) if tools else None,
                   "add_generation_prompt": True, "bos_token": bos, "eos_token": eos}
            if tools:
                ctx["enable_thinking"] = False  # what corral passes when tools are offered
            try:
                cases.append({"name": cname, "messages": messages, "tools": tools,
                              "rendered": tmpl.render(**ctx)})
            except jinja2.exceptions.TemplateError as e:
                cases.append({"name": cname, "messages": messages, "tools": tools, "error": str(e)})
        out["templates"].append({"file": name, "bos": bos, "eos": eos, "cases": cases})
    path = os.path.join(FIXTURES, "template-goldens.json")
    with open(path, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(path)


if __name__ == "__main__":
    main()
