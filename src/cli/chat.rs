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
use crate::chat::session::Session;
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
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub think: ThinkArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

const HELP: &str = "\
/exit, /quit      leave (or Ctrl-D)
/reset            start a new conversation
/think on|off|default
/system TEXT      set the system prompt (empty: none); restarts the context
/save FILE        write the conversation as JSON
/load FILE        read a saved conversation
Alt-Enter, a trailing \\ or a \"\"\" block: multi-line input; Ctrl-C stops a reply";

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
    let template = opts.template.load(g.metadata(), &engine.tok)?;
    let mut session = Session::new(engine, template);
    session.system = a.system.clone();
    session.think = a.think.enable();
    let params = GenParams {
        max_tokens: a.n_predict,
        sampler: a.sampling.config(g.metadata()),
        stop: a.sampling.stop.clone(),
        reasoning: Reasoning::Verbatim,
        think_budget: a.think.think_budget,
        feed_last: true,
    };
    if interactive {
        interactive_loop(&a, &mut session, &params, out)
    } else {
        line_loop(&a, &mut session, &params, out)
    }
}

/// What a line of input asks for.
enum Input<'a> {
    Message(&'a str),
    Exit,
    /// A command was handled; this is what to tell the user.
    Note(String),
}

fn command<'a>(line: &'a str, s: &mut Session) -> Input<'a> {
    let Some(cmd) = line.strip_prefix('/') else {
        return Input::Message(line);
    };
    let (name, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
    let arg = arg.trim();
    let note = |r: Result<String>| Input::Note(r.unwrap_or_else(|e| format!("error: {e:#}")));
    match name {
        "exit" | "quit" => Input::Exit,
        "help" | "?" => Input::Note(HELP.to_string()),
        "reset" => note(s.reset().map(|()| "new conversation".into())),
        "think" => match arg {
            "on" | "off" | "default" => {
                s.set_think(match arg {
                    "on" => Some(true),
                    "off" => Some(false),
                    _ => None,
                });
                Input::Note(format!("thinking {arg}"))
            }
            _ => Input::Note("usage: /think on|off|default".into()),
        },
        "system" => {
            s.set_system((!arg.is_empty()).then(|| arg.to_string()));
            Input::Note(if arg.is_empty() {
                "system prompt cleared".into()
            } else {
                "system prompt set".into()
            })
        }
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

fn line_loop(a: &ChatArgs, s: &mut Session, params: &GenParams, out: &mut dyn Write) -> Result<()> {
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
        match command(text, s) {
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
                let o = reply(s, m, params, &mut on_piece)?;
                writeln!(out)?;
                out.flush()?;
                if !a.model.quiet {
                    eprintln!("[{}]", stats(&o));
                }
            }
        }
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
    params: &GenParams,
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
        .with_validator(Box::new(MultiLine));
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
        match command(&text, s) {
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
                let r = reply(s, m, params, &mut on_piece);
                write!(out, "{}", SetAttribute(Attribute::Reset))?;
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
