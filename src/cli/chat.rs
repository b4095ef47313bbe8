//! `ggrun chat`: an interactive conversation in the terminal. A line editor (reedline, on
//! crossterm) with history on up/down and multi-line input (Alt-Enter, a trailing `\`, or a
//! `"""` block); replies stream as they are generated, reasoning dimmed; Ctrl-C stops a reply,
//! Ctrl-D or /exit leaves. When stdin or stdout is not a terminal it reads one message per line
//! and prints plain answers.

use std::borrow::Cow;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::Result;
use clap::Args;
use crossterm::style::{Attribute, SetAttribute};
use reedline::{
    default_emacs_keybindings, EditCommand, Emacs, FileBackedHistory, KeyCode, KeyModifiers,
    Prompt, PromptEditMode, PromptHistorySearch, Reedline, ReedlineEvent, Signal, ValidationResult,
    Validator,
};

use super::common::{self, ModelArgs, OnOff, SamplingArgs, ThinkArgs};
use crate::chat::session::{ContextPolicy, Session};
use crate::engine::load::{self, GENERATING, INTERRUPTED};
use crate::generate::{Engine, GenParams, Outcome, Piece, Reasoning, StopReason};

#[derive(Args, Debug)]
#[command(next_help_heading = "Conversation")]
pub struct ChatArgs {
    /// System prompt.
    #[arg(long, allow_hyphen_values = true)]
    pub system: Option<String>,
    /// Most tokens per reply (default: until the model stops or the context is full).
    #[arg(short = 'n', long = "n-predict")]
    pub n_predict: Option<usize>,
    /// In line mode (stdin or stdout not a terminal), print reasoning to stderr.
    #[arg(long = "show-think")]
    pub show_think: bool,
    /// When a message does not fit the context: drop the oldest turns (the system prompt
    /// stays) or fail the turn.
    #[arg(long = "ctx-policy", value_name = "drop|error", default_value = "drop")]
    pub ctx_policy: ContextPolicy,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub think: ThinkArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

const HELP: &str = "\
/exit, /quit, /bye        leave (or Ctrl-D)
/reset, /clear            start a new conversation
/think on|off|default     (Ollama's /set think, /set nothink too)
/system TEXT              set the system prompt (empty: none); restarts the context
/set system TEXT          the same, as Ollama spells it
/set parameter NAME VALUE temperature, top_k, top_p, min_p, seed, num_predict,
                          repeat_penalty, repeat_last_n, presence_penalty,
                          frequency_penalty, stop
/show info|system|parameters
/save FILE                write the conversation as JSON
/load FILE                read a saved conversation
Alt-Enter, a trailing \\, a \"\"\" block or a paste: multi-line input; Ctrl-C stops a reply";

pub fn run(a: ChatArgs, out: &mut dyn Write) -> Result<()> {
    common::install_ctrl_c();
    let interactive = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    a.model.no_words()?;
    let mut opts = a.model.options()?;
    let (g, dev) = load::open(&mut opts)?;
    let l = load::load(&g, dev.as_ref(), &opts)?;
    let mut engine = Engine::new(l.model.as_ref(), l.cpu, l.tok, l.n_ctx)?;
    engine.seq.batch = l.batch;
    a.sampling.check_bias(engine.tok.n_vocab())?;
    if let Some(spec) = a.sampling.grammar()? {
        engine.constrain(spec)?;
    }
    let mut template = opts.template.load(g.metadata(), &engine.tok)?;
    if template.fallback {
        // A base model: each message continues the text so far (no roles, no markers).
        eprintln!(
            "warning: this model has no chat template: each message continues the text as \
             written (--chat-template NAME chats with it)"
        );
        template = crate::chat::template::ChatTemplate::transcript(&engine.tok)?;
    }
    let mut session = Session::new(engine, template);
    session.system = a.system.clone();
    session.think = a.think.enable();
    session.policy = a.ctx_policy;
    let params = GenParams {
        max_tokens: a.n_predict,
        sampler: a.sampling.config(g.metadata()),
        stop: a.sampling.stop.clone(),
        reasoning: Reasoning::Verbatim,
        think_budget: a.think.think_budget,
        feed_last: true,
    };
    let info = crate::info::ModelInfo::from_model(&g)?;
    let mut chat = Chat {
        params,
        info: format!(
            "{} · {} · {:.2} B parameters · context {} (trained {})",
            a.model.name().unwrap_or("model"),
            info.architecture,
            info.parameters as f64 / 1e9,
            session.engine.n_ctx(),
            info.context_length.map_or("?".into(), |c| c.to_string()),
        ),
    };
    if interactive {
        interactive_loop(&a, &mut session, &mut chat, out)
    } else {
        line_loop(&a, &mut session, &mut chat, out)
    }
}

/// What a line of input asks for.
enum Input<'a> {
    Message(&'a str),
    Exit,
    /// A command was handled; this is what to tell the user.
    Note(String),
}

/// What `/show info` prints: set once at the start.
struct Chat {
    params: GenParams,
    info: String,
}

fn command<'a>(line: &'a str, s: &mut Session, c: &mut Chat) -> Input<'a> {
    let Some(cmd) = line.strip_prefix('/') else {
        return Input::Message(line);
    };
    let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
    let arg = arg.trim();
    let note = |r: Result<String>| Input::Note(r.unwrap_or_else(|e| format!("error: {e:#}")));
    let think = |s: &mut Session, v: Option<bool>, word: &str| {
        s.set_think(v);
        Input::Note(format!("thinking {word}"))
    };
    match name {
        "exit" | "quit" | "bye" => Input::Exit,
        "help" | "?" => Input::Note(HELP.to_string()),
        "reset" | "clear" => note(s.reset().map(|()| "new conversation".into())),
        "think" => match arg {
            "on" => think(s, Some(true), arg),
            "off" => think(s, Some(false), arg),
            "default" => think(s, None, arg),
            _ => Input::Note("usage: /think on|off|default".into()),
        },
        "system" => set_system(s, arg),
        "set" => {
            let (what, rest) = arg.split_once(' ').unwrap_or((arg, ""));
            match what {
                "system" => set_system(s, rest.trim()),
                "think" => think(s, Some(true), "on"),
                "nothink" => think(s, Some(false), "off"),
                "parameter" => note(set_parameter(&mut c.params, rest.trim())),
                "verbose" | "quiet" => Input::Note("timings are shown after each reply".into()),
                _ => Input::Note(
                    "usage: /set system TEXT | parameter NAME VALUE | think | nothink".into(),
                ),
            }
        }
        "show" => match arg {
            "info" => Input::Note(c.info.clone()),
            "system" => Input::Note(
                s.system
                    .clone()
                    .unwrap_or_else(|| "(no system prompt)".into()),
            ),
            "parameters" => Input::Note(parameters(&c.params)),
            _ => Input::Note("usage: /show info|system|parameters".into()),
        },
        "save" if !arg.is_empty() => {
            note(s.save(Path::new(arg)).map(|_| format!("saved to {arg}")))
        }
        "load" if !arg.is_empty() => note(
            s.load(Path::new(arg))
                .map(|_| format!("loaded {} messages from {arg}", s.messages.len())),
        ),
        "save" | "load" => Input::Note(format!("usage: /{name} FILE")),
        _ => Input::Note(format!("unknown command /{name} (/help lists them)")),
    }
}

fn set_system<'a>(s: &mut Session, text: &str) -> Input<'a> {
    s.set_system((!text.is_empty()).then(|| text.to_string()));
    Input::Note(if text.is_empty() {
        "system prompt cleared".into()
    } else {
        "system prompt set".into()
    })
}

/// Ollama's `/set parameter NAME VALUE`, on the sampling settings.
fn set_parameter(p: &mut GenParams, arg: &str) -> Result<String> {
    let (name, value) = arg
        .split_once(' ')
        .map(|(n, v)| (n, v.trim()))
        .ok_or_else(|| anyhow::anyhow!("usage: /set parameter NAME VALUE"))?;
    let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("{name} {value}: {e}");
    let f = || value.parse::<f32>().map_err(|e| bad(&e));
    let u = || value.parse::<usize>().map_err(|e| bad(&e));
    let c = &mut p.sampler;
    match name {
        "temperature" => c.temperature = f()?,
        "top_k" => c.top_k = u()?,
        "top_p" => c.top_p = f()?,
        "min_p" => c.min_p = f()?,
        "repeat_penalty" => c.repeat_penalty = f()?,
        "presence_penalty" => c.presence_penalty = f()?,
        "frequency_penalty" => c.frequency_penalty = f()?,
        "repeat_last_n" => c.penalty_last_n = u()?,
        "seed" => c.seed = value.parse::<u64>().map_err(|e| bad(&e))?,
        "num_predict" => {
            let n: i64 = value.parse().map_err(|e| bad(&e))?;
            p.max_tokens = usize::try_from(n).ok();
        }
        "stop" => p.stop.push(value.to_string()),
        "num_ctx" => anyhow::bail!("num_ctx: the context is set at start (-c)"),
        _ => anyhow::bail!("unknown parameter {name} (/help lists them)"),
    }
    Ok(format!("set {name} to {value}"))
}

fn parameters(p: &GenParams) -> String {
    let c = &p.sampler;
    format!(
        "temperature {}\ntop_k {}\ntop_p {}\nmin_p {}\nrepeat_penalty {}\nrepeat_last_n {}\n\
         presence_penalty {}\nfrequency_penalty {}\nseed {}\nnum_predict {}\nstop {:?}",
        c.temperature,
        c.top_k,
        c.top_p,
        c.min_p,
        c.repeat_penalty,
        c.penalty_last_n,
        c.presence_penalty,
        c.frequency_penalty,
        c.seed,
        p.max_tokens.map_or("-1".to_string(), |n| n.to_string()),
        p.stop
    )
}

/// The line that says a turn dropped old exchanges to fit the context.
fn dropped_note(s: &Session) -> Option<String> {
    match s.dropped {
        0 => None,
        1 => Some("[the context was full: dropped the oldest turn]".into()),
        n => Some(format!(
            "[the context was full: dropped the {n} oldest turns]"
        )),
    }
}

/// Runs one reply with Ctrl-C armed to stop it.
fn reply(
    s: &mut Session,
    user: &str,
    params: &GenParams,
    on_piece: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<Outcome> {
    INTERRUPTED.store(false, Ordering::SeqCst);
    GENERATING.store(true, Ordering::SeqCst);
    let r = s.turn(user, params, &INTERRUPTED, on_piece);
    GENERATING.store(false, Ordering::SeqCst);
    INTERRUPTED.store(false, Ordering::SeqCst);
    r
}

fn stats(o: &Outcome) -> String {
    let mut s = common::rate(o.generated_tokens, o.generate_secs);
    if o.stop != StopReason::Eog {
        s += &format!(", stopped: {}", o.stop.as_str());
    }
    s
}

fn line_loop(a: &ChatArgs, s: &mut Session, c: &mut Chat, out: &mut dyn Write) -> Result<()> {
    let mut failed = 0;
    let stdin = std::io::stdin();
    let mut pending = String::new();
    for line in stdin.lock().lines() {
        let line = line?;
        // A trailing backslash continues the message on the next line.
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push('\n');
            continue;
        }
        pending.push_str(&line);
        let text = std::mem::take(&mut pending);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        match command(text, s, c) {
            Input::Exit => break,
            Input::Note(n) => eprintln!("{n}"),
            Input::Message(m) => {
                let show = a.show_think;
                let mut on_piece = |p: Piece| -> Result<()> {
                    match p {
                        Piece::Answer(t) => {
                            out.write_all(t.as_bytes())?;
                            out.flush()?;
                        }
                        Piece::Reasoning(t) if show => eprint!("{t}"),
                        Piece::Reasoning(_) => {}
                    }
                    Ok(())
                };
                let r = reply(s, m, &c.params, &mut on_piece);
                if r.is_ok() {
                    writeln!(out)?;
                    out.flush()?;
                }
                if let Some(n) = dropped_note(s) {
                    eprintln!("{n}");
                }
                let o = match r {
                    Ok(o) => o,
                    Err(e) if super::is_closed_pipe(&e) => return Err(e),
                    // A failed turn is reported; the chat goes on (and exits 1 at the end).
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        failed += 1;
                        continue;
                    }
                };
                if !a.model.quiet {
                    eprintln!("[{}]", stats(&o));
                }
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} turn(s) failed");
    }
    Ok(())
}

struct ChatPrompt;

impl Prompt for ChatPrompt {
    fn render_prompt_left(&self) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn render_prompt_right(&self) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn render_prompt_indicator(&self, _: PromptEditMode) -> Cow<'_, str> {
        Cow::Borrowed("> ")
    }
    fn render_prompt_multiline_indicator(&self) -> Cow<'_, str> {
        Cow::Borrowed(". ")
    }
    fn render_prompt_history_search_indicator(&self, h: PromptHistorySearch) -> Cow<'_, str> {
        Cow::Owned(format!("(search: {}) ", h.term))
    }
}

/// Multi-line input: a trailing backslash or an unclosed `"""` block asks for more lines.
struct MultiLine;

impl Validator for MultiLine {
    fn validate(&self, line: &str) -> ValidationResult {
        let fences = line.lines().filter(|l| l.trim() == "\"\"\"").count();
        if line.ends_with('\\') || fences % 2 == 1 {
            ValidationResult::Incomplete
        } else {
            ValidationResult::Complete
        }
    }
}

/// The message typed: continuation backslashes and `"""` fence lines removed.
fn message_text(buffer: &str) -> String {
    buffer
        .lines()
        .filter(|l| l.trim() != "\"\"\"")
        .map(|l| l.strip_suffix('\\').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

fn interactive_loop(
    a: &ChatArgs,
    s: &mut Session,
    c: &mut Chat,
    out: &mut dyn Write,
) -> Result<()> {
    let mut keys = default_emacs_keybindings();
    keys.add_binding(
        KeyModifiers::ALT,
        KeyCode::Enter,
        ReedlineEvent::Edit(vec![EditCommand::InsertNewline]),
    );
    let history =
        FileBackedHistory::new(1000).map_err(|e| anyhow::anyhow!("line editor history: {e}"))?;
    let mut editor = Reedline::create()
        .with_edit_mode(Box::new(Emacs::new(keys)))
        .with_history(Box::new(history))
        .with_validator(Box::new(MultiLine))
        .use_bracketed_paste(true);
    let think = match a.think.think {
        Some(OnOff::On) => "on",
        Some(OnOff::Off) => "off",
        None => "model default",
    };
    writeln!(
        out,
        "{}ggrun chat · {} · context {} · thinking {think} · /help for commands, Ctrl-D to leave{}",
        SetAttribute(Attribute::Dim),
        a.model.name().unwrap_or("model"),
        s.engine.n_ctx(),
        SetAttribute(Attribute::Reset)
    )?;
    loop {
        let buffer = match editor.read_line(&ChatPrompt) {
            Ok(Signal::Success(b)) => b,
            Ok(Signal::CtrlC) => continue,
            Ok(Signal::CtrlD) => break,
            Ok(_) => continue,
            Err(e) => anyhow::bail!("terminal: {e}"),
        };
        let text = message_text(&buffer);
        if text.is_empty() {
            continue;
        }
        match command(&text, s, c) {
            Input::Exit => break,
            Input::Note(n) => {
                writeln!(
                    out,
                    "{}{n}{}",
                    SetAttribute(Attribute::Dim),
                    SetAttribute(Attribute::Reset)
                )?;
            }
            Input::Message(m) => {
                let mut in_reasoning = false;
                let mut on_piece = |p: Piece| -> Result<()> {
                    match p {
                        Piece::Reasoning(t) => {
                            if !in_reasoning {
                                write!(out, "{}", SetAttribute(Attribute::Dim))?;
                                in_reasoning = true;
                            }
                            write!(out, "{t}")?;
                        }
                        Piece::Answer(t) => {
                            if in_reasoning {
                                write!(out, "{}\n\n", SetAttribute(Attribute::Reset))?;
                                in_reasoning = false;
                            }
                            write!(out, "{t}")?;
                        }
                    }
                    out.flush()?;
                    Ok(())
                };
                let r = reply(s, m, &c.params, &mut on_piece);
                write!(out, "{}", SetAttribute(Attribute::Reset))?;
                if let Some(n) = dropped_note(s) {
                    write!(
                        out,
                        "\n{}{n}{}",
                        SetAttribute(Attribute::Dim),
                        SetAttribute(Attribute::Reset)
                    )?;
                }
                match r {
                    Ok(o) => {
                        let note = if o.stop == StopReason::Interrupted {
                            "[interrupted] ".to_string()
                        } else {
                            String::new()
                        };
                        writeln!(
                            out,
                            "\n{}{note}[{}]{}\n",
                            SetAttribute(Attribute::Dim),
                            stats(&o),
                            SetAttribute(Attribute::Reset)
                        )?;
                    }
                    // A failed turn (context full, say) is reported; the chat goes on.
                    Err(e) => writeln!(out, "\nerror: {e:#}")?,
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}
