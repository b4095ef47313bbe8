//! The CPU backend: a thread pool sized from the machine (or `-t`) and the heavy ops every model
//! is written against — matrix products of quantized weights with a batch of activations, and
//! the element-wise ops (RMSNorm, activations) — in the two numeric modes:
//! normal (activations quantized to each weight type's partner format, as llama.cpp does) and
//! exact (weights dequantized to f32, activations kept in f32).

use bytemuck::cast_slice;
use ggrun_quants::{kernels, packed, GgmlType, Kernels};
use rayon::prelude::*;

use super::cuda::DeviceRows;
use super::state::KvTypes;
use crate::gguf::TensorView;

/// MemAvailable from /proc/meminfo, in bytes (None where there is no such file).
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// An error naming `what` and its size when `bytes` of fresh memory exceed what the machine has
/// available (an allocation the OS would grant lazily and kill us for later).
pub fn ensure_memory(bytes: u64, what: &str) -> anyhow::Result<()> {
    if let Some(avail) = available_memory() {
        if bytes > avail {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            anyhow::bail!(
                "{what} needs {:.1} GiB of memory; {:.1} GiB is available",
                gib(bytes),
                gib(avail)
            );
        }
    }
    Ok(())
}

/// A 2-D weight: `rows` output rows of `cols` inputs each, in any supported type, borrowed from
/// the model file, with its packed copy (eight-row groups, [`packed`]) where loading made one,
/// or its copy on the GPU where the placement put it (then the GPU multiplies by it).
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub ty: GgmlType,
    pub data: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub packed: Option<&'a [u8]>,
    pub device: Option<DeviceRows<'a>>,
}

impl<'a> Matrix<'a> {
    /// Tensor `t` as a matrix of `rows` × `cols` in the file's layout (no copies attached).
    pub fn from_view(t: &TensorView<'a>, rows: usize, cols: usize) -> Matrix<'a> {
        Matrix {
            ty: t.info.ty,
            data: t.data,
            rows,
            cols,
            packed: None,
            device: None,
        }
    }

    pub fn row_bytes(&self) -> usize {
        self.data.len() / self.rows.max(1)
    }

    /// Rows `start..start + n` as a matrix (experts stacked in one tensor); the packed copy
    /// comes along when the slice is made of whole groups.
    pub fn slice_rows(&self, start: usize, n: usize) -> Matrix<'a> {
        let rb = self.row_bytes();
        let g = packed::ROWS;
        let packed = self
            .packed
            .filter(|_| start.is_multiple_of(g) && n.is_multiple_of(g))
            .map(|p| {
                let gb = p.len() / (self.rows / g);
                &p[start / g * gb..(start + n) / g * gb]
            });
        let device = self.device.map(|d| DeviceRows {
            start: d.start + start,
            rows: n,
            ..d
        });
        Matrix {
            ty: self.ty,
            data: &self.data[start * rb..(start + n) * rb],
            rows: n,
            cols: self.cols,
            packed,
            device,
        }
    }
}

/// The packed copy of a weight tensor (rows of its first dimension in groups of eight), when the
/// active instruction set has a kernel for it and its shape allows: a type with a packed layout,
/// rows a multiple of 32 elements, and a second dimension (an expert's rows when experts are
/// stacked) that is a multiple of eight, so that every expert is whole groups. None too when
/// the memory for the copy cannot be had (the file's layout then serves, slower).
pub fn pack_tensor(t: &TensorView) -> Option<Box<[u8]>> {
    let ty = t.info.ty;
    kernels(ty)?.packed?;
    let cols = *t.info.dims.first()? as usize;
    let gb = packed::group_bytes(ty, cols)?;
    if !(*t.info.dims.get(1)? as usize).is_multiple_of(packed::ROWS) {
        return None;
    }
    let rows = t.info.rows() as usize;
    let rb = ty.row_bytes(cols as u64)? as usize;
    if t.data.len() != rows * rb {
        return None;
    }
    let mut out = bytemuck::allocation::try_zeroed_vec::<u8>(rows / packed::ROWS * gb)
        .ok()?
        .into_boxed_slice();
    out.par_chunks_mut(gb).enumerate().for_each(|(g, o)| {
        let first = g * packed::ROWS;
        let rows = std::array::from_fn(|r| &t.data[(first + r) * rb..(first + r + 1) * rb]);
        packed::pack(ty, rows, o);
    });
    Some(out)
}

/// Numeric mode of the matrix products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// Activations quantized to the weight type's dot partner (llama.cpp's CPU behaviour).
    Normal,
    /// Weights dequantized to f32, activations in f32.
    Exact,
}

impl Precision {
    /// The types of the KV caches held in host memory when `asked` for: exact precision keeps
    /// f32 whatever was asked.
    pub fn kv_types(self, asked: KvTypes) -> KvTypes {
        match self {
            Precision::Normal => asked,
            Precision::Exact => KvTypes::F32,
        }
    }
}

/// The CPU context: thread pool, numeric mode and the types of the KV caches it keeps.
pub struct Cpu {
    pool: rayon::ThreadPool,
    pub threads: usize,
    pub precision: Precision,
    /// f16 K and V by default; f32 in exact precision, whatever was asked.
    pub kv: KvTypes,
}

impl Cpu {
    /// `threads` = 0 picks the number of physical cores.
    pub fn new(threads: usize, precision: Precision) -> anyhow::Result<Cpu> {
        let threads = if threads == 0 {
            num_cpus::get_physical().max(1)
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ggrun-cpu-{i}"))
            .build()?;
        Ok(Cpu {
            pool,
            threads,
            precision,
            kv: precision.kv_types(KvTypes::F16),
        })
    }

    /// KV caches of types `kv` (`-ctk`/`-ctv`) in normal precision; exact precision keeps f32.
    pub fn with_kv_types(mut self, kv: KvTypes) -> Cpu {
        self.kv = self.precision.kv_types(kv);
        self
    }

    /// Runs `f` inside the pool (so that rayon calls in it use these threads).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// y (t × w.rows) = x (t × w.cols) · wᵀ.
    pub fn matmul(&self, w: &Matrix, x: &[f32], t: usize, y: &mut [f32]) -> anyhow::Result<()> {
        anyhow::ensure!(
            x.len() == t * w.cols && y.len() == t * w.rows,
            "matmul shape mismatch"
        );
        if let Some(d) = w.device {
            d.gpu
                .set_normal_precision(self.precision == Precision::Normal);
            return d.matmul_host(x, t, y);
        }
        let k = kernels(w.ty)
            .ok_or_else(|| anyhow::anyhow!("tensor type {} is not supported", w.ty))?;
        let exact = self.precision == Precision::Exact && w.ty != GgmlType::F32;
        // The kernels write rows × t; for one token that is y's own layout, so decode writes y
        // directly (no buffer to clear, nothing to transpose).
        let mut transposed = Vec::new();
        let yt: &mut [f32] = if t == 1 {
            y
        } else {
            transposed.resize(t * w.rows, 0f32);
            &mut transposed
        };
        let rb = w.row_bytes();
        const CHUNK: usize = 16;
        const TOKEN_BLOCK: usize = 64;
        if exact {
            let f32k = kernels(GgmlType::F32).expect("f32 kernels");
            self.install(|| {
                yt.par_chunks_mut(CHUNK * t)
                    .enumerate()
                    .for_each(|(c, out)| {
                        let mut row = vec![0f32; w.cols];
                        for (i, o) in out.chunks_mut(t).enumerate() {
                            let r = c * CHUNK + i;
                            (k.dequantize)(&w.data[r * rb..(r + 1) * rb], &mut row);
                            for (j, v) in o.iter_mut().enumerate() {
                                *v = (f32k.dot)(
                                    cast_slice(&row),
                                    cast_slice(&x[j * w.cols..(j + 1) * w.cols]),
                                );
                            }
                        }
                    })
            });
        } else if let (Some(p), Some(kernel)) = (w.packed, k.packed) {
            // Packed eight-row groups: every token count, decode included.
            let act = quantize_rows(&k, x, t, w.cols);
            let ab = act.len() / t.max(1);
            let nb = w.cols / 32;
            let mut sums = vec![0i32; t * nb];
            for (a, s) in act.chunks(ab).zip(sums.chunks_mut(nb)) {
                packed::block_sums(a, s);
            }
            let toks: Vec<&[u8]> = act.chunks(ab).collect();
            let sums: Vec<&[i32]> = sums.chunks(nb).collect();
            let g = packed::ROWS;
            let gb = p.len() / (w.rows / g);
            self.install(|| {
                yt.par_chunks_mut(CHUNK * t)
                    .enumerate()
                    .for_each(|(c, out)| {
                        let mut tmp = [0f32; packed::ROWS * TOKEN_BLOCK];
                        for (q, out) in out.chunks_mut(g * t).enumerate() {
                            let grp = c * CHUNK / g + q;
                            let data = &p[grp * gb..(grp + 1) * gb];
                            for t0 in (0..t).step_by(TOKEN_BLOCK) {
                                let t1 = (t0 + TOKEN_BLOCK).min(t);
                                let nt = t1 - t0;
                                kernel(data, &toks[t0..t1], &sums[t0..t1], &mut tmp[..g * nt]);
                                for r in 0..g {
                                    out[r * t + t0..r * t + t1]
                                        .copy_from_slice(&tmp[r * nt..(r + 1) * nt]);
                                }
                            }
                        }
                    })
            });
        } else {
            let act = quantize_rows(&k, x, t, w.cols);
            let ab = act.len() / t.max(1);
            self.install(|| {
                yt.par_chunks_mut(CHUNK * t)
                    .enumerate()
                    .for_each(|(c, out)| {
                        let a = |j: usize| &act[j * ab..(j + 1) * ab];
                        let wr = |i: usize| {
                            let r = c * CHUNK + i;
                            &w.data[r * rb..(r + 1) * rb]
                        };
                        let rows = out.len() / t;
                        // Token blocks keep their activations in L2 while this task's rows are
                        // reused across them.
                        for t0 in (0..t).step_by(TOKEN_BLOCK) {
                            let t1 = (t0 + TOKEN_BLOCK).min(t);
                            let mut i = 0;
                            // Eight rows in the lanes of one register where the tier can (its
                            // own float order; prefill only).
                            if let Some(octet) = k.octet.filter(|_| t1 - t0 >= 8) {
                                let toks: Vec<&[u8]> = (t0..t1).map(a).collect();
                                let nt = toks.len();
                                let mut tmp = vec![0f32; 8 * nt];
                                while i + 8 <= rows {
                                    let ws: [&[u8]; 8] = std::array::from_fn(|q| wr(i + q));
                                    octet(ws, &toks, &mut tmp);
                                    for q in 0..8 {
                                        let at = (i + q) * t + t0;
                                        out[at..at + nt]
                                            .copy_from_slice(&tmp[q * nt..(q + 1) * nt]);
                                    }
                                    i += 8;
                                }
                            }
                            if k.tile.is_some() && t >= 4 {
                                while i + 4 <= rows {
                                    let ws = [wr(i), wr(i + 1), wr(i + 2), wr(i + 3)];
                                    let mut j = t0;
                                    if let Some(tile) = k.tile {
                                        while j + 4 <= t1 {
                                            let mut o = [[0f32; 4]; 4];
                                            let toks = [a(j), a(j + 1), a(j + 2), a(j + 3)];
                                            tile(ws, toks, &mut o);
                                            for (q, oq) in o.iter().enumerate() {
                                                let at = (i + q) * t + j;
                                                out[at..at + 4].copy_from_slice(oq);
                                            }
                                            j += 4;
                                        }
                                    }
                                    for jj in j..t1 {
                                        let mut o = [0f32; 4];
                                        match k.rows4 {
                                            Some(rows4) => rows4(ws, a(jj), &mut o),
                                            None => {
                                                for (v, wq) in o.iter_mut().zip(&ws) {
                                                    *v = (k.dot)(wq, a(jj));
                                                }
                                            }
                                        }
                                        for (q, v) in o.iter().enumerate() {
                                            out[(i + q) * t + jj] = *v;
                                        }
                                    }
                                    i += 4;
                                }
                            }
                            for ii in i..rows {
                                let o = &mut out[ii * t..(ii + 1) * t];
                                let wr = wr(ii);
                                k.dots(wr, t0..t1, a, |j, v| o[j] = v);
                            }
                        }
                    })
            });
        }
        if t == 1 {
            return Ok(());
        }
        // yt is rows × t; y is t × rows. Sixteen rows at a time so both sides stay in cache.
        let yt = &transposed;
        for r0 in (0..w.rows).step_by(16) {
            let r1 = (r0 + 16).min(w.rows);
            for j in 0..t {
                let dst = &mut y[j * w.rows + r0..j * w.rows + r1];
                for (r, d) in (r0..r1).zip(dst) {
                    *d = yt[r * t + j];
                }
            }
        }
        Ok(())
    }
}

/// Quantizes `t` rows of `n` floats to the activation format of `k`.
fn quantize_rows(k: &Kernels, x: &[f32], t: usize, n: usize) -> Vec<u8> {
    let ab = k.act_ty.row_bytes(n as u64).expect("activation row") as usize;
    let mut act = vec![0u8; t * ab];
    for (xr, ar) in x.chunks(n).zip(act.chunks_mut(ab)) {
        (k.quantize_act)(xr, ar);
    }
    act
}

/// RMSNorm of each row of `x` (rows of `w.len()`), times `w`, in place (sum of squares in f64,
/// then x·scale·w in that order, as ggml's rms_norm followed by mul).
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_mut(w.len()) {
        let mean = (row.iter().map(|&v| (v * v) as f64).sum::<f64>() / row.len() as f64) as f32;
        let s = 1.0 / (mean + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = (*v * s) * g;
        }
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Rounds to f16 and back (what storing in an f16 buffer does).
#[inline]
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// [`round_f16`] of every value, through the `half` crate's slice conversions (F16C or NEON
/// where the CPU has them, eight or four values per instruction).
pub fn round_f16_slice(xs: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let mut buf = [half::f16::ZERO; 256];
    for chunk in xs.chunks_mut(256) {
        let b = &mut buf[..chunk.len()];
        b.convert_from_f32_slice(chunk);
        b.convert_to_f32_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slice rounding (SIMD where available) equals the scalar one bit for bit: random bit
    /// patterns of finite floats, values halfway between two f16s, f16 subnormals, and values
    /// beyond f16's range; lengths around the 256-value chunks.
    #[test]
    fn slice_rounding_to_f16_equals_the_scalar_rounding() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut xs: Vec<f32> = (0..3000)
            .map(|_| f32::from_bits(next() as u32))
            .filter(|x| x.is_finite())
            .collect();
        // Ties: 1 + (2k + 1)·2⁻¹¹ lies halfway between two f16 neighbours.
        xs.extend((0..64).map(|k| 1.0 + (2 * k + 1) as f32 / 2048.0));
        xs.extend([
            6.0e-8, -3.0e-6, 5.9e-5, 65504.0, 65520.0, -70000.0, 1e30, 0.0, -0.0,
        ]);
        for len in [1, 7, 255, 256, 257, xs.len()] {
            let mut got = xs[..len].to_vec();
            round_f16_slice(&mut got);
            for (g, x) in got.iter().zip(&xs) {
                assert_eq!(g.to_bits(), round_f16(*x).to_bits(), "{x:e}");
            }
        }
    }
}
