//! The command line: clap definitions and one function per subcommand. Results go to stdout,
//! diagnostics to stderr; every failure is one line and a non-zero exit.

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::gguf::Model;
use crate::info::ModelInfo;

#[derive(Parser, Debug)]
#[command(
    name = "ggrun",
    version,
    about = "GGUF-native LLM runner for sparse MoE and hybrid models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a GGUF model: architecture, size, tensor types, tokenizer, memory needs.
    Info {
        /// The .gguf file (any part of a split model opens the whole set).
        model: PathBuf,
        /// Print one JSON object instead of the text report.
        #[arg(long)]
        json: bool,
    },
    /// Print the SIMD tier in use and the tiers this CPU supports.
    Cpu,
}

/// Runs a parsed command, writing results to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    match cli.command {
        Command::Info { model, json } => {
            let m = Model::open(&model)?;
            let info = ModelInfo::from_model(&m)?;
            if json {
                writeln!(out, "{}", info.to_json())?;
            } else {
                write!(out, "{}", info.to_text())?;
            }
        }
        Command::Cpu => {
            let sel = ggrun_quants::isa::selection();
            let tiers: Vec<_> = ggrun_quants::Isa::available()
                .iter()
                .map(|i| i.name())
                .collect();
            writeln!(
                out,
                "active: {}\navailable: {}",
                sel.active.name(),
                tiers.join(" ")
            )?;
        }
    }
    out.flush()?;
    Ok(())
}
