//! `nemotron_h_moe` (Nemotron 3 Nano) and `nemotron_h` (Nano 9B v2): hybrid stacks of Mamba-2,
//! attention without positional encoding, and MoE (sigmoid router with a selection bias, relu²
//! experts, one shared expert) or dense relu² MLP blocks. The math follows
//! ../shared/spec/nemotron-h.md and ../shared/tools/ref_nemotron.py.

mod device;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::{embed, segments, Forward, LayerState, Seq, State, Tensors};
use crate::backend::attention::{self, AttnShape};
use crate::backend::cpu::{rms_norm, sigmoid, softplus, Cpu, Matrix, Precision};
use crate::backend::cuda::MlpJob;
use crate::backend::ssm::{self, SsmShape};
use crate::backend::state::KvTypes;

/// Mamba-2 mixer weights.
struct Mamba<'a> {
    ssm_in: Matrix<'a>,
    conv_w: Vec<f32>,
    conv_b: Option<Vec<f32>>,
    dt_bias: Vec<f32>,
    a: Vec<f32>,
    d: Vec<f32>,
    norm: Vec<f32>,
    out: Matrix<'a>,
}

/// Attention weights (no positional encoding).
struct Attention<'a> {
    q: Matrix<'a>,
    k: Matrix<'a>,
    v: Matrix<'a>,
    o: Matrix<'a>,
    shape: AttnShape,
}

/// Routed experts (stacked, `ff` rows each) and the optional shared expert.
struct Moe<'a> {
    router: Matrix<'a>,
    bias: Vec<f32>,
    up: Matrix<'a>,
    down: Matrix<'a>,
    ff: usize,
    up_sh: Option<Matrix<'a>>,
    down_sh: Option<Matrix<'a>>,
}

/// One layer's weights, by kind.
enum Block<'a> {
    Mamba(Mamba<'a>),
    Attention(Attention<'a>),
    Moe(Moe<'a>),
    Mlp { up: Matrix<'a>, down: Matrix<'a> },
}

struct Layer<'a> {
    norm: Vec<f32>,
    block: Block<'a>,
}

pub struct NemotronH<'a> {
    n_embd: usize,
    n_vocab: usize,
    n_ctx_train: usize,
    eps: f32,
    ssm: SsmShape,
    n_expert: usize,
    n_expert_used: usize,
    weights_norm: bool,
    weights_scale: f32,
    embd: Matrix<'a>,
    layers: Vec<Layer<'a>>,
    out_norm: Vec<f32>,
    output: Matrix<'a>,
    /// How often each routed expert was selected, per MoE layer (for placement and tuning).
    usage: std::sync::Mutex<Vec<Vec<u64>>>,
    /// The device-resident pass, when the placement put every non-expert weight on the GPU.
    dev: Option<device::DeviceParts<'a>>,
}

/// One relu² feed-forward block to run: its two matrices and `t` input rows.
struct FeedForward<'a, 'x> {
    up: Matrix<'a>,
    down: Matrix<'a>,
    x: &'x [f32],
    t: usize,
}

impl<'a> NemotronH<'a> {
    /// (layer, selections per expert) for every MoE layer, counted over all tokens run so far.
    pub fn routing_counts(&self) -> Result<Vec<(usize, Vec<u64>)>> {
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(d) = &self.dev {
            for (layer, counts) in d.expert_counts()? {
                u[layer].resize(counts.len(), 0);
                for (a, c) in u[layer].iter_mut().zip(counts) {
                    *a += c as u64;
                }
            }
        }
        Ok(u.iter()
            .enumerate()
            .filter(|(_, c)| !c.is_empty())
            .map(|(i, c)| (i, c.clone()))
            .collect())
    }

    pub fn load(t: &Tensors<'a>) -> Result<NemotronH<'a>> {
        let g = t.gguf;
        let md = g.metadata();
        let arch = g.architecture()?.to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = md.get_usize(&key("block_count"))?;
        if n_layer == 0 || n_layer > 4096 {
            bail!("{}: {n_layer} layers is out of range", key("block_count"));
        }
        let n_embd = md.get_usize(&key("embedding_length"))?;
        let eps = match md.get(&key("attention.layer_norm_rms_epsilon")) {
            Some(_) => md.get_positive_f32(&key("attention.layer_norm_rms_epsilon"))?,
            None => md.get_positive_f32(&key("attention.layer_norm_epsilon"))?,
        };
        let n_head = md.get_usize(&key("attention.head_count"))?;
        let n_kv = md.get_per_layer(&key("attention.head_count_kv"), n_layer)?;
        let ff = md.get_per_layer(&key("feed_forward_length"), n_layer)?;
        let head_dim = md
            .get_usize(&key("attention.key_length"))
            .unwrap_or(n_embd / n_head.max(1));
        let scale = md
            .opt_scale(&key("attention.scale"))?
            .filter(|s| *s != 0.0)
            .unwrap_or(1.0 / (head_dim as f32).sqrt());
        let ssm = SsmShape {
            d_conv: md.get_usize(&key("ssm.conv_kernel"))?,
            d_inner: md.get_usize(&key("ssm.inner_size"))?,
            d_state: md.get_usize(&key("ssm.state_size"))?,
            n_head: md.get_usize(&key("ssm.time_step_rank"))?,
            n_group: md.get_usize(&key("ssm.group_count"))?,
        };
        if ssm.d_conv == 0
            || ssm.n_head == 0
            || ssm.n_group == 0
            || !ssm.d_inner.is_multiple_of(ssm.n_head)
            || !ssm.n_head.is_multiple_of(ssm.n_group)
        {
            bail!("{arch}: inconsistent ssm.* sizes {ssm:?}");
        }
        let n_expert = md.get_usize(&key("expert_count")).unwrap_or(0);
        let n_expert_used = md.get_usize(&key("expert_used_count")).unwrap_or(0);
        let weights_norm = md.get_bool(&key("expert_weights_norm")).unwrap_or(false);
        let weights_scale = md.opt_scale(&key("expert_weights_scale"))?.unwrap_or(1.0);

        let (embd, output, n_vocab) = t.embedding_and_output(n_embd)?;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = |n: &str| format!("blk.{i}.{n}");
            let block = if n_kv[i] == 0 && ff[i] == 0 {
                let (di, ng, ds, nh) = (ssm.d_inner, ssm.n_group, ssm.d_state, ssm.n_head);
                let ch = ssm.conv_channels();
                Block::Mamba(Mamba {
                    ssm_in: t.matrix(&p("ssm_in.weight"), n_embd, 2 * di + 2 * ng * ds + nh)?,
                    conv_w: t.vector(&p("ssm_conv1d.weight"), ch * ssm.d_conv)?,
                    conv_b: t.opt_vector(&p("ssm_conv1d.bias"), ch)?,
                    dt_bias: t.vector(&p("ssm_dt.bias"), nh)?,
                    a: t.vector(&p("ssm_a"), nh)?,
                    d: t.vector(&p("ssm_d"), nh)?,
                    norm: t.vector(&p("ssm_norm.weight"), di)?,
                    out: t.matrix(&p("ssm_out.weight"), di, n_embd)?,
                })
            } else if ff[i] == 0 {
                if n_head % n_kv[i] != 0 {
                    bail!(
                        "layer {i}: {n_head} heads do not divide into {} kv heads",
                        n_kv[i]
                    );
                }
                let kvd = n_kv[i] * head_dim;
                Block::Attention(Attention {
                    q: t.matrix(&p("attn_q.weight"), n_embd, n_head * head_dim)?,
                    k: t.matrix(&p("attn_k.weight"), n_embd, kvd)?,
                    v: t.matrix(&p("attn_v.weight"), n_embd, kvd)?,
                    o: t.matrix(&p("attn_output.weight"), n_head * head_dim, n_embd)?,
                    shape: AttnShape {
                        n_head,
                        n_head_kv: n_kv[i],
                        head_dim,
                        scale,
                        window: None,
                    },
                })
            } else if t.opt(&p("ffn_gate_inp.weight")).is_some() {
                if n_expert == 0 || n_expert_used == 0 || n_expert_used > n_expert {
                    bail!("layer {i}: expert_count {n_expert} / expert_used_count {n_expert_used} out of range");
                }
                let exp_ff = ff[i];
                let up_t = t.shaped(
                    &p("ffn_up_exps.weight"),
                    &[n_embd as u64, exp_ff as u64, n_expert as u64],
                )?;
                let down_t = t.shaped(
                    &p("ffn_down_exps.weight"),
                    &[exp_ff as u64, n_embd as u64, n_expert as u64],
                )?;
                let sh = match t.opt(&p("ffn_up_shexp.weight")) {
                    Some(u) => {
                        let sff = *u.info.dims.get(1).unwrap_or(&0) as usize;
                        (
                            Some(t.matrix(&p("ffn_up_shexp.weight"), n_embd, sff)?),
                            Some(t.matrix(&p("ffn_down_shexp.weight"), sff, n_embd)?),
                        )
                    }
                    None => (None, None),
                };
                Block::Moe(Moe {
                    router: t.matrix(&p("ffn_gate_inp.weight"), n_embd, n_expert)?,
                    bias: t
                        .opt_vector(&p("exp_probs_b.bias"), n_expert)?
                        .unwrap_or(vec![0.0; n_expert]),
                    up: t.weight(&up_t, exp_ff * n_expert, n_embd)?,
                    down: t.weight(&down_t, n_embd * n_expert, exp_ff)?,
                    ff: exp_ff,
                    up_sh: sh.0,
                    down_sh: sh.1,
                })
            } else {
                Block::Mlp {
                    up: t.matrix(&p("ffn_up.weight"), n_embd, ff[i])?,
                    down: t.matrix(&p("ffn_down.weight"), ff[i], n_embd)?,
                }
            };
            layers.push(Layer {
                norm: t.vector(&p("attn_norm.weight"), n_embd)?,
                block,
            });
        }
        let mut m = NemotronH {
            n_embd,
            n_vocab,
            n_ctx_train: md.get_usize(&key("context_length")).unwrap_or(4096),
            eps,
            ssm,
            n_expert,
            n_expert_used,
            weights_norm,
            weights_scale,
            embd,
            layers,
            out_norm: t.vector("output_norm.weight", n_embd)?,
            output,
            usage: std::sync::Mutex::new(vec![Vec::new(); n_layer]),
            dev: None,
        };
        let staging = t.opts.device.map_or(0, |d| d.plan.staging_bytes);
        let cache = t.opts.device.map_or(0, |d| d.plan.cache_bytes);
        m.dev = device::DeviceParts::new(&m, staging, cache, t.opts.pass)?;
        Ok(m)
    }

    /// The Mamba-2 mixer over the rows of several sequences (`segs`, each with its state in
    /// `sts`): the products run over all rows at once, the conv and scan per sequence.
    #[allow(clippy::too_many_arguments)]
    fn mamba(
        &self,
        cpu: &Cpu,
        b: &Mamba,
        sts: &mut [&mut LayerState],
        segs: &[std::ops::Range<usize>],
        h: &[f32],
        t: usize,
    ) -> Result<Vec<f32>> {
        let Mamba {
            ssm_in,
            conv_w,
            conv_b,
            dt_bias,
            a,
            d,
            norm,
            out,
        } = b;
        let s = &self.ssm;
        let (di, ch, nh) = (s.d_inner, s.conv_channels(), s.n_head);
        let width = ssm_in.rows;
        let mut zx = vec![0f32; t * width];
        cpu.matmul(ssm_in, h, t, &mut zx)?;
        let mut xbc = Vec::with_capacity(t * ch);
        let mut dt = Vec::with_capacity(t * nh);
        for row in zx.chunks(width) {
            xbc.extend_from_slice(&row[di..di + ch]);
            dt.extend(
                row[di + ch..]
                    .iter()
                    .zip(dt_bias)
                    .map(|(v, b)| softplus(v + b)),
            );
        }
        let mut y = Vec::with_capacity(t * di);
        for (st, r) in sts.iter_mut().zip(segs) {
            let xs = &xbc[r.start * ch..r.end * ch];
            let conv = ssm::conv(st, s, xs, r.len(), conv_w, conv_b.as_deref())?;
            let dts = &dt[r.start * nh..r.end * nh];
            y.extend(ssm::scan(st, s, &conv, dts, r.len(), a, d)?);
        }
        // Gate with SiLU(z), then RMSNorm per group.
        for (yr, zr) in y.chunks_mut(di).zip(zx.chunks(width)) {
            for (v, z) in yr.iter_mut().zip(&zr[..di]) {
                *v *= crate::backend::cpu::silu(*z);
            }
        }
        let gs = di / s.n_group;
        for row in y.chunks_mut(di) {
            for (g, chunk) in row.chunks_mut(gs).enumerate() {
                rms_norm(chunk, &norm[g * gs..(g + 1) * gs], self.eps);
            }
        }
        let mut o = vec![0f32; t * self.n_embd];
        cpu.matmul(out, &y, t, &mut o)?;
        Ok(o)
    }

    /// Attention over the rows of several sequences, each attending over its own cache.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        cpu: &Cpu,
        b: &Attention,
        sts: &mut [&mut LayerState],
        segs: &[std::ops::Range<usize>],
        h: &[f32],
        t: usize,
    ) -> Result<Vec<f32>> {
        let Attention { q, k, v, o, shape } = b;
        let mut qv = vec![0f32; t * q.rows];
        let mut kv = vec![0f32; t * k.rows];
        let mut vv = vec![0f32; t * v.rows];
        cpu.matmul(q, h, t, &mut qv)?;
        cpu.matmul(k, h, t, &mut kv)?;
        cpu.matmul(v, h, t, &mut vv)?;
        let a = attention::attend_each(sts, segs, shape, None, &qv, &kv, &vv)?;
        let mut out = vec![0f32; t * self.n_embd];
        cpu.matmul(o, &a, t, &mut out)?;
        Ok(out)
    }

    /// relu(x)²
    fn relu2(v: &mut [f32]) {
        for x in v {
            *x = if *x > 0.0 { *x * *x } else { 0.0 };
        }
    }

    /// Feed-forward blocks: on the GPU in one batch (one copy in, one out) when all their
    /// weights live there, else one by one on the CPU (a product whose weight is on the GPU
    /// still runs there).
    fn mlps(cpu: &Cpu, blocks: &[FeedForward]) -> Result<Vec<Vec<f32>>> {
        let on_gpu: Option<Vec<MlpJob>> = blocks
            .iter()
            .map(|b| {
                Some(MlpJob {
                    up: b.up.device?,
                    down: b.down.device?,
                    x: b.x,
                    t: b.t,
                })
            })
            .collect();
        match on_gpu {
            Some(jobs) if !jobs.is_empty() => {
                let gpu = jobs[0].up.gpu;
                gpu.set_normal_precision(cpu.precision == Precision::Normal);
                gpu.relu2_mlps(&jobs)
            }
            // The blocks run concurrently, each product's row chunks stolen by whichever
            // threads are free: one fork-join for the layer's experts instead of two per
            // expert.
            _ => blocks
                .par_iter()
                .map(|b| Self::mlp(cpu, &b.up, &b.down, b.x, b.t))
                .collect(),
        }
    }

    fn mlp(cpu: &Cpu, up: &Matrix, down: &Matrix, h: &[f32], t: usize) -> Result<Vec<f32>> {
        let mut u = vec![0f32; t * up.rows];
        cpu.matmul(up, h, t, &mut u)?;
        Self::relu2(&mut u);
        let mut o = vec![0f32; t * down.rows];
        cpu.matmul(down, &u, t, &mut o)?;
        Ok(o)
    }

    fn moe(&self, cpu: &Cpu, layer: usize, b: &Moe, h: &[f32], t: usize) -> Result<Vec<f32>> {
        let Moe { router, bias, .. } = b;
        let (ne, k) = (self.n_expert, self.n_expert_used);
        let mut logits = vec![0f32; t * ne];
        cpu.matmul(router, h, t, &mut logits)?;
        // Route: top-k by sigmoid + bias (ties to the lower index); weights are the sigmoids.
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (ti, row) in logits.chunks(ne).enumerate() {
            let p: Vec<f32> = row.iter().map(|&x| sigmoid(x)).collect();
            let mut idx: Vec<usize> = (0..ne).collect();
            idx.sort_by(|&a, &b| {
                (p[b] + bias[b])
                    .total_cmp(&(p[a] + bias[a]))
                    .then(a.cmp(&b))
            });
            let chosen = &idx[..k];
            let mut w: Vec<f32> = chosen.iter().map(|&e| p[e]).collect();
            if self.weights_norm {
                let s: f32 = w.iter().sum();
                let s = s.max(6.103_515_6e-5);
                w.iter_mut().for_each(|x| *x /= s);
            }
            for (&e, wi) in chosen.iter().zip(w) {
                per_expert[e].push((ti, wi * self.weights_scale));
            }
        }
        {
            let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            let counts = &mut u[layer];
            counts.resize(ne, 0);
            for (c, r) in counts.iter_mut().zip(&per_expert) {
                *c += r.len() as u64;
            }
        }
        self.experts(cpu, b, h, t, &per_expert, true)
    }

    /// The routed experts' weighted sum (plus the shared expert when `with_shared`) for `t`
    /// tokens of `h`, given the (token, weight) pairs routed to each expert: each selected
    /// expert runs once over its tokens.
    fn experts(
        &self,
        cpu: &Cpu,
        b: &Moe,
        h: &[f32],
        t: usize,
        per_expert: &[Vec<(usize, f32)>],
        with_shared: bool,
    ) -> Result<Vec<f32>> {
        let n = self.n_embd;
        let Moe {
            up,
            down,
            ff,
            up_sh,
            down_sh,
            ..
        } = b;
        let mut routed_inputs: Vec<(usize, Vec<f32>)> = Vec::new();
        for (e, routed) in per_expert.iter().enumerate() {
            if routed.is_empty() {
                continue;
            }
            let mut xs = Vec::with_capacity(routed.len() * n);
            for &(ti, _) in routed {
                xs.extend_from_slice(&h[ti * n..(ti + 1) * n]);
            }
            routed_inputs.push((e, xs));
        }
        let mut blocks: Vec<FeedForward> = routed_inputs
            .iter()
            .map(|(e, xs)| FeedForward {
                up: up.slice_rows(e * ff, *ff),
                down: down.slice_rows(e * n, n),
                x: xs,
                t: per_expert[*e].len(),
            })
            .collect();
        if let (true, Some(u), Some(d)) = (with_shared, up_sh, down_sh) {
            blocks.push(FeedForward {
                up: *u,
                down: *d,
                x: h,
                t,
            });
        }
        let ys = Self::mlps(cpu, &blocks)?;
        // Weighted sums in expert order, then the shared expert.
        let mut out = vec![0f32; t * n];
        for ((e, _), y) in routed_inputs.iter().zip(&ys) {
            for (&(ti, w), yr) in per_expert[*e].iter().zip(y.chunks(n)) {
                for (o, v) in out[ti * n..(ti + 1) * n].iter_mut().zip(yr) {
                    *o += w * v;
                }
            }
        }
        if ys.len() > routed_inputs.len() {
            for (o, v) in out.iter_mut().zip(&ys[routed_inputs.len()]) {
                *o += v;
            }
        }
        Ok(out)
    }
}

impl Forward for NemotronH<'_> {
    fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    fn n_ctx_train(&self) -> usize {
        self.n_ctx_train
    }

    fn offload_report(&self) -> Option<String> {
        self.dev.as_ref()?.offload_report(self)
    }

    fn expert_usage(&self) -> Result<Vec<(usize, Vec<u64>)>> {
        self.routing_counts()
    }

    fn new_state(&self, n_ctx: usize, kv: KvTypes) -> Result<State> {
        if let Some(d) = &self.dev {
            return d.new_state(self, n_ctx, kv);
        }
        let bytes = self
            .layers
            .iter()
            .map(|l| match &l.block {
                Block::Attention(Attention { shape, .. }) => {
                    attention::cache_bytes(shape, n_ctx, kv)
                }
                _ => 0,
            })
            .sum();
        crate::backend::cpu::ensure_memory(bytes, &format!("the KV cache of {n_ctx} tokens"))
            .map_err(|e| anyhow::anyhow!("{e} (lower -c/--ctx-size)"))?;
        let layers = self
            .layers
            .iter()
            .map(|l| match &l.block {
                Block::Mamba(_) => Ok(ssm::new_state(&self.ssm)),
                Block::Attention(Attention { shape, .. }) => attention::new_cache(shape, n_ctx, kv),
                _ => Ok(LayerState::None),
            })
            .collect::<Result<_>>()?;
        Ok(State::new(layers, n_ctx))
    }

    fn run(
        &self,
        cpu: &Cpu,
        seqs: &mut [Seq],
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        if let Some(d) = &self.dev {
            return d.run(self, cpu, seqs, tokens, all_logits);
        }
        let t = tokens.len();
        let segs = segments(seqs, t)?;
        let mut x = embed(&self.embd, tokens)?;
        for (i, l) in self.layers.iter().enumerate() {
            let mut h = x.clone();
            rms_norm(&mut h, &l.norm, self.eps);
            let mut sts: Vec<&mut LayerState> =
                seqs.iter_mut().map(|s| &mut s.state.layers[i]).collect();
            let y = match &l.block {
                Block::Mamba(b) => self.mamba(cpu, b, &mut sts, &segs, &h, t),
                Block::Attention(b) => self.attention(cpu, b, &mut sts, &segs, &h, t),
                Block::Moe(b) => self.moe(cpu, i, b, &h, t),
                Block::Mlp { up, down } => {
                    let block = FeedForward {
                        up: *up,
                        down: *down,
                        x: &h,
                        t,
                    };
                    Self::mlps(cpu, &[block]).map(|mut ys| ys.remove(0))
                }
            }
            .with_context(|| format!("layer {i}"))?;
            for (a, b) in x.iter_mut().zip(y) {
                *a += b;
            }
        }
        for seq in seqs.iter_mut() {
            seq.state.pos += seq.len;
        }
        super::logits(
            cpu,
            &x,
            &segs,
            &self.out_norm,
            self.eps,
            &self.output,
            all_logits,
        )
    }
}
