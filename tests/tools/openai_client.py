"""The official OpenAI Python client against `ggrun serve`: prints one JSON line with what a
non-streaming and a streaming chat completion, a completion and the model list returned.
Usage: openai_client.py BASE_URL API_KEY PROMPT MAX_TOKENS"""
import json
import sys

from openai import OpenAI

base, key, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = OpenAI(base_url=base, api_key=key)
msgs = [{"role": "user", "content": prompt}]
whole = client.chat.completions.create(model="any", messages=msgs, max_tokens=n, temperature=0)
parts = []
for chunk in client.chat.completions.create(
    model="any", messages=msgs, max_tokens=n, temperature=0, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
print(
    json.dumps(
        {
            "text": whole.choices[0].message.content,
            "finish": whole.choices[0].finish_reason,
            "completion_tokens": whole.usage.completion_tokens,
            "streamed": "".join(parts),
            "models": [m.id for m in client.models.list().data],
        }
    )
)
