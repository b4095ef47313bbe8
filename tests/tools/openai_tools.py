"""A two-turn tool conversation sent through the official OpenAI Python client to
`ggrun serve` (the history as an agent keeps it: assistant tool calls with null content and
JSON-string arguments, tool results with their call ids). Prints one JSON line: the prompt
tokens the server counted, and the finish reason.
Usage: openai_tools.py BASE_URL CONVERSATION.json TOOLS.json"""
import json
import sys

from openai import OpenAI

base, conv, tools = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key="none")
r = client.chat.completions.create(
    model="any",
    messages=json.load(open(conv)),
    tools=json.load(open(tools)),
    max_tokens=2,
    temperature=0,
)
print(json.dumps({"prompt_tokens": r.usage.prompt_tokens, "finish": r.choices[0].finish_reason}))
