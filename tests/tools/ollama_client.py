"""The official `ollama` Python client against `ggrun serve`'s Ollama API. Prints one JSON line:
the model list, a greedy /api/generate answer whole and streamed, /api/show and /api/ps, a chat
with tools whole and streamed (text and calls), and a chat under a JSON schema.
A second HOST (a server with Llama 3.1's template, whose calls are a bare JSON object) gets a
chat with tools under a `format` schema of such a call: a streamed tool call.
Usage: ollama_client.py HOST PROMPT LLAMA3_HOST"""
import json
import sys

import ollama

host, prompt, llama3 = sys.argv[1], sys.argv[2], sys.argv[3]
c = ollama.Client(host=host)
name = c.list().models[0].model
greedy = {"temperature": 0, "num_predict": 8}
whole = c.generate(model=name, prompt=prompt, options=greedy)
streamed = "".join(p.response for p in c.generate(model=name, prompt=prompt, options=greedy,
                                                   stream=True))
show = c.show(name)
ps = c.ps()
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}}]
msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
opts = {"temperature": 0, "num_predict": 24}
chat = c.chat(model=name, messages=msgs, tools=tools, options=opts)
parts, calls = [], []
for p in c.chat(model=name, messages=msgs, tools=tools, options=opts, stream=True):
    parts.append(p.message.content or "")
    calls.extend(p.message.tool_calls or [])
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
          "required": ["city"], "additionalProperties": False}
formatted = c.chat(model=name, messages=[{"role": "user", "content": "Name a city as JSON."}],
                   format=schema, options={"temperature": 0, "num_predict": 60})
call_schema = {"type": "object", "properties": {
    "name": {"const": "get_weather"},
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}},
    "required": ["name", "parameters"], "additionalProperties": False}
c3 = ollama.Client(host=llama3)
streamed_calls = []
for p in c3.chat(model=c3.list().models[0].model, messages=msgs, tools=tools, format=call_schema,
                 options={"temperature": 0, "num_predict": 60}, stream=True):
    for call in p.message.tool_calls or []:
        streamed_calls.append({"name": call.function.name, "arguments": dict(call.function.arguments)})
print(json.dumps({
    "streamed_calls": streamed_calls,
    "model": name, "generate": whole.response, "generate_streamed": streamed,
    "eval_count": whole.eval_count, "template": show.template,
    "architecture": (show.modelinfo or {}).get("general.architecture"),
    "ps": [m.model for m in ps.models],
    "chat": chat.message.content, "chat_calls": len(chat.message.tool_calls or []),
    "chat_streamed": "".join(parts), "chat_streamed_calls": len(calls),
    "formatted": json.loads(formatted.message.content),
}))
