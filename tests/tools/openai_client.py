"""The official OpenAI Python client against `ggrun serve`: prints one JSON line with what a
non-streaming and a streaming chat completion, the model list, structured output (a JSON schema
over 20 seeds, through `response_format` and the client's `.parse()` with a pydantic model),
logprobs (whole and streamed) and n=2 returned.
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

from pydantic import BaseModel, Field


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
          "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
ask = [{"role": "user", "content": "Describe a person as JSON."}]
people = []
for seed in range(20):
    r = client.chat.completions.create(
        model="any", messages=ask, max_tokens=100, temperature=1.0, seed=seed,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}})
    people.append(Person.model_validate_json(r.choices[0].message.content).model_dump())
parsed = client.chat.completions.parse(model="any", messages=ask, max_tokens=100,
                                       temperature=1.0, seed=99, response_format=Person)
lp = client.chat.completions.create(model="any", messages=msgs, max_tokens=n, temperature=0,
                                    logprobs=True, top_logprobs=2)
streamed_lp = []
for chunk in client.chat.completions.create(model="any", messages=msgs, max_tokens=n,
                                            temperature=0, logprobs=True, stream=True):
    if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
        streamed_lp.extend(e.token for e in chunk.choices[0].logprobs.content)
two = client.chat.completions.create(model="any", messages=msgs, max_tokens=4, temperature=1.0,
                                     seed=1, n=2)
print(
    json.dumps(
        {
            "text": whole.choices[0].message.content,
            "finish": whole.choices[0].finish_reason,
            "completion_tokens": whole.usage.completion_tokens,
            "streamed": "".join(parts),
            "models": [m.id for m in client.models.list().data],
            "people": people,
            "parsed": parsed.choices[0].message.parsed.model_dump(),
            "logprob_tokens": [e.token for e in lp.choices[0].logprobs.content],
            "top_logprobs": [len(e.top_logprobs) for e in lp.choices[0].logprobs.content],
            "streamed_logprob_tokens": streamed_lp,
            "n2": [c.index for c in two.choices],
        }
    )
)
