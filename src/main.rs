//! The `ggrun` binary: parse the command line, run it, turn any error into one line on stderr and
//! exit status 1. A closed stdout (`ggrun ... | head -1`) ends the program quietly (status 0);
//! Ctrl-C ends it with status 130.

/// mimalloc keeps freed pages for reuse: the forward pass's large temporaries (tens of MB in
/// prefill) would otherwise be fresh mmap'd, page-faulted and zeroed memory on every call.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use ggrun::cli::{is_closed_pipe, run, Exit};

fn main() {
    let cli = match ggrun::cli::parse(std::env::args_os()) {
        Ok(c) => c,
        Err(Exit::Print(text)) => {
            print!("{text}");
            return;
        }
        Err(Exit::Usage(line)) => {
            let mut lines = line.lines();
            eprintln!("error: {}", lines.next().unwrap_or_default());
            // A missing command also shows the help.
            for l in lines {
                eprintln!("{l}");
            }
            std::process::exit(1);
        }
    };
    if let Some(w) = &ggrun_quants::isa::selection().warning {
        eprintln!("warning: {w}");
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if let Err(e) = run(cli, &mut out) {
        if is_closed_pipe(&e) {
            std::process::exit(0);
        }
        if e.downcast_ref::<ggrun::engine::load::Interrupted>()
            .is_some()
        {
            eprintln!("interrupted");
            std::process::exit(130);
        }
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
