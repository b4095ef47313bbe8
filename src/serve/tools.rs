//! Tool calls in generated text, as the chat models write them, turned into OpenAI
//! `tool_calls`: the Qwen3-Coder XML style that Nemotron 3 Nano uses
//! (`<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`), Qwen 3's
//! and Hermes' JSON in the same tags (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`),
//! and Llama 3's JSON (`<|python_tag|>{...}` or a reply that is one `{"name": ..., "parameters":
//! ...}` object). Streaming holds text back from the point where a call may begin.

use serde_json::{json, Map, Value};

/// One parsed call: the function name and its arguments as a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

impl ToolCall {
    /// The OpenAI form, numbered `index` (arguments as a JSON string, as the API has them).
    pub fn to_openai(&self, index: usize, id: &str) -> Value {
        json!({
            "index": index,
            "id": format!("{id}-{index}"),
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments.to_string()},
        })
    }
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

/// Splits a reply into its text and the tool calls in it. Text that only looks like a call
/// (no parseable name) stays text.
pub fn parse(text: &str) -> (String, Vec<ToolCall>) {
    let mut calls = Vec::new();
    let mut rest = String::new();
    let mut s = text;
    while let Some(i) = s.find(OPEN) {
        let body_start = i + OPEN.len();
        let (body, after) = match s[body_start..].find(CLOSE) {
            Some(j) => (
                &s[body_start..body_start + j],
                &s[body_start + j + CLOSE.len()..],
            ),
            None => (&s[body_start..], ""),
        };
        match parse_body(body) {
            Some(c) => {
                rest.push_str(&s[..i]);
                calls.push(c);
            }
            None => rest.push_str(&s[..body_start + body.len()]),
        }
        s = after;
    }
    rest.push_str(s);
    if calls.is_empty() {
        // Llama 3: after <|python_tag|>, or a reply that is one JSON call.
        let (before, json_text) = match rest.find(PYTHON_TAG) {
            Some(i) => (
                rest[..i].to_string(),
                rest[i + PYTHON_TAG.len()..].to_string(),
            ),
            None => (String::new(), rest.clone()),
        };
        let candidates: Vec<&str> = json_text.split(';').map(str::trim).collect();
        let parsed: Option<Vec<ToolCall>> = candidates.iter().map(|c| json_call(c)).collect();
        if let Some(p) = parsed.filter(|p| !p.is_empty()) {
            return (before.trim_end().to_string(), p);
        }
    }
    (rest.trim().to_string(), calls)
}

/// The inside of one `<tool_call>` block: XML style or JSON.
fn parse_body(body: &str) -> Option<ToolCall> {
    let b = body.trim();
    if b.starts_with('{') {
        return json_call(b);
    }
    let f = b.find("<function=")?;
    let after = &b[f + "<function=".len()..];
    let name_end = after.find('>')?;
    let name = after[..name_end].trim().to_string();
    if name.is_empty() {
        return None;
    }
    let mut args = Map::new();
    let mut p = &after[name_end + 1..];
    while let Some(i) = p.find("<parameter=") {
        let q = &p[i + "<parameter=".len()..];
        let key_end = q.find('>')?;
        let key = q[..key_end].trim().to_string();
        let v = &q[key_end + 1..];
        let v_end = v.find("</parameter>").unwrap_or(v.len());
        let raw = v[..v_end].trim_matches('\n');
        // Values are text; JSON values (numbers, objects, true) keep their type.
        let value =
            serde_json::from_str(raw.trim()).unwrap_or_else(|_| Value::String(raw.to_string()));
        args.insert(key, value);
        p = &v[(v_end + "</parameter>".len()).min(v.len())..];
    }
    Some(ToolCall {
        name,
        arguments: Value::Object(args),
    })
}

/// `{"name": ..., "arguments" | "parameters": {...}}`.
fn json_call(s: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(s).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or_else(|| json!({}));
    // Some models write the arguments as a JSON string.
    let arguments = match args {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        a => a,
    };
    Some(ToolCall { name, arguments })
}

/// Streaming: passes answer text through until a tool call may begin, then holds the rest for
/// [`Holdback::finish`].
#[derive(Default)]
pub struct Holdback {
    held: String,
    holding: bool,
    sent_any: bool,
}

impl Holdback {
    /// The part of `piece` that can be sent now.
    pub fn push(&mut self, piece: &str) -> String {
        self.held.push_str(piece);
        if self.holding {
            return String::new();
        }
        // A reply that opens with JSON may be a Llama 3 call.
        if !self.sent_any && self.held.trim_start().starts_with('{') {
            self.holding = true;
            return String::new();
        }
        let starts = [OPEN, PYTHON_TAG]
            .iter()
            .filter_map(|m| self.held.find(m))
            .min();
        if let Some(i) = starts {
            self.holding = true;
            let out: String = self.held.drain(..i).collect();
            self.sent_any |= !out.is_empty();
            return out;
        }
        // Keep a tail that could be the start of a marker.
        let keep = [OPEN, PYTHON_TAG]
            .iter()
            .map(|m| longest_prefix_suffix(&self.held, m))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out: String = self.held.drain(..cut).collect();
        self.sent_any |= !out.is_empty();
        out
    }

    /// At the end: the text still to send and the calls in what was held.
    pub fn finish(self) -> (String, Vec<ToolCall>) {
        if self.held.is_empty() {
            return (String::new(), Vec::new());
        }
        let (text, calls) = parse(&self.held);
        if calls.is_empty() {
            (self.held, calls)
        } else {
            (text, calls)
        }
    }
}

/// The length of the longest suffix of `s` that is a proper prefix of `marker`.
fn longest_prefix_suffix(s: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .find(|&n| {
            s.len() >= n && s.is_char_boundary(s.len() - n) && marker.starts_with(&s[s.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_formats_parse() {
        let xml = "Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>";
        let (text, calls) = parse(xml);
        assert_eq!(text, "Let me check.");
        assert_eq!(
            calls,
            vec![ToolCall {
                name: "get_weather".into(),
                arguments: json!({"city": "Paris", "days": 3})
            }]
        );
        let qwen = "<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}\n</tool_call>\n<tool_call>\n{\"name\": \"sub\", \"arguments\": \"{\\\"a\\\": 5}\"}\n</tool_call>";
        let (text, calls) = parse(qwen);
        assert_eq!(text, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[0],
            ToolCall {
                name: "add".into(),
                arguments: json!({"a": 1, "b": 2})
            }
        );
        assert_eq!(calls[1].arguments, json!({"a": 5}));
        let llama = "<|python_tag|>{\"name\": \"search\", \"parameters\": {\"q\": \"rust\"}}";
        assert_eq!(
            parse(llama).1,
            vec![ToolCall {
                name: "search".into(),
                arguments: json!({"q": "rust"})
            }]
        );
        let bare = "{\"name\": \"search\", \"parameters\": {\"q\": \"gguf\"}}";
        assert_eq!(parse(bare).1[0].arguments, json!({"q": "gguf"}));
    }

    #[test]
    fn text_that_only_looks_like_a_call_stays_text() {
        for s in [
            "Use <tool_call> tags like this.",
            "{\"answer\": 42}",
            "plain words",
        ] {
            let (text, calls) = parse(s);
            assert!(calls.is_empty(), "{s}");
            assert_eq!(text, s.trim());
        }
    }

    #[test]
    fn streaming_holds_back_from_a_possible_call_and_parses_it_at_the_end() {
        let pieces = [
            "Sure",
            ", checking",
            " <tool",
            "_call>\n<function=f>",
            "<parameter=x>\n1\n</parameter>",
            "</function>\n</tool_call>",
        ];
        let mut h = Holdback::default();
        let mut sent = String::new();
        for p in pieces {
            sent.push_str(&h.push(p));
        }
        assert_eq!(sent, "Sure, checking ");
        let (rest, calls) = h.finish();
        assert_eq!(rest, "");
        assert_eq!(
            calls,
            vec![ToolCall {
                name: "f".into(),
                arguments: json!({"x": 1})
            }]
        );
        // Held text that is no call comes out at the end, whole.
        let mut h = Holdback::default();
        let mut sent = h.push("a <tool");
        sent.push_str(&h.push("box> b"));
        assert_eq!(sent, "a <toolbox> b");
        assert_eq!(h.finish(), (String::new(), vec![]));
    }
}

/// How a model writes tool calls, as its chat template shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallSyntax {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen, Hermes).
    JsonTags,
    /// `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`
    /// (Qwen3-Coder, Nemotron 3 Nano).
    XmlTags,
    /// One `{"name": ..., "parameters": {...}}` object (Llama 3).
    LlamaJson,
}

impl CallSyntax {
    /// The syntax a chat template teaches (JSON in tags when it shows none).
    pub fn of_template(source: &str) -> CallSyntax {
        if source.contains("<function=") {
            CallSyntax::XmlTags
        } else if source.contains(OPEN) {
            CallSyntax::JsonTags
        } else if source.contains(PYTHON_TAG) || source.contains("\"parameters\"") {
            CallSyntax::LlamaJson
        } else {
            CallSyntax::JsonTags
        }
    }
}

/// A Lark grammar (llguidance) whose every sentence is one or more calls, in `syntax`, of the
/// request's `tools` (OpenAI's shape), or of the one named `only`: `tool_choice` "required" or
/// a named function, enforced token by token. Arguments follow each tool's parameter schema
/// (in the XML syntax: its parameter names, values as text).
pub fn call_grammar(
    syntax: CallSyntax,
    tools: &Value,
    only: Option<&str>,
) -> Result<String, String> {
    let list = tools.as_array().ok_or("tools: expected a list")?;
    let mut chosen: Vec<(&str, Value)> = Vec::new();
    for t in list {
        let f = &t["function"];
        let name = f["name"]
            .as_str()
            .ok_or("tools: a function without a name")?;
        if only.is_none_or(|o| o == name) {
            let params = f
                .get("parameters")
                .cloned()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({"type": "object"}));
            chosen.push((name, params));
        }
    }
    if chosen.is_empty() {
        return Err(match only {
            Some(o) => format!("tool_choice: no tool is named {o:?}"),
            None => "tool_choice: \"required\" needs tools".into(),
        });
    }
    let lit = |s: &str| Value::String(s.to_string()).to_string();
    let mut g = String::from("%llguidance {}\n");
    match syntax {
        CallSyntax::JsonTags | CallSyntax::LlamaJson => {
            let key = if syntax == CallSyntax::JsonTags {
                "arguments"
            } else {
                "parameters"
            };
            let alternatives: Vec<Value> = chosen
                .iter()
                .map(|(name, params)| {
                    json!({"type": "object", "properties": {"name": {"const": name}, key: params},
                           "required": ["name", key], "additionalProperties": false})
                })
                .collect();
            let schema = json!({ "anyOf": alternatives });
            if syntax == CallSyntax::JsonTags {
                g += &format!(
                    "start: call (\"\\n\" call)*\ncall: {} obj {}\nobj: %json {schema}\n",
                    lit("<tool_call>\n"),
                    lit("\n</tool_call>")
                );
            } else {
                g += &format!("start: %json {schema}\n");
            }
        }
        CallSyntax::XmlTags => {
            g += &format!(
                "start: call (\"\\n\" call)*\ncall: {} fn {}\n",
                lit("<tool_call>\n"),
                lit("</tool_call>")
            );
            let fns: Vec<String> = (0..chosen.len()).map(|i| format!("fn{i}")).collect();
            g += &format!("fn: {}\n", fns.join(" | "));
            for (i, (name, params)) in chosen.iter().enumerate() {
                let props: Vec<String> = params["properties"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                if props.is_empty() {
                    g += &format!(
                        "fn{i}: {} {}\n",
                        lit(&format!("<function={name}>\n")),
                        lit("</function>\n")
                    );
                    continue;
                }
                let names: Vec<String> = props.iter().map(|p| lit(p)).collect();
                g += &format!(
                    "fn{i}: {} param{i}* {}\nparam{i}: {} ({}) {} VALUE {}\n",
                    lit(&format!("<function={name}>\n")),
                    lit("</function>\n"),
                    lit("<parameter="),
                    names.join(" | "),
                    lit(">\n"),
                    lit("\n</parameter>\n"),
                );
            }
            // A value: text up to the next tag.
            g += "VALUE: /[^<]+/\n";
        }
    }
    Ok(g)
}

#[cfg(test)]
mod grammar_tests {
    use super::*;

    #[test]
    fn call_grammars_name_the_tools_and_follow_the_template_syntax() {
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}}]);
        assert_eq!(
            CallSyntax::of_template("{{ '<tool_call>' }}"),
            CallSyntax::JsonTags
        );
        assert_eq!(CallSyntax::of_template("<function=x>"), CallSyntax::XmlTags);
        assert_eq!(
            CallSyntax::of_template("<|python_tag|>"),
            CallSyntax::LlamaJson
        );
        let g = call_grammar(CallSyntax::JsonTags, &tools, None).unwrap();
        assert!(
            g.contains("\"const\":\"get_weather\"") && g.contains("\"const\":\"now\""),
            "{g}"
        );
        let g = call_grammar(CallSyntax::XmlTags, &tools, Some("get_weather")).unwrap();
        assert!(
            g.contains("<function=get_weather>") && !g.contains("now"),
            "{g}"
        );
        assert!(call_grammar(CallSyntax::JsonTags, &tools, Some("nope")).is_err());
        assert!(call_grammar(CallSyntax::JsonTags, &json!([]), None).is_err());
    }
}
