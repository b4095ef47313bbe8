//! `llama` (SmolLM2, Llama 2/3, Mistral): pre-norm attention with RoPE ("normal" mode: adjacent
//! pairs rotate) and a SwiGLU feed-forward; output tied to the embedding when `output.weight` is
//! absent. Llama 3.1's `rope_freqs.weight` divides the rotation frequencies when present.

use anyhow::{bail, Context, Result};

use super::{embed, segments, Forward, LayerState, Seq, State, Tensors};
use crate::backend::attention::{self, AttnShape};
use crate::backend::cpu::{rms_norm, silu, Cpu, Matrix, Precision};

struct Layer<'a> {
    attn_norm: Vec<f32>,
    q: Matrix<'a>,
    k: Matrix<'a>,
    v: Matrix<'a>,
    o: Matrix<'a>,
    ffn_norm: Vec<f32>,
    gate: Matrix<'a>,
    up: Matrix<'a>,
    down: Matrix<'a>,
}

pub struct Llama<'a> {
    n_embd: usize,
    n_vocab: usize,
    n_ctx_train: usize,
    eps: f32,
    shape: AttnShape,
    n_rot: usize,
    freq_base: f32,
    freq_factors: Option<Vec<f32>>,
    embd: Matrix<'a>,
    layers: Vec<Layer<'a>>,
    out_norm: Vec<f32>,
    output: Matrix<'a>,
}

impl<'a> Llama<'a> {
    pub fn load(t: &Tensors<'a>) -> Result<Llama<'a>> {
        let g = t.gguf;
        let md = g.metadata();
        let key = |k: &str| format!("llama.{k}");
        let n_layer = md.get_usize(&key("block_count"))?;
        if n_layer == 0 || n_layer > 4096 {
            bail!("llama.block_count: {n_layer} layers is out of range");
        }
        let n_embd = md.get_usize(&key("embedding_length"))?;
        let n_ff = md.get_usize(&key("feed_forward_length"))?;
        let n_head = md.get_usize(&key("attention.head_count"))?;
        let n_head_kv = md
            .get_usize(&key("attention.head_count_kv"))
            .unwrap_or(n_head);
        if n_head == 0 || n_head_kv == 0 || n_head % n_head_kv != 0 {
            bail!("llama: {n_head} heads do not divide into {n_head_kv} kv heads");
        }
        let head_dim = md
            .get_usize(&key("attention.key_length"))
            .unwrap_or(n_embd / n_head);
        let n_rot = md
            .get_usize(&key("rope.dimension_count"))
            .unwrap_or(head_dim);
        if n_rot > head_dim || !n_rot.is_multiple_of(2) {
            bail!("llama.rope.dimension_count: {n_rot} does not fit head dim {head_dim}");
        }
        let eps = md.get_f32(&key("attention.layer_norm_rms_epsilon"))?;
        let freq_base = md.get_f32(&key("rope.freq_base")).unwrap_or(10000.0);
        let (embd, output, n_vocab) = t.embedding_and_output(n_embd)?;
        let kvd = n_head_kv * head_dim;
        let mut layers = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
            let p = |n: &str| format!("blk.{i}.{n}");
            layers.push(Layer {
                attn_norm: t.vector(&p("attn_norm.weight"), n_embd)?,
                q: t.matrix(&p("attn_q.weight"), n_embd, n_head * head_dim)?,
                k: t.matrix(&p("attn_k.weight"), n_embd, kvd)?,
                v: t.matrix(&p("attn_v.weight"), n_embd, kvd)?,
                o: t.matrix(&p("attn_output.weight"), n_head * head_dim, n_embd)?,
                ffn_norm: t.vector(&p("ffn_norm.weight"), n_embd)?,
                gate: t.matrix(&p("ffn_gate.weight"), n_embd, n_ff)?,
                up: t.matrix(&p("ffn_up.weight"), n_embd, n_ff)?,
                down: t.matrix(&p("ffn_down.weight"), n_ff, n_embd)?,
            });
        }
        Ok(Llama {
            n_embd,
            n_vocab,
            n_ctx_train: md.get_usize(&key("context_length")).unwrap_or(4096),
            eps,
            shape: AttnShape {
                n_head,
                n_head_kv,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
            },
            n_rot,
            freq_base,
            freq_factors: t.opt_vector("rope_freqs.weight", n_rot / 2)?,
            embd,
            layers,
            out_norm: t.vector("output_norm.weight", n_embd)?,
            output,
        })
    }

    /// Rotates adjacent pairs of the first n_rot dims of each head of each row (positions
    /// pos0, pos0+1, …), with ggml's iterative angle (θ ← θ·base^(−2/n_rot)).
    fn rope(&self, x: &mut [f32], n_heads: usize, pos0: usize) {
        let hd = self.shape.head_dim;
        let theta_scale = self.freq_base.powf(-2.0 / self.n_rot as f32);
        for (ti, row) in x.chunks_mut(n_heads * hd).enumerate() {
            let p = (pos0 + ti) as f32;
            for head in row.chunks_mut(hd) {
                let mut theta = p;
                for i in 0..self.n_rot / 2 {
                    let th = match &self.freq_factors {
                        Some(f) => theta / f[i],
                        None => theta,
                    };
                    let (s, c) = th.sin_cos();
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * c - b * s;
                    head[2 * i + 1] = a * s + b * c;
                    theta *= theta_scale;
                }
            }
        }
    }
}

impl Forward for Llama<'_> {
    fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    fn n_ctx_train(&self) -> usize {
        self.n_ctx_train
    }

    fn new_state(&self, n_ctx: usize, precision: Precision) -> Result<State> {
        let layers = self
            .layers
            .iter()
            .map(|_| attention::new_cache(&self.shape, n_ctx, precision == Precision::Normal))
            .collect();
        Ok(State::new(layers, n_ctx))
    }

    fn run(
        &self,
        cpu: &Cpu,
        seqs: &mut [Seq],
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let t = tokens.len();
        let segs = segments(seqs, t)?;
        let n = self.n_embd;
        let s = &self.shape;
        let mut x = embed(&self.embd, tokens)?;
        for (i, l) in self.layers.iter().enumerate() {
            let mut layer = || -> Result<()> {
                let mut h = x.clone();
                rms_norm(&mut h, &l.attn_norm, self.eps);
                let mut q = vec![0f32; t * l.q.rows];
                let mut k = vec![0f32; t * l.k.rows];
                let mut v = vec![0f32; t * l.v.rows];
                cpu.matmul(&l.q, &h, t, &mut q)?;
                cpu.matmul(&l.k, &h, t, &mut k)?;
                cpu.matmul(&l.v, &h, t, &mut v)?;
                // Positions and caches are each sequence's own.
                let (qd, kd) = (l.q.rows, l.k.rows);
                for (seq, r) in seqs.iter().zip(&segs) {
                    let pos = seq.state.pos;
                    self.rope(&mut q[r.start * qd..r.end * qd], s.n_head, pos);
                    self.rope(&mut k[r.start * kd..r.end * kd], s.n_head_kv, pos);
                }
                let mut sts: Vec<&mut LayerState> =
                    seqs.iter_mut().map(|sq| &mut sq.state.layers[i]).collect();
                let a = attention::attend_each(&mut sts, &segs, s, &q, &k, &v)?;
                let mut o = vec![0f32; t * n];
                cpu.matmul(&l.o, &a, t, &mut o)?;
                for (a, b) in x.iter_mut().zip(&o) {
                    *a += b;
                }
                let mut h = x.clone();
                rms_norm(&mut h, &l.ffn_norm, self.eps);
                let mut g = vec![0f32; t * l.gate.rows];
                let mut u = vec![0f32; t * l.up.rows];
                cpu.matmul(&l.gate, &h, t, &mut g)?;
                cpu.matmul(&l.up, &h, t, &mut u)?;
                for (gv, uv) in g.iter_mut().zip(&u) {
                    *gv = silu(*gv) * uv;
                }
                cpu.matmul(&l.down, &g, t, &mut o)?;
                for (a, b) in x.iter_mut().zip(&o) {
                    *a += b;
                }
                Ok(())
            };
            layer().with_context(|| format!("layer {i}"))?;
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
