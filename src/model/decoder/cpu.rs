//! The decoder's CPU executor: activations in host memory, products on the thread pool (or,
//! for a weight the placement put on a GPU, on the device, crossing PCIe per product), the KV
//! caches of [`crate::backend::attention`]. The CUDA executor borrows its routed experts for
//! layers whose experts stay in RAM.

use std::ops::Range;

use anyhow::Result;
use rayon::prelude::*;

use super::{route, Act, Attention, Decoder, Gated, Linear, Moe, Ops};
use crate::backend::attention;
use crate::backend::cpu::{rms_norm, Cpu, Matrix, Precision};
use crate::model::{embed, LayerState, Seq};

pub(super) struct CpuOps<'c> {
    pub cpu: &'c Cpu,
}

/// Adds `b` to each row of `y` (rows of `b.len()`).
fn add_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_mut(b.len()) {
        for (v, c) in row.iter_mut().zip(b) {
            *v += c;
        }
    }
}

/// Expert `e`'s `rows` values of stacked per-expert biases.
fn expert_rows(b: Option<&[f32]>, e: usize, rows: usize) -> Option<&[f32]> {
    b.map(|b| &b[e * rows..(e + 1) * rows])
}

impl CpuOps<'_> {
    /// The weighted sum over t rows of `h` of the routed experts in `per_expert` (each
    /// expert's (row, weight) pairs), each expert once over its rows.
    pub(super) fn experts(
        &self,
        d: &Decoder,
        m: &Moe,
        h: &[f32],
        t: usize,
        per_expert: &[Vec<(usize, f32)>],
    ) -> Result<Vec<f32>> {
        let (n, ff) = (d.n_embd, m.ff);
        let used: Vec<usize> = (0..per_expert.len())
            .filter(|&e| !per_expert[e].is_empty())
            .collect();
        let outs: Vec<Vec<f32>> = used
            .par_iter()
            .map(|&e| -> Result<Vec<f32>> {
                let rows = &per_expert[e];
                let mut xs = Vec::with_capacity(rows.len() * n);
                for &(ti, _) in rows {
                    xs.extend_from_slice(&h[ti * n..(ti + 1) * n]);
                }
                self.gated_rows(
                    [
                        &m.gate.slice_rows(e * ff, ff),
                        &m.up.slice_rows(e * ff, ff),
                        &m.down.slice_rows(e * n, n),
                    ],
                    [
                        expert_rows(m.gate_b.as_deref(), e, ff),
                        expert_rows(m.up_b.as_deref(), e, ff),
                        expert_rows(m.down_b.as_deref(), e, n),
                    ],
                    m.act,
                    &xs,
                    rows.len(),
                )
            })
            .collect::<Result<_>>()?;
        let mut out = vec![0f32; t * n];
        for (&e, y) in used.iter().zip(&outs) {
            for (&(ti, w), yr) in per_expert[e].iter().zip(y.chunks(n)) {
                for (o, v) in out[ti * n..(ti + 1) * n].iter_mut().zip(yr) {
                    *o += w * v;
                }
            }
        }
        Ok(out)
    }

    /// down · act(gate · x + b_gate, up · x + b_up) + b_down over t rows of x: a gated MLP,
    /// or one routed expert (its rows of the stacked matrices and its biases).
    fn gated_rows(
        &self,
        [gate, up, down]: [&Matrix; 3],
        [b_gate, b_up, b_down]: [Option<&[f32]>; 3],
        act: Act,
        x: &[f32],
        t: usize,
    ) -> Result<Vec<f32>> {
        let cpu = self.cpu;
        let mut g = vec![0f32; t * gate.rows];
        let mut u = vec![0f32; t * up.rows];
        cpu.matmul(gate, x, t, &mut g)?;
        cpu.matmul(up, x, t, &mut u)?;
        for (y, b) in [(&mut g, b_gate), (&mut u, b_up)] {
            if let Some(b) = b {
                add_rows(y, b);
            }
        }
        act.apply(&mut g, &u, cpu.precision == Precision::Normal);
        let mut o = vec![0f32; t * down.rows];
        cpu.matmul(down, &g, t, &mut o)?;
        if let Some(b) = b_down {
            add_rows(&mut o, b);
        }
        Ok(o)
    }
}

impl Ops for CpuOps<'_> {
    type Rows = Vec<f32>;

    fn embed(&self, d: &Decoder, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut x = embed(&d.embd, tokens)?;
        if let Some(s) = d.embd_scale {
            x.iter_mut().for_each(|v| *v *= s);
        }
        Ok(x)
    }

    fn norm(&self, x: &Vec<f32>, w: &[f32], eps: f32) -> Result<Vec<f32>> {
        let mut h = x.clone();
        rms_norm(&mut h, w, eps);
        Ok(h)
    }

    fn norm_in_place(&self, x: &mut Vec<f32>, w: &[f32], eps: f32) -> Result<()> {
        rms_norm(x, w, eps);
        Ok(())
    }

    fn linear(&self, l: &Linear, x: &Vec<f32>, t: usize) -> Result<Vec<f32>> {
        let mut y = vec![0f32; t * l.w.rows];
        self.cpu.matmul(&l.w, x, t, &mut y)?;
        if let Some(b) = &l.b {
            add_rows(&mut y, b);
        }
        Ok(y)
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        for (a, b) in x.iter_mut().zip(y) {
            *a += b;
        }
        Ok(())
    }

    fn add_norm(&self, x: &mut Vec<f32>, y: &Vec<f32>, w: &[f32], eps: f32) -> Result<Vec<f32>> {
        self.add(x, y)?;
        self.norm(x, w, eps)
    }

    fn qk_norm_rope(
        &self,
        a: &Attention,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        eps: f32,
        at: &[(usize, Range<usize>)],
    ) -> Result<()> {
        let s = &a.shape;
        for (x, norm, n_heads) in [(q, &a.q_norm, s.n_head), (k, &a.k_norm, s.n_head_kv)] {
            if let Some(w) = norm {
                rms_norm(x, w, eps);
            }
            let width = n_heads * s.head_dim;
            for (pos, rows) in at {
                let rows = &mut x[rows.start * width..rows.end * width];
                a.rope.apply(rows, n_heads, s.head_dim, *pos);
            }
        }
        Ok(())
    }

    fn attend(
        &self,
        layer: usize,
        a: &Attention,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        seqs: &mut [Seq],
        segs: &[Range<usize>],
    ) -> Result<Vec<f32>> {
        let mut sts: Vec<&mut LayerState> = seqs
            .iter_mut()
            .map(|sq| &mut sq.state.layers[layer])
            .collect();
        attention::attend_each(&mut sts, segs, &a.shape, a.sinks.as_deref(), q, k, v)
    }

    fn gated(&self, f: &Gated, x: &Vec<f32>, t: usize) -> Result<Vec<f32>> {
        self.gated_rows([&f.gate, &f.up, &f.down], [None; 3], f.act, x, t)
    }

    /// Routes each token to its experts and returns their weighted sum; each selected expert
    /// runs once over its tokens, the experts concurrently.
    fn moe(&self, d: &Decoder, layer: usize, m: &Moe, h: &Vec<f32>, t: usize) -> Result<Vec<f32>> {
        let ne = m.n_expert;
        let logits = self.linear(&m.router, h, t)?;
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for (ti, row) in logits.chunks(ne).enumerate() {
            for (e, w) in route(row, m.n_used, m.gating) {
                per_expert[e].push((ti, w * m.scale));
            }
        }
        {
            let mut u = d.usage.lock().unwrap_or_else(|e| e.into_inner());
            let counts = &mut u[layer];
            counts.resize(ne, 0);
            for (c, r) in counts.iter_mut().zip(&per_expert) {
                *c += r.len() as u64;
            }
        }
        self.experts(d, m, h, t, &per_expert)
    }

    fn logits(
        &self,
        d: &Decoder,
        x: &Vec<f32>,
        segs: &[Range<usize>],
        all: bool,
    ) -> Result<Vec<f32>> {
        let mut logits =
            crate::model::logits(self.cpu, x, segs, &d.out_norm, d.eps, &d.output, all)?;
        if let Some(c) = d.logit_softcap {
            logits.iter_mut().for_each(|v| *v = c * (*v / c).tanh());
        }
        Ok(logits)
    }

    fn host(&self, x: Vec<f32>) -> Result<Vec<f32>> {
        Ok(x)
    }
}
