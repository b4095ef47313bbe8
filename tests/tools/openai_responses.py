"""The official `openai` client's Responses API against `ggrun serve`'s /v1/responses. Prints
one JSON line: a greedy answer whole and streamed (text, status, the stream's event types), and
the input tokens the server counted for a tool conversation as Responses items (reasoning,
function_call, function_call_output).
Usage: openai_responses.py BASE_URL PROMPT CONVERSATION.json"""
import json
import sys

from openai import OpenAI

base, prompt, conv = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key="none")
whole = client.responses.create(model="any", input=prompt, max_output_tokens=12, temperature=0)
deltas, kinds, final = [], [], None
for ev in client.responses.create(model="any", input=prompt, max_output_tokens=12,
                                  temperature=0, stream=True):
    kinds.append(ev.type)
    if ev.type == "response.output_text.delta":
        deltas.append(ev.delta)
    if ev.type == "response.completed":
        final = ev.response
c = json.load(open(conv))
tools = client.responses.create(model="any", instructions=c["instructions"], input=c["input"],
                                tools=c["tools"], max_output_tokens=2, temperature=0)
print(json.dumps({
    "text": whole.output_text, "status": whole.status, "streamed": "".join(deltas),
    "final_text": final.output_text if final else None, "kinds": kinds,
    "tool_input_tokens": tools.usage.input_tokens,
}))
