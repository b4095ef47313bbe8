#!/usr/bin/env python3
"""Renders a chat template the way Hugging Face transformers does (jinja2 sandbox with
trim_blocks, lstrip_blocks, loop controls and the {% generation %} tag; json.dumps-style tojson;
raise_exception; strftime_now in local time), to check `ggrun template` against. The template is the file's if given, else
the model's; bos_token and eos_token come from the model.

    python3 render_template_py.py [--gguf MODEL] [--template FILE] --messages FILE
        [--tools FILE] [--think on|off] [--no-generation-prompt]
"""
import argparse
import json
import sys
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class GenerationTag(Extension):
    """transformers' {% generation %} ... {% endgeneration %}: the body, unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf")
    ap.add_argument("--template")
    ap.add_argument("--messages", required=True)
    ap.add_argument("--tools")
    ap.add_argument("--think", choices=["on", "off"])
    ap.add_argument("--no-generation-prompt", action="store_true")
    a = ap.parse_args()
    bos = eos = ""
    source = open(a.template).read() if a.template else None
    if a.gguf:
        from gguf import GGUFReader

        r = GGUFReader(a.gguf)
        if source is None:
            source = r.fields["tokenizer.chat_template"].contents()
        tokens = r.fields["tokenizer.ggml.tokens"].contents()
        for key in ("bos", "eos"):
            f = r.fields.get(f"tokenizer.ggml.{key}_token_id")
            if f is not None:
                value = tokens[f.contents()]
                bos, eos = (value, eos) if key == "bos" else (bos, value)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    ctx = {
        "messages": json.load(open(a.messages)),
        "add_generation_prompt": not a.no_generation_prompt,
        "bos_token": bos,
        "eos_token": eos,
        "date_string": datetime.utcnow().strftime("%d %b %Y"),
    }
    if a.think:
        ctx["enable_thinking"] = a.think == "on"
    if a.tools:
        ctx["tools"] = json.load(open(a.tools))
    sys.stdout.write(env.from_string(source).render(**ctx))


if __name__ == "__main__":
    main()
