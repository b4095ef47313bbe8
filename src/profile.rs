//! Tuned profiles: the settings `ggrun tune` measured best for one model file on one GPU (or on
//! the CPU), saved as TOML in the cache directory, one file per model file with one entry per
//! device. `run`, `chat` and `bench` apply the entry for the device they find to whatever their
//! command line leaves open (`--no-profile` ignores it).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::cuda::{cache_dir, fnv1a, Gpu};
use crate::backend::placement::PlacementArgs;

/// The device name of entries tuned without a GPU.
pub const CPU: &str = "cpu";

/// One tuned setting: what `tune` chose and what it measured.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Profile {
    /// The GPU's name as the driver reports it, or [`CPU`].
    pub device: String,
    /// The VRAM budget it was tuned for (bytes; none on the CPU).
    pub gpu_mem: Option<u64>,
    /// The context it was tuned for: the plan reserves its state.
    pub ctx_size: usize,
    pub threads: usize,
    pub batch_size: usize,
    /// Layers whose routed experts stay in RAM (GPU plans; empty when all fit).
    pub experts_in_ram: Option<Vec<usize>>,
    pub staging_buffers: Option<usize>,
    /// Bytes of its hot-expert cache (GPU plans; older profiles have none).
    #[serde(default)]
    pub expert_cache: Option<u64>,
    /// The winner's row of the tuning table: its label and measured speeds.
    pub plan: String,
    pub pp_tok_s: f64,
    pub tg_tok_s: f64,
    /// When it was tuned (seconds since the Unix epoch).
    pub tuned_at: u64,
}

impl Profile {
    /// The manual flags that give this setting.
    pub fn flags(&self) -> String {
        let mut f = format!(
            "-c {} -t {} -b {}",
            self.ctx_size, self.threads, self.batch_size
        );
        if let Some(ram) = &self.experts_in_ram {
            f += " -ngl 999";
            if !ram.is_empty() {
                let list: Vec<String> = ram.iter().map(|l| l.to_string()).collect();
                f += &format!(" --experts-in-ram {}", list.join(","));
            }
            if let Some(s) = self.staging_buffers {
                f += &format!(" --staging-buffers {s}");
            }
            if let Some(c) = self.expert_cache {
                f += &format!(" --expert-cache {c}");
            }
        }
        f
    }

    fn on_gpu(&self) -> bool {
        self.device != CPU
    }
}

#[derive(Serialize, Deserialize, Default)]
struct File {
    /// The model file the entries were tuned on, and its size when they were.
    model: String,
    model_bytes: u64,
    #[serde(default)]
    profile: Vec<Profile>,
}

/// Where the profiles of `model` live: one file per model file, named by its stem and a hash of
/// its absolute path and size (a re-downloaded or re-quantized file of another size starts
/// afresh).
pub fn path_for(model: &Path) -> Result<PathBuf> {
    let abs = std::fs::canonicalize(model).with_context(|| model.display().to_string())?;
    let bytes = std::fs::metadata(&abs)?.len();
    let stem = abs
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = fnv1a(abs.to_string_lossy().as_bytes()) ^ bytes.rotate_left(17);
    Ok(cache_dir()
        .join("profiles")
        .join(format!("{stem}-{key:016x}.toml")))
}

fn read(path: &Path) -> Result<Option<File>> {
    match std::fs::read_to_string(path) {
        Ok(s) => toml::from_str(&s)
            .map(Some)
            .map_err(|e| anyhow!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!("{}: {e}", path.display())),
    }
}

/// Saves `p` as the entry of its device for `model` (replacing an earlier one); returns the path.
pub fn save(model: &Path, p: &Profile) -> Result<PathBuf> {
    let path = path_for(model)?;
    let abs = std::fs::canonicalize(model)?;
    let bytes = std::fs::metadata(&abs)?.len();
    let mut f = read(&path).ok().flatten().unwrap_or_default();
    if f.model_bytes != bytes {
        f.profile.clear();
    }
    f.model = abs.display().to_string();
    f.model_bytes = bytes;
    f.profile.retain(|q| q.device != p.device);
    f.profile.push(p.clone());
    let dir = path.parent().expect("profiles live in a directory");
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let text = toml::to_string_pretty(&f).map_err(|e| anyhow!("writing the profile: {e}"))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, &path).with_context(|| path.display().to_string())?;
    Ok(path)
}

/// The entry of `model` for the device this machine would run it on: a GPU entry when one
/// matches the GPU present, else the CPU entry; None when there is none (or the file changed
/// size since). A GPU is opened only when the file has a GPU entry.
pub fn find(model: &Path) -> Result<Option<(Profile, PathBuf)>> {
    let path = path_for(model)?;
    let Some(f) = read(&path)? else {
        return Ok(None);
    };
    if f.model_bytes != std::fs::metadata(model)?.len() {
        return Ok(None);
    }
    let gpu_name = if f.profile.iter().any(Profile::on_gpu) {
        Gpu::open(0).ok().map(|g| g.name)
    } else {
        None
    };
    let pick = f
        .profile
        .iter()
        .find(|p| Some(&p.device) == gpu_name.as_ref())
        .or_else(|| f.profile.iter().find(|p| !p.on_gpu()));
    Ok(pick.map(|p| (p.clone(), path)))
}

/// What a command line left open, for [`apply`] to fill.
pub struct Open<'a> {
    pub ctx_size: &'a mut usize,
    pub threads: &'a mut usize,
    pub batch_size: &'a mut usize,
    pub place: &'a mut PlacementArgs,
}

/// Fills the settings `o` leaves at their defaults (0, or no placement flag at all) from the
/// profile of `model`, unless `no_profile`; says which file on stderr unless `quiet`.
pub fn apply(model: &Path, o: Open, no_profile: bool, quiet: bool) -> Result<Option<PathBuf>> {
    if no_profile {
        return Ok(None);
    }
    // A missing model is for the command to report; a damaged profile must not stop a run.
    if !model.exists() {
        return Ok(None);
    }
    let (p, path) = match find(model) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(None),
        Err(e) => {
            if !quiet {
                eprintln!("warning: the tuned profile is ignored: {e:#}");
            }
            return Ok(None);
        }
    };
    if *o.ctx_size == 0 {
        *o.ctx_size = p.ctx_size;
    }
    if *o.threads == 0 {
        *o.threads = p.threads;
    }
    if *o.batch_size == 0 {
        *o.batch_size = p.batch_size;
    }
    let placed = o.place.n_gpu_layers.is_some()
        || o.place.n_cpu_moe > 0
        || o.place.gpu_mem.is_some()
        || o.place.experts_in_ram.is_some()
        || o.place.staging_buffers.is_some()
        || o.place.expert_cache.is_some();
    if p.on_gpu() && !placed {
        o.place.n_gpu_layers = Some(999);
        o.place.experts_in_ram = Some(p.experts_in_ram.clone().unwrap_or_default());
        o.place.staging_buffers = p.staging_buffers;
        o.place.expert_cache = p.expert_cache;
    }
    if !quiet {
        eprintln!(
            "profile {} ({}: {}; --no-profile ignores it)",
            path.display(),
            p.device,
            p.flags()
        );
    }
    Ok(Some(path))
}
