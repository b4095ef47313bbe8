//! The command line as people coming from llama.cpp and Ollama type it: llama.cpp's flag
//! spellings, models by name, grammars, and the errors for what has no meaning here.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

/// A tiny qwen3 model (ChatML with Qwen3's thinking switch, `<think>` in the vocabulary).
fn qwen3(dir: &Path) -> PathBuf {
    let p = dir.join("q3.gguf");
    let out = common::ggrun()
        .args(["gen-model", "--preset", "qwen3", "--out"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    p
}

fn ggrun(args: &[&str]) -> Output {
    common::ggrun().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_grammar_shapes_the_answer_and_leaves_the_reasoning_free() {
    let dir = tempfile::tempdir().unwrap();
    let m = qwen3(dir.path());
    let m = m.to_str().unwrap();
    let think = common::stdout_of(common::ggrun().args(["tokenize", "-m", m, "<think>"]));
    let think: Vec<u32> = serde_json::from_str(&think).unwrap();
    // The bias makes the model open a thinking block (Qwen3 writes `<think>` itself), whose
    // three tokens the budget allows are free; the answer then follows the grammar.
    let bias = format!("{}+100", think[0]);
    for grammar in [
        vec!["--grammar", r#"root ::= "yes" | "no""#],
        vec!["-j", r#"{"enum": ["yes", "no"]}"#],
    ] {
        let mut args = vec![
            "run",
            "-m",
            m,
            "-p",
            "hi",
            "--think",
            "on",
            "--think-budget",
            "3",
        ];
        args.extend(["--temp", "0", "--json", "-q", "-l", &bias]);
        args.extend(&grammar);
        let o = ggrun(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["tokens"]["reasoning"], 3, "{v}");
        let text = v["text"].as_str().unwrap();
        assert!(["yes", "no", "\"yes\"", "\"no\""].contains(&text), "{v}");
    }
    // Without thinking the grammar holds from the first token.
    let o = ggrun(&[
        "run",
        "-m",
        m,
        "-p",
        "hi",
        "--think",
        "off",
        "--temp",
        "0",
        "--json",
        "-q",
        "--grammar",
        r#"root ::= [a-c]{3}"#,
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(
        text.len() == 3 && text.chars().all(|c| ('a'..='c').contains(&c)),
        "{v}"
    );
    // What cannot be used: one line, exit 1.
    for bad in [
        vec!["--grammar", "root ::= (\"x\""],
        vec!["-j", "{not json"],
        vec!["-l", "99999999+1"],
        vec!["-l", "12x"],
    ] {
        let mut args = vec!["run", "-m", m, "-p", "hi", "-q"];
        args.extend(&bad);
        let o = ggrun(&args);
        assert_eq!(o.status.code(), Some(1), "{bad:?}: {}", stderr(&o));
        assert_eq!(
            stderr(&o).trim_end().lines().count(),
            1,
            "{bad:?}: {}",
            stderr(&o)
        );
    }
}

/// A usage mistake: exit 1 and one line on stderr that contains `needle`.
fn one_line_error(args: &[&str], needle: &str) {
    let o = ggrun(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    assert!(
        err.starts_with("error: ") && err.contains(needle),
        "{args:?}: {err}"
    );
}

#[test]
fn llama_cpp_flags_are_read_under_their_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let m = qwen3(dir.path());
    let m = m.to_str().unwrap();
    // Its sentinels and no-ops, short and long.
    let o = ggrun(&[
        "run",
        "-m",
        m,
        "-p",
        "hi",
        "-n",
        "-1",
        "--seed",
        "-1",
        "-s",
        "-1",
        "-t",
        "-1",
        "--jinja",
        "-fa",
        "-ctk",
        "f16",
        "--cache-type-v=f16",
        "-sys",
        "Be brief.",
        "-c",
        "128",
        "-ub",
        "32",
        "--no-mmap",
        "--flash-attn",
        "auto",
        "--think",
        "off",
        "-q",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["tokens"]["generated"].as_u64().unwrap() > 0, "{v}");
    // -n -1 and the context: generation runs until the model stops or the context is full.
    assert!(
        ["eos", "context"].contains(&v["stop_reason"].as_str().unwrap()),
        "{v}"
    );
    // -sys is the system prompt: the prompt grew by it.
    let plain = ggrun(&[
        "run", "-m", m, "-p", "hi", "-n", "1", "--think", "off", "-q", "--json",
    ]);
    let plain: Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert!(
        v["tokens"]["prompt"].as_u64() > plain["tokens"]["prompt"].as_u64(),
        "{v} {plain}"
    );
    // Flags with no meaning here, and misspellings: one line naming them, exit 1.
    one_line_error(&["run", "-m", m, "-p", "x", "-ctk", "q5_1"], "q5_1");
    // A block cache needs whole blocks per head (this model's heads are 16 wide).
    one_line_error(
        &["run", "-m", m, "-p", "x", "-ctv", "q8_0"],
        "multiple of 32",
    );
    one_line_error(
        &["run", "-m", m, "-p", "x", "-md", "d.gguf"],
        "-md: speculative decoding",
    );
    one_line_error(&["run", "-m", m, "-p", "x", "-ts", "1,1"], "-ts:");
    one_line_error(&["run", "-m", m, "-p", "x", "-np", "2"], "--parallel");
    one_line_error(&["run", "-m", m, "-p", "x", "-xyz"], "unknown flag -xyz");
    one_line_error(&["run", "-m", m, "--tp", "3"], "--top-p");
    one_line_error(&["run", "-m", m, "-p", "x", "-n", "lots"], "lots");
    one_line_error(&["run", "-p", "x", "-hf"], "-hf needs REPO");
    one_line_error(&["frobnicate"], "frobnicate");
    // A text flag's value may start with a dash.
    let o = ggrun(&["run", "-m", m, "-p", "-fa -xyz", "-n", "1", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // --chat-template takes a name or the template text; a file is --chat-template-file.
    let template = |extra: &[&str]| {
        let mut args = vec!["template", "-m", m];
        args.extend(extra);
        ggrun(&args)
    };
    let o = template(&["--chat-template", "llama3"]);
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .contains("<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"),
        "{}",
        stderr(&o)
    );
    let o = template(&["--chat-template", "{{ messages[0]['content'] }}!"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "Hello!");
    let file = dir.path().join("t.jinja");
    std::fs::write(&file, "[{{ messages[0]['content'] }}]").unwrap();
    let o = template(&["--chat-template-file", file.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "[Hello]");
    one_line_error(
        &["template", "-m", m, "--chat-template", "nosuch"],
        "chatml, llama3, gemma, phi3",
    );
    // Help: grouped as llama-cli's, defaults in words, exit 0.
    let o = ggrun(&["run", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for heading in [
        "Sampling and structured output:",
        "Model, context and threads:",
        "GPU placement:",
    ] {
        assert!(help.contains(heading), "{help}");
    }
    for flag in ["--ctx-size", "--threads", "--batch-size", "--n-cpu-moe"] {
        let line = help.lines().find(|l| l.contains(flag)).unwrap();
        assert!(!line.contains("[default: 0]"), "{line}");
    }
    assert!(help.contains("the physical cores"), "{help}");
}

/// A fake Ollama store (`tiny` and `tiny:1b`) and a fake Hugging Face cache (`org/Tiny-GGUF`
/// with Q8_0 and Q4_K_M files), all holding `model`, under `root`.
fn stores(root: &Path, model: &Path) -> (PathBuf, PathBuf) {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(model).unwrap();
    let hex: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let ollama = root.join("ollama");
    std::fs::create_dir_all(ollama.join("blobs")).unwrap();
    std::fs::write(ollama.join("blobs").join(format!("sha256-{hex}")), &bytes).unwrap();
    let manifest = serde_json::json!({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:00", "size": 1},
        {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{hex}"),
         "size": bytes.len()}]});
    let lib = ollama.join("manifests/registry.ollama.ai/library/tiny");
    std::fs::create_dir_all(&lib).unwrap();
    for tag in ["latest", "1b"] {
        std::fs::write(lib.join(tag), manifest.to_string()).unwrap();
    }
    let hf = root.join("hf");
    let repo = hf.join("models--org--Tiny-GGUF");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for q in ["Q8_0", "Q4_K_M"] {
        std::fs::write(snap.join(format!("Tiny-{q}.gguf")), &bytes).unwrap();
    }
    (ollama, hf)
}

#[test]
fn models_resolve_by_name_from_the_ollama_store_and_the_hugging_face_cache() {
    let dir = tempfile::tempdir().unwrap();
    let m = qwen3(dir.path());
    let (ollama, hf) = stores(dir.path(), &m);
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let with = |args: &[&str]| {
        common::ggrun()
            .args(args)
            .env("OLLAMA_MODELS", &ollama)
            .env("HF_HUB_CACHE", &hf)
            .env("HOME", &home)
            .output()
            .unwrap()
    };
    let answer = |args: &[&str]| {
        let o = with(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["tokens"]["generated"].as_u64().unwrap() > 0, "{v}");
    };
    // Ollama's habits: `run MODEL PROMPT`, names with tags; -m and -hf the same.
    answer(&[
        "run", "tiny", "why", "is", "the", "sky", "blue?", "-n", "2", "-q", "--json",
    ]);
    answer(&[
        "run", "-m", "tiny:1b", "-p", "hi", "-n", "2", "-q", "--json",
    ]);
    answer(&[
        "run",
        "-m",
        "org/Tiny-GGUF:q8_0",
        "-p",
        "hi",
        "-n",
        "2",
        "-q",
        "--json",
    ]);
    answer(&[
        "run",
        "-hf",
        "org/Tiny-GGUF",
        "-p",
        "hi",
        "-n",
        "2",
        "-q",
        "--json",
    ]);
    let o = with(&["info", "-m", "tiny", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = with(&["info", "tiny:1b"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("qwen3"),
        "{}",
        stderr(&o)
    );
    // What is not there: one line naming close matches and saying nothing is downloaded.
    let o = with(&["run", "-m", "tinny", "-p", "hi"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("close matches: tiny:1b, tiny:latest") && err.contains("does not download"),
        "{err}"
    );
    let o = with(&["run", "-hf", "org/Tiny-GGUF:Q5_0", "-p", "hi"]);
    let err = stderr(&o);
    assert!(
        err.contains("no such quantization") && err.contains("Q4_K_M, Q8_0"),
        "{err}"
    );
    let o = with(&["info", "-m", "nothing-like-it"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no model nothing-like-it"),
        "{}",
        stderr(&o)
    );
    // A directory or an empty file as the model: plain words.
    let o = with(&["run", "-m", dir.path().to_str().unwrap(), "-p", "hi"]);
    assert!(
        stderr(&o).contains("a directory, not a GGUF file"),
        "{}",
        stderr(&o)
    );
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let o = with(&["run", "-m", empty.to_str().unwrap(), "-p", "hi"]);
    assert!(stderr(&o).contains("empty (0 bytes)"), "{}", stderr(&o));
    // ls: every name, its size, and how it fits a budget.
    let size = std::fs::metadata(&m).unwrap().len();
    for (budget, fits) in [("1GiB", "fits"), ("64KiB", "too large")] {
        let o = with(&["ls", "--gpu-mem", budget, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let rows: Vec<Value> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "org/Tiny-GGUF:Q4_K_M",
                "org/Tiny-GGUF:Q8_0",
                "tiny:1b",
                "tiny:latest"
            ]
        );
        assert!(
            rows.iter().all(|r| r["bytes"] == size && r["gpu"] == fits),
            "{rows:?}"
        );
    }
    let o = with(&["ls"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("NAME") && text.contains("tiny:latest"),
        "{text}"
    );
}

/// `model` with its chat template's key renamed: a base model as the file would have it.
fn without_template(model: &Path) -> PathBuf {
    let mut bytes = std::fs::read(model).unwrap();
    let key = b"tokenizer.chat_template";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at + key.len() - 1] = b'X';
    let out = model.with_file_name("base.gguf");
    std::fs::write(&out, bytes).unwrap();
    out
}

#[test]
fn a_model_without_a_chat_template_completes_raw_text() {
    let dir = tempfile::tempdir().unwrap();
    let m = without_template(&qwen3(dir.path()));
    let m = m.to_str().unwrap();
    let prompt = "Once upon a time";
    let ids = common::stdout_of(common::ggrun().args(["tokenize", "-m", m, prompt]));
    let ids: Vec<u32> = serde_json::from_str(&ids).unwrap();
    let o = ggrun(&["run", "-m", m, "-p", prompt, "-n", "3", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert_eq!(err.matches("no chat template").count(), 1, "{err}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tokens"]["prompt"], ids.len(), "{v}");
    // A template given by name: no warning, the prompt in its markers.
    let o = ggrun(&[
        "run",
        "-m",
        m,
        "-p",
        prompt,
        "-n",
        "3",
        "--json",
        "--chat-template",
        "chatml",
    ]);
    assert!(!stderr(&o).contains("no chat template"), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["tokens"]["prompt"].as_u64().unwrap() > ids.len() as u64 + 3,
        "{v}"
    );
    // chat: warned once, and it goes on.
    let o = chat_lines(&["-m", m, "-n", "3"], "Hello\nAgain\n");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stderr(&o).matches("no chat template").count(),
        1,
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).matches("tok/s").count(), 2, "{}", stderr(&o));
}

/// `ggrun chat` in line mode with `input` on stdin.
fn chat_lines(args: &[&str], input: &str) -> Output {
    common::output_with_stdin(common::ggrun().arg("chat").args(args), input.as_bytes())
}

#[test]
fn a_full_context_drops_the_oldest_turns_and_the_chat_goes_on() {
    let m = common::smollm2();
    let m = m.to_str().unwrap();
    let talk = "Write a long story about a dragon.\nWrite a long story about a knight.\nName three rivers.\n";
    let o = chat_lines(&["-m", m, "-c", "256", "--temp", "0"], talk);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("tok/s").count(), 3, "{err}");
    assert!(
        err.contains("[the context was full: dropped the oldest turn]"),
        "{err}"
    );
    // The policy that fails instead: the turn is an error, the chat goes on, exit 1.
    let o = chat_lines(
        &["-m", m, "-c", "256", "--temp", "0", "--ctx-policy", "error"],
        talk,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the context holds 256"), "{err}");
    assert!(err.contains("turn(s) failed"), "{err}");
    // Ollama's commands beside ours.
    let o = chat_lines(
        &["-m", m, "-n", "4", "--temp", "0"],
        "/set parameter temperature 0.25\n/set parameter num_predict 3\n/show parameters\n\
         /set system Be brief.\n/show system\n/set nothink\n/show info\nHi\n/clear\n/bye\nnever read\n",
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    for want in [
        "temperature 0.25",
        "num_predict 3",
        "Be brief.",
        "thinking off",
        "context",
        "new conversation",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(
        err.contains("3 tokens"),
        "num_predict was not applied: {err}"
    );
    assert_eq!(err.matches("tok/s").count(), 1, "/bye did not leave: {err}");
}

/// In a terminal (tmux): a paste of several lines is one message, and a full context drops
/// the oldest turns with a line saying so, the chat going on.
#[test]
fn in_a_terminal_a_paste_is_one_turn_and_a_full_context_goes_on() {
    use std::process::Command;
    use std::time::{Duration, Instant};
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(args)
            .output()
            .expect("tmux is needed for this test (apt install tmux)")
    };
    let session = format!("ggrun-habits-{}", std::process::id());
    let cmd = format!(
        "{} chat --temp 0 -c 256 -m {}; echo EXIT=$?; sleep 60",
        env!("CARGO_BIN_EXE_ggrun"),
        common::smollm2().display()
    );
    let o = tmux(&[
        "new-session",
        "-d",
        "-s",
        &session,
        "-x",
        "150",
        "-y",
        "50",
        &cmd,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let screen = || {
        let o = tmux(&["capture-pane", "-p", "-J", "-S", "-400", "-t", &session]);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let wait_for = |what: &dyn Fn(&str) -> bool, why: &str| {
        let start = Instant::now();
        loop {
            let s = screen();
            if what(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out waiting for {why}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(&|s| s.contains("/help for commands"), "the banner");
    // Three lines pasted (tmux pastes in brackets when the program asks for them), then Enter.
    tmux(&[
        "set-buffer",
        "-b",
        "p",
        "First line of the paste.\nSecond line.\nThird line: write a long story about a dragon.",
    ]);
    tmux(&["paste-buffer", "-p", "-b", "p", "-t", &session]);
    std::thread::sleep(Duration::from_millis(300));
    tmux(&["send-keys", "-t", &session, "Enter"]);
    let s = wait_for(&|s| s.contains("tok/s"), "the reply to the paste");
    assert_eq!(
        s.matches("tok/s").count(),
        1,
        "the paste became several turns:\n{s}"
    );
    tmux(&[
        "send-keys",
        "-t",
        &session,
        "Write a long story about a knight.",
        "Enter",
    ]);
    let s = wait_for(&|s| s.matches("tok/s").count() == 2, "the second reply");
    assert!(
        s.contains("the context was full: dropped the oldest turn"),
        "{s}"
    );
    tmux(&["send-keys", "-t", &session, "/bye", "Enter"]);
    let s = wait_for(&|s| s.contains("EXIT="), "the exit");
    assert!(s.contains("EXIT=0"), "{s}");
    tmux(&["kill-session", "-t", &session]);
}
