//! Sampling and limits as requests give them (OpenAI's top-level fields, Ollama's `options`),
//! checked before anything runs: a value out of its range is a 400 naming the field.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::grammar::GrammarSpec;
use crate::sample::Settings;

/// Top-level fields of OpenAI requests that change nothing in what is generated (bookkeeping,
/// caching hints, the model name: one model is served), accepted and ignored.
pub const OPENAI_IGNORED: [&str; 11] = [
    "model",
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "stream_options",
    "prompt_cache_key",
    "safety_identifier",
    "cache_prompt",
    "id_slot",
];

/// Ollama `options` that configure how a model is loaded (context, GPU layers, threads,
/// memory), which the server's flags decide here: accepted and ignored.
pub const OLLAMA_LOAD_OPTIONS: [&str; 11] = [
    "num_ctx",
    "num_gpu",
    "num_thread",
    "num_batch",
    "main_gpu",
    "low_vram",
    "use_mmap",
    "use_mlock",
    "numa",
    "vocab_only",
    "f16_kv",
];

/// Whether `value` asks for nothing beyond what is served anyway (null, false, 0, an empty
/// object, plain-text output, automatic tool choice).
fn is_default(key: &str, value: &Value) -> bool {
    match (key, value) {
        (_, Value::Null) => true,
        ("logprobs" | "echo", Value::Bool(false)) => true,
        ("top_logprobs" | "logprobs", Value::Number(n)) => n.as_f64() == Some(0.0),
        ("best_of", Value::Number(n)) => n.as_f64() == Some(1.0),
        ("suffix", Value::String(s)) => s.is_empty(),
        ("tool_choice", Value::String(s)) => s == "auto",
        _ => false,
    }
}

/// Rejects the fields of `rest` (what a request carried beyond the fields read) that would
/// change the output and are not implemented, naming them (`prefix`: where they are), so that
/// nothing a client asked for is silently ignored; `ignored` lists fields accepted as no-ops.
pub fn reject_unsupported(
    rest: &Map<String, Value>,
    ignored: &[&str],
    prefix: &str,
) -> Result<(), String> {
    let mut names: Vec<String> = rest
        .iter()
        .filter(|(k, v)| !ignored.contains(&k.as_str()) && !is_default(k, v))
        .map(|(k, _)| format!("{prefix}{k}"))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    Err(format!(
        "unsupported parameter{}: {} (not implemented by this server)",
        if names.len() > 1 { "s" } else { "" },
        names.join(", ")
    ))
}

/// Most stop strings a request may give, and their longest length (each is searched for in
/// the held-back answer text at every token).
const MAX_STOPS: usize = 16;
const MAX_STOP_LEN: usize = 1024;

/// A stop field: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn list(s: Option<Stop>) -> Vec<String> {
        match s {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

/// Sampling and limits shared by the OpenAI request kinds.
#[derive(Deserialize, Default)]
pub struct Sampling {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    /// Choices per request (read by [`Sampling::choices`]).
    pub n: Option<i64>,
    /// Token id (as a string) → bias added to its logit, −100 to 100; −100 bans it.
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// OpenAI's structured output: `{"type": "text" | "json_object" | "json_schema",
    /// "json_schema": {"schema": ...}}`.
    pub response_format: Option<Value>,
    /// llama-server's: a JSON schema the answer follows.
    pub json_schema: Option<Value>,
    /// llama-server's grammar field: GBNF, or a Lark grammar after `%llguidance`.
    pub grammar: Option<String>,
    /// Chat: true to report each token's log-probability; completions: the number of
    /// alternatives to report with it.
    pub logprobs: Option<Value>,
    /// Chat: alternatives per token (0 to 20), with `logprobs: true`.
    pub top_logprobs: Option<i64>,
}

/// The grammar of OpenAI's `response_format`, llama-server's `json_schema` and `grammar`, or
/// what is wrong with them.
fn grammar_of(
    response_format: Option<Value>,
    json_schema: Option<Value>,
    grammar: Option<String>,
) -> Result<Option<GrammarSpec>, String> {
    let mut specs = Vec::new();
    if let Some(rf) = response_format {
        let kind = rf.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "text" => {}
            "json_object" => specs.push(GrammarSpec::JsonSchema(json!({"type": "object"}))),
            "json_schema" => {
                let schema = rf
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .cloned()
                    .ok_or("response_format.json_schema.schema: missing")?;
                specs.push(GrammarSpec::JsonSchema(schema));
            }
            other => {
                return Err(format!(
                    "response_format.type: {other:?} (text, json_object or json_schema)"
                ))
            }
        }
    }
    if let Some(s) = json_schema {
        specs.push(GrammarSpec::JsonSchema(s));
    }
    if let Some(g) = grammar.filter(|g| !g.trim().is_empty()) {
        specs.push(GrammarSpec::from_grammar_text(&g).map_err(|e| format!("grammar: {e}"))?);
    }
    if specs.len() > 1 {
        return Err("give one of response_format, json_schema and grammar".into());
    }
    Ok(specs.pop())
}

/// Ollama's `format`: "json" (any JSON object), a JSON schema, or "" (none).
pub fn ollama_format(format: Option<Value>) -> Result<Option<GrammarSpec>, String> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => {
            Ok(Some(GrammarSpec::JsonSchema(json!({"type": "object"}))))
        }
        Some(Value::Object(o)) => Ok(Some(GrammarSpec::JsonSchema(Value::Object(o)))),
        Some(other) => Err(format!(
            "format: {other} (\"json\" or a JSON schema object)"
        )),
    }
}

/// Ollama's `options` (the ones that mean something here).
#[derive(Deserialize, Default)]
pub struct OllamaOptions {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub num_predict: Option<i64>,
    pub stop: Option<Vec<String>>,
    /// Everything else (checked by [`reject_unsupported`]).
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl OllamaOptions {
    /// The same settings under OpenAI's names (`num_predict` below 0: no limit, as in Ollama),
    /// or the options it does not implement, named.
    pub fn into_sampling(self) -> Result<Sampling, String> {
        reject_unsupported(&self.rest, &OLLAMA_LOAD_OPTIONS, "options.")?;
        Ok(Sampling {
            max_tokens: self.num_predict.filter(|n| *n >= 0),
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            stop: self.stop.map(Stop::Many),
            ..Default::default()
        })
    }
}

/// `v` must be finite and within `lo..=hi`.
fn range(field: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f32>, String> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x as f32)),
        Some(x) if x.abs() >= 1e16 => Err(format!("{field}: {x:e} is out of range ({lo} to {hi})")),
        Some(x) => Err(format!("{field}: {x} is out of range ({lo} to {hi})")),
    }
}

/// Most choices one request may ask for (each is a job of its own).
pub const MAX_CHOICES: i64 = 16;

impl Sampling {
    /// How many choices `n` asks for (1 to [`MAX_CHOICES`]).
    pub fn choices(&self) -> Result<usize, String> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n as usize),
            Some(n) => Err(format!("n: {n} is out of range (1 to {MAX_CHOICES})")),
        }
    }

    /// The token limit and sampler flags, or what is wrong with them. `prefix` names where the
    /// fields are (`options.` for Ollama).
    pub fn args(self, prefix: &str) -> Result<(Option<usize>, Settings), String> {
        let f = |name: &str| format!("{prefix}{name}");
        let (max_name, max) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => ("max_completion_tokens", Some(m)),
            (None, m) => ("max_tokens", m),
        };
        let max = match max {
            None => None,
            Some(m) if m >= 1 => Some(m as usize),
            Some(m) => return Err(format!("{}: {m} is not a positive number", f(max_name))),
        };
        let top_k = match self.top_k {
            None => None,
            Some(k) if (0..=i32::MAX as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(format!(
                    "{}: {k} is out of range (0 to {})",
                    f("top_k"),
                    i32::MAX
                ))
            }
        };
        let stop = Stop::list(self.stop);
        if stop.len() > MAX_STOPS {
            return Err(format!(
                "{}: {} strings (at most {MAX_STOPS})",
                f("stop"),
                stop.len()
            ));
        }
        if let Some(s) = stop.iter().find(|s| s.len() > MAX_STOP_LEN) {
            return Err(format!(
                "{}: a string of {} bytes (at most {MAX_STOP_LEN})",
                f("stop"),
                s.len()
            ));
        }
        let mut logit_bias = Vec::new();
        for (k, v) in self.logit_bias.unwrap_or_default() {
            let id: u32 = k
                .parse()
                .map_err(|_| format!("{}: {k:?} is not a token id", f("logit_bias")))?;
            let b = range(&f(&format!("logit_bias.{k}")), Some(v), -100.0, 100.0)?.unwrap_or(0.0);
            // −100 bans the token, as OpenAI describes it.
            logit_bias.push((id, if b <= -100.0 { f32::NEG_INFINITY } else { b }));
        }
        let grammar = grammar_of(self.response_format, self.json_schema, self.grammar)?;
        let top = match self.top_logprobs {
            None => None,
            Some(k) if (0..=20).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(format!(
                    "{}: {k} is out of range (0 to 20)",
                    f("top_logprobs")
                ))
            }
        };
        let logprobs = match self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) if top.is_some_and(|k| k > 0) => {
                return Err(format!("{}: needs logprobs: true", f("top_logprobs")))
            }
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(top.unwrap_or(0)),
            // The completions API's form: the number of alternatives.
            Some(Value::Number(n)) => match n.as_u64().filter(|&n| n <= 20) {
                Some(0) => None,
                Some(n) => Some(n as usize),
                None => return Err(format!("{}: {n} is out of range (0 to 20)", f("logprobs"))),
            },
            Some(other) => return Err(format!("{}: {other} (true or false)", f("logprobs"))),
        };
        let a = Settings {
            temp: range(&f("temperature"), self.temperature, 0.0, 100.0)?,
            top_k,
            top_p: range(&f("top_p"), self.top_p, 0.0, 1.0)?,
            min_p: range(&f("min_p"), self.min_p, 0.0, 1.0)?,
            repeat_penalty: range(&f("repeat_penalty"), self.repeat_penalty, 0.01, 100.0)?
                .unwrap_or(1.0),
            presence_penalty: range(&f("presence_penalty"), self.presence_penalty, -2.0, 2.0)?
                .unwrap_or(0.0),
            frequency_penalty: range(&f("frequency_penalty"), self.frequency_penalty, -2.0, 2.0)?
                .unwrap_or(0.0),
            repeat_last_n: 64,
            seed: self.seed,
            stop,
            logit_bias,
            grammar,
            logprobs,
        };
        Ok((max, a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<(Option<usize>, Settings), String> {
        serde_json::from_str::<Sampling>(json).unwrap().args("")
    }

    #[test]
    fn every_bad_value_is_named() {
        let cases = [
            (
                r#"{"temperature": -1}"#,
                "temperature: -1 is out of range (0 to 100)",
            ),
            (
                r#"{"temperature": 1e39}"#,
                "temperature: 1e39 is out of range (0 to 100)",
            ),
            (r#"{"top_p": 5}"#, "top_p: 5 is out of range (0 to 1)"),
            (r#"{"min_p": -5}"#, "min_p: -5 is out of range (0 to 1)"),
            (
                r#"{"top_k": 1000000000000000000}"#,
                "top_k: 1000000000000000000 is out of range (0 to 2147483647)",
            ),
            (
                r#"{"presence_penalty": 3}"#,
                "presence_penalty: 3 is out of range (-2 to 2)",
            ),
            (
                r#"{"frequency_penalty": -9}"#,
                "frequency_penalty: -9 is out of range (-2 to 2)",
            ),
            (
                r#"{"repeat_penalty": 0}"#,
                "repeat_penalty: 0 is out of range (0.01 to 100)",
            ),
            (
                r#"{"max_tokens": 0}"#,
                "max_tokens: 0 is not a positive number",
            ),
            (
                r#"{"max_completion_tokens": -3}"#,
                "max_completion_tokens: -3 is not a positive number",
            ),
            (
                r#"{"logit_bias": {"x": 1}}"#,
                "logit_bias: \"x\" is not a token id",
            ),
            (
                r#"{"logit_bias": {"5": 101}}"#,
                "logit_bias.5: 101 is out of range (-100 to 100)",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(check(json).err().as_deref(), Some(want), "{json}");
        }
        let many = format!(r#"{{"stop": {:?}}}"#, vec!["x"; 17]);
        assert_eq!(check(&many).unwrap_err(), "stop: 17 strings (at most 16)");
        let n = |json: &str| serde_json::from_str::<Sampling>(json).unwrap().choices();
        assert_eq!(n(r#"{"n": 3}"#), Ok(3));
        assert_eq!(
            n(r#"{"n": 0}"#).unwrap_err(),
            "n: 0 is out of range (1 to 16)"
        );
        let o: OllamaOptions = serde_json::from_str(r#"{"top_p": 2}"#).unwrap();
        assert_eq!(
            o.into_sampling().unwrap().args("options.").unwrap_err(),
            "options.top_p: 2 is out of range (0 to 1)"
        );
    }

    #[test]
    fn good_values_pass_through() {
        let (max, a) = check(
            r#"{"max_tokens": 9, "temperature": 0, "top_p": 1, "top_k": 0, "min_p": 0.1,
                "seed": 5, "stop": "x", "n": 1}"#,
        )
        .unwrap();
        assert_eq!(max, Some(9));
        assert_eq!(
            (a.temp, a.top_p, a.top_k, a.seed),
            (Some(0.0), Some(1.0), Some(0), Some(5))
        );
        assert_eq!(a.stop, ["x"]);
        let o: OllamaOptions = serde_json::from_str(r#"{"num_predict": -1}"#).unwrap();
        assert_eq!(o.into_sampling().unwrap().args("options.").unwrap().0, None);
    }

    #[test]
    fn unsupported_fields_are_named_and_harmless_ones_pass() {
        let rest = |json: &str| -> Map<String, Value> { serde_json::from_str(json).unwrap() };
        let ok = rest(
            r#"{"model": "x", "user": "u", "logprobs": false, "top_logprobs": 0,
                "tool_choice": "auto", "seed": null}"#,
        );
        assert_eq!(reject_unsupported(&ok, &OPENAI_IGNORED, ""), Ok(()));
        let bad = rest(r#"{"logprobs": true, "tool_choice": "required", "frobnicate": 1}"#);
        assert_eq!(
            reject_unsupported(&bad, &OPENAI_IGNORED, "").unwrap_err(),
            "unsupported parameters: frobnicate, logprobs, tool_choice (not implemented by this \
             server)"
        );
        let s: Sampling = serde_json::from_str(r#"{"logprobs": true, "top_logprobs": 3}"#).unwrap();
        assert_eq!(s.args("").unwrap().1.logprobs, Some(3));
        let s: Sampling = serde_json::from_str(r#"{"top_logprobs": 3}"#).unwrap();
        assert_eq!(
            s.args("").unwrap_err(),
            "top_logprobs: needs logprobs: true"
        );
        let s: Sampling = serde_json::from_str(r#"{"logprobs": 2}"#).unwrap();
        assert_eq!(s.args("").unwrap().1.logprobs, Some(2));
        let o: OllamaOptions =
            serde_json::from_str(r#"{"num_ctx": 8192, "mirostat": 2, "temperature": 0.5}"#)
                .unwrap();
        assert_eq!(
            o.into_sampling().err().as_deref(),
            Some("unsupported parameter: options.mirostat (not implemented by this server)")
        );
    }
}
