//! A sequence's state, as the executors keep it: per layer its KV cache rows or its Mamba-2
//! conv and SSM state, on the host or on a GPU, with the position reached; cleared in place,
//! saved to bytes and restored exactly.

use anyhow::{anyhow, bail, Result};
use ggrun_quants::float::{f16_to_f32, f32_to_f16, k_tile_index, K_TILE};

/// A KV cache's rows: f32 (exact mode), or f16 bits (normal precision: llama.cpp's F16 cache,
/// half the bytes, holding exactly the values that f32 rows rounded to f16 would).
#[derive(Debug)]
pub enum KvRows {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

impl KvRows {
    /// `n` zeros (the OS's zero pages until written); None when the memory cannot be had.
    pub fn zeroed(n: usize, f16: bool) -> Option<KvRows> {
        Some(match f16 {
            false => KvRows::F32(bytemuck::allocation::try_zeroed_vec(n).ok()?),
            true => KvRows::F16(bytemuck::allocation::try_zeroed_vec(n).ok()?),
        })
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes whole rows `src` (of `row` values each) at positions from `pos`, rounded to f16
    /// (nearest even) when the rows are f16; in tile layout when `tiled` (see
    /// [`ggrun_quants::float::k_tile_index`]), else position after position.
    pub fn write_rows(&mut self, pos: usize, row: usize, tiled: bool, src: &[f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let at = pos * row;
        if !tiled {
            match self {
                KvRows::F32(v) => v[at..at + src.len()].copy_from_slice(src),
                KvRows::F16(v) => {
                    let dst: &mut [half::f16] = v[at..at + src.len()].reinterpret_cast_mut();
                    dst.convert_from_f32_slice(src);
                }
            }
            return;
        }
        // Position p's column c is K_TILE elements after its column c − 1.
        for (p, r) in (pos..).zip(src.chunks_exact(row)) {
            let base = k_tile_index(p, 0, row);
            match self {
                KvRows::F32(v) => r
                    .iter()
                    .enumerate()
                    .for_each(|(c, &x)| v[base + c * K_TILE] = x),
                KvRows::F16(v) => r
                    .iter()
                    .enumerate()
                    .for_each(|(c, &x)| v[base + c * K_TILE] = f32_to_f16(x)),
            }
        }
    }

    /// The first `n` positions' rows (of `row` values) as f32, position after position, from
    /// either layout.
    pub fn rows_f32(&self, n: usize, row: usize, tiled: bool) -> std::borrow::Cow<'_, [f32]> {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        use std::borrow::Cow;
        let len = n * row;
        if !tiled {
            return match self {
                KvRows::F32(v) => Cow::Borrowed(&v[..len]),
                KvRows::F16(v) => {
                    let h: &[half::f16] = v[..len].reinterpret_cast();
                    Cow::Owned(h.to_f32_vec())
                }
            };
        }
        let mut out = Vec::with_capacity(len);
        for p in 0..n {
            let base = k_tile_index(p, 0, row);
            let cols = (0..row).map(|c| base + c * K_TILE);
            match self {
                KvRows::F32(v) => out.extend(cols.map(|i| v[i])),
                KvRows::F16(v) => out.extend(cols.map(|i| f16_to_f32(v[i]))),
            }
        }
        Cow::Owned(out)
    }
}

/// Per-layer state of one sequence: KV cache rows or Mamba conv/SSM state, on the host or on a
/// GPU.
#[derive(Debug)]
pub enum LayerState {
    None,
    /// K and V rows (kv_heads × head_dim each) for positions 0..len, capacity n_ctx. The CPU
    /// keeps K in tile layout (`k_tiled`; its rows then reach to whole tiles past the capacity),
    /// the host form of a GPU cache position after position.
    Attention {
        k: KvRows,
        v: KvRows,
        len: usize,
        row: usize,
        capacity: usize,
        k_tiled: bool,
    },
    /// conv: (d_conv − 1) × channels, ssm: heads × head_dim × d_state.
    Mamba {
        conv: Vec<f32>,
        ssm: Vec<f32>,
    },
    /// Either of the above held in GPU memory (the device-resident forward pass).
    Device(super::cuda::DeviceState),
}

/// Appends `xs` as little-endian f32s (one copy on little-endian machines: snapshots of long
/// contexts are hundreds of megabytes).
fn put_f32s(out: &mut Vec<u8>, xs: &[f32]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(xs));
    } else {
        out.extend(xs.iter().flat_map(|x| x.to_le_bytes()));
    }
}

/// A sequence's state: one entry per layer plus the number of tokens seen.
#[derive(Debug)]
pub struct State {
    pub layers: Vec<LayerState>,
    pub pos: usize,
    pub n_ctx: usize,
}

impl State {
    /// Empties the state in place, as [`Forward::new_state`] makes it but without allocating:
    /// a fresh state of a long context is hundreds of megabytes of pages to fault in again.
    pub fn clear(&mut self) -> Result<()> {
        for l in &mut self.layers {
            match l {
                LayerState::None => {}
                LayerState::Attention { len, .. } => *len = 0,
                LayerState::Mamba { conv, ssm } => {
                    conv.fill(0.0);
                    ssm.fill(0.0);
                }
                LayerState::Device(d) => d.clear()?,
            }
        }
        self.pos = 0;
        Ok(())
    }

    /// Serialises the state (little-endian f32s with a small header) for save/restore; layers
    /// held on a GPU are copied back first.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut put = |v: u64| out.extend_from_slice(&v.to_le_bytes());
        put(self.pos as u64);
        put(self.n_ctx as u64);
        put(self.layers.len() as u64);
        let body = &mut out;
        for l in &self.layers {
            let host;
            let l = match l {
                LayerState::Device(d) => {
                    host = d.to_host()?;
                    &host
                }
                l => l,
            };
            match l {
                LayerState::None | LayerState::Device(_) => body.push(0u8),
                LayerState::Attention {
                    k,
                    v,
                    len,
                    row,
                    k_tiled,
                    ..
                } => {
                    body.push(1);
                    body.extend_from_slice(&(*len as u64).to_le_bytes());
                    put_f32s(body, &k.rows_f32(*len, *row, *k_tiled));
                    put_f32s(body, &v.rows_f32(*len, *row, false));
                }
                LayerState::Mamba { conv, ssm } => {
                    body.push(2);
                    put_f32s(body, conv);
                    put_f32s(body, ssm);
                }
            }
        }
        Ok(out)
    }

    /// Restores a state saved by [`State::to_bytes`] into `self` (which must have the same
    /// layout: same model and context size); layers held on a GPU are loaded there.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        // Device layers take their host form for the parse, then go back with the new values.
        let mut on_device = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            if let LayerState::Device(d) = l {
                let host = d.to_host()?;
                on_device.push((i, std::mem::replace(l, host)));
            }
        }
        let parsed = self.restore_host(bytes);
        for (i, mut dev) in on_device {
            if let (Ok(()), LayerState::Device(d)) = (&parsed, &mut dev) {
                d.load(&self.layers[i])?;
            }
            self.layers[i] = dev;
        }
        parsed
    }

    /// [`State::restore`] for states held in host memory.
    fn restore_host(&mut self, bytes: &[u8]) -> Result<()> {
        let bad = || anyhow!("saved state does not match this model and context size");
        let mut r = bytes;
        let mut get = |n: usize| -> Result<&[u8]> {
            if r.len() < n {
                return Err(bad());
            }
            let (a, b) = r.split_at(n);
            r = b;
            Ok(a)
        };
        let u = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap()) as usize;
        let pos = u(get(8)?);
        if u(get(8)?) != self.n_ctx || u(get(8)?) != self.layers.len() {
            return Err(bad());
        }
        let floats = |b: &[u8], out: &mut [f32]| {
            bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(b);
            if cfg!(target_endian = "big") {
                out.iter_mut()
                    .for_each(|x| *x = f32::from_bits(x.to_bits().swap_bytes()));
            }
        };
        for l in self.layers.iter_mut() {
            let tag = get(1)?[0];
            match (tag, l) {
                (0, LayerState::None) => {}
                (
                    1,
                    LayerState::Attention {
                        k,
                        v,
                        len,
                        row,
                        capacity,
                        k_tiled,
                    },
                ) => {
                    let n_len = u(get(8)?);
                    if n_len > *capacity {
                        return Err(bad());
                    }
                    let n = n_len * *row;
                    let mut rows = vec![0f32; n];
                    floats(get(4 * n)?, &mut rows);
                    k.write_rows(0, *row, *k_tiled, &rows);
                    floats(get(4 * n)?, &mut rows);
                    v.write_rows(0, *row, false, &rows);
                    *len = n_len;
                }
                (2, LayerState::Mamba { conv, ssm }) => {
                    floats(get(4 * conv.len())?, conv);
                    floats(get(4 * ssm.len())?, ssm);
                }
                _ => return Err(bad()),
            }
        }
        if !r.is_empty() {
            return Err(bad());
        }
        self.pos = pos;
        Ok(())
    }
}

impl State {
    /// A state with these per-layer entries, at position 0.
    pub fn new(layers: Vec<LayerState>, n_ctx: usize) -> State {
        State {
            layers,
            pos: 0,
            n_ctx,
        }
    }

    /// Errors when `t` more tokens would overflow the context.
    pub fn check_room(&self, t: usize) -> Result<()> {
        if t == 0 {
            bail!("no tokens to process");
        }
        if self.pos + t > self.n_ctx {
            bail!(
                "{t} tokens do not fit in the context: {} already used of {} (raise -c/--ctx-size)",
                self.pos,
                self.n_ctx
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::KvRows;

    /// Rows written in tile layout (from a position inside a tile, ending inside another) read
    /// back as the same rows, position after position, in f32 and f16; so do rows written in
    /// row layout.
    #[test]
    fn rows_read_back_from_either_layout() {
        let (row, n) = (12, 21);
        let src: Vec<f32> = (0..n * row).map(|i| i as f32 * 0.25 - 7.0).collect();
        for tiled in [true, false] {
            for f16 in [false, true] {
                let mut k = KvRows::zeroed(32 * row, f16).unwrap();
                k.write_rows(0, row, tiled, &src[..3 * row]);
                k.write_rows(3, row, tiled, &src[3 * row..]);
                assert_eq!(
                    k.rows_f32(n, row, tiled)[..],
                    src[..],
                    "tiled {tiled} f16 {f16}"
                );
            }
        }
    }
}
