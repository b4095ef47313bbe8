"""The official `anthropic` Python client against `ggrun serve`'s /v1/messages. Prints one JSON
line: a greedy answer whole and streamed (text, stop reason, usage), and the input tokens the
server counted for a tool conversation in Anthropic's shape (system, thinking and tool_use
blocks, tool_result blocks).
Usage: anthropic_client.py BASE_URL PROMPT CONVERSATION.json"""
import json
import sys

import anthropic

base, prompt, conv = sys.argv[1], sys.argv[2], sys.argv[3]
client = anthropic.Anthropic(base_url=base, api_key="none")
msg = [{"role": "user", "content": prompt}]
# Sampling fields are not parameters of this SDK's create(): they go in the body.
greedy = {"temperature": 0}
whole = client.messages.create(model="any", max_tokens=12, messages=msg, extra_body=greedy)
with client.messages.stream(model="any", max_tokens=12, messages=msg, extra_body=greedy) as s:
    streamed = "".join(s.text_stream)
    final = s.get_final_message()
c = json.load(open(conv))
tools = client.messages.create(model="any", max_tokens=2, system=c["system"],
                               messages=c["messages"], tools=c["tools"], extra_body=greedy)
print(json.dumps({
    "text": whole.content[0].text, "stop_reason": whole.stop_reason,
    "output_tokens": whole.usage.output_tokens, "streamed": streamed,
    "streamed_stop_reason": final.stop_reason, "tool_input_tokens": tools.usage.input_tokens,
}))
