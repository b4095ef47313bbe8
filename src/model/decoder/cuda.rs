//! The decoder's CUDA executor: when the placement puts every weight but routed experts on the
//! GPU, the hidden rows stay in device memory from the embedding to the head (norms, biases,
//! RoPE from host-computed angles, attention over device KV caches with windows and sinks,
//! gated MLPs, routing and experts), and each sequence's caches live there too. Several
//! sequences share one pass: products run over all their rows, attention over each one's
//! cache. Layers whose routed experts stay in RAM send the normed rows to the CPU executor and
//! take its sum back, or, for a prefill batch where the costs measured so far say copying pays,
//! copy the layer's experts into a staging buffer and compute them on the GPU. Where every
//! routed expert is on the device, decode steps (one token per sequence) replay as CUDA graphs.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Instant;

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};

use super::cpu::CpuOps;
use super::{Act, Attention, Decoder, FeedForward, Gated, Gating, Linear, Moe, Ops, Rope};
use crate::backend::cpu::{Cpu, Matrix, Precision};
use crate::backend::cuda::{
    average, device_position, time_copies, DeviceAct, DeviceGating, DeviceMatrix, DeviceRows,
    DeviceState, Epilogue, ExpertCache, ExpertCaches, Found, Gpu, Graphs, Group, HostPins,
    OffloadCosts, PassOptions, Prefetch, StepGraph, COPY_SAMPLES,
};
use crate::backend::state::KvTypes;
use crate::model::{embed, segments, LayerState, Seq, State};

/// Decode batches up to this many tokens run the routed experts with the expert ids left on
/// the device; larger ones copy the ids back, group the rows per expert and run each selected
/// expert once over its rows (as Nemotron-H's pass does).
const ID_PATH_MAX_TOKENS: usize = 4;

/// What the device-resident pass adds to a loaded decoder.
pub(super) struct DeviceDecoder<'a> {
    gpu: &'a Gpu,
    /// Device copies of the description's vectors (norm weights, biases, sinks), found by the
    /// address of their host values: the description owns them and never changes them after
    /// loading, so the address names one vector for the model's life.
    vectors: HashMap<usize, CudaSlice<f32>>,
    /// Routing counts of each MoE layer routed on the device (experts there, or staged).
    counts: Vec<(usize, Mutex<CudaSlice<u32>>)>,
    /// Where RAM layers' experts are copied for prefill, when the plan reserved room.
    staging: Option<Staging>,
    /// The model's distinct RoPEs (gemma3 has two), in the order of [`StepInputs::angles`].
    ropes: Vec<Rope>,
    /// Decode steps captured as CUDA graphs (only where every routed expert is on the device:
    /// a step with RAM experts waits for the CPU).
    graphs: Mutex<Graphs<DecoderStep>>,
}

/// What a pass reads from device memory besides the weights and the states, written by the
/// host before it runs: each sequence's first position (kv_store and attention read it there)
/// and, for each of the model's RoPEs, the (cos, sin) pairs of every row (the CPU's angles, so
/// that both executors rotate by the same values). A captured step keeps its own, refilled
/// before each replay.
struct StepInputs {
    pos: CudaSlice<i32>,
    angles: Vec<CudaSlice<f32>>,
}

impl StepInputs {
    /// Device copies of [`host_inputs`]' values.
    fn upload(g: &Gpu, (pos, tables): &(Vec<i32>, Vec<Vec<f32>>)) -> Result<StepInputs> {
        Ok(StepInputs {
            pos: g.to_device(pos)?,
            angles: tables
                .iter()
                .map(|t| g.to_device(t))
                .collect::<Result<_>>()?,
        })
    }
}

/// A captured decode step and the inputs it reads.
struct DecoderStep {
    graph: StepGraph,
    inputs: StepInputs,
}

/// The host values of a pass's [`StepInputs`]: positions, and one angle table per RoPE.
fn host_inputs(ropes: &[Rope], seqs: &[Seq]) -> Result<(Vec<i32>, Vec<Vec<f32>>)> {
    let pos = seqs
        .iter()
        .map(|s| i32::try_from(s.state.pos).map_err(|_| anyhow!("position out of range")))
        .collect::<Result<Vec<_>>>()?;
    let tables = ropes
        .iter()
        .map(|r| {
            let mut cs = vec![(0f32, 0f32); r.n_rot / 2];
            let rows: usize = seqs.iter().map(|s| s.len).sum();
            let mut table = Vec::with_capacity(rows * r.n_rot);
            for s in seqs {
                for i in 0..s.len {
                    r.angles((s.state.pos + i) as f32, &mut cs);
                    table.extend(cs.iter().flat_map(|&(c, s)| [c, s]));
                }
            }
            table
        })
        .collect();
    Ok((pos, tables))
}

/// The embedded tokens (times the embedding scale), on the host.
fn embedded(d: &Decoder, tokens: &[u32]) -> Result<Vec<f32>> {
    let mut x = embed(&d.embd, tokens)?;
    if let Some(s) = d.embd_scale {
        x.iter_mut().for_each(|v| *v *= s);
    }
    Ok(x)
}

/// Device buffers that take one RAM layer's routed experts (gate, up, down) each for a prefill
/// batch that copying pays for, the mapped expert tensors page-locked where the driver allows
/// (DMA at PCIe speed), and the costs measured so far.
struct Staging {
    stage: Mutex<Buffers>,
    prefetch: Prefetch,
    pins: Option<HostPins>,
    costs: Mutex<OffloadCosts>,
    /// The hot-expert caches of the RAM layers, when the plan has room for them.
    caches: ExpertCaches,
}

/// Buffer 0 takes one RAM layer at a time, copied on the compute stream. With a second buffer
/// and a copy stream, a prefill batch that copying pays for prefetches its RAM layers into the
/// two in turn: while the GPU computes up to RAM layer i, the copy stream fills the other
/// buffer with the next one.
struct Buffers {
    bufs: Vec<[DeviceMatrix; 3]>,
    copy: Option<Arc<CudaStream>>,
    /// This pass's RAM layers in order, when it prefetches (else empty).
    plan: Vec<usize>,
    /// Per buffer: the layer being copied into it and the event its copy completes.
    filling: [Option<(usize, CudaEvent)>; 2],
}

impl Buffers {
    /// Buffer 0 for layer `m`'s experts, once the copy stream has finished filling it.
    fn first_for(&mut self, g: &Gpu, m: &Moe) -> Result<&mut [DeviceMatrix; 3]> {
        if let Some((_, ev)) = self.filling[0].take() {
            g.compute_wait(&ev)?;
        }
        let bufs = &mut self.bufs[0];
        for (buf, w) in bufs.iter_mut().zip([&m.gate, &m.up, &m.down]) {
            buf.restage(w.ty, w.cols)?;
        }
        Ok(bufs)
    }

    /// Queues the copy of layer `m`'s experts (index `layer`) into buffer `slot` on the copy
    /// stream, after `ready` (the compute stream's last use of that buffer).
    fn fill(
        &mut self,
        g: &Gpu,
        slot: usize,
        layer: usize,
        m: &Moe,
        ready: &CudaEvent,
    ) -> Result<()> {
        let copy = self.copy.clone().ok_or_else(|| anyhow!("no copy stream"))?;
        copy.wait(ready)
            .map_err(|e| anyhow!("CUDA event wait: {e:?}"))?;
        for (buf, w) in self.bufs[slot].iter_mut().zip([&m.gate, &m.up, &m.down]) {
            buf.restage(w.ty, w.cols)?;
            g.stage_rows_on(&copy, buf, 0, w.data)?;
        }
        let done = copy
            .record_event(None)
            .map_err(|e| anyhow!("CUDA event: {e:?}"))?;
        self.filling[slot] = Some((layer, done));
        Ok(())
    }
}

impl Staging {
    /// Buffers for the largest RAM layer within `budget` bytes (None, with a note, when they
    /// do not fit: the CPU then computes RAM experts always), and equal hot-expert caches for
    /// the RAM layers (`ram`: index and layer) out of `cache_budget` bytes.
    fn new(
        gpu: &Gpu,
        ram_layers: &[(usize, &Moe)],
        budget: u64,
        cache_budget: u64,
        prefetch: Prefetch,
    ) -> Option<Staging> {
        let ram: Vec<&Moe> = ram_layers.iter().map(|(_, m)| *m).collect();
        let most = |f: fn(&Moe) -> usize| ram.iter().map(|m| f(m)).max().unwrap_or(0);
        let sizes = [
            most(|m| m.gate.data.len()),
            most(|m| m.up.data.len()),
            most(|m| m.down.data.len()),
        ];
        let total: usize = sizes.iter().sum();
        if total == 0 {
            return None;
        }
        if total as u64 > budget {
            eprintln!(
                "note: the GPU budget leaves no room to stage RAM experts ({:.2} GiB); the CPU computes them",
                total as f64 / (1u64 << 30) as f64
            );
            return None;
        }
        let buffer = || match sizes.map(|b| gpu.staging(b)) {
            [Ok(g), Ok(u), Ok(d)] => Ok([g, u, d]),
            [Err(e), ..] | [_, Err(e), _] | [.., Err(e)] => Err(e),
        };
        let first = match buffer() {
            Ok(b) => b,
            Err(e) => {
                eprintln!(
                    "note: no room to stage RAM experts on the GPU ({e:#}); the CPU computes them"
                );
                return None;
            }
        };
        let ranges: Vec<&[u8]> = ram
            .iter()
            .flat_map(|m| [m.gate.data, m.up.data, m.down.data])
            .collect();
        let pins = gpu
            .pin_host(&ranges)
            .map_err(|e| eprintln!("note: {e:#}; expert copies go through pageable memory"))
            .ok();
        let tensors: Vec<(usize, Vec<&Matrix>)> = ram_layers
            .iter()
            .map(|(i, m)| (*i, vec![&m.gate, &m.up, &m.down]))
            .collect();
        let (ne, k) = ram_layers
            .first()
            .map_or((0, 0), |(_, m)| (m.n_expert, m.n_used));
        let mut stage = Buffers {
            bufs: vec![first],
            copy: None,
            plan: Vec::new(),
            filling: [None, None],
        };
        // Prefetching needs room for two layers and page-locked sources (a copy from pageable
        // memory holds the host thread until it is done, so nothing would overlap).
        if pins.is_some() && 2 * total as u64 <= budget {
            if let (Ok(second), Ok(copy)) = (buffer(), gpu.copy_stream()) {
                stage.bufs.push(second);
                stage.copy = Some(copy);
            }
        }
        let caches = ExpertCaches::new(gpu, &tensors, ne, k, cache_budget);
        Some(Staging {
            stage: Mutex::new(stage),
            prefetch,
            pins,
            costs: Mutex::default(),
            caches,
        })
    }

    fn cache(&self, layer: usize) -> Option<&Mutex<ExpertCache>> {
        self.caches.get(layer)
    }
}

/// Bytes of a layer's routed experts.
fn layer_bytes(m: &Moe) -> usize {
    m.gate.data.len() + m.up.data.len() + m.down.data.len()
}

fn key(v: &[f32]) -> usize {
    v.as_ptr() as usize
}

/// Whether every weight but routed experts is on the GPU.
fn resident(d: &Decoder) -> bool {
    let on = |m: &Matrix| m.device.is_some();
    on(&d.output)
        && d.layers.iter().all(|l| {
            let a = &l.attn;
            on(&a.q.w)
                && on(&a.k.w)
                && on(&a.v.w)
                && on(&a.o.w)
                && match &l.ffn {
                    FeedForward::Gated(f) => on(&f.gate) && on(&f.up) && on(&f.down),
                    FeedForward::Moe(m) => on(&m.router.w),
                }
        })
}

/// Whether a MoE layer's experts are all on the device.
fn experts_on_device(m: &Moe) -> bool {
    m.gate.device.is_some() && m.up.device.is_some() && m.down.device.is_some()
}

fn dev<'a>(m: &Matrix<'a>) -> Result<DeviceRows<'a>> {
    m.device
        .ok_or_else(|| anyhow!("a weight the device pass needs is not on the GPU"))
}

impl<'a> DeviceDecoder<'a> {
    /// The device parts of `d` when its placement allows the resident pass (None otherwise:
    /// the CPU executor runs it, each GPU product crossing PCIe on its own); `staging_budget`
    /// is what the plan reserved for staging RAM experts.
    pub(super) fn new(
        d: &Decoder<'a>,
        staging_budget: u64,
        cache_budget: u64,
        pass: PassOptions,
    ) -> Result<Option<DeviceDecoder<'a>>> {
        if !resident(d) {
            return Ok(None);
        }
        let gpu = dev(&d.output)?.gpu;
        let ram = ram_layers(d);
        let staging = match staging_budget {
            0 => None,
            b => Staging::new(gpu, &ram, b, cache_budget, pass.prefetch),
        };
        let mut host: Vec<&[f32]> = vec![&d.out_norm];
        let mut counts = Vec::new();
        for (i, l) in d.layers.iter().enumerate() {
            let a = &l.attn;
            host.push(&l.attn_norm);
            host.push(&l.ffn_norm);
            for v in [
                &a.q.b, &a.k.b, &a.v.b, &a.o.b, &a.q_norm, &a.k_norm, &a.sinks,
            ]
            .into_iter()
            .chain([&l.attn_post_norm, &l.ffn_post_norm])
            .flatten()
            {
                host.push(v);
            }
            if let FeedForward::Moe(m) = &l.ffn {
                for v in [&m.router.b, &m.gate_b, &m.up_b, &m.down_b]
                    .into_iter()
                    .flatten()
                {
                    host.push(v);
                }
                if experts_on_device(m) || staging.is_some() {
                    counts.push((i, Mutex::new(gpu.zeros(m.n_expert)?)));
                }
            }
        }
        let mut vectors = HashMap::new();
        for v in host {
            if let std::collections::hash_map::Entry::Vacant(e) = vectors.entry(key(v)) {
                e.insert(gpu.to_device(v)?);
            }
        }
        let mut ropes: Vec<Rope> = Vec::new();
        for l in &d.layers {
            if !ropes.contains(&l.attn.rope) {
                ropes.push(l.attn.rope.clone());
            }
        }
        let graphs = Graphs::new(pass.cuda_graphs && ram.is_empty());
        Ok(Some(DeviceDecoder {
            gpu,
            vectors,
            counts,
            staging,
            ropes,
            graphs: Mutex::new(graphs),
        }))
    }

    /// One line on how prefill treated the routed experts left in RAM, when the plan staged
    /// them, or on the decode steps replayed as CUDA graphs, when there were some.
    pub(super) fn offload_report(&self) -> Option<String> {
        let Some(s) = self.staging.as_ref() else {
            let g = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
            let replays = g.replays();
            return (replays > 0).then(|| format!("{replays} decode steps ran as CUDA graphs"));
        };
        let c = s.costs.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = format!(
            "RAM experts in prefill: {} layer-batches copied to the GPU ({} of them prefetched whole), {} computed on the CPU",
            c.gpu_batches, c.prefetched_batches, c.cpu_batches
        );
        if let Some(bw) = c.copy_bytes_per_s {
            line += &format!("; copies {:.1} GB/s", bw / 1e9);
        }
        if let Some(t) = c.cpu_s_per_pair {
            line += &format!("; CPU {:.1} µs per token-expert", t * 1e6);
        }
        line += match &s.pins {
            Some(_) => "; page-locked",
            None => "; not page-locked",
        };
        line += &s.caches.report();
        if c.split_steps > 0 {
            line += &format!("; {} decode steps copied experts", c.split_steps);
        }
        Some(line)
    }

    /// A fresh state: each layer's K/V cache in device memory (f16, or f32 where `kv` asks).
    pub(super) fn new_state(&self, d: &Decoder, n_ctx: usize, kv: KvTypes) -> Result<State> {
        let layers = d
            .layers
            .iter()
            .map(|l| {
                let s = &l.attn.shape;
                Ok(LayerState::Device(DeviceState::attention(
                    self.gpu,
                    s.n_head_kv * s.head_dim,
                    n_ctx,
                    kv,
                )?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(State::new(layers, n_ctx))
    }

    /// Routing counts gathered on the device (layer index, count per expert).
    pub(super) fn expert_counts(&self) -> Result<Vec<(usize, Vec<u32>)>> {
        self.counts
            .iter()
            .map(|(i, c)| {
                let c = c.lock().unwrap_or_else(|e| e.into_inner());
                Ok((*i, self.gpu.to_host(&*c)?))
            })
            .collect()
    }

    /// One pass over `seqs` (see [`Decoder::pass`]): a decode step replayed or captured as a
    /// CUDA graph where graphs are on, else the pass launched op by op.
    pub(super) fn run(
        &self,
        d: &Decoder<'a>,
        cpu: &Cpu,
        seqs: &mut [Seq],
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let g = self.gpu;
        g.set_normal_precision(cpu.precision == Precision::Normal);
        segments(seqs, tokens.len())?;
        for s in seqs.iter() {
            device_position(s.state, false)?;
        }
        // One token per sequence; with routed experts, few enough that their ids stay on the
        // device (more are grouped on the host, which a graph cannot replay).
        let moe = d
            .layers
            .iter()
            .any(|l| matches!(l.ffn, FeedForward::Moe(_)));
        let decode = !all_logits
            && seqs.iter().all(|s| s.len == 1)
            && (!moe || tokens.len() <= ID_PATH_MAX_TOKENS);
        if decode {
            if let Some(logits) = self.decode_step(d, cpu, seqs, tokens)? {
                return Ok(logits);
            }
        }
        let inputs = StepInputs::upload(g, &host_inputs(&self.ropes, seqs)?)?;
        self.start_prefetch(d, tokens.len())?;
        let e = CudaOps {
            dev: self,
            cpu,
            inputs: &inputs,
            x: None,
        };
        let rows = d.pass(&e, seqs, tokens, all_logits)?;
        e.host(rows)
    }

    /// A decode step as a CUDA graph (see [`Graphs`]): replayed when these states' step was
    /// captured, captured when it ran once before; None: run it as usual.
    fn decode_step(
        &self,
        d: &Decoder<'a>,
        cpu: &Cpu,
        seqs: &mut [Seq],
        tokens: &[u32],
    ) -> Result<Option<Vec<f32>>> {
        let g = self.gpu;
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        if !graphs.is_on() {
            return Ok(None);
        }
        let mut key = vec![(cpu.precision == Precision::Normal) as u64];
        for s in seqs.iter() {
            for st in &s.state.layers {
                if let LayerState::Device(DeviceState::Attention { k, v, .. }) = st {
                    key.extend([k.address(g), v.address(g)]);
                }
            }
        }
        // The step's inputs are made only when it replays or is captured.
        let replay = match graphs.find(&key) {
            Found::Run => return Ok(None),
            Found::Replay(step) => Some(step),
            Found::Capture => None,
        };
        let x = embedded(d, tokens)?;
        let host = host_inputs(&self.ropes, seqs)?;
        if let Some(mut step) = replay {
            g.upload_into(&x, &mut step.graph.x)?;
            g.upload_into(&host.0, &mut step.inputs.pos)?;
            for (t, buf) in host.1.iter().zip(&mut step.inputs.angles) {
                g.upload_into(t, buf)?;
            }
            step.graph.launch()?;
            for s in seqs.iter_mut() {
                for st in s.state.layers.iter_mut() {
                    if let LayerState::Device(DeviceState::Attention { len, .. }) = st {
                        *len += 1;
                    }
                }
                s.state.pos += 1;
            }
            let logits = g.to_host(&step.graph.logits)?;
            graphs.keep(key, step);
            return Ok(Some(logits));
        }
        let inputs = StepInputs::upload(g, &host)?;
        let before: Vec<usize> = seqs.iter().map(|s| s.state.pos).collect();
        let (xd, logits) = (g.to_device(&x)?, g.output(seqs.len() * d.n_vocab)?);
        let captured = g.capture_step(xd, logits, |x, logits| {
            let e = CudaOps {
                dev: self,
                cpu,
                inputs: &inputs,
                x: Some(&*x),
            };
            let rows = d.pass(&e, seqs, tokens, false)?;
            g.copy_into(&rows, logits)
        });
        match captured {
            Ok(graph) => {
                // The capture moved the host's lengths and positions on; now the step runs.
                graph.launch()?;
                let logits = g.to_host(&graph.logits)?;
                graphs.keep(key, DecoderStep { graph, inputs });
                Ok(Some(logits))
            }
            Err(e) => {
                // Nothing captured ran: put the host's lengths and positions back.
                for (s, pos) in seqs.iter_mut().zip(before) {
                    for st in s.state.layers.iter_mut() {
                        if let LayerState::Device(DeviceState::Attention { len, .. }) = st {
                            *len = pos;
                        }
                    }
                    s.state.pos = pos;
                }
                graphs.turn_off(&e);
                Ok(None)
            }
        }
    }

    /// For a prefill batch that copying RAM layers pays for (by the measured costs, or as
    /// `--prefetch` says), plans the pass's RAM layers for prefetching and starts copying the
    /// first two into the two buffers.
    fn start_prefetch(&self, d: &Decoder, t: usize) -> Result<()> {
        let Some(s) = &self.staging else {
            return Ok(());
        };
        let mut stage = s.stage.lock().unwrap_or_else(|e| e.into_inner());
        stage.plan.clear();
        if t <= ID_PATH_MAX_TOKENS || stage.bufs.len() < 2 {
            return Ok(());
        }
        let ram = ram_layers(d);
        let Some(&(_, first)) = ram.first() else {
            return Ok(());
        };
        let pays = match s.prefetch {
            Prefetch::On => true,
            Prefetch::Off => false,
            Prefetch::Auto => {
                let c = s.costs.lock().unwrap_or_else(|e| e.into_inner());
                c.cpu_s_per_pair.is_some()
                    && c.copy_bytes_per_s.is_some()
                    && c.prefers_copy(layer_bytes(first), t * first.n_used)
            }
        };
        if !pays {
            return Ok(());
        }
        stage.plan = ram.iter().map(|(i, _)| *i).collect();
        // The buffers may still be read by work queued before this pass.
        let ready = self.gpu.compute_event()?;
        for (slot, &(layer, m)) in ram.iter().take(2).enumerate() {
            stage.fill(self.gpu, slot, layer, m, &ready)?;
        }
        Ok(())
    }

    fn vector(&self, v: &[f32]) -> Result<&CudaSlice<f32>> {
        self.vectors
            .get(&key(v))
            .ok_or_else(|| anyhow!("a vector the device pass needs is not on the GPU"))
    }
}

/// One pass's executor (see [`DeviceDecoder::run`]).
pub(super) struct CudaOps<'p, 'a> {
    dev: &'p DeviceDecoder<'a>,
    cpu: &'p Cpu,
    inputs: &'p StepInputs,
    /// The embedded tokens already on the device (a captured step's input buffer), or None:
    /// `embed` uploads them.
    x: Option<&'p CudaSlice<f32>>,
}

impl CudaOps<'_, '_> {
    /// Routed experts on the device (`w`: gate, up and down, where they are now, `n_in`
    /// experts stacked in each): ids (into `w`) and weights from the router, then either the
    /// id products (decode) or the rows grouped per expert (prefill, `w` holding every
    /// expert); the weighted sum returned. The expert biases are indexed by `bias_ids` (the
    /// layer's expert ids, which `ids` are too unless `w` is a cache's slots).
    #[allow(clippy::too_many_arguments)]
    fn experts(
        &self,
        d: &Decoder,
        m: &Moe,
        [gate, up, down]: [DeviceRows; 3],
        (ids, n_in): (&CudaSlice<i32>, usize),
        bias_ids: &CudaSlice<i32>,
        wts: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        t: usize,
    ) -> Result<CudaSlice<f32>> {
        let g = self.dev.gpu;
        let (ne, k, n, ff) = (m.n_expert, m.n_used, d.n_embd, m.ff);
        let pairs = t * k;
        let bias = |y: &mut CudaSlice<f32>,
                    b: &Option<Vec<f32>>,
                    ids: &CudaSlice<i32>,
                    width: usize|
         -> Result<()> {
            match b {
                Some(b) => g.add_bias(y, self.dev.vector(b)?, Some((ids, ne - 1)), pairs, width),
                None => Ok(()),
            }
        };
        // Every row of it is written by the combine below.
        let mut out = g.output(t * n)?;
        if t <= ID_PATH_MAX_TOKENS {
            // Gate, up, their biases and the activation in one pass; down with its bias.
            let vector = |b: &Option<Vec<f32>>| b.as_ref().map(|b| self.dev.vector(b)).transpose();
            let (bg, bu, bd) = (vector(&m.gate_b)?, vector(&m.up_b)?, vector(&m.down_b)?);
            let mut act = g.output(pairs * ff)?;
            let (x, mut yv) = (h.slice(..), act.slice_mut(..));
            if gate.m.ty == up.m.ty {
                let (biases, a) = ((bg, bu, bias_ids), device_act(m.act));
                gate.matmul_gated_id(&up, ff, n_in, ids, &x, &mut yv, pairs, k, biases, a)?;
            } else {
                // Gate and up of different types (a mix may give them different ones).
                let mut ub = g.output(pairs * ff)?;
                let (bg, bu) = (bg.map(|b| (b, bias_ids)), bu.map(|b| (b, bias_ids)));
                gate.matmul_id(
                    ff,
                    n_in,
                    ids,
                    &x,
                    &mut yv,
                    pairs,
                    k,
                    false,
                    bg,
                    Epilogue::Store,
                )?;
                let mut uv = ub.slice_mut(..);
                up.matmul_id(
                    ff,
                    n_in,
                    ids,
                    &x,
                    &mut uv,
                    pairs,
                    k,
                    false,
                    bu,
                    Epilogue::Store,
                )?;
                g.gated_act(&mut act, &ub, pairs * ff, device_act(m.act))?;
            }
            let mut y = g.output(pairs * n)?;
            let (x, mut yv) = (act.slice(..), y.slice_mut(..));
            let bd = bd.map(|b| (b, bias_ids));
            down.matmul_id(
                n,
                n_in,
                ids,
                &x,
                &mut yv,
                pairs,
                k,
                true,
                bd,
                Epilogue::Store,
            )?;
            g.moe_combine(&y, None, wts, &mut out, t, k, n, false)?;
            return Ok(out);
        }
        if n_in != ne {
            bail!("grouped expert products need every expert of the layer");
        }
        // Rows grouped per expert: row r of the grouped buffers is a token of
        // token_of_row[r], of expert expert_of_row[r]; pair p's output is row pos[p].
        let ids_h = g.to_host(ids)?;
        let mut start = vec![0usize; ne + 1];
        for &e in &ids_h {
            start[e as usize + 1] += 1;
        }
        for e in 0..ne {
            start[e + 1] += start[e];
        }
        let mut fill = start.clone();
        let (mut token_of_row, mut expert_of_row) = (vec![0i32; pairs], vec![0i32; pairs]);
        let mut pos = vec![0i32; pairs];
        for (p, &e) in ids_h.iter().enumerate() {
            let r = fill[e as usize];
            fill[e as usize] += 1;
            token_of_row[r] = (p / k) as i32;
            expert_of_row[r] = e;
            pos[p] = r as i32;
        }
        let (rows_d, experts_d) = (g.to_device(&token_of_row)?, g.to_device(&expert_of_row)?);
        let pos_d = g.to_device(&pos)?;
        let mut xg = g.output(pairs * n)?;
        g.gather_rows(h, &rows_d, &mut xg, t, n, t - 1)?;
        let groups = |rows: usize| -> Vec<Group> {
            (0..ne)
                .filter(|&e| start[e + 1] > start[e])
                .map(|e| (e * rows, start[e], start[e + 1] - start[e]))
                .collect()
        };
        let (mut gb, mut ub) = (g.output(pairs * ff)?, g.output(pairs * ff)?);
        for (w, y) in [(&gate, &mut gb), (&up, &mut ub)] {
            let (x, mut yv) = (xg.slice(..), y.slice_mut(..));
            g.matmul_grouped(w.m, ff, &groups(ff), &x, &mut yv, Epilogue::Store)?;
        }
        bias(&mut gb, &m.gate_b, &experts_d, ff)?;
        bias(&mut ub, &m.up_b, &experts_d, ff)?;
        g.gated_act(&mut gb, &ub, pairs * ff, device_act(m.act))?;
        let mut y = g.output(pairs * n)?;
        let (x, mut yv) = (gb.slice(..), y.slice_mut(..));
        g.matmul_grouped(down.m, n, &groups(n), &x, &mut yv, Epilogue::Store)?;
        bias(&mut y, &m.down_b, &experts_d, n)?;
        g.moe_combine(&y, Some(&pos_d), wts, &mut out, t, k, n, false)?;
        Ok(out)
    }
}

impl CudaOps<'_, '_> {
    /// A decode step (t ≤ [`ID_PATH_MAX_TOKENS`]) of a RAM layer with a hot-expert cache, the
    /// ids and weights routed on the device: the selected experts in the cache run there; of
    /// the others, the most used are copied into cache slots they win (as many as the measured
    /// costs say finish with the CPU's share), and the CPU computes the rest while the GPU runs
    /// its share and the copies.
    #[allow(clippy::too_many_arguments)]
    fn cached_decode(
        &self,
        d: &Decoder,
        m: &Moe,
        s: &Staging,
        cache: &Mutex<ExpertCache>,
        ids: &CudaSlice<i32>,
        wts: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        t: usize,
    ) -> Result<CudaSlice<f32>> {
        let g = self.dev.gpu;
        let (ne, k, n) = (m.n_expert, m.n_used, d.n_embd);
        let (ids_h, wts_h, hh) = (g.to_host(ids)?, g.to_host(wts)?, g.to_host(h)?);
        let mut selected = vec![false; ne];
        for &e in &ids_h {
            selected[e as usize] = true;
        }
        let chosen: Vec<usize> = (0..ne).filter(|&e| selected[e]).collect();
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        c.note(&chosen);
        let mut on_gpu: Vec<bool> = (0..ne)
            .map(|e| selected[e] && c.slot_of[e].is_some())
            .collect();
        let mut rest: Vec<usize> = chosen.iter().copied().filter(|&e| !on_gpu[e]).collect();
        rest.sort_by(|&a, &b| c.uses[b].total_cmp(&c.uses[a]).then(a.cmp(&b)));
        let (n_copy, measure) = {
            let mut costs = s.costs.lock().unwrap_or_else(|e| e.into_inner());
            let n_copy = costs.cpu_s_per_decode_expert.map_or(0, |cpu| {
                costs.copies_beside_cpu(rest.len(), cpu, layer_bytes(m) / ne.max(1))
            });
            costs.split_steps += (n_copy > 0) as u64;
            (n_copy, n_copy > 0 && costs.copy_samples < COPY_SAMPLES)
        };
        for &e in &rest[..n_copy] {
            on_gpu[e] = true;
        }
        // Slots first, so that the index tables go up before any copy is queued (an upload
        // from pageable memory waits for everything queued before it, which would hold the
        // CPU's share until the copies ended).
        let mut admitted = Vec::with_capacity(n_copy);
        for &e in &rest[..n_copy] {
            match c.admit(e, &on_gpu) {
                Some(slot) => admitted.push((e, slot)),
                None => on_gpu[e] = false,
            }
        }
        let mut tables = None;
        if on_gpu.iter().any(|&v| v) {
            let slots: Vec<i32> = ids_h
                .iter()
                .map(|&e| match (on_gpu[e as usize], c.slot_of[e as usize]) {
                    (true, Some(slot)) => slot as i32,
                    _ => 0,
                })
                .collect();
            let masked: Vec<f32> = ids_h
                .iter()
                .zip(&wts_h)
                .map(|(&e, &w)| if on_gpu[e as usize] { w } else { 0.0 })
                .collect();
            tables = Some((g.to_device(&slots)?, g.to_device(&masked)?));
        }
        if measure {
            g.synchronize()?;
        }
        let started = Instant::now();
        let mut copied = 0;
        let tensors = [&m.gate, &m.up, &m.down];
        for &(e, slot) in &admitted {
            copied += c.fill(g, slot, e, &tensors)?;
        }
        if measure && copied > 0 {
            time_copies(g, &s.costs, copied, started)?;
        }
        // The GPU's share, queued: its pairs point at cache slots, the CPU's weigh nothing.
        let mut out = None;
        if let Some((slots, masked)) = &tables {
            let w = [0, 1, 2].map(|i| c.all(g, i));
            out = Some(self.experts(d, m, w, (slots, c.len()), ids, masked, h, t)?);
        }
        drop(c);
        // The CPU's share meanwhile, timed per expert.
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (p, (&e, &w)) in ids_h.iter().zip(&wts_h).enumerate() {
            if !on_gpu[e as usize] {
                per_expert[e as usize].push((p / k, w));
            }
        }
        let on_cpu = per_expert.iter().filter(|l| !l.is_empty()).count();
        let mut out = match out {
            Some(o) => o,
            None => g.zeros(t * n)?,
        };
        if on_cpu > 0 {
            let started = Instant::now();
            let y = CpuOps { cpu: self.cpu }.experts(d, m, &hh, t, &per_expert)?;
            let sample = started.elapsed().as_secs_f64() / on_cpu as f64;
            {
                // A sample far above the estimate (the CPU preempted, a cold cache) moves it
                // by at most a factor of three.
                let mut costs = s.costs.lock().unwrap_or_else(|e| e.into_inner());
                let sample = costs
                    .cpu_s_per_decode_expert
                    .map_or(sample, |e| sample.min(3.0 * e));
                costs.cpu_s_per_decode_expert = average(costs.cpu_s_per_decode_expert, sample);
            }
            g.add(&mut out, &g.to_device(&y)?, t * n)?;
        }
        Ok(out)
    }
}

/// The MoE layers whose routed experts stay in RAM, with their index.
fn ram_layers<'d, 'a>(d: &'d Decoder<'a>) -> Vec<(usize, &'d Moe<'a>)> {
    d.layers
        .iter()
        .enumerate()
        .filter_map(|(i, l)| match &l.ffn {
            FeedForward::Moe(m) if !experts_on_device(m) => Some((i, &**m)),
            _ => None,
        })
        .collect()
}

fn device_act(a: Act) -> DeviceAct {
    match a {
        Act::Silu => DeviceAct::Silu,
        Act::GeluTanh => DeviceAct::GeluTanh,
        Act::SwigluOai { alpha, limit } => DeviceAct::SwigluOai { alpha, limit },
    }
}

impl Ops for CudaOps<'_, '_> {
    type Rows = CudaSlice<f32>;

    fn embed(&self, d: &Decoder, tokens: &[u32]) -> Result<CudaSlice<f32>> {
        match self.x {
            Some(x) => self.dev.gpu.duplicate(x),
            None => self.dev.gpu.to_device(&embedded(d, tokens)?),
        }
    }

    fn norm(&self, x: &CudaSlice<f32>, w: &[f32], eps: f32) -> Result<CudaSlice<f32>> {
        let g = self.dev.gpu;
        let mut y = g.output(x.len())?;
        let rows = x.len() / w.len();
        g.rms_norm(
            &x.slice(..),
            self.dev.vector(w)?,
            &mut y.slice_mut(..),
            rows,
            eps,
        )?;
        Ok(y)
    }

    fn norm_in_place(&self, x: &mut CudaSlice<f32>, w: &[f32], eps: f32) -> Result<()> {
        *x = self.norm(x, w, eps)?;
        Ok(())
    }

    fn linear(&self, l: &Linear, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.dev.gpu.output(t * l.w.rows)?;
        let b = l.b.as_ref().map(|b| self.dev.vector(b)).transpose()?;
        dev(&l.w)?.launch_biased(&x.slice(..), t, &mut y.slice_mut(..), b)?;
        Ok(y)
    }

    fn qkv(
        &self,
        a: &Attention,
        x: &CudaSlice<f32>,
        t: usize,
    ) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        let bias = |l: &Linear| l.b.as_ref().map(|b| self.dev.vector(b)).transpose();
        let (wq, wk, wv) = (dev(&a.q.w)?, dev(&a.k.w)?, dev(&a.v.w)?);
        let parts = [(&wq, bias(&a.q)?), (&wk, bias(&a.k)?), (&wv, bias(&a.v)?)];
        let [q, k, v] = self.dev.gpu.matmul3(parts, x, t)?;
        Ok((q, k, v))
    }

    fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>) -> Result<()> {
        self.dev.gpu.add(x, y, x.len())
    }

    fn add_norm(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        w: &[f32],
        eps: f32,
    ) -> Result<CudaSlice<f32>> {
        let g = self.dev.gpu;
        let mut h = g.output(x.len())?;
        g.add_rms_norm(x, y, self.dev.vector(w)?, &mut h, eps)?;
        Ok(h)
    }

    fn qk_norm_rope(
        &self,
        a: &Attention,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        eps: f32,
        at: &[(usize, Range<usize>)],
    ) -> Result<()> {
        let r = &a.rope;
        let t = at.last().map_or(0, |(_, rows)| rows.end);
        let cs = self
            .dev
            .ropes
            .iter()
            .position(|known| known == r)
            .map(|i| &self.inputs.angles[i])
            .filter(|cs| cs.len() >= t * r.n_rot)
            .ok_or_else(|| anyhow!("no RoPE angles on the device for this pass"))?;
        let norm = |w: &Option<Vec<f32>>| w.as_ref().map(|w| self.dev.vector(w)).transpose();
        let norms = (norm(&a.q_norm)?, norm(&a.k_norm)?);
        let rot = (r.n_rot, r.neox);
        self.dev
            .gpu
            .qk_norm_rope(q, k, norms, cs, &a.shape, t, rot, eps)
    }

    fn attend(
        &self,
        layer: usize,
        a: &Attention,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        seqs: &mut [Seq],
        segs: &[Range<usize>],
    ) -> Result<CudaSlice<f32>> {
        let g = self.dev.gpu;
        let s = &a.shape;
        let (qd, kd) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        let t = segs.last().map_or(0, |r| r.end);
        let sinks = a.sinks.as_deref().map(|z| self.dev.vector(z)).transpose()?;
        let mut out = g.output(t * qd)?;
        for (i, (seq, r)) in seqs.iter_mut().zip(segs).enumerate() {
            let LayerState::Device(DeviceState::Attention {
                k: kc,
                v: vc,
                len,
                row,
                capacity,
            }) = &mut seq.state.layers[layer]
            else {
                bail!("layer state is not a device attention cache");
            };
            let n = r.len();
            if *len + n > *capacity {
                bail!("context is full ({capacity} tokens): raise -c/--ctx-size");
            }
            let pos = self.inputs.pos.slice(i..i + 1);
            g.kv_store(
                &k.slice(r.start * kd..r.end * kd),
                &v.slice(r.start * kd..r.end * kd),
                kc,
                vc,
                &pos,
                *len,
                *row,
                n,
            )?;
            g.attention(
                s,
                sinks,
                &q.slice(r.start * qd..r.end * qd),
                kc,
                vc,
                &mut out.slice_mut(r.start * qd..r.end * qd),
                n,
                *len,
                &pos,
            )?;
            *len += n;
        }
        Ok(out)
    }

    fn gated(&self, f: &Gated, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        let g = self.dev.gpu;
        let ff = f.gate.rows;
        let (mut gb, mut ub) = (g.output(t * ff)?, g.output(t * ff)?);
        dev(&f.gate)?.launch(&x.slice(..), t, &mut gb.slice_mut(..), Epilogue::Store)?;
        dev(&f.up)?.launch(&x.slice(..), t, &mut ub.slice_mut(..), Epilogue::Store)?;
        g.gated_act(&mut gb, &ub, t * ff, device_act(f.act))?;
        let mut y = g.output(t * f.down.rows)?;
        dev(&f.down)?.launch(&gb.slice(..), t, &mut y.slice_mut(..), Epilogue::Store)?;
        Ok(y)
    }

    fn moe(
        &self,
        d: &Decoder,
        layer: usize,
        m: &Moe,
        h: &CudaSlice<f32>,
        t: usize,
    ) -> Result<CudaSlice<f32>> {
        let g = self.dev.gpu;
        let (ne, k) = (m.n_expert, m.n_used);
        let on_device = experts_on_device(m);
        let staging = self.dev.staging.as_ref();
        let copy = !on_device
            && t > ID_PATH_MAX_TOKENS
            && staging.is_some_and(|s| {
                let c = s.costs.lock().unwrap_or_else(|e| e.into_inner());
                c.prefers_copy(layer_bytes(m), t * k)
            });
        // A layer this prefill prefetches is computed from its buffer.
        let prefetched = !on_device
            && staging.is_some_and(|s| {
                let stage = s.stage.lock().unwrap_or_else(|e| e.into_inner());
                stage.plan.contains(&layer)
            });
        let copy = copy || prefetched;
        // A decode step of a RAM layer with a hot-expert cache routes on the device too.
        let cached = !on_device
            && t <= ID_PATH_MAX_TOKENS
            && staging.is_some_and(|s| s.cache(layer).is_some());
        let counts = match self.dev.counts.iter().find(|(i, _)| *i == layer) {
            Some((_, c)) if on_device || copy || cached => c,
            _ => {
                // Experts in RAM: the CPU routes and computes them (timed for prefill, so that
                // the next batch can choose).
                let hh = g.to_host(h)?;
                let started = Instant::now();
                let y = CpuOps { cpu: self.cpu }.moe(d, layer, m, &hh, t)?;
                if let (Some(s), true) = (staging, t > ID_PATH_MAX_TOKENS) {
                    let spent = started.elapsed().as_secs_f64();
                    let mut c = s.costs.lock().unwrap_or_else(|e| e.into_inner());
                    c.cpu_s_per_pair = average(c.cpu_s_per_pair, spent / (t * k) as f64);
                    c.cpu_batches += 1;
                }
                return g.to_device(&y);
            }
        };
        let logits = self.linear(&m.router, h, t)?;
        let (mut ids, mut wts) = (g.output::<i32>(t * k)?, g.output(t * k)?);
        let (gating, norm) = match m.gating {
            Gating::Softmax { norm } => (DeviceGating::Softmax, norm),
            Gating::SoftmaxSelected => (DeviceGating::SoftmaxSelected, false),
        };
        {
            let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
            if c.len() != ne {
                bail!("routing counts of layer {layer} do not match its experts");
            }
            g.route_topk(
                &logits, gating, &mut ids, &mut wts, &mut c, t, k, norm, m.scale,
            )?;
        }
        if !on_device && !copy {
            // Decode with the layer's hot-expert cache (see the guard above).
            let cache = staging.and_then(|s| s.cache(layer).map(|c| (s, c)));
            let (s, cache) = cache.ok_or_else(|| anyhow!("no expert cache for layer {layer}"))?;
            return self.cached_decode(d, m, s, cache, &ids, &wts, h, t);
        }
        let Some(s) = staging.filter(|_| copy) else {
            let w = [dev(&m.gate)?, dev(&m.up)?, dev(&m.down)?];
            return self.experts(d, m, w, (&ids, ne), &ids, &wts, h, t);
        };
        let mut stage = s.stage.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = stage.plan.iter().position(|&l| l == layer) {
            // Prefetched: wait for its copy, compute, then the buffer takes the RAM layer two
            // on.
            let slot = at % 2;
            match stage.filling[slot].take() {
                Some((l, ev)) if l == layer => g.compute_wait(&ev)?,
                _ => bail!("RAM layer {layer} was not prefetched into staging buffer {slot}"),
            }
            let y = {
                let [bg, bu, bd] = &stage.bufs[slot];
                let w = [(bg, &m.gate), (bu, &m.up), (bd, &m.down)].map(|(b, w)| DeviceRows {
                    gpu: g,
                    m: b,
                    start: 0,
                    rows: w.rows,
                });
                self.experts(d, m, w, (&ids, ne), &ids, &wts, h, t)?
            };
            if let Some(&next) = stage.plan.get(at + 2) {
                if let FeedForward::Moe(nm) = &d.layers[next].ffn {
                    let ready = g.compute_event()?;
                    stage.fill(g, slot, next, nm, &ready)?;
                }
            }
            let mut c = s.costs.lock().unwrap_or_else(|e| e.into_inner());
            c.gpu_batches += 1;
            c.prefetched_batches += 1;
            return Ok(y);
        }
        // The whole layer copied over (a prefill batch selects most experts), on the compute
        // stream after the work that read the buffers last; the first copies are timed.
        let bufs = stage.first_for(g, m)?;
        let measure = s
            .costs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .copy_samples
            < COPY_SAMPLES;
        if measure {
            g.synchronize()?;
        }
        let started = Instant::now();
        for (buf, w) in bufs.iter_mut().zip([&m.gate, &m.up, &m.down]) {
            g.stage_rows(buf, 0, w.data)?;
        }
        if measure {
            time_copies(g, &s.costs, layer_bytes(m), started)?;
        }
        s.costs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .gpu_batches += 1;
        let [bg, bu, bd] = &*bufs;
        let w = [(bg, &m.gate), (bu, &m.up), (bd, &m.down)].map(|(b, w)| DeviceRows {
            gpu: g,
            m: b,
            start: 0,
            rows: w.rows,
        });
        self.experts(d, m, w, (&ids, ne), &ids, &wts, h, t)
    }

    fn logits(
        &self,
        d: &Decoder,
        x: &CudaSlice<f32>,
        segs: &[Range<usize>],
        all: bool,
    ) -> Result<CudaSlice<f32>> {
        let g = self.dev.gpu;
        let (n, t) = (d.n_embd, x.len() / d.n_embd);
        let last: CudaSlice<f32>;
        // Every row when asked, or when each segment is one row (a decode step: no gather,
        // whose row indices would come from the host).
        let rows = if all || segs.iter().all(|r| r.len() == 1) {
            x
        } else {
            let idx: Vec<i32> = segs.iter().map(|r| r.end as i32 - 1).collect();
            let mut y = g.output(idx.len() * n)?;
            g.gather_rows(x, &g.to_device(&idx)?, &mut y, t, n, t - 1)?;
            last = y;
            &last
        };
        let h = self.norm(rows, &d.out_norm, d.eps)?;
        let m = h.len() / n;
        let mut out = g.output(m * d.n_vocab)?;
        dev(&d.output)?.launch(&h.slice(..), m, &mut out.slice_mut(..), Epilogue::Store)?;
        if let Some(c) = d.logit_softcap {
            g.softcap(&mut out, m * d.n_vocab, c)?;
        }
        Ok(out)
    }

    fn host(&self, x: CudaSlice<f32>) -> Result<Vec<f32>> {
        self.dev.gpu.to_host(&x)
    }
}
