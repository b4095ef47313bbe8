//! Chat templates: the model's `tokenizer.chat_template` (or a file given with
//! `--chat-template`, or ChatML when a model has none) rendered with minijinja set up the way
//! Hugging Face renders them: trim_blocks and lstrip_blocks, Python string and dict methods,
//! `raise_exception`, `strftime_now` (local time), the `{% generation %}` tag, printed lists and
//! dicts as Python's repr, and a `tojson` that writes what Python's `json.dumps` does with its
//! arguments (`ensure_ascii`, `indent`, `separators`, `sort_keys`).
//! Renders spend at most [`Limits`]: instructions, output and (in a child process) memory.

use anyhow::{anyhow, bail, Result};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};

pub use super::message::Message;
use crate::gguf::Metadata;
use crate::tokenizer::{Shield, Tokenizer};

/// The fallback for models without a template.
pub const CHATML: &str = "{%- for message in messages -%}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}";

/// A base model's conversation: the messages' text, one after another.
const TRANSCRIPT: &str = "{%- for message in messages -%}\
{{- message['content'] -}}{%- if not loop.last -%}{{- '\n' -}}{%- endif -%}\
{%- endfor -%}";

/// Llama 3's header format.
const LLAMA3: &str = "{{- bos_token -}}{%- for message in messages -%}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}";

/// Gemma's turns (a system message joins the first user turn; the assistant is `model`).
const GEMMA: &str = "{{- bos_token -}}{%- set ns = namespace(system='') -%}\
{%- for message in messages -%}\
{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}\
{%- else -%}\
{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' -}}\
{%- set ns.system = '' -%}\
{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}";

/// Phi-3's tags.
const PHI3: &str = "{%- for message in messages -%}\
{{- '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' -}}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}";

/// The templates `--chat-template NAME` names (llama.cpp's names for the same formats).
pub const BUILTIN: [(&str, &str); 4] = [
    ("chatml", CHATML),
    ("llama3", LLAMA3),
    ("gemma", GEMMA),
    ("phi3", PHI3),
];

/// Where a template comes from when it is not the model's.
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateSource {
    File(std::path::PathBuf),
    /// Template text (a built-in one, or one given on the command line); `origin` names it.
    Text {
        text: String,
        origin: String,
    },
}

impl TemplateSource {
    /// llama.cpp's `--chat-template` value: a built-in template's name or the template itself
    /// (and, as ggrun took before, a file that exists).
    pub fn from_flag(value: &str) -> Result<TemplateSource> {
        if let Some((name, text)) = BUILTIN.iter().find(|(n, _)| *n == value) {
            return Ok(TemplateSource::Text {
                text: text.to_string(),
                origin: format!("the built-in {name} template"),
            });
        }
        if value.contains("{{") || value.contains("{%") {
            return Ok(TemplateSource::Text {
                text: value.to_string(),
                origin: "the --chat-template text".into(),
            });
        }
        let p = std::path::Path::new(value);
        if p.is_file() {
            return Ok(TemplateSource::File(p.to_path_buf()));
        }
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        bail!(
            "--chat-template {value}: not a template name ({}) nor Jinja text; a file is \
             --chat-template-file FILE",
            names.join(", ")
        )
    }
}

/// What a render needs besides the messages.
#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    /// None: leave `enable_thinking` undefined so the template uses its own default.
    pub enable_thinking: Option<bool>,
    /// Tool definitions (OpenAI style), passed as `tools` when present.
    pub tools: Option<serde_json::Value>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for error messages.
    pub origin: String,
    bos: String,
    eos: String,
    /// Escapes special-token text in messages so that it reaches the model as text (see
    /// [`Shield`]); None: such text becomes control tokens (`--parse-message-specials`).
    pub shield: Option<Shield>,
    source: String,
    limits: Limits,
    /// The model has no template and none was given: this is ChatML, invented.
    pub fallback: bool,
}

/// Which template a run uses and how: a file instead of the model's, whether message text
/// may hold special tokens, and the render limits.
#[derive(Clone, Debug, PartialEq)]
pub struct TemplateOptions {
    /// `--chat-template` (a name, template text, or a file) and `--chat-template-file`.
    pub chat_template: Option<String>,
    pub file: Option<std::path::PathBuf>,
    /// Read special-token text in messages as control tokens (no [`Shield`]).
    pub parse_message_specials: bool,
    pub limits: Limits,
}

impl TemplateOptions {
    /// The template these options ask for (the file, else the model's, else ChatML).
    pub fn load(&self, md: &Metadata, tok: &Tokenizer) -> Result<ChatTemplate> {
        let source = match (&self.file, &self.chat_template) {
            (Some(f), _) => Some(TemplateSource::File(f.clone())),
            (None, Some(v)) => Some(TemplateSource::from_flag(v)?),
            (None, None) => None,
        };
        let mut t = ChatTemplate::for_model(md, tok, source.as_ref())?;
        if self.parse_message_specials {
            t.shield = None;
        }
        t.set_limits(self.limits);
        Ok(t)
    }
}

/// What a render may spend: instructions (minijinja's fuel), output bytes, and, when
/// `isolate`d in a child process ([`super::sandbox`]), memory. A render past a limit is a
/// one-line error naming it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub fuel: u64,
    pub max_output: u64,
    pub max_memory: u64,
    /// Render in a child process, where the memory limit holds (the CLI and the server do;
    /// tests of the template logic itself need not).
    pub isolate: bool,
}

impl Default for Limits {
    /// 20 million instructions (0.5-1.5 s; the real templates of Nemotron 3 Nano, Qwen3 and
    /// Qwen3-Coder spend 0.1 million on 1000 messages and 50 tools, gpt-oss's 1.5 million: it
    /// grows with the square of the messages), 64 MiB of output, 512 MiB of memory.
    fn default() -> Limits {
        Limits {
            fuel: 20_000_000,
            max_output: 64 << 20,
            max_memory: 512 << 20,
            isolate: false,
        }
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template of `over` if given, else the model's, else ChatML (marked as the
    /// [`ChatTemplate::fallback`]).
    pub fn for_model(
        md: &Metadata,
        tok: &Tokenizer,
        over: Option<&TemplateSource>,
    ) -> Result<ChatTemplate> {
        let mut fallback = false;
        let (source, origin) = match over {
            Some(TemplateSource::File(p)) => (
                std::fs::read_to_string(p).map_err(|e| anyhow!("{}: {e}", p.display()))?,
                p.display().to_string(),
            ),
            Some(TemplateSource::Text { text, origin }) => (text.clone(), origin.clone()),
            None => match md.get_str("tokenizer.chat_template") {
                Ok(s) => (s.to_string(), "the model's chat template".to_string()),
                Err(_) => {
                    fallback = true;
                    (CHATML.to_string(), "the ChatML fallback".to_string())
                }
            },
        };
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(&tok.token_bytes(i, true)).into_owned())
                .unwrap_or_default()
        };
        let mut t = ChatTemplate::new(&source, &origin, &text(tok.bos), &text(tok.eos))?;
        t.shield = Some(tok.shield()?);
        t.fallback = fallback;
        Ok(t)
    }

    /// The plain transcript a base model continues: each message's text on its own line, no
    /// roles or markers (the system prompt first).
    pub fn transcript(tok: &Tokenizer) -> Result<ChatTemplate> {
        let mut t = ChatTemplate::new(TRANSCRIPT, "the plain transcript", "", "")?;
        t.shield = Some(tok.shield()?);
        Ok(t)
    }

    /// Compiles `source`; `origin` names it in errors.
    pub fn new(source: &str, origin: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let limits = Limits::default();
        Ok(ChatTemplate {
            env: environment(source, origin, limits.fuel)?,
            origin: origin.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
            shield: None,
            source: source.to_string(),
            limits,
            fallback: false,
        })
    }

    /// Renders under `limits` from now on.
    pub fn set_limits(&mut self, limits: Limits) {
        self.env.set_fuel(Some(limits.fuel));
        self.limits = limits;
    }

    /// The prompt for `messages`, their text [`Shield`]ed when the template has a shield (read it
    /// with [`Tokenizer::encode_rendered`]).
    pub fn render(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        self.render_shielded(messages, opts, self.shield.as_ref())
    }

    /// The prompt for `messages` as text, to be read by people (message text as written).
    pub fn render_text(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        self.render_shielded(messages, opts, None)
    }

    fn render_shielded(
        &self,
        messages: &[Message],
        opts: &RenderOptions,
        shield: Option<&Shield>,
    ) -> Result<String> {
        let mut messages: Vec<serde_json::Value> =
            messages.iter().map(Message::template_view).collect();
        let mut tools = opts.tools.clone();
        if let Some(shield) = shield {
            // A model's own answers keep their user-defined tokens (`<think>`, `<tool_call>`);
            // everything else a client sends is text through and through.
            for view in messages.iter_mut() {
                let control_only = view["role"] == "assistant";
                if let serde_json::Value::Object(o) = view {
                    for (_, v) in o.iter_mut().filter(|(k, _)| *k != "role") {
                        shield_strings(v, shield, control_only);
                    }
                }
            }
            if let Some(t) = &mut tools {
                shield_strings(t, shield, false);
            }
        }
        let mut ctx = serde_json::json!({
            "messages": messages,
            "add_generation_prompt": opts.add_generation_prompt,
            "bos_token": self.bos,
            "eos_token": self.eos,
            "date_string": format_time("%d %b %Y", now_utc()),
        });
        if let Some(t) = opts.enable_thinking {
            ctx["enable_thinking"] = t.into();
        }
        if let Some(tools) = tools {
            ctx["tools"] = tools;
        }
        if self.limits.isolate {
            return super::sandbox::render(&self.source, &self.origin, &ctx, &self.limits);
        }
        render_with(&self.env, &self.origin, ctx, &self.limits)
    }
}

/// An environment set up as Hugging Face renders templates, with `source` compiled and
/// `fuel` instructions to spend per render.
fn environment(source: &str, origin: &str, fuel: u64) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.set_formatter(python_formatter);
    env.set_fuel(Some(fuel));
    env.add_template_owned(NAME, without_generation_tags(source))
        .map_err(|e| describe(&e, origin))?;
    Ok(env)
}

/// transformers' `{% generation %}` … `{% endgeneration %}` (it marks the assistant's tokens
/// for training masks and renders its body unchanged) as an always-true `if`, whitespace
/// control kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        // The tag's end, after its opening (in "{%}" the "%}" overlaps the "{%").
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_dash, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => ("", inner),
        };
        let (body, close_dash) = match body.strip_suffix('-') {
            Some(b) => (b, "-"),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{open_dash} if true {close_dash}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open_dash} endif {close_dash}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Prints values as Python does: lists and dicts as their `repr` (`{'k': 'v'}`), the rest as
/// minijinja does (which already prints True, False and None).
fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Seq | ValueKind::Map => {
            nesting_ok(value)?;
            let mut s = String::new();
            python_repr(value, &mut s);
            out.write_str(&s)
                .map_err(|e| Error::new(ErrorKind::WriteFailure, e.to_string()))
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Deepest nesting of lists and dicts that is printed or serialized (Python's own recursion
/// limit is about a thousand); deeper values are an error, not a stack overflow.
const MAX_NESTING: usize = 512;

/// Errs when `v` nests lists and dicts deeper than [`MAX_NESTING`] (looking no deeper).
fn nesting_ok(v: &Value) -> Result<(), Error> {
    fn deeper(v: &Value, depth: usize) -> bool {
        use minijinja::value::ValueKind;
        if depth > MAX_NESTING {
            return true;
        }
        match v.kind() {
            ValueKind::Seq => v
                .try_iter()
                .into_iter()
                .flatten()
                .any(|x| deeper(&x, depth + 1)),
            ValueKind::Map => v
                .try_iter()
                .into_iter()
                .flatten()
                .any(|k| deeper(&v.get_item(&k).unwrap_or_default(), depth + 1)),
            _ => false,
        }
    }
    if deeper(v, 0) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("a value nested more than {MAX_NESTING} deep"),
        ));
    }
    Ok(())
}

/// Python's `repr` of a template value.
fn python_repr(v: &Value, out: &mut String) {
    use minijinja::value::ValueKind;
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::String => python_str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, x) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&x, out);
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, k) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr(&k, out);
                out.push_str(": ");
                python_repr(&v.get_item(&k).unwrap_or_default(), out);
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
}

/// Python's `repr` of a str: single quotes unless the text has one and no double quote.
fn python_str_repr(s: &str, out: &mut String) {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(q);
}

/// Compiles and renders `source` with `context` under `limits` (the fuel and output limits; the
/// caller sees to memory): the sandbox's child does this.
pub fn render_limited(
    source: &str,
    origin: &str,
    context: serde_json::Value,
    limits: &Limits,
) -> Result<String> {
    let env = environment(source, origin, limits.fuel)?;
    render_with(&env, origin, context, limits)
}

/// Renders the compiled template of `env`, stopping at the fuel and output limits.
fn render_with(
    env: &Environment<'static>,
    origin: &str,
    context: serde_json::Value,
    limits: &Limits,
) -> Result<String> {
    let tmpl = env.get_template(NAME).map_err(|e| describe(&e, origin))?;
    let mut out = CappedOutput {
        text: Vec::new(),
        max: limits.max_output,
        over: false,
    };
    match tmpl.render_captured_to(context, &mut out) {
        Ok(_) => String::from_utf8(out.text)
            .map_err(|_| anyhow!("{origin}: the template's output is not UTF-8")),
        Err(_) if out.over => Err(anyhow!(
            "{origin}: the template wrote more than {} (--template-max-output)",
            size_text(limits.max_output)
        )),
        Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(anyhow!(
            "{origin}: the template ran more than {} instructions (--template-fuel)",
            limits.fuel
        )),
        Err(e) => Err(describe(&e, origin)),
    }
}

/// "64 MiB" for whole mebibytes, else "N bytes" (limits in messages).
pub(crate) fn size_text(b: u64) -> String {
    if b > 0 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else {
        format!("{b} bytes")
    }
}

/// A render's output, refusing to grow past `max` bytes.
struct CappedOutput {
    text: Vec<u8>,
    max: u64,
    over: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if (self.text.len() + b.len()) as u64 > self.max {
            self.over = true;
            return Err(std::io::Error::other("the output limit"));
        }
        self.text.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Escapes special-token text in every string of `v` (see [`Shield::escape`]).
fn shield_strings(v: &mut serde_json::Value, shield: &Shield, control_only: bool) {
    use serde_json::Value as J;
    match v {
        J::String(s) => *s = shield.escape(s, control_only),
        J::Array(a) => a
            .iter_mut()
            .for_each(|x| shield_strings(x, shield, control_only)),
        J::Object(o) => o
            .values_mut()
            .for_each(|x| shield_strings(x, shield, control_only)),
        _ => {}
    }
}

/// One line naming the template, the line and what went wrong.
fn describe(e: &Error, origin: &str) -> anyhow::Error {
    let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
    let what = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            format!("raised: {}", e.detail().unwrap_or_default())
        }
        _ => match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        },
    };
    anyhow!("{origin}{line}: {what}")
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// Seconds since the epoch, for `strftime_now`.
fn now_utc() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// transformers' `strftime_now`: the local time (as `datetime.now()`), formatted.
fn strftime_now(fmt: String) -> String {
    let now = now_utc();
    format_time(&fmt, now + local_offset(now))
}

/// Seconds east of UTC of the local time zone at `secs` (0 where it cannot be had).
fn local_offset(secs: i64) -> i64 {
    #[cfg(unix)]
    {
        let t = secs as libc::time_t;
        // SAFETY: localtime_r reads `t` and writes only the tm struct we own; a zeroed tm is a
        // valid value to start from.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: as above; a null return leaves tm zeroed (offset 0).
        let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
        if ok {
            return tm.tm_gmtoff;
        }
    }
    let _ = secs;
    0
}

/// A small strftime (of a time already shifted to its zone) for the directives chat
/// templates use.
fn format_time(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let month = MONTHS[(m - 1) as usize];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &y.to_string(),
            Some('y') => out += &format!("{:02}", y.rem_euclid(100)),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('-') => match chars.next() {
                Some('d') => out += &d.to_string(),
                Some('m') => out += &m.to_string(),
                Some(o) => out += &format!("%-{o}"),
                None => out += "%-",
            },
            Some('B') => out += month,
            Some('b') => out += &month[..3],
            Some('A') => out += weekday,
            Some('a') => out += &weekday[..3],
            Some('H') => out += &format!("{:02}", tod / 3600),
            Some('M') => out += &format!("{:02}", tod / 60 % 60),
            Some('S') => out += &format!("{:02}", tod % 60),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// How [`tojson`] writes JSON: Python's `json.dumps` options.
struct JsonStyle {
    indent: Option<usize>,
    /// Between items, and between a key and its value.
    item_sep: String,
    key_sep: String,
    /// Non-ASCII characters as \uXXXX escapes.
    ensure_ascii: bool,
    sort_keys: bool,
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` with those keyword arguments (transformers' tojson): ", " and ": "
/// separators (", " becomes "," with `indent`), keys in insertion order, no HTML escaping.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    nesting_ok(&value)?;
    let (item_sep, key_sep) = match separators.as_deref() {
        None => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_json(&json, &style, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

fn write_json(v: &serde_json::Value, st: &JsonStyle, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = st.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => write_json_string(s, st.ensure_ascii, out),
        J::Array(a) if a.is_empty() => out.push_str("[]"),
        J::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&st.item_sep);
                }
                newline(out, depth + 1);
                write_json(x, st, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(o) if o.is_empty() => out.push_str("{}"),
        J::Object(o) => {
            let mut items: Vec<(&String, &J)> = o.iter().collect();
            if st.sort_keys {
                items.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, x)) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&st.item_sep);
                }
                newline(out, depth + 1);
                write_json_string(k, st.ensure_ascii, out);
                out.push_str(&st.key_sep);
                write_json(x, st, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        ChatTemplate::new(src, "test template", "<s>", "</s>")?.render(messages, opts)
    }

    #[test]
    fn generation_tags_become_an_if_and_broken_tags_pass_through() {
        assert_eq!(
            without_generation_tags("a{%- generation %}b{% endgeneration -%}c"),
            "a{%- if true %}b{% endif -%}c"
        );
        // Overlapping and unclosed tags are left for the template compiler to report (the
        // fuzzer's find: "{%}" once sliced past its own end).
        for s in ["{%}", "{{%}- x", "{%", "{% generation", "%}{%}%}", "é{%}é"] {
            assert_eq!(without_generation_tags(s), s);
        }
    }

    #[test]
    fn deeply_nested_values_are_an_error_when_printed_or_serialized() {
        let build = "{%- set ns = namespace(x=[]) %}{%- for i in range(600) %}{%- set ns.x = \
                     [ns.x] %}{%- endfor %}";
        for out in ["{{ ns.x }}", "{{ ns.x|tojson }}"] {
            let e = render(&format!("{build}{out}"), &[], &RenderOptions::default()).unwrap_err();
            assert!(format!("{e:#}").contains("nested more than 512"), "{e:#}");
        }
        let shallow = "{%- set ns = namespace(x=[]) %}{%- for i in range(5) %}{%- set ns.x = \
                       [ns.x] %}{%- endfor %}{{ ns.x }} {{ ns.x|tojson }}";
        assert_eq!(
            render(shallow, &[], &RenderOptions::default()).unwrap(),
            "[[[[[[]]]]]] [[[[[[]]]]]]"
        );
    }

    #[test]
    fn chatml_fallback_renders_a_conversation() {
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi"),
        ];
        let opts = RenderOptions {
            add_generation_prompt: true,
            ..Default::default()
        };
        assert_eq!(
            render(CHATML, &msgs, &opts).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_filters_and_block_trimming_behave_as_in_transformers() {
        // The constructs HF templates lean on: namespace, macros, python str/dict methods,
        // loop.previtem, `is mapping`, default(.., true), tojson with ", " separators,
        // trim_blocks/lstrip_blocks; booleans print as Python's True/False.
        let src = r#"{% macro show(d) %}{% for k, v in d|items %}<{{ k }}={{ v|tojson }}>{% endfor %}{% endmacro %}
{%- set ns = namespace(n=0) %}
{%- for m in messages %}
    {%- set ns.n = ns.n + 1 %}
    {%- if loop.previtem and loop.previtem.role == m.role %}[same]{% endif %}
    {{- m.role|upper }}:{{ m.content.strip().split(' ')[0] }}|{{ m.content.startswith('  a') }}
    {% if m.reasoning_content is defined %}R={{ m.reasoning_content }}{% endif %}
{% endfor %}
{{- ns.n }} {{ show({"b": [1, "x"], "a": {"k": true}}) }} {{ tools is mapping }} {{ none|default('d', true) }}
{%- if tools is defined %}{{ tools|tojson }}{{ tools.get('name') }}{% endif %}"#;
        let mut m2 = Message::new("user", "  again y");
        m2.reasoning_content = Some("r".into());
        let msgs = [Message::new("user", "  alpha beta"), m2];
        let opts = RenderOptions {
            tools: Some(serde_json::json!({"name": "f", "d": "é\n"})),
            ..Default::default()
        };
        assert_eq!(
            render(src, &msgs, &opts).unwrap(),
            "USER:alpha|True\n[same]USER:again|True\nR=r2 <b=[1, \"x\"]><a={\"k\": true}> True d\
             {\"name\": \"f\", \"d\": \"é\\n\"}f"
        );
    }

    #[test]
    fn thinking_flag_is_undefined_unless_set() {
        let src = "{{ enable_thinking if enable_thinking is defined else 'default' }}";
        let mut opts = RenderOptions::default();
        assert_eq!(render(src, &[], &opts).unwrap(), "default");
        opts.enable_thinking = Some(false);
        assert_eq!(render(src, &[], &opts).unwrap(), "False");
    }

    #[test]
    fn errors_name_the_template_and_line() {
        let e = render("line one\n{% if %}", &[], &RenderOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("test template line 2: syntax error"), "{e}");
        let e = render(
            "a\nb\n{{ raise_exception('roles must alternate') }}",
            &[],
            &RenderOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "test template line 3: raised: roles must alternate");
    }

    #[test]
    fn renders_stop_at_the_fuel_and_output_limits() {
        let mut t = ChatTemplate::new(
            "{% for i in range(n) %}{{ 'abcd' }}{% endfor %}",
            "t",
            "",
            "",
        )
        .unwrap();
        let limits = Limits {
            fuel: 10_000,
            max_output: 1000,
            ..Limits::default()
        };
        t.set_limits(limits);
        let run = |n: usize| render_with(&t.env, "t", serde_json::json!({ "n": n }), &limits);
        assert_eq!(run(250).unwrap().len(), 1000);
        let e = run(251).unwrap_err().to_string();
        assert_eq!(
            e,
            "t: the template wrote more than 1000 bytes (--template-max-output)"
        );
        t.set_limits(Limits {
            max_output: 1 << 30,
            ..limits
        });
        let e = render_with(&t.env, "t", serde_json::json!({"n": 100_000}), &t.limits)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t: the template ran more than 10000 instructions (--template-fuel)"
        );
    }

    #[test]
    fn strftime_covers_the_common_directives() {
        // 2024-07-26 13:05:09 UTC was a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            format_time("%d %b %Y %H:%M:%S %A %B %-d/%-m %y %%", t),
            "26 Jul 2024 13:05:09 Friday July 26/7 24 %"
        );
    }
}
