//! `ggrun tune`'s flags, turned into the tuner's options ([`crate::tune::Options`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::backend::placement::parse_size;

#[derive(Args, Debug, Clone)]
pub struct TuneArgs {
    /// The model: a .gguf file, or a name in Ollama's store or the Hugging Face cache.
    #[arg(short = 'm', long = "model", value_name = "FILE|NAME", value_parser = super::common::model_path)]
    pub model: PathBuf,
    /// VRAM budget (e.g. 24GiB; default: what the GPU has free).
    #[arg(long = "gpu-mem", value_parser = size)]
    pub gpu_mem: Option<u64>,
    /// Context the plans must hold (default: the model's, at most 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: usize,
    /// Time limit for the measurements (e.g. 2m, 90s).
    #[arg(long, default_value = "2m", value_parser = duration)]
    pub time: Duration,
    /// A text file whose tokens are the calibration prompt (default: a built-in text).
    #[arg(long, value_name = "FILE")]
    pub calib: Option<PathBuf>,
    /// Prompt tokens of each pp measurement (batch sizes up to this many are tried).
    #[arg(long = "n-prompt", default_value_t = 1024)]
    pub n_prompt: usize,
    /// Tokens of each tg measurement.
    #[arg(long = "n-gen", default_value_t = 32)]
    pub n_gen: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measure without saving the profile.
    #[arg(long = "no-save")]
    pub no_save: bool,
}

impl TuneArgs {
    /// The tuner's options.
    pub fn options(&self) -> crate::tune::Options {
        crate::tune::Options {
            model: self.model.clone(),
            gpu_mem: self.gpu_mem,
            ctx_size: self.ctx_size,
            time: self.time,
            calib: self.calib.clone(),
            n_prompt: self.n_prompt,
            n_gen: self.n_gen,
            json: self.json,
            no_save: self.no_save,
        }
    }
}

fn size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// "2m", "90s", "1m30s", "45" (seconds).
fn duration(s: &str) -> Result<Duration, String> {
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
        num.clear();
        total += match c {
            'h' => n * 3600,
            'm' => n * 60,
            's' => n,
            _ => return Err(format!("bad duration {s:?} (use s, m or h)")),
        };
    }
    if !num.is_empty() {
        total += num
            .parse::<u64>()
            .map_err(|_| format!("bad duration {s:?}"))?;
    }
    if total == 0 {
        return Err("the time limit must be positive".into());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(duration("45").unwrap(), Duration::from_secs(45));
        assert!(duration("0s").is_err() && duration("3x").is_err());
    }
}
