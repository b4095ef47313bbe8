//! The decoder-only transformer that `llama`, `qwen2`, `qwen3`, `qwen3moe`, `gemma3` and
//! `gpt-oss` share: pre-norm attention (RoPE in ggml's normal or neox pairing, optional q/k/v/o
//! biases, per-head q/k RMSNorm, sliding windows, sink logits, YaRN scaling) and a feed-forward
//! part that is a gated MLP (SiLU, GELU-tanh) or routed experts (softmax routers, SwiGLU or
//! gpt-oss's clamped SwiGLU, expert biases), each with optional post-norms (gemma3). The
//! architecture files only read their hyperparameters and tensors into a [`Decoder`] (a
//! description); the forward pass is written once here over `Ops`, which two executors
//! implement: `cpu.rs` (host memory, the thread pool; products of GPU-placed weights cross
//! PCIe one by one) and `cuda.rs` (everything but RAM experts resident on the GPU).

mod cpu;
mod cuda;

use std::ops::Range;

use anyhow::{bail, Context, Result};

use super::{segments, Forward, Seq, State, Tensors};
use crate::backend::attention::{self, AttnShape};
use crate::backend::cpu::{round_f16, silu, Cpu, Matrix};
use crate::backend::state::KvTypes;
use crate::gguf::Metadata;

/// Rotary position embedding of one layer, as ggml computes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// Dimensions rotated at the start of each head.
    pub n_rot: usize,
    pub base: f32,
    /// Neox pairing (i, i + n_rot/2) instead of adjacent pairs (2i, 2i + 1).
    pub neox: bool,
    /// Per-pair divisors of the angle (Llama 3.1's `rope_freqs.weight`).
    pub freq_factors: Option<Vec<f32>>,
    /// 1 / the context scaling factor (linear scaling, or YaRN's interpolated angles).
    pub freq_scale: f32,
    /// Multiplies cos and sin (`rope.scaling.attn_factor`, and YaRN's magnitude).
    pub mscale: f32,
    /// YaRN's correction dimensions: pairs below the first keep their trained angle, above the
    /// second are interpolated, a ramp mixes the two between.
    pub yarn: Option<[f32; 2]>,
}

impl Rope {
    /// Plain rotation of `n_rot` dims with base `base`.
    pub fn plain(n_rot: usize, base: f32, neox: bool) -> Rope {
        Rope {
            n_rot,
            base,
            neox,
            freq_factors: None,
            freq_scale: 1.0,
            mscale: 1.0,
            yarn: None,
        }
    }

    /// Context scaling as llama.cpp applies it: `linear` divides every angle by `factor`;
    /// `yarn` (ext factor 1) keeps fast pairs, interpolates slow ones and scales the magnitude
    /// by 1 + 0.1·ln(factor), over a trained context of `n_ctx_orig`; `none` nothing.
    /// `attn_factor` multiplies the magnitude in every case.
    #[allow(clippy::too_many_arguments)]
    pub fn scaled(
        mut self,
        kind: &str,
        factor: f32,
        attn_factor: f32,
        n_ctx_orig: usize,
        beta_fast: f32,
        beta_slow: f32,
    ) -> Result<Rope> {
        self.mscale = attn_factor;
        if kind == "none" || factor <= 0.0 {
            return Ok(self);
        }
        self.freq_scale = 1.0 / factor;
        match kind {
            "linear" => {}
            "yarn" => {
                let (n, base) = (self.n_rot as f32, self.base);
                let dim = |beta: f32| {
                    n * (n_ctx_orig as f32 / (beta * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                self.yarn = Some([
                    dim(beta_fast).floor().max(0.0),
                    dim(beta_slow).ceil().min(n - 1.0),
                ]);
                // llama.cpp cancels its attention factor against ggml's, leaving ggml's.
                if factor > 1.0 {
                    self.mscale *= 1.0 + 0.1 * factor.ln();
                }
            }
            other => bail!("RoPE scaling {other} is not supported (none, linear, yarn)"),
        }
        Ok(self)
    }

    /// (cos, sin) of each rotated pair at position `p` (ggml's iterative angle θ ← θ·base^(−2/n)).
    fn angles(&self, p: f32, out: &mut [(f32, f32)]) {
        let theta_scale = self.base.powf(-2.0 / self.n_rot as f32);
        let mut theta = p;
        for (i, o) in out.iter_mut().enumerate() {
            let extrap = match &self.freq_factors {
                Some(f) => theta / f[i],
                None => theta,
            };
            let interp = self.freq_scale * extrap;
            let th = match self.yarn {
                Some(c) => {
                    let r = (i as f32 - c[0]) / (c[1] - c[0]).max(0.001);
                    let ramp = 1.0 - r.clamp(0.0, 1.0);
                    interp * (1.0 - ramp) + extrap * ramp
                }
                None => interp,
            };
            let (s, c) = th.sin_cos();
            *o = (c * self.mscale, s * self.mscale);
            theta *= theta_scale;
        }
    }

    /// Rotates each head (of `head_dim`) of each row of `x` (`n_heads` heads a row), rows at
    /// positions pos0, pos0 + 1, ….
    pub fn apply(&self, x: &mut [f32], n_heads: usize, head_dim: usize, pos0: usize) {
        let half = self.n_rot / 2;
        let mut cs = vec![(0f32, 0f32); half];
        for (ti, row) in x.chunks_mut(n_heads * head_dim).enumerate() {
            self.angles((pos0 + ti) as f32, &mut cs);
            for head in row.chunks_mut(head_dim) {
                for (i, &(c, s)) in cs.iter().enumerate() {
                    let (ia, ib) = if self.neox {
                        (i, i + half)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let (a, b) = (head[ia], head[ib]);
                    head[ia] = a * c - b * s;
                    head[ib] = a * s + b * c;
                }
            }
        }
    }
}

/// A weight product with an optional bias added to each output row.
pub struct Linear<'a> {
    pub w: Matrix<'a>,
    pub b: Option<Vec<f32>>,
}

/// One attention block.
pub struct Attention<'a> {
    pub q: Linear<'a>,
    pub k: Linear<'a>,
    pub v: Linear<'a>,
    pub o: Linear<'a>,
    /// Per-head RMSNorm weights of q and k (applied before RoPE).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// One logit per query head that joins each softmax's denominator.
    pub sinks: Option<Vec<f32>>,
    pub shape: AttnShape,
    pub rope: Rope,
}

/// The activation of a gated feed-forward: act(gate) ⊙ up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// gpt-oss: gate clamped above at `limit`, up clamped to ±limit, gate·σ(α·gate)·(up + 1).
    SwigluOai {
        alpha: f32,
        limit: f32,
    },
}

impl Act {
    /// gate ← act(gate, up), element-wise. `table`: GELU as llama.cpp's CPU computes it, from
    /// a table of f16 inputs to f16 outputs (normal precision).
    fn apply(self, gate: &mut [f32], up: &[f32], table: bool) {
        match self {
            Act::Silu => gate.iter_mut().zip(up).for_each(|(g, u)| *g = silu(*g) * u),
            Act::GeluTanh if table => gate
                .iter_mut()
                .zip(up)
                .for_each(|(g, u)| *g = gelu_f16_table(*g) * u),
            Act::GeluTanh => gate
                .iter_mut()
                .zip(up)
                .for_each(|(g, u)| *g = gelu_tanh(*g) * u),
            Act::SwigluOai { alpha, limit } => gate.iter_mut().zip(up).for_each(|(g, u)| {
                let x = g.min(limit);
                let y = u.clamp(-limit, limit);
                *g = x / (1.0 + (-alpha * x).exp()) * (y + 1.0);
            }),
        }
    }
}

/// GELU with the tanh approximation (the form ggml and Gemma use).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// ggml's table GELU: 0 at or below −10, x at or above 10, else the f16 rounding of GELU at
/// the f16 rounding of x.
pub fn gelu_f16_table(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        round_f16(gelu_tanh(round_f16(x)))
    }
}

/// How a router's logits become expert weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gating {
    /// Softmax over all experts, top-k of the probabilities; with `norm` the k weights are
    /// rescaled to sum to 1 (qwen3moe).
    Softmax { norm: bool },
    /// Top-k of the logits, softmax over the k selected (gpt-oss).
    SoftmaxSelected,
}

/// Routed experts: stacked gate, up (ff rows each) and down (n_embd rows each) matrices.
pub struct Moe<'a> {
    pub router: Linear<'a>,
    pub gate: Matrix<'a>,
    pub up: Matrix<'a>,
    pub down: Matrix<'a>,
    /// Per-expert biases (n_expert × ff, n_expert × ff, n_expert × n_embd).
    pub gate_b: Option<Vec<f32>>,
    pub up_b: Option<Vec<f32>>,
    pub down_b: Option<Vec<f32>>,
    pub n_expert: usize,
    pub n_used: usize,
    pub ff: usize,
    pub gating: Gating,
    pub act: Act,
    /// Multiplies every expert weight (1: none).
    pub scale: f32,
}

/// A gated MLP: down · act(gate · x, up · x).
pub struct Gated<'a> {
    pub gate: Matrix<'a>,
    pub up: Matrix<'a>,
    pub down: Matrix<'a>,
    pub act: Act,
}

pub enum FeedForward<'a> {
    Gated(Box<Gated<'a>>),
    Moe(Box<Moe<'a>>),
}

pub struct Layer<'a> {
    pub attn_norm: Vec<f32>,
    pub attn: Attention<'a>,
    /// RMSNorm of the attention output before the residual add (gemma3).
    pub attn_post_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: FeedForward<'a>,
    /// RMSNorm of the feed-forward output before the residual add (gemma3).
    pub ffn_post_norm: Option<Vec<f32>>,
}

/// A decoder-only transformer, as an architecture file filled it.
pub struct Decoder<'a> {
    pub n_embd: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub eps: f32,
    /// Multiplies the embedded tokens (gemma3: √n_embd).
    pub embd_scale: Option<f32>,
    /// Logits become c·tanh(logit / c) (`final_logit_softcapping`).
    pub logit_softcap: Option<f32>,
    pub embd: Matrix<'a>,
    pub layers: Vec<Layer<'a>>,
    pub out_norm: Vec<f32>,
    pub output: Matrix<'a>,
    /// Selections per expert of each MoE layer, counted over the tokens whose experts the CPU
    /// computed (the device counts its own).
    pub usage: std::sync::Mutex<Vec<Vec<u64>>>,
    /// The device-resident executor, when the placement put every weight but routed experts on
    /// the GPU.
    device: Option<cuda::DeviceDecoder<'a>>,
}

/// Which of `n_layer` layers use the sliding window, by llama.cpp's rule: an array of booleans
/// in `{arch}.attention.sliding_window_pattern`, else its integer n (default `pattern`): layer i
/// is windowed unless i % n == n − 1 (n = 0: every layer).
pub fn swa_layers(md: &Metadata, arch: &str, n_layer: usize, pattern: usize) -> Result<Vec<bool>> {
    use crate::gguf::Value;
    let key = format!("{arch}.attention.sliding_window_pattern");
    if let Some(Value::Array(items)) = md.get(&key) {
        if items.len() != n_layer {
            bail!("{key}: {} entries for {n_layer} layers", items.len());
        }
        // Booleans as llama.cpp reads them; any other element type windows no layer.
        return Ok(match items.bools() {
            Some(b) => b.to_vec(),
            None => vec![false; n_layer],
        });
    }
    let n = md.get_usize(&key).unwrap_or(pattern);
    Ok((0..n_layer).map(|i| n == 0 || i % n < n - 1).collect())
}

/// Hyperparameters every decoder architecture names the same way (`{arch}.key`).
pub struct Hyper {
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// KV heads per layer.
    pub n_head_kv: Vec<usize>,
    pub head_dim: usize,
    pub n_rot: usize,
    pub eps: f32,
    pub freq_base: f32,
    pub n_ctx_train: usize,
}

impl Hyper {
    pub fn read(t: &Tensors, arch: &str) -> Result<Hyper> {
        let md = t.gguf.metadata();
        let key = |k: &str| format!("{arch}.{k}");
        let n_layer = md.get_usize(&key("block_count"))?;
        if n_layer == 0 || n_layer > 4096 {
            bail!("{arch}.block_count: {n_layer} layers is out of range");
        }
        let n_embd = md.get_usize(&key("embedding_length"))?;
        let n_head = md.get_usize(&key("attention.head_count"))?;
        if n_head == 0 || n_embd == 0 {
            bail!("{arch}: {n_head} heads of an embedding of {n_embd}");
        }
        let n_head_kv = match md.get(&key("attention.head_count_kv")) {
            Some(_) => md.get_per_layer(&key("attention.head_count_kv"), n_layer)?,
            None => vec![n_head; n_layer],
        };
        let head_dim = md
            .get_usize(&key("attention.key_length"))
            .unwrap_or(n_embd / n_head);
        Ok(Hyper {
            arch: arch.to_string(),
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_rot: md
                .get_usize(&key("rope.dimension_count"))
                .unwrap_or(head_dim),
            eps: md.get_positive_f32(&key("attention.layer_norm_rms_epsilon"))?,
            freq_base: match md.get(&key("rope.freq_base")) {
                Some(_) => md.get_positive_f32(&key("rope.freq_base"))?,
                None => 10000.0,
            },
            n_ctx_train: md.get_usize(&key("context_length")).unwrap_or(4096),
        })
    }

    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// The RoPE of this model at base `base`, with the file's context scaling
    /// (`rope.scaling.*`) applied as llama.cpp does.
    pub fn rope(&self, t: &Tensors, base: f32, neox: bool) -> Result<Rope> {
        let md = t.gguf.metadata();
        let f = |k: &str, d: f32| -> Result<f32> { Ok(md.opt_scale(&self.key(k))?.unwrap_or(d)) };
        let kind = md
            .get_str(&self.key("rope.scaling.type"))
            .unwrap_or("linear");
        let factor = match md.get(&self.key("rope.scaling.factor")) {
            Some(_) => f("rope.scaling.factor", 0.0)?,
            None => f("rope.scale_linear", 0.0)?,
        };
        let n_ctx_orig = md
            .get_usize(&self.key("rope.scaling.original_context_length"))
            .unwrap_or(self.n_ctx_train);
        Rope::plain(self.n_rot, base, neox).scaled(
            kind,
            factor,
            f("rope.scaling.attn_factor", 1.0)?,
            n_ctx_orig,
            f("rope.scaling.yarn_beta_fast", 32.0)?,
            f("rope.scaling.yarn_beta_slow", 1.0)?,
        )
    }

    /// Which layers use the sliding window (see [`swa_layers`]).
    pub fn swa_layers(&self, t: &Tensors, pattern: usize) -> Result<Vec<bool>> {
        swa_layers(t.gguf.metadata(), &self.arch, self.n_layer, pattern)
    }

    /// The attention of layer `i`: q/k/v/o with the biases the file has, and per-head q/k
    /// norms and sinks when asked for (then required).
    #[allow(clippy::too_many_arguments)]
    pub fn attention<'a>(
        &self,
        t: &Tensors<'a>,
        i: usize,
        rope: Rope,
        window: Option<usize>,
        scale: f32,
        qk_norm: bool,
        sinks: bool,
    ) -> Result<Attention<'a>> {
        let p = |n: &str| format!("blk.{i}.{n}");
        let (n, hd, nh, nkv) = (self.n_embd, self.head_dim, self.n_head, self.n_head_kv[i]);
        let linear = |name: &str, cols: usize, rows: usize| -> Result<Linear<'a>> {
            Ok(Linear {
                w: t.matrix(&p(&format!("{name}.weight")), cols, rows)?,
                b: t.opt_vector(&p(&format!("{name}.bias")), rows)?,
            })
        };
        Ok(Attention {
            q: linear("attn_q", n, nh * hd)?,
            k: linear("attn_k", n, nkv * hd)?,
            v: linear("attn_v", n, nkv * hd)?,
            o: linear("attn_output", nh * hd, n)?,
            q_norm: qk_norm
                .then(|| t.vector(&p("attn_q_norm.weight"), hd))
                .transpose()?,
            k_norm: qk_norm
                .then(|| t.vector(&p("attn_k_norm.weight"), hd))
                .transpose()?,
            sinks: sinks
                .then(|| t.vector(&p("attn_sinks.weight"), nh))
                .transpose()?,
            shape: AttnShape {
                n_head: nh,
                n_head_kv: nkv,
                head_dim: hd,
                scale,
                window,
            },
            rope,
        })
    }

    /// A gated feed-forward of `ff` rows (`ffn_gate`, `ffn_up`, `ffn_down`).
    pub fn gated<'a>(
        &self,
        t: &Tensors<'a>,
        i: usize,
        ff: usize,
        act: Act,
    ) -> Result<FeedForward<'a>> {
        let p = |n: &str| format!("blk.{i}.{n}");
        let n = self.n_embd;
        Ok(FeedForward::Gated(Box::new(Gated {
            gate: t.matrix(&p("ffn_gate.weight"), n, ff)?,
            up: t.matrix(&p("ffn_up.weight"), n, ff)?,
            down: t.matrix(&p("ffn_down.weight"), ff, n)?,
            act,
        })))
    }

    /// The routed experts of layer `i` (`ffn_gate_inp`, `ffn_{gate,up,down}_exps`, with the
    /// biases the file has), sized from `expert_count`, `expert_used_count` and
    /// `expert_feed_forward_length`.
    pub fn moe<'a>(
        &self,
        t: &Tensors<'a>,
        i: usize,
        gating: Gating,
        act: Act,
    ) -> Result<FeedForward<'a>> {
        let md = t.gguf.metadata();
        let p = |n: &str| format!("blk.{i}.{n}");
        let n = self.n_embd;
        let ne = md.get_usize(&self.key("expert_count"))?;
        let k = md.get_usize(&self.key("expert_used_count"))?;
        let ff = md.get_usize(&self.key("expert_feed_forward_length"))?;
        if ne == 0 || k == 0 || k > ne || ne > 1 << 16 {
            bail!("expert_count {ne} / expert_used_count {k} out of range");
        }
        let stacked = |name: &str, cols: usize, rows: usize| -> Result<Matrix<'a>> {
            let w = t.shaped(&p(name), &[cols as u64, rows as u64, ne as u64])?;
            t.weight(&w, rows * ne, cols)
        };
        let scale = md
            .opt_scale(&self.key("expert_weights_scale"))?
            .unwrap_or(0.0);
        Ok(FeedForward::Moe(Box::new(Moe {
            router: Linear {
                w: t.matrix(&p("ffn_gate_inp.weight"), n, ne)?,
                b: t.opt_vector(&p("ffn_gate_inp.bias"), ne)?,
            },
            gate: stacked("ffn_gate_exps.weight", n, ff)?,
            up: stacked("ffn_up_exps.weight", n, ff)?,
            down: stacked("ffn_down_exps.weight", ff, n)?,
            gate_b: t.opt_vector(&p("ffn_gate_exps.bias"), ne * ff)?,
            up_b: t.opt_vector(&p("ffn_up_exps.bias"), ne * ff)?,
            down_b: t.opt_vector(&p("ffn_down_exps.bias"), ne * n)?,
            n_expert: ne,
            n_used: k,
            ff,
            gating,
            act,
            // llama.cpp applies the scale only when it is neither 0 nor 1.
            scale: if scale == 0.0 { 1.0 } else { scale },
        })))
    }

    /// The model around `layers`: embedding, final norm and head (tied when `output.weight` is
    /// absent), checked.
    pub fn decoder<'a>(
        &self,
        t: &Tensors<'a>,
        layers: Vec<Layer<'a>>,
        embd_scale: Option<f32>,
    ) -> Result<Decoder<'a>> {
        let (embd, output, n_vocab) = t.embedding_and_output(self.n_embd)?;
        let mut d = Decoder {
            n_embd: self.n_embd,
            n_vocab,
            n_ctx_train: self.n_ctx_train,
            eps: self.eps,
            embd_scale,
            logit_softcap: None,
            embd,
            usage: std::sync::Mutex::new(vec![Vec::new(); layers.len()]),
            layers,
            out_norm: t.vector("output_norm.weight", self.n_embd)?,
            output,
            device: None,
        };
        d.check()?;
        let (staging, cache) = t
            .opts
            .device
            .map_or((0, 0), |w| (w.plan.staging_bytes, w.plan.cache_bytes));
        d.device = cuda::DeviceDecoder::new(&d, staging, cache, t.opts.pass)?;
        Ok(d)
    }
}

impl<'a> Decoder<'a> {
    /// Checks what the tensor shapes do not: heads that divide into KV heads, and a rotation
    /// that fits a head (expert counts are checked where they are read, in [`Hyper::moe`]).
    pub fn check(&self) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            let s = &l.attn.shape;
            if s.n_head == 0 || s.n_head_kv == 0 || s.n_head % s.n_head_kv != 0 {
                bail!(
                    "layer {i}: {} heads do not divide into {} kv heads",
                    s.n_head,
                    s.n_head_kv
                );
            }
            if l.attn.rope.n_rot > s.head_dim || !l.attn.rope.n_rot.is_multiple_of(2) {
                bail!(
                    "layer {i}: {} rotated dims do not fit head dim {}",
                    l.attn.rope.n_rot,
                    s.head_dim
                );
            }
        }
        Ok(())
    }

    /// The forward pass over the tokens of `seqs` (consecutive runs of `tokens`), on the
    /// executor `e`: logits of every row when `all_logits`, else of each sequence's last, where
    /// the executor keeps its rows.
    fn pass<E: Ops>(
        &self,
        e: &E,
        seqs: &mut [Seq],
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<E::Rows> {
        let t = tokens.len();
        let segs = segments(seqs, t)?;
        let at: Vec<(usize, Range<usize>)> = seqs
            .iter()
            .zip(&segs)
            .map(|(s, r)| (s.state.pos, r.clone()))
            .collect();
        let eps = self.eps;
        let mut x = e.embed(self, tokens)?;
        // The attention input of the next layer: each layer's last residual add computes it
        // (add_norm), so that an executor may do both in one step.
        let mut h = match self.layers.first() {
            Some(l) => Some(e.norm(&x, &l.attn_norm, eps)?),
            None => None,
        };
        for (i, l) in self.layers.iter().enumerate() {
            let mut layer = || -> Result<()> {
                let a = &l.attn;
                let hin = h.take().context("no attention input")?;
                let (mut q, mut k, v) = e.qkv(a, &hin, t)?;
                e.qk_norm_rope(a, &mut q, &mut k, eps, &at)?;
                let o = e.attend(i, a, &q, &k, &v, seqs, &segs)?;
                let mut y = e.linear(&a.o, &o, t)?;
                if let Some(w) = &l.attn_post_norm {
                    e.norm_in_place(&mut y, w, eps)?;
                }
                let hf = e.add_norm(&mut x, &y, &l.ffn_norm, eps)?;
                let mut y = match &l.ffn {
                    FeedForward::Gated(f) => e.gated(f, &hf, t)?,
                    FeedForward::Moe(m) => e.moe(self, i, m, &hf, t)?,
                };
                if let Some(w) = &l.ffn_post_norm {
                    e.norm_in_place(&mut y, w, eps)?;
                }
                match self.layers.get(i + 1) {
                    Some(next) => h = Some(e.add_norm(&mut x, &y, &next.attn_norm, eps)?),
                    None => e.add(&mut x, &y)?,
                }
                Ok(())
            };
            layer().with_context(|| format!("layer {i}"))?;
        }
        for seq in seqs.iter_mut() {
            seq.state.pos += seq.len;
        }
        e.logits(self, &x, &segs, all_logits)
    }
}

/// The operations the decoder's pass is written in. An executor implements them where its
/// activations live ([`Ops::Rows`]: t rows of one width); vectors (norm weights, biases) are
/// the description's, which an executor may keep copies of.
trait Ops {
    type Rows;
    /// The embedded tokens (times the embedding scale).
    fn embed(&self, d: &Decoder, tokens: &[u32]) -> Result<Self::Rows>;
    /// RMSNorm(x) · w over rows of `w.len()`.
    fn norm(&self, x: &Self::Rows, w: &[f32], eps: f32) -> Result<Self::Rows>;
    fn norm_in_place(&self, x: &mut Self::Rows, w: &[f32], eps: f32) -> Result<()>;
    /// x · wᵀ (+ bias) over t rows.
    fn linear(&self, l: &Linear, x: &Self::Rows, t: usize) -> Result<Self::Rows>;
    /// The attention's q, k and v of the same rows (an executor may run them as one).
    fn qkv(
        &self,
        a: &Attention,
        x: &Self::Rows,
        t: usize,
    ) -> Result<(Self::Rows, Self::Rows, Self::Rows)> {
        Ok((
            self.linear(&a.q, x, t)?,
            self.linear(&a.k, x, t)?,
            self.linear(&a.v, x, t)?,
        ))
    }
    /// x += y.
    fn add(&self, x: &mut Self::Rows, y: &Self::Rows) -> Result<()>;
    /// x += y, then RMSNorm(x) · w (the residual add and the norm that follows it).
    fn add_norm(
        &self,
        x: &mut Self::Rows,
        y: &Self::Rows,
        w: &[f32],
        eps: f32,
    ) -> Result<Self::Rows>;
    /// Attention's q and k: each head RMSNorm'd by the attention's q/k norms where it has
    /// them, then rotated by its RoPE; `at`: each sequence's first position and its rows.
    fn qk_norm_rope(
        &self,
        a: &Attention,
        q: &mut Self::Rows,
        k: &mut Self::Rows,
        eps: f32,
        at: &[(usize, Range<usize>)],
    ) -> Result<()>;
    /// Appends each sequence's k and v rows (`segs`) to its cache of layer `layer` and returns
    /// the attention output of its q rows.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        a: &Attention,
        q: &Self::Rows,
        k: &Self::Rows,
        v: &Self::Rows,
        seqs: &mut [Seq],
        segs: &[Range<usize>],
    ) -> Result<Self::Rows>;
    /// down · act(gate · x, up · x).
    fn gated(&self, f: &Gated, x: &Self::Rows, t: usize) -> Result<Self::Rows>;
    /// The routed experts of layer `layer`: each row's experts, weighted and summed.
    fn moe(
        &self,
        d: &Decoder,
        layer: usize,
        m: &Moe,
        x: &Self::Rows,
        t: usize,
    ) -> Result<Self::Rows>;
    /// The head over every row (`all`) or each segment's last: final norm, vocabulary
    /// projection, soft-cap.
    fn logits(
        &self,
        d: &Decoder,
        x: &Self::Rows,
        segs: &[Range<usize>],
        all: bool,
    ) -> Result<Self::Rows>;
    /// Rows on the host.
    fn host(&self, x: Self::Rows) -> Result<Vec<f32>>;
}

/// The k experts a router row picks, with their weights (ties to the lower index).
pub fn route(logits: &[f32], k: usize, gating: Gating) -> Vec<(usize, f32)> {
    let softmax = |xs: &[f32]| -> Vec<f32> {
        let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = xs.iter().map(|&x| (x - max).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|&x| x / s).collect()
    };
    let top = |score: &[f32]| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..score.len()).collect();
        idx.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx
    };
    match gating {
        Gating::Softmax { norm } => {
            let p = softmax(logits);
            let chosen = top(&p);
            let mut w: Vec<f32> = chosen.iter().map(|&e| p[e]).collect();
            if norm {
                let s = w.iter().sum::<f32>().max(6.103_515_6e-5);
                w.iter_mut().for_each(|x| *x /= s);
            }
            chosen.into_iter().zip(w).collect()
        }
        Gating::SoftmaxSelected => {
            let chosen = top(logits);
            let sel: Vec<f32> = chosen.iter().map(|&e| logits[e]).collect();
            chosen.into_iter().zip(softmax(&sel)).collect()
        }
    }
}

impl Forward for Decoder<'_> {
    fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    fn n_ctx_train(&self) -> usize {
        self.n_ctx_train
    }

    fn offload_report(&self) -> Option<String> {
        self.device.as_ref()?.offload_report()
    }

    fn expert_usage(&self) -> Result<Vec<(usize, Vec<u64>)>> {
        let mut out: Vec<(usize, Vec<u64>)> = {
            let u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
            self.layers
                .iter()
                .enumerate()
                .filter_map(|(i, l)| match &l.ffn {
                    FeedForward::Moe(m) => {
                        let mut c = u[i].clone();
                        c.resize(m.n_expert, 0);
                        Some((i, c))
                    }
                    FeedForward::Gated(_) => None,
                })
                .collect()
        };
        if let Some(dev) = &self.device {
            for (layer, counts) in dev.expert_counts()? {
                if let Some((_, c)) = out.iter_mut().find(|(i, _)| *i == layer) {
                    for (a, b) in c.iter_mut().zip(counts) {
                        *a += b as u64;
                    }
                }
            }
        }
        Ok(out)
    }

    fn new_state(&self, n_ctx: usize, kv: KvTypes) -> Result<State> {
        if let Some(dev) = &self.device {
            return dev.new_state(self, n_ctx, kv);
        }
        let bytes = self
            .layers
            .iter()
            .map(|l| attention::cache_bytes(&l.attn.shape, n_ctx, kv))
            .sum();
        crate::backend::cpu::ensure_memory(bytes, &format!("the KV cache of {n_ctx} tokens"))
            .map_err(|e| anyhow::anyhow!("{e} (lower -c/--ctx-size)"))?;
        let layers = self
            .layers
            .iter()
            .map(|l| attention::new_cache(&l.attn.shape, n_ctx, kv))
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
        match &self.device {
            Some(dev) => dev.run(self, cpu, seqs, tokens, all_logits),
            None => self.pass(&cpu::CpuOps { cpu }, seqs, tokens, all_logits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neox_and_normal_pairings_rotate_the_same_angles() {
        // A head whose pairs hold (1, 0): after rotation each pair is (cos θ_i, sin θ_i).
        let (hd, pos) = (8, 5usize);
        let normal = Rope::plain(hd, 10000.0, false);
        let neox = Rope::plain(hd, 10000.0, true);
        let mut a = vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let mut b = vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        normal.apply(&mut a, 1, hd, pos);
        neox.apply(&mut b, 1, hd, pos);
        for i in 0..hd / 2 {
            let th = pos as f64 * 10000f64.powf(-2.0 * i as f64 / hd as f64);
            assert!((a[2 * i] as f64 - th.cos()).abs() < 1e-5, "{a:?}");
            assert!((a[2 * i + 1] as f64 - th.sin()).abs() < 1e-5, "{a:?}");
            assert_eq!((a[2 * i], a[2 * i + 1]), (b[i], b[i + hd / 2]));
        }
    }

    #[test]
    fn yarn_keeps_fast_pairs_and_interpolates_slow_ones() {
        let (n, base, factor) = (64, 150000.0f32, 32.0f32);
        let r = Rope::plain(n, base, true)
            .scaled("yarn", factor, 1.0, 4096, 32.0, 1.0)
            .unwrap();
        let c = r.yarn.unwrap();
        assert!(c[0] >= 0.0 && c[0] < c[1] && c[1] <= (n - 1) as f32);
        let mut cs = vec![(0f32, 0f32); n / 2];
        let p = 1000.0f32;
        r.angles(p, &mut cs);
        let theta = |i: usize| p * base.powf(-2.0 * i as f32 / n as f32);
        // The first pair keeps its angle, the last is divided by the factor; both scaled.
        let (c0, s0) = cs[0];
        assert!((s0.atan2(c0) - theta(0).sin().atan2(theta(0).cos())).abs() < 1e-3);
        let mscale = 1.0 + 0.1 * factor.ln();
        assert!(((c0 * c0 + s0 * s0).sqrt() - mscale).abs() < 1e-5);
        let (cl, sl) = cs[n / 2 - 1];
        let want = theta(n / 2 - 1) / factor;
        assert!((sl.atan2(cl) - want.sin().atan2(want.cos())).abs() < 1e-4);
        // Linear scaling divides every angle; an unknown kind is an error.
        let lin = Rope::plain(n, base, true)
            .scaled("linear", 4.0, 1.0, 4096, 32.0, 1.0)
            .unwrap();
        lin.angles(p, &mut cs);
        assert!((cs[0].1.atan2(cs[0].0) - (p / 4.0).sin().atan2((p / 4.0).cos())).abs() < 1e-3);
        assert!(Rope::plain(n, base, true)
            .scaled("longrope", 4.0, 1.0, 4096, 32.0, 1.0)
            .is_err());
    }

    #[test]
    fn routing_follows_each_gating_rule() {
        let logits = [0.5f32, 2.0, -1.0, 2.0, 1.0];
        // Softmax then top-2 (ties to the lower index), renormalised.
        let r = route(&logits, 2, Gating::Softmax { norm: true });
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 3]);
        assert!((r[0].1 - 0.5).abs() < 1e-6 && (r[1].1 - 0.5).abs() < 1e-6);
        // Without renormalisation the weights are the full softmax's.
        let r = route(&logits, 1, Gating::Softmax { norm: false });
        let z: f32 = logits.iter().map(|x| x.exp()).sum();
        assert!((r[0].1 - 2f32.exp() / z).abs() < 1e-6);
        // Top-k of the logits, softmax over the selected.
        let r = route(&logits, 3, Gating::SoftmaxSelected);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 3, 4]);
        let z = 2.0 * 2f32.exp() + 1f32.exp();
        assert!((r[2].1 - 1f32.exp() / z).abs() < 1e-6);
    }

    #[test]
    fn clamped_swiglu_matches_its_formula() {
        let act = Act::SwigluOai {
            alpha: 1.702,
            limit: 7.0,
        };
        let mut g = [-3.0f32, 0.5, 9.0];
        let u = [1.0f32, -8.0, 2.0];
        act.apply(&mut g, &u, false);
        let f = |x: f32, y: f32| x / (1.0 + (-1.702 * x).exp()) * (y + 1.0);
        assert_eq!(g, [f(-3.0, 1.0), f(0.5, -7.0), f(7.0, 2.0)]);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
    }
}
