//! Models by name, found where other runners keep them: a path; an Ollama model (`name[:tag]`,
//! `user/name[:tag]`, `hf.co/org/repo[:quant]`) in Ollama's store (`$OLLAMA_MODELS`, else
//! `~/.ollama/models`: manifests naming blobs); a Hugging Face repository (`org/repo[:quant]`)
//! in the Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`). Nothing is downloaded: a name found nowhere is an error that
//! lists close matches and says how to fetch it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// A model the stores hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Found {
    /// The name that resolves to it.
    pub name: String,
    /// Its file (the first part of a split model).
    pub path: PathBuf,
    /// Bytes on disk (every part).
    pub bytes: u64,
    /// "ollama" or "huggingface".
    pub store: &'static str,
}

/// Ollama's model store.
pub fn ollama_dir() -> Option<PathBuf> {
    match std::env::var_os("OLLAMA_MODELS") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => home().map(|h| h.join(".ollama/models")),
    }
}

/// The Hugging Face hub cache.
pub fn hf_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("hub"));
    }
    home().map(|h| h.join(".cache/huggingface/hub"))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// The file `name` means: itself when it exists, else the model of that name in Ollama's
/// store or the Hugging Face cache.
pub fn resolve(name: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    if p.exists() || name.ends_with(".gguf") {
        // A missing .gguf path, a directory or an empty file: the reader says which.
        return Ok(p.to_path_buf());
    }
    let bare = name.strip_prefix("hf.co/").unwrap_or(name);
    let is_repo = bare.split(':').next().unwrap_or("").split('/').count() == 2;
    if is_repo {
        if let Some(path) = hf_lookup(bare)? {
            return Ok(path);
        }
    }
    if let Some(path) = ollama_lookup(name)? {
        return Ok(path);
    }
    let close = close_matches(name, &list());
    let matches = if close.is_empty() {
        String::new()
    } else {
        format!("; close matches: {}", close.join(", "))
    };
    let places = [
        ollama_dir().map(|d| format!("Ollama's store ({})", d.display())),
        hf_dir().map(|d| format!("the Hugging Face cache ({})", d.display())),
    ];
    let places: Vec<String> = places.into_iter().flatten().collect();
    bail!(
        "no model {name}: not a file, and not in {}{matches} (ggrun does not download models: \
         `ollama pull NAME` or `huggingface-cli download REPO` fetch them)",
        places.join(" or ")
    )
}

/// Every model the two stores hold, by name.
pub fn list() -> Vec<Found> {
    let mut out = ollama_list();
    out.extend(hf_list());
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

// ---- Ollama ----

const OLLAMA_REGISTRY: &str = "registry.ollama.ai";

/// `name[:tag]` as the manifest path's parts (host, namespace, model, tag).
fn ollama_parts(name: &str) -> Option<[String; 4]> {
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, t),
        _ => (name, "latest"),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let [host, ns, model] = match parts.as_slice() {
        [m] => [OLLAMA_REGISTRY, "library", m],
        [ns, m] => [OLLAMA_REGISTRY, ns, m],
        [h, ns, m] => [*h, *ns, *m],
        _ => return None,
    };
    let ok = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('\\');
    [host, ns, model, tag]
        .iter()
        .all(|s| ok(s))
        .then(|| [host, ns, model, tag].map(str::to_string))
}

/// The model blob a manifest names, and its size.
fn ollama_blob(store: &Path, manifest: &Path) -> Option<(PathBuf, u64)> {
    let text = std::fs::read_to_string(manifest).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let layer = v["layers"]
        .as_array()?
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.ollama.image.model")?;
    let digest = layer["digest"].as_str()?;
    let hex = digest.strip_prefix("sha256:")?;
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let blob = store.join("blobs").join(format!("sha256-{hex}"));
    let bytes = std::fs::metadata(&blob).ok()?.len();
    Some((blob, bytes))
}

fn ollama_lookup(name: &str) -> Result<Option<PathBuf>> {
    let (Some(store), Some(parts)) = (ollama_dir(), ollama_parts(name)) else {
        return Ok(None);
    };
    let manifest = parts
        .iter()
        .fold(store.join("manifests"), |p, part| p.join(part));
    if !manifest.is_file() {
        return Ok(None);
    }
    match ollama_blob(&store, &manifest) {
        Some((blob, _)) => Ok(Some(blob)),
        None => bail!(
            "{name}: Ollama's manifest {} names no model blob that is present",
            manifest.display()
        ),
    }
}

fn ollama_list() -> Vec<Found> {
    let Some(store) = ollama_dir() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let file_name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    for host in dirs(&store.join("manifests")) {
        for ns in dirs(&host) {
            for model in dirs(&ns) {
                for tag in dirs(&model) {
                    let Some((path, bytes)) = ollama_blob(&store, &tag) else {
                        continue;
                    };
                    let [h, n, m, t] =
                        [&host, &ns, &model, &tag].map(|p| file_name(p).unwrap_or_default());
                    let name = match (h.as_str(), n.as_str()) {
                        (OLLAMA_REGISTRY, "library") => format!("{m}:{t}"),
                        (OLLAMA_REGISTRY, _) => format!("{n}/{m}:{t}"),
                        _ => format!("{h}/{n}/{m}:{t}"),
                    };
                    out.push(Found {
                        name,
                        path,
                        bytes,
                        store: "ollama",
                    });
                }
            }
        }
    }
    out
}

// ---- Hugging Face ----

/// The snapshot directory of `org/repo` (the revision refs/main names, else the newest).
fn hf_snapshot(cache: &Path, repo: &str) -> Option<PathBuf> {
    let (org, name) = repo.split_once('/')?;
    let dir = cache.join(format!("models--{org}--{name}"));
    let snaps = dir.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs/main")) {
        let p = snaps.join(rev.trim());
        if rev.trim().chars().all(|c| c.is_ascii_alphanumeric()) && p.is_dir() {
            return Some(p);
        }
    }
    std::fs::read_dir(&snaps)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// The .gguf files of a snapshot (in subdirectories too), without projector files; split
/// models by their first part.
fn ggufs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let n = e.file_name().to_string_lossy().to_lowercase();
            if p.is_dir() {
                stack.push(p);
            } else if n.ends_with(".gguf") && !n.contains("mmproj") {
                let later_part = n.contains("-of-") && !n.contains("-00001-of-");
                if !later_part {
                    out.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

/// Whether `file` is of quantization `quant` (`Q4_K_M` in `model-Q4_K_M.gguf`, not in
/// `model-Q4_K_M_L.gguf`).
fn is_quant(file: &Path, quant: &str) -> bool {
    let rel = file.to_string_lossy().to_lowercase();
    let q = quant.to_lowercase();
    rel.match_indices(&q).any(|(at, _)| {
        let before = rel[..at].chars().next_back();
        let after = rel[at + q.len()..].chars().next();
        let edge = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        edge(before) && edge(after)
    })
}

/// The quantization a file name carries (`Q4_K_M`, `IQ4_XS`, `F16`, `MXFP4`...), for listing.
fn quant_of(file: &Path) -> Option<String> {
    let stem = file.file_stem()?.to_string_lossy().into_owned();
    let stem = match stem.find("-0000") {
        Some(at) => stem[..at].to_string(),
        None => stem,
    };
    stem.rsplit(['-', '.'])
        .find(|w| {
            let u = w.to_uppercase();
            ["Q", "IQ", "F16", "F32", "BF16", "MXFP4"]
                .iter()
                .any(|p| u.starts_with(p))
                && u.chars().any(|c| c.is_ascii_digit())
        })
        .map(str::to_uppercase)
}

fn hf_lookup(name: &str) -> Result<Option<PathBuf>> {
    let Some(cache) = hf_dir() else {
        return Ok(None);
    };
    let (repo, quant) = match name.split_once(':') {
        Some((r, q)) => (r, Some(q)),
        None => (name, None),
    };
    let Some(snap) = hf_snapshot(&cache, repo) else {
        return Ok(None);
    };
    let files = ggufs(&snap);
    let pick: Vec<&PathBuf> = match quant {
        Some(q) => files.iter().filter(|f| is_quant(f, q)).collect(),
        // llama.cpp's -hf default, else the only one.
        None if files.len() == 1 => files.iter().collect(),
        None => files.iter().filter(|f| is_quant(f, "Q4_K_M")).collect(),
    };
    match pick.as_slice() {
        [one] => Ok(Some(one.to_path_buf())),
        _ => {
            let quants: Vec<String> = files.iter().filter_map(|f| quant_of(f)).collect();
            if files.is_empty() {
                bail!(
                    "{repo}: the Hugging Face cache holds no .gguf file of it ({})",
                    snap.display()
                );
            }
            bail!(
                "{name}: {} in the Hugging Face cache; name one as {repo}:QUANT ({})",
                if pick.is_empty() {
                    "no such quantization"
                } else {
                    "several files match"
                },
                quants.join(", ")
            )
        }
    }
}

fn hf_list() -> Vec<Found> {
    let Some(cache) = hf_dir() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(&cache).into_iter().flatten().flatten() {
        let dir = e.file_name().to_string_lossy().into_owned();
        let Some(repo) = dir.strip_prefix("models--") else {
            continue;
        };
        let Some((org, name)) = repo.split_once("--") else {
            continue;
        };
        let repo = format!("{org}/{name}");
        let Some(snap) = hf_snapshot(&cache, &repo) else {
            continue;
        };
        for f in ggufs(&snap) {
            let name = match quant_of(&f) {
                Some(q) => format!("{repo}:{q}"),
                None => repo.clone(),
            };
            let bytes = split_parts(&f)
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum();
            out.push(Found {
                name,
                path: f,
                bytes,
                store: "huggingface",
            });
        }
    }
    out
}

/// Every part of a split model (`-00001-of-00003.gguf`), or the file alone.
fn split_parts(first: &Path) -> Vec<PathBuf> {
    let name = first
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Some(at) = name.find("-00001-of-") else {
        return vec![first.to_path_buf()];
    };
    let count: usize = name[at + 10..]
        .trim_end_matches(".gguf")
        .parse()
        .unwrap_or(1);
    (1..=count)
        .map(|i| first.with_file_name(format!("{}-{i:05}-of-{count:05}.gguf", &name[..at])))
        .collect()
}

// ---- close matches ----

/// Names of `found` that look like `name` (one contains the other, or a few edits away).
fn close_matches(name: &str, found: &[Found]) -> Vec<String> {
    let want = name.to_lowercase();
    let base = |s: &str| s.split(':').next().unwrap_or(s).to_string();
    let mut out: Vec<String> = found
        .iter()
        .filter(|f| {
            let have = f.name.to_lowercase();
            have.contains(&base(&want))
                || want.contains(&base(&have))
                || edits(&base(&want), &base(&have)) <= 3
        })
        .map(|f| f.name.clone())
        .collect();
    out.dedup();
    out.truncate(8);
    out
}

/// Levenshtein distance.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_as_ollama_stores_them() {
        let p = |n| ollama_parts(n).map(|a| a.join("/"));
        assert_eq!(
            p("smollm2").unwrap(),
            "registry.ollama.ai/library/smollm2/latest"
        );
        assert_eq!(
            p("nemotron-3-nano:30b").unwrap(),
            "registry.ollama.ai/library/nemotron-3-nano/30b"
        );
        assert_eq!(p("me/m:q4").unwrap(), "registry.ollama.ai/me/m/q4");
        assert_eq!(p("hf.co/org/repo:Q4_K_M").unwrap(), "hf.co/org/repo/Q4_K_M");
        assert_eq!(p("../x"), None);
        assert_eq!(p("a/b/c/d"), None);
    }

    #[test]
    fn quantizations_match_whole_words() {
        let f = Path::new("x/Qwen3-30B-A3B-Q4_K_M.gguf");
        assert!(is_quant(f, "q4_k_m"));
        assert!(!is_quant(f, "Q4_K"));
        assert_eq!(quant_of(f).as_deref(), Some("Q4_K_M"));
        let split = Path::new("M-IQ4_XS-00001-of-00002.gguf");
        assert_eq!(quant_of(split).as_deref(), Some("IQ4_XS"));
        assert_eq!(split_parts(split).len(), 2);
        assert_eq!(edits("smollm", "smollm2"), 1);
    }
}
