//! Nemotron-H's device-resident forward pass: when the placement puts every weight but routed
//! experts on the GPU, the hidden state stays in device memory from the embedding to the logits
//! (norms, Mamba-2 conv and scan, attention over a device KV cache, routing, experts), and the
//! per-sequence state lives there too ([`DeviceState`]). Layers whose routed experts stay in RAM
//! send the normed hidden state and the routing (a few KiB per token) to the CPU, whose SIMD
//! kernels compute the selected experts while the GPU runs the shared expert, and take the sum
//! back.

use std::ops::Range;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};

use super::{Attention, Block, Mamba, Moe, NemotronH};
use crate::backend::cpu::{Cpu, Matrix, Precision};
use crate::backend::cuda::{
    average, device_position, time_copies, DeviceGating, DeviceMatrix, DeviceRows, DeviceState,
    Epilogue, ExpertCache, ExpertCaches, Found, Gpu, Graphs, Group, HostPins, OffloadCosts,
    PassOptions, Prefetch, StepGraph, COPY_SAMPLES,
};
use crate::backend::state::KvTypes;
use crate::model::{embed, segments, LayerState, Seq, State};

/// Decode batches up to this many tokens run the routed experts with the expert ids left on
/// the device (each (token, slot) pair reads its expert's rows); larger batches copy the ids
/// back, group the tokens per expert and run each selected expert once over its tokens.
const ID_PATH_MAX_TOKENS: usize = 4;

/// The per-layer vectors the device ops read (norm weights, Mamba parameters, router bias), and
/// the routing counts of each MoE layer.
enum DeviceBlock {
    Mamba(Box<MambaParams>),
    Attention,
    Moe {
        bias: CudaSlice<f32>,
        counts: Mutex<CudaSlice<u32>>,
    },
    Mlp,
}

struct MambaParams {
    conv_w: CudaSlice<f32>,
    conv_b: Option<CudaSlice<f32>>,
    dt_bias: CudaSlice<f32>,
    a: CudaSlice<f32>,
    d: CudaSlice<f32>,
    norm: CudaSlice<f32>,
}

struct DeviceLayer {
    norm: CudaSlice<f32>,
    block: DeviceBlock,
}

/// What the device-resident pass adds to a loaded model.
pub(super) struct DeviceParts<'a> {
    gpu: &'a Gpu,
    layers: Vec<DeviceLayer>,
    out_norm: CudaSlice<f32>,
    /// Where routed experts stay in RAM: what brings them over for prefill.
    offload: Option<Offload>,
    /// Each sequence's first position in a pass, which kv_store and attention read on the
    /// device (written before each pass; grown when a pass has more sequences).
    pos: Mutex<CudaSlice<i32>>,
    /// Decode steps captured as CUDA graphs (only where the whole pass is on the device: no
    /// RAM experts, whose steps wait for the CPU); tests/gpu.rs compares them with plain
    /// launches bit for bit.
    graphs: Mutex<Graphs<StepGraph>>,
}

/// Prefill of layers whose routed experts stay in RAM: per batch and layer, either the CPU
/// computes the selected experts, or they are copied (from page-locked mapped memory where the
/// driver allowed it) into a staging buffer and computed on the GPU, whichever the costs
/// measured on this machine say is faster.
struct Offload {
    stage: Mutex<Staging>,
    pins: Option<HostPins>,
    costs: Mutex<OffloadCosts>,
    prefetch: Prefetch,
    /// The hot-expert cache of each RAM MoE layer (by layer index), when the plan has one.
    caches: ExpertCaches,
}

/// Device buffers for RAM experts, each an up and a down buffer with room for a whole layer's.
/// Buffer 0 takes one layer's selected experts at a time, copied on the compute stream (decode
/// splits; prefill without prefetch). With a second buffer and a copy stream, a prefill batch
/// that copying pays for prefetches whole RAM layers into the two in turn: while the GPU computes
/// up to RAM layer i, the copy stream fills the other buffer with the next one.
struct Staging {
    bufs: Vec<(DeviceMatrix, DeviceMatrix)>,
    copy: Option<Arc<CudaStream>>,
    /// This pass's RAM MoE layers in order, when it prefetches (else empty).
    plan: Vec<usize>,
    /// Per buffer: the layer being copied into it and the event its copy completes.
    filling: [Option<(usize, CudaEvent)>; 2],
}

impl Staging {
    /// Buffer 0, shaped for layer `b`'s experts, once the copy stream has finished filling it.
    fn first_for(&mut self, g: &Gpu, b: &Moe) -> Result<(&mut DeviceMatrix, &mut DeviceMatrix)> {
        if let Some((_, ev)) = self.filling[0].take() {
            g.compute_wait(&ev)?;
        }
        let (up, down) = &mut self.bufs[0];
        up.restage(b.up.ty, b.up.cols)?;
        down.restage(b.down.ty, b.down.cols)?;
        Ok((up, down))
    }
}

/// (token, expert) pairs grouped per expert: pairs `start[e]..start[e + 1]` are expert e's; on
/// the device, each grouped row's token (`rows_idx`) and each pair's grouped row (`pos`).
struct Pairs {
    start: Vec<usize>,
    rows_idx: CudaSlice<i32>,
    pos: CudaSlice<i32>,
}

/// Bytes of one routed expert (its up and down rows) of the first MoE layer in RAM.
fn expert_bytes(m: &NemotronH) -> Option<usize> {
    m.layers.iter().find_map(|l| match &l.block {
        Block::Moe(b) if b.up.device.is_none() => {
            Some((b.up.data.len() + b.down.data.len()) / m.n_expert.max(1))
        }
        _ => None,
    })
}

/// The file bytes of layer `b`'s experts `es`: their up rows and their down rows (`n` down
/// rows per expert).
fn expert_rows<'a>(b: &Moe<'a>, n: usize, es: std::ops::Range<usize>) -> (&'a [u8], &'a [u8]) {
    let (urb, drb) = (b.up.row_bytes(), b.down.row_bytes());
    (
        &b.up.data[es.start * b.ff * urb..es.end * b.ff * urb],
        &b.down.data[es.start * n * drb..es.end * n * drb],
    )
}

impl Offload {
    /// Staging and page-locking for the MoE layers whose experts stay in RAM (None when there
    /// are none, or when the plan reserved no room to stage them: then the CPU computes them
    /// always).
    fn new(
        gpu: &Gpu,
        m: &NemotronH,
        budget: u64,
        cache_budget: u64,
        prefetch: Prefetch,
    ) -> Option<Offload> {
        let ram_layers: Vec<(usize, &Moe)> = m
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.block {
                Block::Moe(b) if b.up.device.is_none() => Some((i, b)),
                _ => None,
            })
            .collect();
        let in_ram: Vec<&Moe> = ram_layers.iter().map(|(_, b)| *b).collect();
        let up_bytes = in_ram.iter().map(|b| b.up.data.len()).max()?;
        let down_bytes = in_ram.iter().map(|b| b.down.data.len()).max()?;
        if (up_bytes + down_bytes) as u64 > budget {
            eprintln!(
                "note: the GPU budget leaves no room to stage RAM experts ({:.2} GiB); the CPU computes them",
                (up_bytes + down_bytes) as f64 / (1u64 << 30) as f64
            );
            return None;
        }
        let first = match (gpu.staging(up_bytes), gpu.staging(down_bytes)) {
            (Ok(u), Ok(d)) => (u, d),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!(
                    "note: no room to stage RAM experts on the GPU ({e:#}); the CPU computes them"
                );
                return None;
            }
        };
        let ranges: Vec<&[u8]> = in_ram
            .iter()
            .flat_map(|b| [b.up.data, b.down.data])
            .collect();
        let pins = match gpu.pin_host(&ranges) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("note: {e:#}; expert copies go through pageable memory");
                None
            }
        };
        let mut stage = Staging {
            bufs: vec![first],
            copy: None,
            plan: Vec::new(),
            filling: [None, None],
        };
        // Prefetching needs room for two layers and page-locked sources (a copy from pageable
        // memory holds the host thread until it is done, so nothing would overlap).
        if pins.is_some() && 2 * (up_bytes + down_bytes) as u64 <= budget {
            let second = (gpu.staging(up_bytes), gpu.staging(down_bytes));
            if let (Ok(u), Ok(d), Ok(c)) = (second.0, second.1, gpu.copy_stream()) {
                stage.bufs.push((u, d));
                stage.copy = Some(c);
            }
        }
        let tensors: Vec<(usize, Vec<&Matrix>)> = ram_layers
            .iter()
            .map(|(i, b)| (*i, vec![&b.up, &b.down]))
            .collect();
        let caches = ExpertCaches::new(gpu, &tensors, m.n_expert, m.n_expert_used, cache_budget);
        Some(Offload {
            stage: Mutex::new(stage),
            pins,
            costs: Mutex::default(),
            prefetch,
            caches,
        })
    }

    fn cache(&self, layer: usize) -> Option<&Mutex<ExpertCache>> {
        self.caches.get(layer)
    }
}

/// The device copy of a weight the placement put on the GPU.
fn dev<'a>(m: &Matrix<'a>) -> Result<DeviceRows<'a>> {
    m.device
        .ok_or_else(|| anyhow!("a weight the device pass needs is not on the GPU"))
}

/// Whether every weight of the model except routed experts is on the GPU.
fn resident(m: &NemotronH) -> bool {
    let on = |x: &Matrix| x.device.is_some();
    on(&m.output)
        && m.layers.iter().all(|l| match &l.block {
            Block::Mamba(b) => on(&b.ssm_in) && on(&b.out),
            Block::Attention(b) => on(&b.q) && on(&b.k) && on(&b.v) && on(&b.o),
            Block::Moe(b) => {
                on(&b.router)
                    && b.up_sh.as_ref().is_none_or(on)
                    && b.down_sh.as_ref().is_none_or(on)
            }
            Block::Mlp { up, down } => on(up) && on(down),
        })
}

impl<'a> DeviceParts<'a> {
    /// The device parts for `m` when its placement allows the device-resident pass (None when
    /// some non-expert weight stays in RAM: then each product crosses PCIe on its own);
    /// `staging_budget` is what the plan reserved for staging RAM experts.
    pub(super) fn new(
        m: &NemotronH<'a>,
        staging_budget: u64,
        cache_budget: u64,
        pass: PassOptions,
    ) -> Result<Option<DeviceParts<'a>>> {
        if !resident(m) {
            return Ok(None);
        }
        let gpu = dev(&m.output)?.gpu;
        let up = |v: &[f32]| gpu.to_device(v);
        let mut layers = Vec::with_capacity(m.layers.len());
        for l in &m.layers {
            let block = match &l.block {
                Block::Mamba(b) => DeviceBlock::Mamba(Box::new(MambaParams {
                    conv_w: up(&b.conv_w)?,
                    conv_b: b.conv_b.as_deref().map(up).transpose()?,
                    dt_bias: up(&b.dt_bias)?,
                    a: up(&b.a)?,
                    d: up(&b.d)?,
                    norm: up(&b.norm)?,
                })),
                Block::Attention(_) => DeviceBlock::Attention,
                Block::Moe(b) => DeviceBlock::Moe {
                    bias: up(&b.bias)?,
                    counts: Mutex::new(gpu.zeros(m.n_expert)?),
                },
                Block::Mlp { .. } => DeviceBlock::Mlp,
            };
            layers.push(DeviceLayer {
                norm: up(&l.norm)?,
                block,
            });
        }
        let offload = Offload::new(gpu, m, staging_budget, cache_budget, pass.prefetch);
        // Graphs only where no step waits for the CPU: every routed expert on the device (not
        // merely no staging: without room to stage, RAM experts still run on the CPU).
        let experts_on_device = m.layers.iter().all(|l| match &l.block {
            Block::Moe(b) => b.up.device.is_some() && b.down.device.is_some(),
            _ => true,
        });
        let on = experts_on_device && pass.cuda_graphs;
        Ok(Some(DeviceParts {
            gpu,
            layers,
            out_norm: up(&m.out_norm)?,
            offload,
            pos: Mutex::new(gpu.zeros(1)?),
            graphs: Mutex::new(Graphs::new(on)),
        }))
    }

    /// One line on how prefill treated the routed experts left in RAM, when there are some, or
    /// on the decode steps replayed as CUDA graphs, when there were some.
    pub(super) fn offload_report(&self, m: &NemotronH) -> Option<String> {
        let Some(o) = self.offload.as_ref() else {
            let replays = self
                .graphs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replays();
            return (replays > 0).then(|| format!("{replays} decode steps ran as CUDA graphs"));
        };
        let c = o.costs.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = format!(
            "RAM experts in prefill: {} layer-batches copied to the GPU ({} of them prefetched whole), {} computed on the CPU",
            c.gpu_batches, c.prefetched_batches, c.cpu_batches
        );
        if let Some(bw) = c.copy_bytes_per_s {
            line += &format!("; copies {:.1} GB/s", bw / 1e9);
        }
        if let Some(s) = c.cpu_s_per_pair {
            line += &format!("; CPU {:.1} µs per token-expert", s * 1e6);
        }
        if let Some(s) = c.cpu_s_per_decode_expert {
            line += &format!(
                "; decode: CPU {:.0} µs per expert, {} layer-steps split with a concurrent copy",
                s * 1e6,
                c.split_steps
            );
        }
        if let (Some(bw), Some(s), Some(eb)) =
            (c.copy_bytes_per_s, c.cpu_s_per_pair, expert_bytes(m))
        {
            // With experts picked uniformly, t tokens select ne·(1 − (1 − k/ne)^t) of them.
            let (ne, k) = (m.n_expert as f64, m.n_expert_used as f64);
            let crossover = (2..=1 << 16).find(|&t| {
                let sel = ne * (1.0 - (1.0 - k / ne).powi(t));
                sel * eb as f64 / bw < s * k * t as f64
            });
            if let Some(t) = crossover {
                line += &format!("; copying pays from ~{t} tokens");
            }
        }
        line += &o.caches.report();
        if let Some(p) = &o.pins {
            line += &format!(
                "; {:.2} GiB page-locked",
                p.bytes as f64 / (1u64 << 30) as f64
            );
        } else {
            line += "; not page-locked";
        }
        Some(line)
    }

    /// A fresh per-sequence state in device memory.
    pub(super) fn new_state(&self, m: &NemotronH, n_ctx: usize, kv: KvTypes) -> Result<State> {
        let s = &m.ssm;
        let layers = m
            .layers
            .iter()
            .map(|l| {
                Ok(match &l.block {
                    Block::Mamba(_) => LayerState::Device(DeviceState::mamba(
                        self.gpu,
                        (s.d_conv - 1) * s.conv_channels(),
                        s.n_head * s.head_dim() * s.d_state,
                    )?),
                    Block::Attention(a) => LayerState::Device(DeviceState::attention(
                        self.gpu,
                        a.shape.n_head_kv * a.shape.head_dim,
                        n_ctx,
                        kv,
                    )?),
                    _ => LayerState::None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(State::new(layers, n_ctx))
    }

    /// Routing counts per MoE layer gathered on the device (layer index, count per expert).
    pub(super) fn expert_counts(&self) -> Result<Vec<(usize, Vec<u32>)>> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let DeviceBlock::Moe { counts, .. } = &l.block {
                let c = counts.lock().unwrap_or_else(|e| e.into_inner());
                out.push((i, self.gpu.to_host(&*c)?));
            }
        }
        Ok(out)
    }

    /// The forward pass with the hidden state on the device (see the module comment), over
    /// `seqs` (consecutive runs of `tokens`, each extending its sequence's state): the
    /// products run once over every sequence's rows, the Mamba scans and the attention per
    /// sequence. A decode step (one token per sequence, few enough that the expert ids stay on
    /// the device) replays as a CUDA graph where graphs are on.
    pub(super) fn run(
        &self,
        m: &NemotronH,
        cpu: &Cpu,
        seqs: &mut [Seq],
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let g = self.gpu;
        let t = tokens.len();
        let segs = segments(seqs, t)?;
        g.set_normal_precision(cpu.precision == Precision::Normal);
        let positions = seqs
            .iter()
            .map(|s| device_position(s.state, true))
            .collect::<Result<Vec<_>>>()?;
        let mut pos = self.pos.lock().unwrap_or_else(|e| e.into_inner());
        if pos.len() < positions.len() {
            // A new buffer (captured steps are keyed by its address).
            *pos = g.zeros(positions.len())?;
        }
        g.upload_into(&positions, &mut pos)?;
        let decode = !all_logits && segs.iter().all(|r| r.len() == 1) && t <= ID_PATH_MAX_TOKENS;
        if decode {
            if let Some(logits) = self.decode_step(m, cpu, seqs, &segs, tokens, &pos)? {
                return Ok(logits);
            }
        }
        let mut x = g.to_device(&embed(&m.embd, tokens)?)?;
        self.start_prefetch(m, t)?;
        let rows = if all_logits { t } else { seqs.len() };
        let mut logits = g.output(rows * m.n_vocab)?;
        self.layers_and_head(m, cpu, seqs, &segs, &mut x, all_logits, &mut logits, &pos)?;
        for s in seqs.iter_mut() {
            s.state.pos += s.len;
        }
        g.to_host(&logits)
    }

    /// Every layer over the hidden state `x` (the rows of `segs`, one run per sequence), then
    /// the head: the final norm and vocabulary projection of every row (`all`) or of each
    /// sequence's last into `logits`. Host bookkeeping: each attention layer's length grows by
    /// its sequence's rows (the positions are the caller's).
    #[allow(clippy::too_many_arguments)]
    fn layers_and_head(
        &self,
        m: &NemotronH,
        cpu: &Cpu,
        seqs: &mut [Seq],
        segs: &[Range<usize>],
        x: &mut CudaSlice<f32>,
        all: bool,
        logits: &mut CudaSlice<f32>,
        pos: &CudaSlice<i32>,
    ) -> Result<()> {
        let g = self.gpu;
        let n = m.n_embd;
        let t = segs.last().map_or(0, |r| r.end);
        let mut h = g.output(t * n)?;
        for (i, (l, dl)) in m.layers.iter().zip(&self.layers).enumerate() {
            g.rms_norm(&x.slice(..), &dl.norm, &mut h.slice_mut(..), t, m.eps)?;
            let mut sts: Vec<&mut LayerState> =
                seqs.iter_mut().map(|s| &mut s.state.layers[i]).collect();
            match (&l.block, &dl.block) {
                (Block::Mamba(b), DeviceBlock::Mamba(p)) => {
                    self.mamba(m, b, p, &mut sts, segs, &h, x)
                }
                (Block::Attention(b), DeviceBlock::Attention) => {
                    self.attention(b, &mut sts, segs, &h, x, pos)
                }
                (Block::Moe(b), DeviceBlock::Moe { bias, counts }) => {
                    self.moe(m, cpu, i, b, bias, counts, &h, x, t)
                }
                (Block::Mlp { up, down }, DeviceBlock::Mlp) => {
                    self.mlp(dev(up)?, dev(down)?, &h, x, t)
                }
                _ => bail!("device layer {i} does not match the model"),
            }
            .with_context(|| format!("layer {i}"))?;
        }
        // The rows the head reads: all of them, each sequence's only row (a decode step: no
        // gather, whose indices would come from the host), or each sequence's last.
        let gathered;
        let (last, rows) = if all || segs.iter().all(|r| r.len() == 1) {
            (x.slice(..), t)
        } else if let [r] = segs {
            (x.slice((r.end - 1) * n..r.end * n), 1)
        } else {
            let idx: Vec<i32> = segs.iter().map(|r| r.end as i32 - 1).collect();
            let mut y = g.output(idx.len() * n)?;
            g.gather_rows(x, &g.to_device(&idx)?, &mut y, t, n, t - 1)?;
            gathered = y;
            (gathered.slice(..), segs.len())
        };
        let mut hn = g.output(rows * n)?;
        g.rms_norm(&last, &self.out_norm, &mut hn.slice_mut(..), rows, m.eps)?;
        dev(&m.output)?.launch(
            &hn.slice(..),
            rows,
            &mut logits.slice_mut(..),
            Epilogue::Store,
        )
    }

    /// A decode step as a CUDA graph when graphs are on (see [`Graphs`]): replayed when these
    /// states' step was captured, captured when it ran once before; None: run it as usual.
    fn decode_step(
        &self,
        m: &NemotronH,
        cpu: &Cpu,
        seqs: &mut [Seq],
        segs: &[Range<usize>],
        tokens: &[u32],
        pos: &CudaSlice<i32>,
    ) -> Result<Option<Vec<f32>>> {
        let g = self.gpu;
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        if !graphs.is_on() {
            return Ok(None);
        }
        let Some(key) = self.graph_key(seqs, pos, cpu.precision) else {
            return Ok(None);
        };
        let x = embed(&m.embd, tokens)?;
        let step_taken = |seqs: &mut [Seq]| {
            for s in seqs.iter_mut() {
                s.state.pos += 1;
            }
        };
        match graphs.find(&key) {
            Found::Run => return Ok(None),
            Found::Replay(mut step) => {
                g.upload_into(&x, &mut step.x)?;
                step.launch()?;
                for s in seqs.iter_mut() {
                    for st in s.state.layers.iter_mut() {
                        if let LayerState::Device(DeviceState::Attention { len, .. }) = st {
                            *len += 1;
                        }
                    }
                }
                step_taken(seqs);
                let logits = g.to_host(&step.logits)?;
                graphs.keep(key, step);
                return Ok(Some(logits));
            }
            Found::Capture => {}
        }
        let lens: Vec<Vec<usize>> = seqs
            .iter()
            .map(|s| {
                s.state
                    .layers
                    .iter()
                    .map(|st| match st {
                        LayerState::Device(DeviceState::Attention { len, .. }) => *len,
                        _ => 0,
                    })
                    .collect()
            })
            .collect();
        let (xd, logits) = (g.to_device(&x)?, g.output(seqs.len() * m.n_vocab)?);
        let captured = g.capture_step(xd, logits, |x, logits| {
            self.layers_and_head(m, cpu, seqs, segs, x, false, logits, pos)
        });
        match captured {
            Ok(step) => {
                step.launch()?;
                step_taken(seqs);
                let logits = g.to_host(&step.logits)?;
                graphs.keep(key, step);
                Ok(Some(logits))
            }
            Err(e) => {
                // Nothing captured ran: put the host's lengths back and run the step as usual.
                for (s, lens) in seqs.iter_mut().zip(lens) {
                    for (st, l) in s.state.layers.iter_mut().zip(lens) {
                        if let LayerState::Device(DeviceState::Attention { len, .. }) = st {
                            *len = l;
                        }
                    }
                }
                graphs.turn_off(&e);
                Ok(None)
            }
        }
    }

    /// What a captured step depends on besides the model: the precision (which kernels run),
    /// the position buffer and the addresses of the states' device buffers, sequence after
    /// sequence. None when some layer's state is not on the device.
    fn graph_key(
        &self,
        seqs: &[Seq],
        pos: &CudaSlice<i32>,
        precision: Precision,
    ) -> Option<Vec<u64>> {
        let g = self.gpu;
        let mut key = vec![(precision == Precision::Normal) as u64, g.address(pos)];
        for s in seqs {
            for st in &s.state.layers {
                match st {
                    LayerState::Device(DeviceState::Mamba { conv, ssm }) => {
                        key.extend([g.address(conv), g.address(ssm)]);
                    }
                    LayerState::Device(DeviceState::Attention { k, v, .. }) => {
                        key.extend([k.address(g), v.address(g)]);
                    }
                    // Layers without a state (MoE, MLP).
                    LayerState::None => {}
                    _ => return None,
                }
            }
        }
        Some(key)
    }

    /// A Mamba-2 layer: the projections over every row, the conv and the scan over each
    /// sequence's rows with its own state.
    #[allow(clippy::too_many_arguments)]
    fn mamba(
        &self,
        m: &NemotronH,
        b: &Mamba,
        p: &MambaParams,
        sts: &mut [&mut LayerState],
        segs: &[Range<usize>],
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let MambaParams {
            conv_w,
            conv_b,
            dt_bias,
            a,
            d,
            norm,
        } = p;
        let (g, s) = (self.gpu, &m.ssm);
        let t = segs.last().map_or(0, |r| r.end);
        let (di, ch, nh) = (s.d_inner, s.conv_channels(), s.n_head);
        let mut zx = g.output(t * b.ssm_in.rows)?;
        dev(&b.ssm_in)?.launch(&h.slice(..), t, &mut zx.slice_mut(..), Epilogue::Store)?;
        let mut xbc = g.output(t * ch)?;
        let mut dt = g.output(t * nh)?;
        g.mamba_split(s, &zx, dt_bias, &mut xbc, &mut dt, t)?;
        let mut xc = g.output(t * ch)?;
        let mut y = g.output(t * di)?;
        for (st, r) in sts.iter_mut().zip(segs) {
            let LayerState::Device(DeviceState::Mamba { conv, ssm }) = &mut **st else {
                bail!("layer state is not a device Mamba state");
            };
            let n = r.len();
            let (rc, rd) = (r.start * ch..r.end * ch, r.start * nh..r.end * nh);
            g.mamba_conv(
                &xbc.slice(rc.clone()),
                conv,
                conv_w,
                conv_b.as_ref(),
                &mut xc.slice_mut(rc.clone()),
                n,
                ch,
                s.d_conv,
            )?;
            g.mamba_scan(
                s,
                &xc.slice(rc),
                &dt.slice(rd),
                a,
                d,
                ssm,
                &mut y.slice_mut(r.start * di..r.end * di),
                n,
            )?;
        }
        g.mamba_gate_norm(s, &mut y, &zx, norm, t, m.eps)?;
        dev(&b.out)?.launch(&y.slice(..), t, &mut x.slice_mut(..), Epilogue::Add)
    }

    /// An attention layer: the projections over every row, the cache writes and the attention
    /// over each sequence's rows with its own cache and position (`pos[i]`, sequence i's).
    fn attention(
        &self,
        b: &Attention,
        sts: &mut [&mut LayerState],
        segs: &[Range<usize>],
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        pos: &CudaSlice<i32>,
    ) -> Result<()> {
        let g = self.gpu;
        let t = segs.last().map_or(0, |r| r.end);
        let qd = b.q.rows;
        let mut q = g.output(t * qd)?;
        dev(&b.q)?.launch(&h.slice(..), t, &mut q.slice_mut(..), Epilogue::Store)?;
        let kd = b.k.rows;
        let (mut kn, mut vn) = (g.output(t * kd)?, g.output(t * kd)?);
        dev(&b.k)?.launch(&h.slice(..), t, &mut kn.slice_mut(..), Epilogue::Store)?;
        dev(&b.v)?.launch(&h.slice(..), t, &mut vn.slice_mut(..), Epilogue::Store)?;
        let mut out = g.output(t * qd)?;
        for (i, (st, r)) in sts.iter_mut().zip(segs).enumerate() {
            let LayerState::Device(DeviceState::Attention {
                k,
                v,
                len,
                row,
                capacity,
            }) = &mut **st
            else {
                bail!("layer state is not a device attention cache");
            };
            let n = r.len();
            if *len + n > *capacity {
                bail!("context is full ({capacity} tokens): raise -c/--ctx-size");
            }
            // K and V of the new positions, then into the cache at the position the kernel
            // reads from device memory (a captured decode step replays at every position).
            let p = pos.slice(i..i + 1);
            g.kv_store(
                &kn.slice(r.start * kd..r.end * kd),
                &vn.slice(r.start * kd..r.end * kd),
                k,
                v,
                &p,
                *len,
                *row,
                n,
            )?;
            g.attention(
                &b.shape,
                None,
                &q.slice(r.start * qd..r.end * qd),
                k,
                v,
                &mut out.slice_mut(r.start * qd..r.end * qd),
                n,
                *len,
                &p,
            )?;
            *len += n;
        }
        dev(&b.o)?.launch(&out.slice(..), t, &mut x.slice_mut(..), Epilogue::Add)
    }

    /// x += relu²(h · upᵀ) · downᵀ.
    fn mlp(
        &self,
        up: DeviceRows,
        down: DeviceRows,
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        t: usize,
    ) -> Result<()> {
        let mut u = self.gpu.output(t * up.rows)?;
        up.launch(&h.slice(..), t, &mut u.slice_mut(..), Epilogue::Relu2)?;
        down.launch(&u.slice(..), t, &mut x.slice_mut(..), Epilogue::Add)
    }

    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        m: &NemotronH,
        cpu: &Cpu,
        layer: usize,
        b: &Moe,
        bias: &CudaSlice<f32>,
        counts: &Mutex<CudaSlice<u32>>,
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        t: usize,
    ) -> Result<()> {
        let g = self.gpu;
        let (ne, k, n) = (m.n_expert, m.n_expert_used, m.n_embd);
        let mut logits = g.output(t * ne)?;
        dev(&b.router)?.launch(&h.slice(..), t, &mut logits.slice_mut(..), Epilogue::Store)?;
        let mut ids = g.output::<i32>(t * k)?;
        let mut wts = g.output(t * k)?;
        {
            let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
            g.route_topk(
                &logits,
                DeviceGating::SigmoidBias(bias),
                &mut ids,
                &mut wts,
                &mut c,
                t,
                k,
                m.weights_norm,
                m.weights_scale,
            )?;
        }
        match (b.up.device, b.down.device) {
            (Some(up), Some(down)) => {
                if t <= ID_PATH_MAX_TOKENS {
                    let pairs = t * k;
                    let mut u = g.output(pairs * b.ff)?;
                    up.matmul_id(
                        b.ff,
                        ne,
                        &ids,
                        &h.slice(..),
                        &mut u.slice_mut(..),
                        pairs,
                        k,
                        false,
                        None,
                        Epilogue::Relu2,
                    )?;
                    let mut y = g.output(pairs * n)?;
                    down.matmul_id(
                        n,
                        ne,
                        &ids,
                        &u.slice(..),
                        &mut y.slice_mut(..),
                        pairs,
                        k,
                        true,
                        None,
                        Epilogue::Store,
                    )?;
                    g.moe_combine(&y, None, &wts, x, t, k, n, true)?;
                } else {
                    let ids_h = g.to_host(&ids)?;
                    let up_of = |e: usize| DeviceRows {
                        start: e * b.ff,
                        rows: b.ff,
                        ..up
                    };
                    let down_of = |e: usize| DeviceRows {
                        start: e * n,
                        rows: n,
                        ..down
                    };
                    self.grouped(m, &up_of, &down_of, &ids_h, None, &wts, h, x, t, b.ff)?;
                }
                self.shared(b, h, x, t)
            }
            _ => {
                let ids_h = g.to_host(&ids)?;
                if t > 1 && self.prefetched(m, layer, &ids_h, &wts, h, x, t, b.ff)? {
                    return self.shared(b, h, x, t);
                }
                if t > 1 {
                    if let Some(o) = &self.offload {
                        let mut selected = vec![false; ne];
                        for &e in &ids_h {
                            selected[e as usize] = true;
                        }
                        let n_sel = selected.iter().filter(|&&s| s).count();
                        let bytes = n_sel * (b.up.data.len() + b.down.data.len()) / ne;
                        let copy = {
                            let c = o.costs.lock().unwrap_or_else(|e| e.into_inner());
                            c.prefers_copy(bytes, t * k)
                        };
                        if copy {
                            self.staged(m, o, b, &selected, None, &ids_h, &wts, h, x, t, true)?;
                            o.costs
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .gpu_batches += 1;
                            return self.shared(b, h, x, t);
                        }
                    }
                }
                // The CPU computes the selected experts while the GPU runs the shared one and, in
                // decode, the share of the experts copied to it meanwhile.
                let hh = g.to_host(h)?;
                let mut wts_h = g.to_host(&wts)?;
                let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
                for (p, (&e, &w)) in ids_h.iter().zip(&wts_h).enumerate() {
                    per_expert[e as usize].push((p / k, w));
                }
                let cache = self
                    .offload
                    .as_ref()
                    .and_then(|o| o.cache(layer).map(|c| (o, c)));
                if let (1, Some((o, cache))) = (t, cache) {
                    self.cached_decode(m, o, cache, b, &ids_h, &wts_h, &mut per_expert, h, x)?;
                } else if t == 1 {
                    if let Some((o, to_gpu)) = self.decode_split(m, b, &per_expert) {
                        let measure = o
                            .costs
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .copy_samples
                            < COPY_SAMPLES;
                        for (w, &e) in wts_h.iter_mut().zip(&ids_h) {
                            if !to_gpu[e as usize] {
                                *w = 0.0;
                            }
                        }
                        let masked = g.to_device(&wts_h)?;
                        self.staged(
                            m,
                            o,
                            b,
                            &to_gpu,
                            Some(&to_gpu),
                            &ids_h,
                            &masked,
                            h,
                            x,
                            t,
                            measure,
                        )?;
                        for (e, list) in per_expert.iter_mut().enumerate() {
                            if to_gpu[e] {
                                list.clear();
                            }
                        }
                    }
                }
                self.shared(b, h, x, t)?;
                let on_cpu = per_expert.iter().filter(|l| !l.is_empty()).count();
                if on_cpu == 0 {
                    return Ok(());
                }
                let started = Instant::now();
                let y = m.experts(cpu, b, &hh, t, &per_expert, false)?;
                if let Some(o) = &self.offload {
                    let spent = started.elapsed().as_secs_f64();
                    let mut c = o.costs.lock().unwrap_or_else(|e| e.into_inner());
                    if t > 1 {
                        c.cpu_s_per_pair = average(c.cpu_s_per_pair, spent / (t * k) as f64);
                        c.cpu_batches += 1;
                    } else if on_cpu > 0 {
                        // A sample far above the estimate (the CPU preempted, a cold cache) moves
                        // it by at most a factor of three.
                        let sample = spent / on_cpu as f64;
                        let sample = c
                            .cpu_s_per_decode_expert
                            .map_or(sample, |e| sample.min(3.0 * e));
                        c.cpu_s_per_decode_expert = average(c.cpu_s_per_decode_expert, sample);
                    }
                }
                let dy = g.to_device(&y)?;
                g.add(x, &dy, t * n)
            }
        }
    }

    /// x += the shared expert of h, when the layer has one.
    fn shared(&self, b: &Moe, h: &CudaSlice<f32>, x: &mut CudaSlice<f32>, t: usize) -> Result<()> {
        match (&b.up_sh, &b.down_sh) {
            (Some(u), Some(d)) => self.mlp(dev(u)?, dev(d)?, h, x, t),
            _ => Ok(()),
        }
    }

    /// The experts of a RAM layer marked in `copy` copied into the staging buffer (runs of
    /// consecutive experts in one copy each) and computed as [`DeviceParts::grouped`] for the
    /// pairs routed to them (`only`: the pairs of other experts are left to the caller, their
    /// weights zeroed in `wts`). With `measure`, waits for the copies and records their speed;
    /// without, everything stays queued (the CPU works meanwhile).
    #[allow(clippy::too_many_arguments)]
    fn staged(
        &self,
        m: &NemotronH,
        o: &Offload,
        b: &Moe,
        copy: &[bool],
        only: Option<&[bool]>,
        ids_h: &[i32],
        wts: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        t: usize,
        measure: bool,
    ) -> Result<()> {
        let selected = copy;
        let g = self.gpu;
        let (ne, n, ff) = (m.n_expert, m.n_embd, b.ff);
        let mut stage = o.stage.lock().unwrap_or_else(|e| e.into_inner());
        let (up_s, down_s) = stage.first_for(g, b)?;
        let Some(pairs) = self.pairs(m, ids_h, only, t)? else {
            return Ok(());
        };
        if measure {
            g.synchronize()?;
        }
        let started = Instant::now();
        // Slots in expert order, so that consecutive selected experts are one copy.
        let mut slot = vec![0usize; ne];
        let (mut next, mut e) = (0, 0);
        let mut copied = 0;
        while e < ne {
            if !selected[e] {
                e += 1;
                continue;
            }
            let first = e;
            while e < ne && selected[e] {
                slot[e] = next + e - first;
                e += 1;
            }
            let (up_rows, down_rows) = expert_rows(b, n, first..e);
            g.stage_rows(up_s, next * ff, up_rows)?;
            g.stage_rows(down_s, next * n, down_rows)?;
            copied += up_rows.len() + down_rows.len();
            next += e - first;
        }
        if measure {
            time_copies(g, &o.costs, copied, started)?;
        }
        let (up_m, down_m): (&DeviceMatrix, &DeviceMatrix) = (up_s, down_s);
        let up_of = |e: usize| DeviceRows {
            gpu: g,
            m: up_m,
            start: slot[e] * ff,
            rows: ff,
        };
        let down_of = |e: usize| DeviceRows {
            gpu: g,
            m: down_m,
            start: slot[e] * n,
            rows: n,
        };
        self.grouped_pairs(m, &pairs, &up_of, &down_of, wts, h, x, t, ff)
    }

    /// At the start of a pass: when it is a prefill batch that copying pays for (by the costs
    /// measured so far, for whole layers) and there are two staging buffers, plans to prefetch
    /// every RAM MoE layer and queues the copies of the first two.
    fn start_prefetch(&self, m: &NemotronH, t: usize) -> Result<()> {
        let Some(o) = &self.offload else {
            return Ok(());
        };
        let mut stage = o.stage.lock().unwrap_or_else(|e| e.into_inner());
        stage.plan.clear();
        if t <= ID_PATH_MAX_TOKENS || stage.bufs.len() < 2 {
            return Ok(());
        }
        let ram: Vec<(usize, &Moe)> = m
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.block {
                Block::Moe(b) if b.up.device.is_none() => Some((i, b)),
                _ => None,
            })
            .collect();
        let Some(&(_, first)) = ram.first() else {
            return Ok(());
        };
        let layer_bytes = first.up.data.len() + first.down.data.len();
        let pays = match o.prefetch {
            Prefetch::On => true,
            Prefetch::Off => false,
            Prefetch::Auto => {
                let c = o.costs.lock().unwrap_or_else(|e| e.into_inner());
                c.cpu_s_per_pair.is_some()
                    && c.copy_bytes_per_s.is_some()
                    && c.prefers_copy(layer_bytes, t * m.n_expert_used)
            }
        };
        if !pays {
            return Ok(());
        }
        stage.plan = ram.iter().map(|(i, _)| *i).collect();
        // The buffers may still be read by work queued before this pass.
        let ready = self.gpu.compute_event()?;
        for (slot, &(layer, b)) in ram.iter().take(2).enumerate() {
            self.fill(&mut stage, slot, layer, b, &ready)?;
        }
        Ok(())
    }

    /// Queues the copy of all of layer `layer`'s experts into buffer `slot` on the copy stream,
    /// after `ready` (the compute stream's last use of that buffer).
    fn fill(
        &self,
        stage: &mut Staging,
        slot: usize,
        layer: usize,
        b: &Moe,
        ready: &CudaEvent,
    ) -> Result<()> {
        let g = self.gpu;
        let copy = stage
            .copy
            .clone()
            .ok_or_else(|| anyhow!("no copy stream"))?;
        copy.wait(ready)
            .map_err(|e| anyhow!("CUDA event wait: {e:?}"))?;
        let (up_s, down_s) = &mut stage.bufs[slot];
        up_s.restage(b.up.ty, b.up.cols)?;
        down_s.restage(b.down.ty, b.down.cols)?;
        // Experts the layer's cache holds are computed from there: the runs between them are
        // copied, each expert at its own place in the buffer.
        let cached: Vec<bool> = match self.offload.as_ref().and_then(|o| o.cache(layer)) {
            Some(c) => {
                let c = c.lock().unwrap_or_else(|e| e.into_inner());
                c.slot_of.iter().map(Option::is_some).collect()
            }
            None => Vec::new(),
        };
        let ne = b.up.rows / b.ff.max(1);
        let (urows, drows) = (b.up.rows / ne.max(1), b.down.rows / ne.max(1));
        let mut e = 0;
        while e < ne {
            if cached.get(e).copied().unwrap_or(false) {
                e += 1;
                continue;
            }
            let first = e;
            while e < ne && !cached.get(e).copied().unwrap_or(false) {
                e += 1;
            }
            let (up_src, down_src) = expert_rows(b, drows, first..e);
            g.stage_rows_on(&copy, up_s, first * urows, up_src)?;
            g.stage_rows_on(&copy, down_s, first * drows, down_src)?;
        }
        let done = copy
            .record_event(None)
            .map_err(|e| anyhow!("CUDA event: {e:?}"))?;
        stage.filling[slot] = Some((layer, done));
        Ok(())
    }

    /// A prefetched RAM layer's experts, computed from the buffer they were copied into (the
    /// compute stream waits for that copy); then that buffer starts taking the layer two RAM
    /// layers on. False when this pass does not prefetch `layer`.
    #[allow(clippy::too_many_arguments)]
    fn prefetched(
        &self,
        m: &NemotronH,
        layer: usize,
        ids_h: &[i32],
        wts: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        t: usize,
        ff: usize,
    ) -> Result<bool> {
        let Some(o) = &self.offload else {
            return Ok(false);
        };
        let g = self.gpu;
        let n = m.n_embd;
        let mut stage = o.stage.lock().unwrap_or_else(|e| e.into_inner());
        let Some(at) = stage.plan.iter().position(|&l| l == layer) else {
            return Ok(false);
        };
        let slot = at % 2;
        match stage.filling[slot].take() {
            Some((l, ev)) if l == layer => g.compute_wait(&ev)?,
            _ => bail!("RAM layer {layer} was not prefetched into staging buffer {slot}"),
        }
        {
            let (up_m, down_m): (&DeviceMatrix, &DeviceMatrix) = {
                let (u, d) = &stage.bufs[slot];
                (u, d)
            };
            // Cached experts were not copied (see `fill`): their rows are in the cache.
            let cache = o
                .cache(layer)
                .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()));
            let in_cache = |e: usize| cache.as_ref().and_then(|c| c.slot_of[e].map(|s| (c, s)));
            let up_of = |e: usize| match in_cache(e) {
                Some((c, s)) => DeviceRows {
                    gpu: g,
                    m: &c.mats[0],
                    start: s * ff,
                    rows: ff,
                },
                None => DeviceRows {
                    gpu: g,
                    m: up_m,
                    start: e * ff,
                    rows: ff,
                },
            };
            let down_of = |e: usize| match in_cache(e) {
                Some((c, s)) => DeviceRows {
                    gpu: g,
                    m: &c.mats[1],
                    start: s * n,
                    rows: n,
                },
                None => DeviceRows {
                    gpu: g,
                    m: down_m,
                    start: e * n,
                    rows: n,
                },
            };
            self.grouped(m, &up_of, &down_of, ids_h, None, wts, h, x, t, ff)?;
        }
        if let Some(&next) = stage.plan.get(at + 2) {
            if let Block::Moe(b) = &m.layers[next].block {
                let ready = g.compute_event()?;
                self.fill(&mut stage, slot, next, b, &ready)?;
            }
        }
        let mut c = o.costs.lock().unwrap_or_else(|e| e.into_inner());
        c.gpu_batches += 1;
        c.prefetched_batches += 1;
        Ok(true)
    }

    /// A decode step of a RAM layer with an expert cache: the selected experts in the cache run
    /// there; of the others, the most used are copied over (as many as the measured costs say
    /// finish with the CPU's share) into cache slots they win (else the staging buffer), and
    /// the CPU keeps the rest, which stay in `per_expert` for the caller.
    #[allow(clippy::too_many_arguments)]
    fn cached_decode(
        &self,
        m: &NemotronH,
        o: &Offload,
        cache: &Mutex<ExpertCache>,
        b: &Moe,
        ids_h: &[i32],
        wts_h: &[f32],
        per_expert: &mut [Vec<(usize, f32)>],
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let g = self.gpu;
        let (ne, n, ff) = (m.n_expert, m.n_embd, b.ff);
        let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
        let selected: Vec<usize> = (0..ne).filter(|&e| !per_expert[e].is_empty()).collect();
        c.note(&selected);
        let mut on_gpu = vec![false; ne];
        for &e in &selected {
            on_gpu[e] = c.slot_of[e].is_some();
        }
        let mut rest: Vec<usize> = selected.iter().copied().filter(|&e| !on_gpu[e]).collect();
        rest.sort_by(|&a, &b| c.uses[b].total_cmp(&c.uses[a]).then(a.cmp(&b)));
        let (n_copy, measure) = {
            let mut costs = o.costs.lock().unwrap_or_else(|e| e.into_inner());
            let n_copy = match costs.cpu_s_per_decode_expert {
                None => 0,
                Some(cpu) => {
                    let eb = (b.up.data.len() + b.down.data.len()) / ne.max(1);
                    costs.copies_beside_cpu(rest.len(), cpu, eb)
                }
            };
            costs.split_steps += (n_copy > 0) as u64;
            (n_copy, n_copy > 0 && costs.copy_samples < COPY_SAMPLES)
        };
        let copies = &rest[..n_copy];
        for &e in copies {
            on_gpu[e] = true;
        }
        if !on_gpu.iter().any(|&v| v) {
            return Ok(());
        }
        // The GPU's share: its pairs' index tables and weights go up before any copy is queued.
        let masked: Vec<f32> = ids_h
            .iter()
            .zip(wts_h)
            .map(|(&e, &w)| if on_gpu[e as usize] { w } else { 0.0 })
            .collect();
        let masked = g.to_device(&masked)?;
        let Some(pairs) = self.pairs(m, ids_h, Some(&on_gpu), 1)? else {
            return Ok(());
        };
        let mut stage = o.stage.lock().unwrap_or_else(|e| e.into_inner());
        let (up_s, down_s) = stage.first_for(g, b)?;
        if measure {
            g.synchronize()?;
        }
        let started = Instant::now();
        let mut staged_at = vec![None; ne];
        let (mut next, mut copied) = (0, 0);
        for &e in copies {
            let (up_rows, down_rows) = expert_rows(b, n, e..e + 1);
            match c.admit(e, &on_gpu) {
                Some(slot) => {
                    c.fill(g, slot, e, &[&b.up, &b.down])?;
                }
                None => {
                    g.stage_rows(up_s, next * ff, up_rows)?;
                    g.stage_rows(down_s, next * n, down_rows)?;
                    staged_at[e] = Some(next);
                    next += 1;
                }
            }
            copied += up_rows.len() + down_rows.len();
        }
        if measure {
            time_copies(g, &o.costs, copied, started)?;
        }
        let (up_s, down_s): (&DeviceMatrix, &DeviceMatrix) = (up_s, down_s);
        let c = &*c;
        // An expert's rows: in the staging buffer where it was staged, else in its cache slot.
        fn rows_in<'d>(
            gpu: &'d Gpu,
            (staged, cached): (&'d DeviceMatrix, &'d DeviceMatrix),
            (at, slot): (Option<usize>, Option<usize>),
            rows: usize,
        ) -> DeviceRows<'d> {
            let (m, i) = match at {
                Some(at) => (staged, at),
                None => (cached, slot.unwrap_or(0)),
            };
            DeviceRows {
                gpu,
                m,
                start: i * rows,
                rows,
            }
        }
        let up_of = |e: usize| rows_in(g, (up_s, &c.mats[0]), (staged_at[e], c.slot_of[e]), ff);
        let down_of = |e: usize| rows_in(g, (down_s, &c.mats[1]), (staged_at[e], c.slot_of[e]), n);
        self.grouped_pairs(m, &pairs, &up_of, &down_of, &masked, h, x, 1, ff)?;
        for (e, list) in per_expert.iter_mut().enumerate() {
            if on_gpu[e] {
                list.clear();
            }
        }
        Ok(())
    }

    /// For a decode step of a RAM layer: which of the selected experts to copy to the GPU
    /// while the CPU computes the others, so that both finish together by the measured costs
    /// (None: all on the CPU — no staging, or the CPU not measured yet).
    fn decode_split<'o>(
        &'o self,
        m: &NemotronH,
        b: &Moe,
        per_expert: &[Vec<(usize, f32)>],
    ) -> Option<(&'o Offload, Vec<bool>)> {
        let o = self.offload.as_ref()?;
        let mut c = o.costs.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = c.cpu_s_per_decode_expert?;
        let eb = (b.up.data.len() + b.down.data.len()) / m.n_expert.max(1);
        let chosen: Vec<usize> = (0..per_expert.len())
            .filter(|&e| !per_expert[e].is_empty())
            .collect();
        let n = chosen.len();
        let g = c.copies_beside_cpu(n, cpu, eb);
        if g == 0 {
            return None;
        }
        c.split_steps += 1;
        let mut to_gpu = vec![false; per_expert.len()];
        for &e in &chosen[n - g..] {
            to_gpu[e] = true;
        }
        Some((o, to_gpu))
    }

    /// Routed experts of a prefill batch on the device, given the ids copied back: the tokens
    /// are grouped per expert (one gather), each selected expert (its rows from `up_of` and
    /// `down_of`) runs once over its tokens, and the weighted outputs are added to x.
    #[allow(clippy::too_many_arguments)]
    fn grouped<'d>(
        &self,
        m: &NemotronH,
        up_of: &dyn Fn(usize) -> DeviceRows<'d>,
        down_of: &dyn Fn(usize) -> DeviceRows<'d>,
        ids_h: &[i32],
        only: Option<&[bool]>,
        wts: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        t: usize,
        ff: usize,
    ) -> Result<()> {
        match self.pairs(m, ids_h, only, t)? {
            Some(p) => self.grouped_pairs(m, &p, up_of, down_of, wts, h, x, t, ff),
            None => Ok(()),
        }
    }

    /// The (token, expert) pairs of `ids_h` that run here (all, or those of the experts marked
    /// in `only`), grouped per expert, with their index tables on the device (None: no pair).
    /// Callers that queue copies build this first: an upload from pageable memory waits for
    /// everything queued before it, which would hold the CPU until those copies end.
    fn pairs(
        &self,
        m: &NemotronH,
        ids_h: &[i32],
        only: Option<&[bool]>,
        t: usize,
    ) -> Result<Option<Pairs>> {
        let g = self.gpu;
        let (ne, k) = (m.n_expert, m.n_expert_used);
        let runs = |e: i32| only.is_none_or(|o| o[e as usize]);
        // In expert order: grouped row r holds a token of `token_of_row[r]`, and `pos[p]` is
        // pair p's row (0 for pairs computed elsewhere, whose weight the caller zeroed).
        let pairs = ids_h.iter().filter(|&&e| runs(e)).count();
        if pairs == 0 {
            return Ok(None);
        }
        let mut start = vec![0usize; ne + 1];
        for &e in ids_h.iter().filter(|&&e| runs(e)) {
            start[e as usize + 1] += 1;
        }
        for e in 0..ne {
            start[e + 1] += start[e];
        }
        let mut fill = start.clone();
        let mut token_of_row = vec![0i32; pairs];
        let mut pos = vec![0i32; t * k];
        for (p, &e) in ids_h.iter().enumerate().filter(|(_, &e)| runs(e)) {
            let r = fill[e as usize];
            fill[e as usize] += 1;
            token_of_row[r] = (p / k) as i32;
            pos[p] = r as i32;
        }
        Ok(Some(Pairs {
            start,
            rows_idx: g.to_device(&token_of_row)?,
            pos: g.to_device(&pos)?,
        }))
    }

    /// [`DeviceParts::grouped`] for pairs already grouped.
    #[allow(clippy::too_many_arguments)]
    fn grouped_pairs<'d>(
        &self,
        m: &NemotronH,
        p: &Pairs,
        up_of: &dyn Fn(usize) -> DeviceRows<'d>,
        down_of: &dyn Fn(usize) -> DeviceRows<'d>,
        wts: &CudaSlice<f32>,
        h: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        t: usize,
        ff: usize,
    ) -> Result<()> {
        let g = self.gpu;
        let (ne, k, n) = (m.n_expert, m.n_expert_used, m.n_embd);
        let (start, rows_idx, pos_d) = (&p.start, &p.rows_idx, &p.pos);
        let pairs = start[ne];
        let mut xg = g.output(pairs * n)?;
        g.gather_rows(h, rows_idx, &mut xg, t, n, t - 1)?;
        // Each product runs once per weight matrix the experts live in (the resident tensor,
        // or a staging buffer): all its experts' groups in one launch.
        let products = |of: &dyn Fn(usize) -> DeviceRows<'d>,
                        rows: usize,
                        x: &CudaSlice<f32>,
                        y: &mut CudaSlice<f32>,
                        epi: Epilogue|
         -> Result<()> {
            let mut by_matrix: Vec<(&DeviceMatrix, Vec<Group>)> = Vec::new();
            for e in (0..ne).filter(|&e| start[e + 1] > start[e]) {
                let w = of(e);
                let group = (w.start, start[e], start[e + 1] - start[e]);
                match by_matrix.iter_mut().find(|(m, _)| std::ptr::eq(*m, w.m)) {
                    Some((_, gs)) => gs.push(group),
                    None => by_matrix.push((w.m, vec![group])),
                }
            }
            for (m, groups) in by_matrix {
                g.matmul_grouped(m, rows, &groups, &x.slice(..), &mut y.slice_mut(..), epi)?;
            }
            Ok(())
        };
        let mut u = g.output(pairs * ff)?;
        products(up_of, ff, &xg, &mut u, Epilogue::Relu2)?;
        let mut y = g.output(pairs * n)?;
        products(down_of, n, &u, &mut y, Epilogue::Store)?;
        g.moe_combine(&y, Some(pos_d), wts, x, t, k, n, true)
    }
}
