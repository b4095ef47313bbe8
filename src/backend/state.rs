//! A sequence's state, as the executors keep it: per layer its KV cache rows or its Mamba-2
//! conv and SSM state, on the host or on a GPU, with the position reached; cleared in place,
//! saved to bytes and restored exactly.

use anyhow::{anyhow, bail, Result};
use ggrun_quants::float::{f16_to_f32, f32_to_f16, k_tile_index, K_TILE};
use ggrun_quants::GgmlType;

/// The element type of a KV cache's K or V rows, by llama.cpp's `--cache-type-k/-v` names:
/// f32 (exact mode), f16 (the default), and the block formats q8_0 and q4_0 (32 values per
/// block with an f16 scale, quantized as llama.cpp quantizes its cache rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvType {
    F32,
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    /// The types `--cache-type-k/-v` take.
    pub const NAMED: [KvType; 3] = [KvType::F16, KvType::Q8_0, KvType::Q4_0];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// A `--cache-type-k/-v` value: one of [`KvType::NAMED`].
    pub fn parse(s: &str) -> std::result::Result<KvType, String> {
        KvType::NAMED
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<_> = KvType::NAMED.iter().map(|t| t.name()).collect();
                format!(
                    "KV cache type {s:?} is not supported (use {})",
                    names.join(", ")
                )
            })
    }

    /// The block format of a quantized type.
    pub fn block_type(self) -> Option<GgmlType> {
        match self {
            KvType::Q8_0 => Some(GgmlType::Q8_0),
            KvType::Q4_0 => Some(GgmlType::Q4_0),
            KvType::F32 | KvType::F16 => None,
        }
    }

    /// Bytes of `n` rows of `row` values (None: not whole blocks, or too large).
    pub fn bytes(self, row: usize, n: usize) -> Option<u64> {
        let per_row = match self.block_type() {
            Some(ty) => ty.row_bytes(row as u64)?,
            None => row as u64 * if self == KvType::F32 { 4 } else { 2 },
        };
        per_row.checked_mul(n as u64)
    }
}

/// The types of a cache's K and V rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvTypes {
    pub k: KvType,
    pub v: KvType,
}

impl KvTypes {
    pub const F32: KvTypes = KvTypes {
        k: KvType::F32,
        v: KvType::F32,
    };
    pub const F16: KvTypes = KvTypes {
        k: KvType::F16,
        v: KvType::F16,
    };
}

/// A KV cache's rows: f32 (exact mode), f16 bits (normal precision: llama.cpp's F16 cache,
/// half the bytes, holding exactly the values that f32 rows rounded to f16 would), or blocks of
/// a quantized type, each row `ty.row_bytes(row)` bytes, position after position.
#[derive(Debug)]
pub enum KvRows {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Quant { ty: GgmlType, data: Vec<u8> },
}

impl KvRows {
    /// Room for `n` positions of `row` values (f32 and f16 hold `n · row` elements; the caller
    /// rounds `n` up to whole tiles for tiled K), zeros (the OS's zero pages until written);
    /// None when the memory cannot be had.
    pub fn zeroed(ty: KvType, row: usize, n: usize) -> Option<KvRows> {
        let elems = row.checked_mul(n)?;
        Some(match ty {
            KvType::F32 => KvRows::F32(bytemuck::allocation::try_zeroed_vec(elems).ok()?),
            KvType::F16 => KvRows::F16(bytemuck::allocation::try_zeroed_vec(elems).ok()?),
            KvType::Q8_0 | KvType::Q4_0 => {
                let bytes = usize::try_from(ty.bytes(row, n)?).ok()?;
                KvRows::Quant {
                    ty: ty.block_type()?,
                    data: bytemuck::allocation::try_zeroed_vec(bytes).ok()?,
                }
            }
        })
    }

    /// Writes whole rows `src` (of `row` values each) at positions from `pos`: rounded to f16
    /// (nearest even) when the rows are f16, quantized when they are blocks; in tile layout
    /// when `tiled` (f32 and f16 only, see [`ggrun_quants::float::k_tile_index`]), else
    /// position after position.
    pub fn write_rows(&mut self, pos: usize, row: usize, tiled: bool, src: &[f32]) {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        let at = pos * row;
        if let KvRows::Quant { ty, data } = self {
            let rb = ty.row_bytes(row as u64).expect("whole blocks") as usize;
            let quantize = quantizer(*ty);
            for (r, dst) in src
                .chunks_exact(row)
                .zip(data[pos * rb..].chunks_exact_mut(rb))
            {
                quantize(r, dst);
            }
            return;
        }
        if !tiled {
            match self {
                KvRows::F32(v) => v[at..at + src.len()].copy_from_slice(src),
                KvRows::F16(v) => {
                    let dst: &mut [half::f16] = v[at..at + src.len()].reinterpret_cast_mut();
                    dst.convert_from_f32_slice(src);
                }
                KvRows::Quant { .. } => unreachable!("handled above"),
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
                KvRows::Quant { .. } => unreachable!("handled above"),
            }
        }
    }

    /// The first `n` positions' rows (of `row` values) as f32, position after position, from
    /// any layout.
    pub fn rows_f32(&self, n: usize, row: usize, tiled: bool) -> std::borrow::Cow<'_, [f32]> {
        use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
        use std::borrow::Cow;
        let len = n * row;
        if let KvRows::Quant { ty, data } = self {
            let rb = ty.row_bytes(row as u64).expect("whole blocks") as usize;
            let mut out = vec![0f32; len];
            for (dst, src) in out.chunks_exact_mut(row).zip(data.chunks_exact(rb)) {
                ggrun_quants::dequantize_row(*ty, src, dst).expect("a KV block type");
            }
            return Cow::Owned(out);
        }
        if !tiled {
            return match self {
                KvRows::F32(v) => Cow::Borrowed(&v[..len]),
                KvRows::F16(v) => {
                    let h: &[half::f16] = v[..len].reinterpret_cast();
                    Cow::Owned(h.to_f32_vec())
                }
                KvRows::Quant { .. } => unreachable!("handled above"),
            };
        }
        let mut out = Vec::with_capacity(len);
        for p in 0..n {
            let base = k_tile_index(p, 0, row);
            let cols = (0..row).map(|c| base + c * K_TILE);
            match self {
                KvRows::F32(v) => out.extend(cols.map(|i| v[i])),
                KvRows::F16(v) => out.extend(cols.map(|i| f16_to_f32(v[i]))),
                KvRows::Quant { .. } => unreachable!("handled above"),
            }
        }
        Cow::Owned(out)
    }
}

/// How a cache row is quantized to block type `ty`: llama.cpp's CPU quantizer for it (for
/// q8_0 the SIMD one its activations use, for q4_0 the reference).
pub fn quantizer(ty: GgmlType) -> ggrun_quants::QuantizeFn {
    match ty {
        GgmlType::Q8_0 => {
            ggrun_quants::kernels(ty)
                .expect("q8_0 kernels")
                .quantize_act
        }
        _ => ggrun_quants::reference_quantize_fn(ty).expect("a KV block type"),
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
    /// Empties the state in place, as [`crate::model::Forward::new_state`] makes it but without allocating:
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
    /// held on a GPU are copied back first. Block KV rows are saved as the values they hold,
    /// which are rotated (see `attention::k_rotation`): restore into a state with the same
    /// cache types, as the in-process prompt cache and `bench -d` do.
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
    use super::{KvRows, KvType};

    /// Rows written in tile layout (from a position inside a tile, ending inside another) read
    /// back as the same rows, position after position, in f32 and f16; so do rows written in
    /// row layout.
    #[test]
    fn rows_read_back_from_either_layout() {
        let (row, n) = (12, 21);
        let src: Vec<f32> = (0..n * row).map(|i| i as f32 * 0.25 - 7.0).collect();
        for tiled in [true, false] {
            for ty in [KvType::F32, KvType::F16] {
                let mut k = KvRows::zeroed(ty, row, 32).unwrap();
                k.write_rows(0, row, tiled, &src[..3 * row]);
                k.write_rows(3, row, tiled, &src[3 * row..]);
                assert_eq!(
                    k.rows_f32(n, row, tiled)[..],
                    src[..],
                    "tiled {tiled} {ty:?}"
                );
            }
        }
    }

    /// Block rows read back within a quantization step's bound of what was written (the step
    /// of a block is its largest magnitude over 127 for q8_0, over 8 for q4_0; rounding is
    /// within half a step, plus the f16 rounding of the scale (2^-11 relative, times up to 127
    /// steps) for q8_0; q4_0 clamps the largest value of the sign opposite to the block's
    /// extreme to 7 steps, a full step off), and writing what was read back reproduces the
    /// same bytes: a saved state restores exactly.
    #[test]
    fn block_rows_read_back_within_a_step_and_round_trip_exactly() {
        let (row, n) = (64, 9);
        let mut x = 0x2545_f491_u32;
        let src: Vec<f32> = (0..n * row)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32 - 0.5) * 6.0
            })
            .collect();
        for (ty, levels, bound) in [(KvType::Q8_0, 127.0, 0.57), (KvType::Q4_0, 8.0, 1.01)] {
            let mut k = KvRows::zeroed(ty, row, 16).unwrap();
            k.write_rows(0, row, false, &src[..2 * row]);
            k.write_rows(2, row, false, &src[2 * row..]);
            let back = k.rows_f32(n, row, false).into_owned();
            for (b, (got, want)) in back.chunks(32).zip(src.chunks(32)).enumerate() {
                let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let step = amax / levels;
                for (g, w) in got.iter().zip(want) {
                    assert!((g - w).abs() <= bound * step + 1e-6, "{ty:?} block {b}");
                }
            }
            let mut again = KvRows::zeroed(ty, row, 16).unwrap();
            again.write_rows(0, row, false, &back);
            match (&k, &again) {
                (KvRows::Quant { data: a, .. }, KvRows::Quant { data: b, .. }) => {
                    assert_eq!(a, b, "{ty:?}")
                }
                _ => panic!("block rows expected"),
            }
        }
    }

    #[test]
    fn cache_type_names_parse_and_others_are_refused() {
        for ty in KvType::NAMED {
            assert_eq!(KvType::parse(ty.name()), Ok(ty));
        }
        assert_eq!(KvType::parse("Q8_0"), Ok(KvType::Q8_0));
        let e = KvType::parse("q5_1").unwrap_err();
        assert!(e.contains("q5_1") && e.contains("q8_0"), "{e}");
    }
}
