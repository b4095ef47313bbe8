//! Which weights live on the GPU: llama.cpp's `-ngl N` (the last N layers, the output head too
//! when N exceeds the layer count) and `--n-cpu-moe N` (the routed experts of the first N layers
//! stay in RAM), and our `--gpu-mem SIZE`, a VRAM budget filled in priority order: non-expert
//! weights of the GPU layers and the output head, the compute buffers, then whole expert layers
//! (last layers first, as `--n-cpu-moe` keeps the first ones in RAM) while they fit. Our
//! `--experts-in-ram LIST` and `--staging-buffers N` name a plan exactly (what `ggrun tune`
//! measured and saved). A plan is data (tensor names); the CUDA backend uploads what it names.

use std::collections::BTreeSet;

use anyhow::{anyhow, bail, Result};

use crate::backend::state::KvType;
use crate::gguf::{Model as Gguf, TensorInfo};

/// The placement flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlacementArgs {
    /// `-ngl`: layers on the GPU, counted from the last (None: all when a budget is given,
    /// else none).
    pub n_gpu_layers: Option<usize>,
    /// `--n-cpu-moe`: the routed experts of the first N layers stay in RAM.
    pub n_cpu_moe: usize,
    /// `--gpu-mem`: the VRAM budget in bytes.
    pub gpu_mem: Option<u64>,
    /// Sequences whose state is reserved (0 counts as 1).
    pub sequences: usize,
    /// `--experts-in-ram`: exactly these layers' routed experts stay in RAM (with
    /// `--n-cpu-moe`'s); the others go to the GPU, or the plan fails (what `tune` chose).
    pub experts_in_ram: Option<Vec<usize>>,
    /// `--staging-buffers`: at most this many staging buffers (0, 1 or 2; default 2 where
    /// they fit).
    pub staging_buffers: Option<usize>,
    /// `--expert-cache`: VRAM for a cache of the most used experts of the RAM layers, taken
    /// from the budget before whole expert layers (so more of them may stay in RAM); default an
    /// eighth of `gpu_mem` when experts spill.
    pub expert_cache: Option<u64>,
    /// Exact mode: the device KV caches hold f32 values (otherwise f16).
    pub exact: bool,
}

impl PlacementArgs {
    /// Whether the flags ask for a GPU at all.
    pub fn wants_gpu(&self) -> bool {
        self.n_gpu_layers.is_some_and(|n| n > 0)
            || self.gpu_mem.is_some()
            || self.experts_in_ram.is_some()
    }

    /// The element type of the device KV caches (what `DeviceState::attention` allocates).
    pub fn device_kv(&self) -> KvType {
        match self.exact {
            true => KvType::F32,
            false => KvType::F16,
        }
    }
}

/// What a family's device executor allocates besides its weights when every layer and the
/// output are on the GPU: what the planner reserves for it, and no more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecutorNeeds {
    /// Each sequence's state lives in device memory (K/V caches, Mamba-2 state).
    pub device_state: bool,
    /// At most this many staging buffers, each with room for one RAM layer's routed experts,
    /// which prefill copies over PCIe (0: the CPU computes RAM experts).
    pub staging_buffers: u64,
    /// A hot-expert cache in VRAM for the RAM layers' experts.
    pub expert_cache: bool,
}

impl ExecutorNeeds {
    /// A device-resident pass with two staging buffers (one layer copied while the GPU computes
    /// another) and the hot-expert cache (every family's).
    pub const RESIDENT_WITH_STAGING: ExecutorNeeds = ExecutorNeeds {
        device_state: true,
        staging_buffers: 2,
        expert_cache: true,
    };
    /// Products on the device one by one, state and experts on the host.
    pub const PRODUCTS_ONLY: ExecutorNeeds = ExecutorNeeds {
        device_state: false,
        staging_buffers: 0,
        expert_cache: false,
    };
}

/// A placement: the weight tensors on the GPU and what they and the buffers need.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    gpu: BTreeSet<String>,
    /// The context (tokens per sequence) the state was planned for.
    pub n_ctx: usize,
    /// Bytes of the weights placed on the GPU.
    pub gpu_weight_bytes: u64,
    /// Bytes of the weights left in RAM.
    pub cpu_weight_bytes: u64,
    /// Device memory reserved beside the weights (compute buffers).
    pub reserved_bytes: u64,
    /// Device memory of one sequence's state at the planned context (K/V caches of the
    /// attention layers, f16 or in exact mode f32, and Mamba-2 conv and SSM states), when the
    /// whole pass runs on the device.
    pub state_bytes: u64,
    /// Device memory for staging: when routed experts stay in RAM and everything else is on
    /// the GPU, a prefill batch can copy the experts it selected into a buffer of one expert
    /// layer's size and compute them there.
    pub staging_bytes: u64,
    /// Device memory for the hot-expert cache of the RAM layers (decode computes a cached
    /// expert on the GPU; the experts it copies over replace the least used).
    pub cache_bytes: u64,
    /// Layers whose routed experts are on the GPU.
    pub expert_layers_on_gpu: Vec<usize>,
    /// Layers whose routed experts stay in RAM.
    pub expert_layers_in_ram: Vec<usize>,
}

/// Without `--expert-cache`, a plan whose experts spill keeps this fraction of `--gpu-mem` for
/// the hot-expert cache.
pub const DEFAULT_CACHE_SHARE: u64 = 8;

/// `blk.N.` → N.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Routed-expert tensors (one placement unit per layer).
fn is_expert(name: &str) -> bool {
    name.contains("_exps.")
}

/// Tensors a forward pass multiplies by (2-D or stacked 3-D weights); norms, biases, the Mamba
/// conv and scan parameters stay with the CPU ops that read them. The embedding is read by
/// rows on the CPU; it is a matmul weight only when it is also the (tied) output head.
fn is_matmul_weight(t: &TensorInfo, tied_output: bool) -> bool {
    let n = t.name.as_str();
    if n == "token_embd.weight" {
        return tied_output;
    }
    n.ends_with(".weight")
        && t.dims.len() >= 2
        && t.dims[1] > 1
        && !n.contains("norm")
        && !n.contains("ssm_conv1d")
}

/// Whether the `i`-th of `n` expert layers is one of `ram` spread evenly over them (the middle
/// of each of `ram` equal stretches).
fn spread(i: usize, n: usize, ram: usize) -> bool {
    (0..ram).any(|j| (2 * j + 1) * n / (2 * ram) == i)
}

impl Plan {
    /// Everything on the CPU.
    pub fn cpu_only() -> Plan {
        Plan::default()
    }

    /// Whether tensor `name` is placed on the GPU.
    pub fn on_gpu(&self, name: &str) -> bool {
        self.gpu.contains(name)
    }

    /// Whether anything is on the GPU.
    pub fn uses_gpu(&self) -> bool {
        !self.gpu.is_empty()
    }

    /// The plan for `g` under `args`; `reserve` is device memory needed beside the weights for
    /// compute buffers; a context of `n_ctx` tokens adds the sequence state when the plan keeps
    /// the whole pass on the device (every layer and the output head there).
    pub fn new(g: &Gguf, args: &PlacementArgs, reserve: u64, n_ctx: usize) -> Result<Plan> {
        Plan::for_executor(
            g,
            args,
            reserve,
            n_ctx,
            ExecutorNeeds::RESIDENT_WITH_STAGING,
        )
    }

    /// [`Plan::new`] for an executor that allocates what `needs` says: state, staging and the
    /// cache are reserved only where it allocates them.
    pub fn for_executor(
        g: &Gguf,
        args: &PlacementArgs,
        reserve: u64,
        n_ctx: usize,
        needs: ExecutorNeeds,
    ) -> Result<Plan> {
        if !args.wants_gpu() {
            let cpu_weight_bytes = g.tensors().map(|t| t.size_bytes).sum();
            return Ok(Plan {
                cpu_weight_bytes,
                ..Plan::default()
            });
        }
        let n_layer = g
            .tensors()
            .filter_map(|t| layer_of(&t.name))
            .max()
            .map_or(0, |m| m + 1);
        let ngl = args.n_gpu_layers.unwrap_or(n_layer + 1);
        let first_gpu_layer = n_layer.saturating_sub(ngl);
        let output_on_gpu = ngl > n_layer;
        let tied = g.tensors().all(|t| t.name != "output.weight");
        let mut plan = Plan {
            reserved_bytes: reserve,
            n_ctx,
            ..Plan::default()
        };
        // Candidates: non-expert weights, and expert tensors grouped by layer.
        let mut fixed: Vec<&TensorInfo> = Vec::new();
        let mut experts: std::collections::BTreeMap<usize, Vec<&TensorInfo>> = Default::default();
        for t in g.tensors() {
            let eligible = is_matmul_weight(t, tied)
                && match layer_of(&t.name) {
                    Some(l) => l >= first_gpu_layer,
                    None => output_on_gpu,
                };
            if !eligible {
                plan.cpu_weight_bytes += t.size_bytes;
                continue;
            }
            match layer_of(&t.name) {
                Some(l) if is_expert(&t.name) => {
                    let named = args.experts_in_ram.as_ref().is_some_and(|v| v.contains(&l));
                    if l < args.n_cpu_moe || named {
                        plan.cpu_weight_bytes += t.size_bytes;
                        plan.expert_layers_in_ram.push(l);
                    } else {
                        experts.entry(l).or_default().push(t);
                    }
                }
                _ => fixed.push(t),
            }
        }
        let fixed_bytes: u64 = fixed.iter().map(|t| t.size_bytes).sum();
        let budget = args.gpu_mem.unwrap_or(u64::MAX);
        let resident = output_on_gpu && first_gpu_layer == 0;
        if resident && needs.device_state {
            plan.state_bytes =
                state_bytes(g, n_ctx, args.device_kv())? * args.sequences.max(1) as u64;
        }
        let reserve = reserve + plan.state_bytes;
        if fixed_bytes.saturating_add(reserve) > budget {
            bail!(
                "a GPU budget of {} is too small: the non-expert weights of the GPU layers need {}, the buffers {} and the state of {} {} (lower -ngl or -c, or raise --gpu-mem)",
                gib(budget),
                gib(fixed_bytes),
                gib(reserve - plan.state_bytes),
                match args.sequences {
                    0 | 1 => format!("a {n_ctx}-token context"),
                    n => format!("{n} sequences of {n_ctx} tokens"),
                },
                gib(plan.state_bytes)
            );
        }
        for t in fixed {
            plan.gpu.insert(t.name.clone());
        }
        plan.gpu_weight_bytes = fixed_bytes;
        let mut used = fixed_bytes + reserve;
        // When some expert layer will stay in RAM under a device-resident placement (every
        // layer and the output on the GPU), keep room for staging one: the largest tensor of
        // each kind (up, down, ...) over the layers, which the staging buffers are sized by.
        let layer_bytes = |ts: &Vec<&TensorInfo>| ts.iter().map(|t| t.size_bytes).sum::<u64>();
        let all_experts: u64 = experts.values().map(layer_bytes).sum();
        let spills =
            !plan.expert_layers_in_ram.is_empty() || used.saturating_add(all_experts) > budget;
        if resident && spills && needs.staging_buffers > 0 {
            let largest = staging_buffer_bytes(g);
            // Two buffers let prefill copy the next RAM layer while the GPU computes the current
            // one; where only one fits, layers are staged one at a time.
            let most = (args.staging_buffers.unwrap_or(2) as u64).min(needs.staging_buffers);
            if let Some(bytes) = [2 * largest, largest]
                .into_iter()
                .filter(|&b| b <= most * largest)
                .find(|&b| largest > 0 && used + b <= budget)
            {
                plan.staging_bytes = bytes;
                used += bytes;
            }
            // The hot-expert cache: as asked, else by default an eighth of a given budget
            // (H200, 52-layer Q8_0 at 24 GiB: 3 GiB took decode from 105 to 171 tok/s and
            // prefill from 2464 to 2262 once the cache serves prefill too; 1.5 GiB gave 162 and
            // 2233, BENCHMARKS.md). `--expert-cache 0` turns it off.
            let want = args
                .expert_cache
                .or(args.gpu_mem.map(|b| b / DEFAULT_CACHE_SHARE))
                .filter(|_| plan.staging_bytes > 0 && needs.expert_cache);
            if let Some(want) = want {
                // Never more than the experts themselves (a budget of a whole card's free
                // memory over a small model asked 17 GiB for a cache of a few MiB of experts).
                let every_expert: u64 = g
                    .tensors()
                    .filter(|t| is_expert(&t.name))
                    .map(|t| t.size_bytes)
                    .sum();
                plan.cache_bytes = want.min(budget.saturating_sub(used)).min(every_expert);
                used += plan.cache_bytes;
            }
        }
        // As many whole expert layers as fit. Those left in RAM are spread evenly through the
        // network rather than being the first ones: a prefill that prefetches RAM layers then
        // copies each while the GPU computes the resident layers before it.
        let sizes: Vec<(usize, u64)> = experts
            .iter()
            .map(|(l, ts)| (*l, ts.iter().map(|t| t.size_bytes).sum()))
            .collect();
        let room = budget.saturating_sub(used);
        if args.experts_in_ram.is_some() && used.saturating_add(all_experts) > budget {
            bail!(
                "a GPU budget of {} is too small for the named plan: its GPU expert layers need {} beside {} of weights, buffers, state and staging (name more layers in --experts-in-ram, or raise --gpu-mem; a profile from `ggrun tune` names such plans, --no-profile ignores it)",
                gib(budget),
                gib(all_experts),
                gib(used)
            );
        }
        let mut by_size: Vec<u64> = sizes.iter().map(|s| s.1).collect();
        by_size.sort_unstable();
        let mut fits = 0;
        let mut total = 0u64;
        for b in by_size {
            if total + b > room {
                break;
            }
            total += b;
            fits += 1;
        }
        let n = sizes.len();
        let ram = n - fits;
        let mut in_ram: Vec<bool> = (0..n).map(|i| ram > 0 && spread(i, n, ram)).collect();
        // Layers of unequal sizes: move the largest GPU ones to RAM until the rest fit.
        loop {
            let on_gpu: u64 = (0..n).filter(|&i| !in_ram[i]).map(|i| sizes[i].1).sum();
            if on_gpu <= room {
                break;
            }
            let Some(i) = (0..n).filter(|&i| !in_ram[i]).max_by_key(|&i| sizes[i].1) else {
                break;
            };
            in_ram[i] = true;
        }
        for (i, (l, bytes)) in sizes.iter().enumerate() {
            if in_ram[i] {
                plan.cpu_weight_bytes += bytes;
                plan.expert_layers_in_ram.push(*l);
            } else {
                plan.gpu_weight_bytes += bytes;
                plan.expert_layers_on_gpu.push(*l);
                plan.gpu.extend(experts[l].iter().map(|t| t.name.clone()));
            }
        }
        plan.expert_layers_on_gpu.sort_unstable();
        plan.expert_layers_in_ram.sort_unstable();
        plan.expert_layers_in_ram.dedup();
        Ok(plan)
    }

    /// One line for stderr: what went where.
    pub fn summary(&self) -> String {
        format!(
            "GPU: {} of weights + {} of buffers + {} of state ({} tokens of context) + {} of staging + {} of expert cache; RAM: {} of weights; routed experts on the GPU for {} layers, in RAM for {}",
            gib(self.gpu_weight_bytes),
            gib(self.reserved_bytes),
            gib(self.state_bytes),
            self.n_ctx,
            gib(self.staging_bytes),
            gib(self.cache_bytes),
            gib(self.cpu_weight_bytes),
            self.expert_layers_on_gpu.len(),
            self.expert_layers_in_ram.len()
        )
    }
}

/// Bytes of one staging buffer for `g`: the largest routed-expert tensor of each kind (up,
/// down, ...) over the layers, which a buffer holds one layer's worth of.
pub fn staging_buffer_bytes(g: &Gguf) -> u64 {
    g.tensors()
        .filter(|t| is_expert(&t.name))
        .fold(
            std::collections::BTreeMap::<&str, u64>::new(),
            |mut m, t| {
                let kind = t.name.splitn(3, '.').nth(2).unwrap_or(&t.name);
                let e = m.entry(kind).or_default();
                *e = (*e).max(t.size_bytes);
                m
            },
        )
        .into_values()
        .sum()
}

/// Device bytes of one sequence's state at `n_ctx` tokens: K and V rows of type `kv` for every
/// layer with KV heads (`attention.head_count_kv`, per layer or one value), and for the Mamba-2
/// layers of hybrid models (no KV heads and no feed-forward) the conv window and the SSM state
/// (f32).
pub fn state_bytes(g: &Gguf, n_ctx: usize, kv: KvType) -> Result<u64> {
    let md = g.metadata();
    let arch = g.architecture()?;
    let key = |k: &str| format!("{arch}.{k}");
    let n_layer = md.get_usize(&key("block_count"))?;
    let n_embd = md.get_usize(&key("embedding_length"))?;
    let n_head = md
        .get_usize(&key("attention.head_count"))
        .unwrap_or(1)
        .max(1);
    let head_dim = md
        .get_usize(&key("attention.key_length"))
        .unwrap_or(n_embd / n_head);
    let n_kv = match md.get(&key("attention.head_count_kv")) {
        Some(_) => md.get_per_layer(&key("attention.head_count_kv"), n_layer)?,
        None => vec![n_head; n_layer],
    };
    let ff = md
        .get_per_layer(&key("feed_forward_length"), n_layer)
        .unwrap_or(vec![1; n_layer]);
    let ssm = |k: &str| md.get_usize(&key(k)).ok();
    let mamba = match (
        ssm("ssm.conv_kernel"),
        ssm("ssm.inner_size"),
        ssm("ssm.state_size"),
        ssm("ssm.group_count"),
    ) {
        (Some(k), Some(di), Some(ds), Some(ng)) => {
            (k.saturating_sub(1) * (di + 2 * ng * ds) + di * ds) as u64 * 4
        }
        _ => 0,
    };
    let mut total = 0u64;
    for (n, f) in n_kv.iter().zip(&ff) {
        total += if *n > 0 {
            let row = kv.bytes(n * head_dim, 1).ok_or_else(|| {
                anyhow!("a KV row of {} values is not whole blocks", n * head_dim)
            })?;
            2 * n_ctx as u64 * row
        } else if *f == 0 {
            mamba
        } else {
            0
        };
    }
    Ok(total)
}

/// A size for people: GiB from 1 GiB up, else MiB.
fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Parses a size like `24GiB`, `24G`, `512MiB`, `1.5GB` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a size (e.g. 24GiB, 512MiB)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        _ => bail!("{s:?}: unknown size unit {unit:?} (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"),
    };
    let bytes = v * mult;
    if !bytes.is_finite() || !(0.0..=1e18).contains(&bytes) {
        bail!("{s:?} is out of range");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{write_nemotron, Mix, NemotronPreset};

    /// A tiny Nemotron-H file with the layer pattern `M E * E M E` (three MoE layers).
    fn model(dir: &std::path::Path) -> Gguf {
        let path = dir.join("p.gguf");
        write_nemotron(
            &NemotronPreset::tiny("ME*EME").unwrap(),
            Mix::Q8_0,
            7,
            &path,
        )
        .unwrap();
        Gguf::open(&path).unwrap()
    }

    fn bytes_of(g: &Gguf, pred: impl Fn(&str) -> bool) -> u64 {
        g.tensors()
            .filter(|t| pred(&t.name))
            .map(|t| t.size_bytes)
            .sum()
    }

    #[test]
    fn no_flags_no_gpu_and_every_byte_accounted() {
        let dir = tempfile::tempdir().unwrap();
        let g = model(dir.path());
        let p = Plan::new(&g, &PlacementArgs::default(), 0, 0).unwrap();
        assert!(!p.uses_gpu());
        assert_eq!(p.cpu_weight_bytes, bytes_of(&g, |_| true));
        let all = PlacementArgs {
            n_gpu_layers: Some(99),
            ..Default::default()
        };
        let p = Plan::new(&g, &all, 0, 0).unwrap();
        assert_eq!(
            p.gpu_weight_bytes + p.cpu_weight_bytes,
            bytes_of(&g, |_| true),
            "every tensor is on one side"
        );
        assert!(p.on_gpu("output.weight") && p.on_gpu("blk.0.ssm_in.weight"));
        assert!(!p.on_gpu("token_embd.weight") && !p.on_gpu("blk.0.ssm_conv1d.weight"));
        assert!(!p.on_gpu("output_norm.weight"));
        assert_eq!(p.expert_layers_on_gpu, vec![1, 3, 5]);
    }

    #[test]
    fn ngl_counts_from_the_last_layer_and_takes_the_head_only_past_the_layer_count() {
        let dir = tempfile::tempdir().unwrap();
        let g = model(dir.path());
        let args = |n| PlacementArgs {
            n_gpu_layers: Some(n),
            ..Default::default()
        };
        let p = Plan::new(&g, &args(2), 0, 0).unwrap();
        assert!(p.on_gpu("blk.5.ffn_up_exps.weight") && p.on_gpu("blk.4.ssm_in.weight"));
        assert!(!p.on_gpu("blk.3.ffn_up_exps.weight") && !p.on_gpu("output.weight"));
        let p = Plan::new(&g, &args(6), 0, 0).unwrap();
        assert!(p.on_gpu("blk.0.ssm_in.weight") && !p.on_gpu("output.weight"));
        let p = Plan::new(&g, &args(7), 0, 0).unwrap();
        assert!(p.on_gpu("output.weight"));
    }

    #[test]
    fn n_cpu_moe_keeps_the_first_layers_experts_in_ram() {
        let dir = tempfile::tempdir().unwrap();
        let g = model(dir.path());
        let args = PlacementArgs {
            n_gpu_layers: Some(99),
            n_cpu_moe: 4,
            gpu_mem: None,
            ..Default::default()
        };
        let p = Plan::new(&g, &args, 0, 0).unwrap();
        assert_eq!(p.expert_layers_in_ram, vec![1, 3]);
        assert_eq!(p.expert_layers_on_gpu, vec![5]);
        assert!(p.staging_bytes > 0, "experts in RAM get a staging buffer");
        assert!(!p.on_gpu("blk.1.ffn_down_exps.weight"));
        assert!(
            p.on_gpu("blk.1.ffn_up_shexp.weight"),
            "the shared expert is not routed"
        );
        assert!(p.on_gpu("blk.1.ffn_gate_inp.weight"), "nor is the router");
    }

    /// RAM layers chosen by a budget are spread evenly: `ram` distinct layers of `n`, gaps
    /// between them differing by at most one, none of the first layers crowded together.
    #[test]
    fn ram_layers_are_spread_evenly() {
        for n in 1..40 {
            for ram in 0..=n {
                let picked: Vec<usize> = (0..n).filter(|&i| spread(i, n, ram)).collect();
                assert_eq!(picked.len(), ram, "n {n} ram {ram}");
                let gaps: Vec<usize> = picked.windows(2).map(|w| w[1] - w[0]).collect();
                if let (Some(lo), Some(hi)) = (gaps.iter().min(), gaps.iter().max()) {
                    assert!(hi - lo <= 1, "n {n} ram {ram}: {picked:?}");
                }
            }
        }
        let nano: Vec<usize> = (0..23).filter(|&i| spread(i, 23, 8)).collect();
        assert_eq!(nano, [1, 4, 7, 10, 12, 15, 18, 21]);
    }

    #[test]
    fn a_named_plan_keeps_exactly_its_layers_in_ram_and_caps_staging() {
        let dir = tempfile::tempdir().unwrap();
        let g = model(dir.path());
        let layer =
            |l: usize| bytes_of(&g, |n| n.starts_with(&format!("blk.{l}.")) && is_expert(n));
        let (reserve, ctx) = (1000, 100);
        let named = |ram: Vec<usize>, staging: Option<usize>, budget: Option<u64>| {
            Plan::new(
                &g,
                &PlacementArgs {
                    gpu_mem: budget,
                    experts_in_ram: Some(ram),
                    staging_buffers: staging,
                    ..Default::default()
                },
                reserve,
                ctx,
            )
        };
        let p = named(vec![3], None, None).unwrap();
        assert_eq!(p.expert_layers_in_ram, vec![3]);
        assert_eq!(p.expert_layers_on_gpu, vec![1, 5]);
        assert_eq!(p.staging_bytes, 2 * layer(3), "two buffers where they fit");
        let p = named(vec![1, 5], Some(1), None).unwrap();
        assert_eq!(p.expert_layers_in_ram, vec![1, 5]);
        assert_eq!(p.staging_bytes, layer(1), "--staging-buffers 1");
        let p = named(vec![1], Some(0), None).unwrap();
        assert_eq!(p.staging_bytes, 0);
        // The named GPU layers must fit: no silent move to RAM.
        let tight = p.gpu_weight_bytes + reserve + p.state_bytes - 1;
        let e = named(vec![1], Some(0), Some(tight)).unwrap_err();
        assert!(e.to_string().contains("named plan"), "{e}");
        // Naming layers asks for the GPU without -ngl.
        assert!(PlacementArgs {
            experts_in_ram: Some(vec![]),
            ..Default::default()
        }
        .wants_gpu());
    }

    #[test]
    fn only_what_the_executor_allocates_is_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let g = model(dir.path());
        let layer =
            |l: usize| bytes_of(&g, |n| n.starts_with(&format!("blk.{l}.")) && is_expert(n));
        let (reserve, ctx) = (1000, 100);
        let state = state_bytes(&g, ctx, KvType::F16).unwrap();
        let all_ram = PlacementArgs {
            n_gpu_layers: Some(99),
            n_cpu_moe: 99,
            ..Default::default()
        };
        let fixed = Plan::new(&g, &all_ram, 0, 0).unwrap().gpu_weight_bytes;
        // The fixed part, the state and two and a half expert layers (of three, all equal):
        // the experts spill.
        let budget = fixed + reserve + state + layer(1) * 5 / 2;
        let args = PlacementArgs {
            gpu_mem: Some(budget),
            expert_cache: Some(0),
            ..Default::default()
        };
        let full = Plan::for_executor(
            &g,
            &args,
            reserve,
            ctx,
            ExecutorNeeds::RESIDENT_WITH_STAGING,
        )
        .unwrap();
        assert_eq!(
            (full.state_bytes, full.staging_bytes),
            (state, 2 * layer(1))
        );
        assert!(full.expert_layers_on_gpu.is_empty());
        // An executor with host state and no staging gets neither, and the room they took
        // holds expert layers instead.
        let bare =
            Plan::for_executor(&g, &args, reserve, ctx, ExecutorNeeds::PRODUCTS_ONLY).unwrap();
        assert_eq!(
            (bare.state_bytes, bare.staging_bytes, bare.cache_bytes),
            (0, 0, 0)
        );
        assert_eq!(bare.expert_layers_on_gpu.len(), 2);
        assert!(bare.gpu_weight_bytes + reserve <= budget);
    }

    #[test]
    fn a_budget_takes_whole_expert_layers_and_never_overflows() {
        let dir = tempfile::tempdir().unwrap();
        let g = model(dir.path());
        let layer =
            |l: usize| bytes_of(&g, |n| n.starts_with(&format!("blk.{l}.")) && is_expert(n));
        let fixed = Plan::new(
            &g,
            &PlacementArgs {
                n_gpu_layers: Some(99),
                n_cpu_moe: 99,
                gpu_mem: None,
                ..Default::default()
            },
            0,
            0,
        )
        .unwrap()
        .gpu_weight_bytes;
        let reserve = 1000;
        let ctx = 100;
        let state = state_bytes(&g, ctx, KvType::F16).unwrap();
        // Room for the fixed part, the state of a 100-token context and two and a half expert
        // layers (all three equal here): they do not all fit, so two staging buffers (each the
        // largest expert layer) come first and no whole layer fits beside them.
        let largest = layer(1).max(layer(3)).max(layer(5));
        assert!(layer(1) == largest && layer(3) == largest && layer(5) == largest);
        let budget = fixed + reserve + state + 2 * largest + largest / 2;
        let p = Plan::new(
            &g,
            &PlacementArgs {
                gpu_mem: Some(budget),
                ..Default::default()
            },
            reserve,
            ctx,
        )
        .unwrap();
        assert_eq!((p.staging_bytes, p.state_bytes), (2 * largest, state));
        assert!(p.expert_layers_on_gpu.is_empty());
        assert_eq!(p.expert_layers_in_ram, vec![1, 3, 5]);
        let total = |p: &Plan| {
            p.gpu_weight_bytes + reserve + p.state_bytes + p.staging_bytes + p.cache_bytes
        };
        assert!(total(&p) <= budget);
        assert_eq!(p.gpu_weight_bytes, fixed);
        // The hot-expert cache: an eighth of the budget by default, taken before whole layers
        // (with the half layer of room left it is that half layer), as asked, or none.
        assert_eq!(
            p.cache_bytes,
            (budget / DEFAULT_CACHE_SHARE).min(largest / 2)
        );
        for (asked, want) in [(Some(0), 0), (Some(largest / 4), largest / 4)] {
            let q = Plan::new(
                &g,
                &PlacementArgs {
                    gpu_mem: Some(budget),
                    expert_cache: asked,
                    ..Default::default()
                },
                reserve,
                ctx,
            )
            .unwrap();
            assert_eq!(q.cache_bytes, want);
            assert!(total(&q) <= budget);
        }
        // A cache as large as a layer leaves that layer in RAM where it would have fitted (one
        // staging buffer, then room for one and a half layers).
        let roomy = fixed + reserve + state + largest + largest + largest / 2;
        let with = |cache| {
            Plan::new(
                &g,
                &PlacementArgs {
                    gpu_mem: Some(roomy),
                    expert_cache: Some(cache),
                    staging_buffers: Some(1),
                    ..Default::default()
                },
                reserve,
                ctx,
            )
            .unwrap()
        };
        assert_eq!(with(0).expert_layers_on_gpu.len(), 1);
        let cached = with(largest);
        assert_eq!(
            (cached.expert_layers_on_gpu.len(), cached.cache_bytes),
            (0, largest)
        );
        assert!(total(&cached) <= roomy);
        // Room for one staging buffer and half a layer: layers are staged one at a time.
        let one = fixed + reserve + state + largest + largest / 2;
        let p = Plan::new(
            &g,
            &PlacementArgs {
                gpu_mem: Some(one),
                ..Default::default()
            },
            reserve,
            ctx,
        )
        .unwrap();
        assert_eq!(p.staging_bytes, largest);
        assert!(p.expert_layers_on_gpu.is_empty());
        // With -ngl and --n-cpu-moe 2 (layers 1 and 3 in RAM) and room to spare, layer 5 goes
        // to the GPU beside the two staging buffers.
        let p = Plan::new(
            &g,
            &PlacementArgs {
                n_gpu_layers: Some(99),
                n_cpu_moe: 4,
                ..Default::default()
            },
            reserve,
            ctx,
        )
        .unwrap();
        assert_eq!(p.expert_layers_on_gpu, vec![5]);
        assert_eq!(p.staging_bytes, 2 * largest);
        // A budget of a whole card beside a small model: the default cache (an eighth of the
        // budget) is never more than the experts there are.
        let p = Plan::new(
            &g,
            &PlacementArgs {
                n_gpu_layers: Some(99),
                n_cpu_moe: 4,
                gpu_mem: Some(1 << 40),
                ..Default::default()
            },
            reserve,
            ctx,
        )
        .unwrap();
        assert!(p.cache_bytes > 0 && p.cache_bytes <= layer(1) + layer(3) + layer(5));
        // ... and with every expert layer in RAM, the cache may hold all of them.
        let p = Plan::new(
            &g,
            &PlacementArgs {
                n_gpu_layers: Some(99),
                n_cpu_moe: 99,
                gpu_mem: Some(1 << 40),
                ..Default::default()
            },
            reserve,
            ctx,
        )
        .unwrap();
        assert_eq!(p.cache_bytes, layer(1) + layer(3) + layer(5));
        // Room for everything: no staging.
        let all = fixed + reserve + state + layer(1) + layer(3) + layer(5);
        let p = Plan::new(
            &g,
            &PlacementArgs {
                gpu_mem: Some(all),
                ..Default::default()
            },
            reserve,
            ctx,
        )
        .unwrap();
        assert_eq!((p.expert_layers_in_ram.len(), p.staging_bytes), (0, 0));
        // Too small for the non-expert weights: a clear error.
        let e = Plan::new(
            &g,
            &PlacementArgs {
                gpu_mem: Some(fixed / 2),
                ..Default::default()
            },
            reserve,
            ctx,
        )
        .unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        // A context whose state cannot fit beside the weights: the error names the context.
        let e = Plan::new(
            &g,
            &PlacementArgs {
                gpu_mem: Some(fixed + reserve + state),
                ..Default::default()
            },
            reserve,
            1_000_000,
        )
        .unwrap_err();
        assert!(e.to_string().contains("1000000-token context"), "{e}");
        // Several sequences (the server's --parallel) reserve a state each.
        let p = Plan::new(
            &g,
            &PlacementArgs {
                gpu_mem: Some(all + 2 * state),
                sequences: 3,
                ..Default::default()
            },
            reserve,
            ctx,
        )
        .unwrap();
        assert_eq!(p.state_bytes, 3 * state);
        assert_eq!(p.expert_layers_in_ram.len(), 0);
    }

    /// The planner's state size is what a sequence's state really holds on a GPU: the host
    /// state the model allocates, in f32 and position for position as the device state (the
    /// host cache rounds its K positions up to whole tiles), at a few context sizes.
    #[test]
    fn state_bytes_match_the_state_the_model_allocates() {
        let dir = tempfile::tempdir().unwrap();
        let g = model(dir.path());
        let m = crate::model::load_with(&g, Default::default()).unwrap();
        for n_ctx in [1, 100, 4096] {
            let st = m
                .new_state(n_ctx, crate::backend::state::KvTypes::F32)
                .unwrap();
            let held: usize = st
                .layers
                .iter()
                .map(|l| match l {
                    crate::model::LayerState::Attention {
                        k,
                        v,
                        row,
                        capacity,
                        ..
                    } => {
                        let tiles = capacity.next_multiple_of(ggrun_quants::float::K_TILE);
                        let elems = |r: &crate::backend::state::KvRows| match r {
                            crate::backend::state::KvRows::F32(x) => x.len(),
                            _ => panic!("f32 rows expected"),
                        };
                        assert_eq!((elems(k), elems(v)), (row * tiles, row * capacity));
                        2 * row * capacity
                    }
                    crate::model::LayerState::Mamba { conv, ssm } => conv.len() + ssm.len(),
                    _ => 0,
                })
                .sum();
            assert_eq!(
                state_bytes(&g, n_ctx, KvType::F32).unwrap(),
                4 * held as u64,
                "n_ctx {n_ctx}"
            );
        }
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("24GiB").unwrap(), 24 << 30);
        assert_eq!(parse_size("24G").unwrap(), 24 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "GiB", "12XB", "-1G", "1e30G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
