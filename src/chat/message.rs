//! Conversation messages, and how the API shapes map onto what chat templates read. A request's
//! messages lose nothing on the way: OpenAI's (content as a string or text parts, `tool_calls`
//! with JSON-string arguments, tool results with `tool_call_id` and `name`, `reasoning_content`
//! or `reasoning`) and Ollama's (`thinking`, `tool_calls` with object arguments, `tool_name`)
//! become the dictionaries Hugging Face templates are written for: tool-call arguments as
//! objects, reasoning as `reasoning_content` (and `thinking`, which gpt-oss's template reads),
//! null content as an empty string (templates concatenate it), and every other field passed
//! through as sent.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    /// The text (empty where a request had null, no content, or a message of tool calls only).
    #[serde(default)]
    pub content: String,
    /// An assistant turn's reasoning, kept apart from its answer.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reasoning_content: Option<String>,
    /// The calls an assistant turn made.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// A tool result: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tool_call_id: Option<String>,
    /// A tool result: the function's name (or a participant's name).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    /// Fields we do not interpret, passed to the template as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One tool call of an assistant message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<String>,
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function a call names and its arguments (an object where the request's arguments were
/// a JSON object written as a string, as OpenAI sends them; otherwise as sent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default = "empty_object")]
    pub arguments: Value,
}

fn function_type() -> String {
    "function".into()
}

fn empty_object() -> Value {
    json!({})
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            reasoning_content: None,
            tool_calls: None,
            tool_call_id: None,
            name: None,
            extra: Map::new(),
        }
    }

    /// A message of an API request (OpenAI or Ollama shape); errors name the field, with
    /// `at` (e.g. `messages[2]`) before it.
    pub fn from_api(v: &Value, at: &str) -> Result<Message, String> {
        let Value::Object(obj) = v else {
            return Err(format!("{at}: expected an object"));
        };
        let string = |key: &str| -> Result<Option<String>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{at}.{key}: expected a string")),
            }
        };
        let role = string("role")?.ok_or_else(|| format!("{at}.role: missing"))?;
        let content = match obj.get("content") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => text_parts(parts, &format!("{at}.content"))?,
            Some(_) => {
                return Err(format!(
                    "{at}.content: expected a string or a list of parts"
                ))
            }
        };
        let reasoning = match string("reasoning_content")? {
            Some(r) => Some(r),
            None => match string("reasoning")? {
                Some(r) => Some(r),
                None => string("thinking")?,
            },
        };
        let tool_calls = match obj.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Array(calls)) => Some(
                calls
                    .iter()
                    .enumerate()
                    .map(|(i, c)| ToolCall::from_api(c, &format!("{at}.tool_calls[{i}]")))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(_) => return Err(format!("{at}.tool_calls: expected a list")),
        };
        let name = match string("name")? {
            Some(n) => Some(n),
            None => string("tool_name")?,
        };
        const KNOWN: &[&str] = &[
            "role",
            "content",
            "reasoning_content",
            "reasoning",
            "thinking",
            "tool_calls",
            "tool_call_id",
            "name",
            "tool_name",
        ];
        let extra = obj
            .iter()
            .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Message {
            role,
            content,
            reasoning_content: reasoning,
            tool_calls,
            tool_call_id: string("tool_call_id")?,
            name,
            extra,
        })
    }

    /// Every message of a request's `messages` list.
    pub fn list_from_api(v: &Value, at: &str) -> Result<Vec<Message>, String> {
        let Value::Array(items) = v else {
            return Err(format!("{at}: expected a list of messages"));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, m)| Message::from_api(m, &format!("{at}[{i}]")))
            .collect()
    }

    /// The dictionary a chat template sees: the fields above, and the reasoning as `thinking`
    /// too (gpt-oss's template reads it there) unless the message set that field itself.
    pub fn template_view(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let (Some(r), Value::Object(o)) = (&self.reasoning_content, &mut v) {
            o.entry("thinking").or_insert_with(|| r.clone().into());
        }
        v
    }
}

impl ToolCall {
    fn from_api(v: &Value, at: &str) -> Result<ToolCall, String> {
        let Value::Object(obj) = v else {
            return Err(format!("{at}: expected an object"));
        };
        let Some(Value::Object(f)) = obj.get("function") else {
            return Err(format!("{at}.function: missing"));
        };
        let name = match f.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => return Err(format!("{at}.function.name: expected a string")),
        };
        let arguments = match f.get("arguments") {
            None | Some(Value::Null) => empty_object(),
            Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
                Ok(parsed @ Value::Object(_)) => parsed,
                _ => Value::String(s.clone()),
            },
            Some(other) => other.clone(),
        };
        let id = match obj.get("id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(format!("{at}.id: expected a string")),
        };
        Ok(ToolCall {
            id,
            kind: function_type(),
            function: FunctionCall { name, arguments },
        })
    }
}

/// The text of OpenAI content parts, joined. Parts that are not text (images, audio) are an
/// error: the models served here read text only, and dropping them would answer another
/// question than the one asked.
fn text_parts(parts: &[Value], at: &str) -> Result<String, String> {
    let mut text = String::new();
    for (i, p) in parts.iter().enumerate() {
        match (p.get("type").and_then(Value::as_str), p.get("text")) {
            (Some("text") | None, Some(Value::String(t))) => text.push_str(t),
            (Some(kind), _) if kind != "text" => {
                return Err(format!(
                    "{at}[{i}]: {kind} parts are not supported (text only)"
                ))
            }
            _ => return Err(format!("{at}[{i}].text: expected a string")),
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_tool_turns_keep_their_calls_ids_and_names() {
        let v = json!([
            {"role": "user", "content": [{"type": "text", "text": "Weather in "},
                                          {"type": "text", "text": "Paris?"}]},
            {"role": "assistant", "content": null, "reasoning_content": "look it up",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "get_weather",
                                          "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
             "content": "18 C"},
        ]);
        let m = Message::list_from_api(&v, "messages").unwrap();
        assert_eq!(m[0].content, "Weather in Paris?");
        assert_eq!(m[1].content, "");
        let view = m[1].template_view();
        assert_eq!(
            view["tool_calls"],
            json!([{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
        );
        assert_eq!(view["reasoning_content"], "look it up");
        assert_eq!(view["thinking"], "look it up");
        let tool = m[2].template_view();
        assert_eq!(tool["tool_call_id"], "call_1");
        assert_eq!(tool["name"], "get_weather");
        assert!(tool.get("tool_calls").is_none() && tool.get("thinking").is_none());
    }

    #[test]
    fn ollama_fields_map_and_unknown_fields_pass_through() {
        let v = json!([
            {"role": "assistant", "content": "", "thinking": "hmm",
             "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
            {"role": "tool", "tool_name": "f", "content": "2", "custom": [1, 2]},
        ]);
        let m = Message::list_from_api(&v, "messages").unwrap();
        assert_eq!(m[0].reasoning_content.as_deref(), Some("hmm"));
        let call = &m[0].tool_calls.as_ref().unwrap()[0];
        assert_eq!(call.function.arguments, json!({"x": 1}));
        assert_eq!(call.kind, "function");
        assert_eq!(m[1].name.as_deref(), Some("f"));
        assert_eq!(m[1].template_view()["custom"], json!([1, 2]));
        // Arguments that are not a JSON object stay the string they were.
        let v = json!({"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "not json"}}]});
        let m = Message::from_api(&v, "m").unwrap();
        assert_eq!(m.tool_calls.unwrap()[0].function.arguments, "not json");
    }

    #[test]
    fn malformed_messages_name_the_field() {
        let cases = [
            (json!([{"content": "x"}]), "messages[0].role: missing"),
            (json!([{"role": 3}]), "messages[0].role: expected a string"),
            (
                json!([{"role": "user", "content": 5}]),
                "messages[0].content: expected a string or a list of parts",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                "messages[0].content[0]: image_url parts are not supported (text only)",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"id": "a"}]}]),
                "messages[0].tool_calls[0].function: missing",
            ),
            (
                json!({"role": "user"}),
                "messages: expected a list of messages",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(Message::list_from_api(&v, "messages").unwrap_err(), want);
        }
    }

    #[test]
    fn saved_conversations_of_the_old_shape_still_load() {
        let m: Message = serde_json::from_value(
            json!({"role": "assistant", "content": "hi", "reasoning_content": "r"}),
        )
        .unwrap();
        assert_eq!(m.content, "hi");
        assert_eq!(m.reasoning_content.as_deref(), Some("r"));
        assert!(m.extra.is_empty());
    }
}
