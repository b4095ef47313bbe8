//! llama.cpp's spellings of our flags, rewritten before clap reads the command line: its
//! multi-letter short flags (`-ngl`, `-ctk`, `-np`, `-sys`, ...), which clap would read as a
//! cluster of one-letter flags and misparse, its sentinel values (`-n -1`, `--seed -1`) and its
//! flags that change nothing here (`--jinja`, `-fa`, `--no-mmap`). A llama.cpp flag that has no
//! meaning here is a one-line error naming it, and so is any other multi-letter short flag.

use std::ffi::OsString;

/// llama.cpp's multi-letter short flags that mean one of ours: (theirs, ours).
const SHORT: [(&str, &str); 13] = [
    ("-ngl", "--n-gpu-layers"),
    ("-ncmoe", "--n-cpu-moe"),
    ("-ctk", "--cache-type-k"),
    ("-ctv", "--cache-type-v"),
    ("-np", "--parallel"),
    ("-sys", "--system"),
    ("-hf", "--hf-repo"),
    ("-hfr", "--hf-repo"),
    ("-jf", "--json-schema-file"),
    ("-fa", "--flash-attn"),
    ("-cmoe", "--cpu-moe"),
    ("-ub", "--ubatch-size"),
    ("-cnv", "--conversation"),
];

/// llama.cpp flags with no meaning in ggrun (theirs, why).
const UNSUPPORTED: [(&str, &str); 14] = [
    ("-md", "speculative decoding is not supported"),
    ("--model-draft", "speculative decoding is not supported"),
    ("-ts", "ggrun uses one GPU (--gpu-mem sets its budget)"),
    (
        "--tensor-split",
        "ggrun uses one GPU (--gpu-mem sets its budget)",
    ),
    ("-sm", "ggrun uses one GPU (--gpu-mem sets its budget)"),
    (
        "--split-mode",
        "ggrun uses one GPU (--gpu-mem sets its budget)",
    ),
    ("-mg", "ggrun uses one GPU (--gpu-mem sets its budget)"),
    (
        "--main-gpu",
        "ggrun uses one GPU (--gpu-mem sets its budget)",
    ),
    (
        "-ot",
        "not supported; place experts with --n-cpu-moe, --experts-in-ram or --gpu-mem",
    ),
    (
        "--override-tensor",
        "not supported; place experts with --n-cpu-moe, --experts-in-ram or --gpu-mem",
    ),
    (
        "-no-cnv",
        "`ggrun run` answers one prompt; `ggrun chat` converses",
    ),
    (
        "--no-conversation",
        "`ggrun run` answers one prompt; `ggrun chat` converses",
    ),
    ("--lora", "LoRA adapters are not supported"),
    ("--mmproj", "images and audio are not supported"),
];

/// Flags that change nothing here, dropped (with their value when they take one): ggrun
/// always renders templates with Jinja, chooses its attention kernels, maps the file (and
/// keeps its own copies resident), and warms up as it loads.
const NO_OPS: [&str; 7] = [
    "--jinja",
    "--no-mmap",
    "--mlock",
    "--no-warmup",
    "--conversation",
    "--flash-attn",
    "--cont-batching",
];

/// Flags whose next argument is free text (a prompt may start with a dash).
const TEXT_FLAGS: [&str; 13] = [
    "-p",
    "--prompt",
    "--system",
    "-sys",
    "--system-prompt",
    "-r",
    "--reverse-prompt",
    "--stop",
    "--grammar",
    "-j",
    "--json-schema",
    "--chat-template",
    "--api-key",
];

/// `args` (the program name first) in our spellings, or the one-line error for a flag we do
/// not take.
pub fn rewrite(args: impl IntoIterator<Item = OsString>) -> Result<Vec<OsString>, String> {
    let args: Vec<OsString> = args.into_iter().collect();
    let mut out: Vec<OsString> = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_string_lossy().into_owned();
        let next = args.get(i + 1).map(|n| n.to_string_lossy().into_owned());
        i += 1;
        if i == 1 || a == "--" {
            let end = a == "--";
            out.push(a.into());
            if end {
                out.extend(args[i..].iter().cloned());
                break;
            }
            continue;
        }
        // `--flag=value` is looked up by its flag.
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with('-') => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(f, _)| *f == flag) {
            return Err(format!("{flag}: {why}"));
        }
        let typed = flag.clone();
        let flag = SHORT
            .iter()
            .find(|(theirs, _)| *theirs == flag)
            .map_or(flag, |(_, ours)| ours.to_string());
        let value = inline.clone().or(next.clone());
        let takes_next = inline.is_none();
        match flag.as_str() {
            // Boolean in old llama.cpp, on|off|auto in new.
            "--flash-attn" => {
                if takes_next
                    && value.as_deref().is_some_and(|v| {
                        ["on", "off", "auto", "1", "0", "true", "false"].contains(&v)
                    })
                {
                    i += 1;
                }
                continue;
            }
            f if NO_OPS.contains(&f) => continue,
            "--cpu-moe" => {
                // Every layer's routed experts in RAM.
                out.push("--n-cpu-moe".into());
                out.push(u32::MAX.to_string().into());
                continue;
            }
            // llama.cpp's sentinels: -1 = no limit, a random seed, every core.
            "-n" | "--n-predict" if matches!(value.as_deref(), Some("-1" | "-2")) => {
                i += usize::from(takes_next);
                continue;
            }
            "-s" | "--seed" | "-t" | "--threads" if value.as_deref() == Some("-1") => {
                i += usize::from(takes_next);
                continue;
            }
            "--hf-repo" => {
                // A Hugging Face repository is a model name (resolved in the local cache).
                let v = value.ok_or(format!("{typed} needs REPO[:QUANT]"))?;
                out.push("--model".into());
                out.push(format!("hf.co/{}", v.trim_start_matches("hf.co/")).into());
                i += usize::from(takes_next);
                continue;
            }
            "--system-prompt" => {
                out.push("--system".into());
                continue;
            }
            _ => {}
        }
        if is_clustered(&flag) {
            return Err(format!(
                "unknown flag {flag} (ggrun's short flags are one letter; see --help)"
            ));
        }
        match &inline {
            Some(v) => out.push(format!("{flag}={v}").into()),
            None => out.push(flag.clone().into()),
        }
        // Free text after a text flag is never read as a flag.
        if TEXT_FLAGS.contains(&flag.as_str()) && inline.is_none() {
            if let Some(v) = args.get(i) {
                out.push(v.clone());
                i += 1;
            }
        }
    }
    Ok(out)
}

/// `-abc`: what clap would split into `-a -b -c`; ggrun defines no such cluster.
fn is_clustered(a: &str) -> bool {
    let Some(rest) = a.strip_prefix('-') else {
        return false;
    };
    rest.len() >= 2
        && !rest.starts_with('-')
        && rest.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(s: &str) -> Result<String, String> {
        let args = std::iter::once("ggrun")
            .chain(s.split(' '))
            .map(OsString::from);
        rewrite(args).map(|v| {
            v[1..]
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
    }

    #[test]
    fn llama_cpp_spellings_become_ours() {
        assert_eq!(
            rw("run -ngl 99 -m x").unwrap(),
            "run --n-gpu-layers 99 -m x"
        );
        assert_eq!(
            rw("serve -np 2 -ncmoe 4").unwrap(),
            "serve --parallel 2 --n-cpu-moe 4"
        );
        assert_eq!(rw("run -sys hi -p -fa").unwrap(), "run --system hi -p -fa");
        assert_eq!(rw("run -n -1 -s -1 --seed=-1 -t -1").unwrap(), "run");
        assert_eq!(rw("run -n -2 -n 5").unwrap(), "run -n 5");
        assert_eq!(
            rw("run --jinja -fa -ctk q8_0 -ctv=q4_0 --no-mmap").unwrap(),
            "run --cache-type-k q8_0 --cache-type-v=q4_0"
        );
        assert_eq!(rw("run -fa on -p x").unwrap(), "run -p x");
        assert_eq!(
            rw("run -hf org/repo:Q4_K_M").unwrap(),
            "run --model hf.co/org/repo:Q4_K_M"
        );
        assert_eq!(
            rw("run -jf s.json").unwrap(),
            "run --json-schema-file s.json"
        );
        assert_eq!(
            rw("run -cmoe").unwrap(),
            format!("run --n-cpu-moe {}", u32::MAX)
        );
        assert_eq!(rw("run -- -xyz").unwrap(), "run -- -xyz");
    }

    #[test]
    fn flags_without_a_meaning_here_are_named() {
        assert!(rw("run -md d.gguf")
            .unwrap_err()
            .starts_with("-md: speculative"));
        assert!(rw("run -ts 1,1").unwrap_err().starts_with("-ts:"));
        assert!(rw("run -xyz 3")
            .unwrap_err()
            .starts_with("unknown flag -xyz"));
        assert!(rw("run --tensor-split=1,1")
            .unwrap_err()
            .starts_with("--tensor-split:"));
    }
}
