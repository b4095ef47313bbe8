//! Mamba-2 sequence mixing: the causal depthwise convolution with its rolling state, and the
//! selective scan with the per-head SSM state. Token by token in f32, as the state demands; heads
//! are independent and run in parallel.

use anyhow::{bail, Result};
use rayon::prelude::*;

use super::state::LayerState;

/// Shape of one Mamba-2 layer.
#[derive(Clone, Copy, Debug)]
pub struct SsmShape {
    pub d_conv: usize,
    pub d_inner: usize,
    pub d_state: usize,
    pub n_head: usize,
    pub n_group: usize,
}

impl SsmShape {
    /// Channels of the convolution input: x, B and C.
    pub fn conv_channels(&self) -> usize {
        self.d_inner + 2 * self.n_group * self.d_state
    }

    pub fn head_dim(&self) -> usize {
        self.d_inner / self.n_head
    }
}

pub fn new_state(s: &SsmShape) -> LayerState {
    LayerState::Mamba {
        conv: vec![0.0; (s.d_conv - 1) * s.conv_channels()],
        ssm: vec![0.0; s.n_head * s.head_dim() * s.d_state],
    }
}

/// Causal conv over `t` rows of xBC (t × channels) with weights `w` (channels × d_conv) and an
/// optional bias, then SiLU. Updates the conv state to the last d_conv − 1 inputs.
pub fn conv(
    state: &mut LayerState,
    s: &SsmShape,
    xbc: &[f32],
    t: usize,
    w: &[f32],
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let LayerState::Mamba { conv, .. } = state else {
        bail!("layer state is not a Mamba state");
    };
    let ch = s.conv_channels();
    let k = s.d_conv;
    // The sequence: previous k − 1 inputs, then this batch.
    let mut seq = Vec::with_capacity((k - 1 + t) * ch);
    seq.extend_from_slice(conv);
    seq.extend_from_slice(&xbc[..t * ch]);
    let mut out = vec![0f32; t * ch];
    for ti in 0..t {
        for c in 0..ch {
            let mut acc = 0f32;
            for j in 0..k {
                acc += seq[(ti + j) * ch + c] * w[c * k + j];
            }
            if let Some(b) = bias {
                acc += b[c];
            }
            out[ti * ch + c] = crate::backend::cpu::silu(acc);
        }
    }
    conv.copy_from_slice(&seq[t * ch..]);
    Ok(out)
}

/// The selective scan over `t` tokens. `xbc` is the conv output (t × channels: x | B | C), `dt`
/// the softplus-ed step sizes (t × n_head), `a` and `d` per head. Returns y (t × d_inner) with
/// the D skip term added.
pub fn scan(
    state: &mut LayerState,
    s: &SsmShape,
    xbc: &[f32],
    dt: &[f32],
    t: usize,
    a: &[f32],
    d: &[f32],
) -> Result<Vec<f32>> {
    let LayerState::Mamba { ssm, .. } = state else {
        bail!("layer state is not a Mamba state");
    };
    let (hd, ds, nh) = (s.head_dim(), s.d_state, s.n_head);
    let ch = s.conv_channels();
    let heads_per_group = nh / s.n_group;
    let state_row = ggrun_quants::ssm::ssm_row_fn();
    let mut y = vec![0f32; t * s.d_inner];
    // Each head owns a slice of the state and writes its own columns of y: compute per head,
    // then scatter.
    let per_head: Vec<Vec<f32>> = ssm
        .par_chunks_mut(hd * ds)
        .enumerate()
        .map(|(h, st)| {
            let g = h / heads_per_group;
            let mut yh = vec![0f32; t * hd];
            for ti in 0..t {
                let row = &xbc[ti * ch..(ti + 1) * ch];
                let x = &row[h * hd..(h + 1) * hd];
                let b = &row[s.d_inner + g * ds..s.d_inner + (g + 1) * ds];
                let c = &row[s.d_inner + s.n_group * ds + g * ds
                    ..s.d_inner + s.n_group * ds + (g + 1) * ds];
                let dth = dt[ti * nh + h];
                let da = (dth * a[h]).exp();
                for i in 0..hd {
                    let xdt = x[i] * dth;
                    let sr = &mut st[i * ds..(i + 1) * ds];
                    yh[ti * hd + i] = state_row(sr, b, c, da, xdt) + x[i] * d[h];
                }
            }
            yh
        })
        .collect();
    for (h, yh) in per_head.iter().enumerate() {
        for ti in 0..t {
            y[ti * s.d_inner + h * hd..ti * s.d_inner + (h + 1) * hd]
                .copy_from_slice(&yh[ti * hd..(ti + 1) * hd]);
        }
    }
    Ok(y)
}
