//! Renders a chat template in a child process of this program (`ggrun render-template`, a
//! hidden command), so that a hostile template (they come inside model files) cannot take the
//! process down with it. In the child the template runs under the instruction fuel and output
//! limits it has in-process, and under a memory limit the OS enforces (RLIMIT_AS, on Linux): a
//! template that grows a string without end fails an allocation there, which ends the child,
//! not us. The parent waits at most [`DEADLINE`] and turns every way the child can end into one
//! line naming the limit that was hit.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use super::template::{render_limited, size_text, Limits};

/// The longest a render may take, whatever else stops it first.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The name of the hidden command the child runs.
pub const COMMAND: &str = "render-template";

/// What the child is given on stdin.
#[derive(Serialize, Deserialize)]
struct Job {
    source: String,
    origin: String,
    context: serde_json::Value,
    fuel: u64,
    max_output: u64,
    max_memory: u64,
}

/// This program, to run again as the child.
fn this_program() -> std::path::PathBuf {
    // /proc/self/exe runs even when the file was replaced or deleted since we started.
    let proc_exe = std::path::PathBuf::from("/proc/self/exe");
    if proc_exe.exists() {
        proc_exe
    } else {
        std::env::current_exe().unwrap_or(proc_exe)
    }
}

/// Renders `source` with `context` in a child process under `limits`.
pub fn render(
    source: &str,
    origin: &str,
    context: &serde_json::Value,
    limits: &Limits,
) -> Result<String> {
    let job = serde_json::to_vec(&Job {
        source: source.to_string(),
        origin: origin.to_string(),
        context: context.clone(),
        fuel: limits.fuel,
        max_output: limits.max_output,
        max_memory: limits.max_memory,
    })?;
    let mut command = Command::new(this_program());
    command
        .arg(COMMAND)
        // mimalloc reserves 1 GiB of address space up front unless told not to; the limit is
        // set on top of what the child has mapped when it starts.
        .env("MIMALLOC_ARENA_RESERVE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A process group of its own: Ctrl-C in the terminal signals the whole foreground group,
    // and it is ours to handle (chat stops the turn), not a reason for the render to die.
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .map_err(|e| anyhow!("{origin}: cannot start the template renderer: {e}"))?;
    // Feed and drain on threads of their own so that neither side blocks on a full pipe.
    let mut stdin = child.stdin.take().expect("piped");
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&job);
    });
    let mut stdout = child.stdout.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let mut stderr = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = feeder.join();
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let Some(status) = status else {
        bail!(
            "{origin}: the template ran longer than {} s",
            DEADLINE.as_secs()
        );
    };
    if status.success() {
        return String::from_utf8(out)
            .map_err(|_| anyhow!("{origin}: the template's output is not UTF-8"));
    }
    if status.code() == Some(1) {
        if let Some(line) = err.lines().find_map(|l| l.strip_prefix("error: ")) {
            bail!("{line}");
        }
    }
    if err.contains("memory allocation") {
        bail!(
            "{origin}: the template needed more than {} of memory (--template-max-memory)",
            size_text(limits.max_memory)
        );
    }
    bail!("{origin}: the template renderer failed ({status})")
}

/// The child's side: reads a `Job` on stdin, limits its own memory, renders, and writes the
/// prompt on stdout (or one line on stderr and exit status 1).
pub fn serve_child() -> Result<()> {
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input)?;
    let job: Job = serde_json::from_slice(&input)?;
    drop(input);
    limit_memory(job.max_memory);
    let limits = Limits {
        fuel: job.fuel,
        max_output: job.max_output,
        max_memory: job.max_memory,
        isolate: false,
    };
    let text = render_limited(&job.source, &job.origin, job.context, &limits)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Caps this process's address space at what it uses now plus `bytes` (Linux; elsewhere the
/// fuel, output and time limits remain).
fn limit_memory(bytes: u64) {
    #[cfg(target_os = "linux")]
    {
        let used_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmSize:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        let cap = (used_kib * 1024).saturating_add(bytes);
        let lim = libc::rlimit {
            rlim_cur: cap as libc::rlim_t,
            rlim_max: cap as libc::rlim_t,
        };
        // SAFETY: setrlimit reads the struct we pass and changes only this process's limit;
        // failure leaves the limit as it was (the other limits still hold).
        unsafe {
            libc::setrlimit(libc::RLIMIT_AS, &lim);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}
