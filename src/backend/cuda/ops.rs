//! The device ops besides the matrix products, each a thin launch of a kernel in `kernels.cu`
//! with its shapes checked first: norms (one with the residual add before it), the Mamba-2
//! conv, scan and glue, attention's q/k norms with RoPE, biases, gated activations, attention
//! over a device KV cache (windows, sinks), MoE routing (sigmoid + bias, softmax, softmax over
//! the selected), the products of routed experts chosen on the device, the gather / combine
//! around grouped experts, and logit soft-capping.

use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaFunction, CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

use super::{DeviceKv, DeviceRows, Gpu};
use crate::backend::attention::AttnShape;
use crate::backend::ssm::SsmShape;
use crate::backend::state::KvType;

/// Threads per block of the row-wise kernels (norms).
const ROW_THREADS: u32 = 1024;
/// Heads per block of `qk_norm_rope` (a warp each: QK_WARPS in kernels.cu).
const QK_WARPS: usize = 4;

/// Decode attention's blocks (heads × tokens × splits of the positions) aim at this many: a
/// few per multiprocessor of a large GPU.
const ATT_BLOCKS: usize = 1024;
/// The fewest positions a split of a full cache takes, and the most splits.
const ATT_MIN_RUN: usize = 128;
const ATT_MAX_SPLITS: usize = 64;
/// Batches of this many tokens and more attend on the tensor cores in normal precision
/// (`attention_flash_<head dim>`, for head dims 64 and 128); its blocks take 64 (token, head)
/// rows of a KV head each, so smaller batches leave the GPU idle and keep the split kernels.
const FLASH_FROM: usize = 32;
/// Query rows per block of the flash kernels (FA_ROWS in kernels.cu).
const FLASH_ROWS: usize = 64;

/// The suffix of the kernels that read a cache of this type.
fn kv_suffix(c: &DeviceKv) -> &'static str {
    match c {
        DeviceKv::F32(_) => "",
        DeviceKv::F16(_) => "_f16",
    }
}

/// A K or V cache as a kernel argument (its element type picks the kernel: [`kv_suffix`]).
fn push_kv<'a>(launch: &mut cudarc::driver::LaunchArgs<'a>, c: &'a DeviceKv) {
    match c {
        DeviceKv::F32(s) => launch.arg(s),
        DeviceKv::F16(s) => launch.arg(s),
    };
}

fn launched(r: Result<(), cudarc::driver::DriverError>) -> Result<()> {
    r.map_err(|e| anyhow!("CUDA launch: {e:?}"))
}

/// How [`Gpu::route_topk`] turns router logits into expert weights.
#[derive(Clone, Copy)]
pub enum DeviceGating<'a> {
    /// Top k of sigmoid(logit) + bias, weighted by sigmoid(logit) (Nemotron-H).
    SigmoidBias(&'a CudaSlice<f32>),
    /// Top k of the softmax over all experts, weighted by their probabilities (qwen3moe).
    Softmax,
    /// Top k logits, weighted by a softmax over those k (gpt-oss).
    SoftmaxSelected,
}

/// The activation of [`Gpu::gated_act`]: act(gate) · up.
#[derive(Clone, Copy)]
pub enum DeviceAct {
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// gpt-oss: gate clamped above at `limit`, up to ±limit, gate·σ(α·gate)·(up + 1).
    SwigluOai {
        alpha: f32,
        limit: f32,
    },
}

impl DeviceAct {
    /// The kernels' (act, alpha, limit) arguments.
    fn code(self) -> (i32, f32, f32) {
        match self {
            DeviceAct::Silu => (0, 0.0, 0.0),
            DeviceAct::GeluTanh => (1, 0.0, 0.0),
            DeviceAct::SwigluOai { alpha, limit } => (2, alpha, limit),
        }
    }
}

impl Gpu {
    /// x += y over the first `n` values.
    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        if x.len() < n || y.len() < n {
            bail!("CUDA add shape mismatch");
        }
        let f = self.function("add")?;
        let cfg = LaunchConfig::for_num_elems(n as u32);
        let n = n as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(y).arg(&n);
        // SAFETY: add(float* x, const float* y, int n) touches n floats of each, checked above.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// y = RMSNorm(x) · w for `rows` rows of `w.len()` values (y may not alias x).
    pub fn rms_norm(
        &self,
        x: &CudaView<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaViewMut<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        let n = w.len();
        if rows == 0 || x.len() < rows * n || y.len() < rows * n {
            bail!("CUDA rms_norm shape mismatch");
        }
        let f = self.function("rms_norm")?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let ni = n as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(w).arg(y).arg(&ni).arg(&eps);
        // SAFETY: rms_norm(const float* x, const float* w, float* y, int n, float eps) with one
        // block per row reads and writes rows × n floats, checked above.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// x += y, then h = RMSNorm(x) · w, for the rows of `w.len()` values of x (one launch: a
    /// decoder layer's residual add and the norm after it).
    pub fn add_rms_norm(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        h: &mut CudaSlice<f32>,
        eps: f32,
    ) -> Result<()> {
        let n = w.len();
        let rows = x.len().checked_div(n).unwrap_or(0);
        if rows == 0 || x.len() != rows * n || y.len() < rows * n || h.len() < rows * n {
            bail!("CUDA add_rms_norm shape mismatch");
        }
        let f = self.function("add_rms_norm")?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let ni = n as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(y).arg(w).arg(h).arg(&ni).arg(&eps);
        // SAFETY: add_rms_norm(float* x, const float* y, const float* w, float* h, int n,
        // float eps) with one block per row touches rows × n floats of x, y and h and n of w,
        // checked above.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// Splits the Mamba input projection `zx` (t × width: z | xBC | dt) into `xbc` (t × ch) and
    /// `dt` = softplus(dt + dt_bias) (t × n_head).
    pub fn mamba_split(
        &self,
        s: &SsmShape,
        zx: &CudaSlice<f32>,
        dt_bias: &CudaSlice<f32>,
        xbc: &mut CudaSlice<f32>,
        dt: &mut CudaSlice<f32>,
        t: usize,
    ) -> Result<()> {
        let (di, ch, nh) = (s.d_inner, s.conv_channels(), s.n_head);
        let width = di + ch + nh;
        if zx.len() < t * width || dt_bias.len() < nh || xbc.len() < t * ch || dt.len() < t * nh {
            bail!("CUDA mamba_split shape mismatch");
        }
        let f = self.function("mamba_split")?;
        let cfg = LaunchConfig::for_num_elems((t * (ch + nh)) as u32);
        let args = [t, width, di, ch, nh].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(zx).arg(dt_bias).arg(xbc).arg(dt);
        for v in &args {
            launch.arg(v);
        }
        // SAFETY: mamba_split(const float* zx, const float* dt_bias, float* xbc, float* dt,
        // int t, int width, int di, int ch, int nh): arguments in that order, lengths checked.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// Mamba-2's output gate and grouped RMSNorm, in place on `y` (t × d_inner).
    pub fn mamba_gate_norm(
        &self,
        s: &SsmShape,
        y: &mut CudaSlice<f32>,
        zx: &CudaSlice<f32>,
        norm: &CudaSlice<f32>,
        t: usize,
        eps: f32,
    ) -> Result<()> {
        let di = s.d_inner;
        let width = di + s.conv_channels() + s.n_head;
        let gs = di / s.n_group;
        if y.len() < t * di || zx.len() < t * width || norm.len() < di {
            bail!("CUDA mamba_gate_norm shape mismatch");
        }
        let f = self.function("mamba_gate_norm")?;
        let cfg = LaunchConfig {
            grid_dim: (s.n_group as u32, t as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [di, width, gs].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(y).arg(zx).arg(norm);
        for v in &args {
            launch.arg(v);
        }
        launch.arg(&eps);
        // SAFETY: mamba_gate_norm(float* y, const float* zx, const float* norm, int di,
        // int width, int gs, float eps), block (group, token): lengths checked above.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// The K and V rows of `t` new positions (`row` floats each) into the caches at position
    /// `past` (rounded to f16 for an f16 cache), which the kernel reads from `past_dev`
    /// (checked here against the host's copy).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_store(
        &self,
        k_new: &CudaView<f32>,
        v_new: &CudaView<f32>,
        k_cache: &mut DeviceKv,
        v_cache: &mut DeviceKv,
        past_dev: &CudaView<i32>,
        past: usize,
        row: usize,
        t: usize,
    ) -> Result<()> {
        let n = t * row;
        if k_new.len() < n
            || v_new.len() < n
            || k_cache.len() < (past + t) * row
            || v_cache.len() < (past + t) * row
            || past_dev.is_empty()
            || k_cache.ty() != v_cache.ty()
        {
            bail!("CUDA kv_store shape mismatch");
        }
        let f = self.function(match k_cache.ty() {
            KvType::F32 => "kv_store",
            _ => "kv_store_f16",
        })?;
        let (r, ni) = (row as i32, n as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(k_new).arg(v_new);
        push_kv(&mut launch, k_cache);
        push_kv(&mut launch, v_cache);
        launch.arg(past_dev).arg(&r).arg(&ni);
        // SAFETY: kv_store[_f16](const float* kn, const float* vn, float* (u16*) kc,
        // float* (u16*) vc, const int* pastp, int row, int n), the cache element type the
        // kernel's name says: it writes n values of each cache from row *pastp,
        // which the callers keep equal to `past` (the device passes write it from the state
        // they checked), so within the lengths checked above.
        launched(unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.map(drop))
    }

    /// Attention output (t × n_head·head_dim) of queries `q` for the `t` tokens at positions
    /// past.., whose keys and values are already in the caches (rows of n_head_kv·head_dim);
    /// the kernel reads `past` from `past_dev`. The shape's window limits each token to the
    /// last `window` positions; `sinks` (one logit per head) join each softmax.
    ///
    /// In normal precision with head dims 64 and 128 the tensor cores take prefill-sized
    /// batches, in blocks of 64 (token, query head) rows of a KV head (`attention_flash_<hd>`:
    /// the GQA heads read each K/V tile once). Otherwise a block per head and token walks the
    /// positions in f32; decode-sized batches split each head's positions into runs
    /// (`attention_split`, then `attention_merge`: split-K), so that a long cache is read by
    /// the whole GPU. The runs' count follows the cache's capacity (or the window), not
    /// `past`, so that a captured step replays at every position.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        s: &AttnShape,
        sinks: Option<&CudaSlice<f32>>,
        q: &CudaView<f32>,
        k_cache: &DeviceKv,
        v_cache: &DeviceKv,
        out: &mut CudaViewMut<f32>,
        t: usize,
        past: usize,
        past_dev: &CudaView<i32>,
    ) -> Result<()> {
        let (nh, nkv, hd) = (s.n_head, s.n_head_kv, s.head_dim);
        let row = nkv * hd;
        if hd == 0
            || hd > 256
            || nkv == 0
            || !nh.is_multiple_of(nkv)
            || q.len() < t * nh * hd
            || out.len() < t * nh * hd
            || k_cache.len() < (past + t) * row
            || v_cache.len() < (past + t) * row
            || past_dev.is_empty()
            || sinks.is_some_and(|z| z.len() < nh)
            || k_cache.ty() != v_cache.ty()
        {
            bail!("CUDA attention: unsupported shape (head_dim {hd} must be at most 256)");
        }
        let sfx = kv_suffix(k_cache);
        let seen = s.window.unwrap_or(usize::MAX).min(k_cache.len() / row);
        let rows = t * (nh / nkv);
        let tensor = self.normal_precision.load(Ordering::Relaxed) && matches!(hd, 64 | 128);
        // (kernel, grid, splits)
        let (name, grid, splits) = if tensor && t >= FLASH_FROM {
            let grid = (rows.div_ceil(FLASH_ROWS) as u32, nkv as u32, 1);
            (format!("attention_flash_{hd}{sfx}"), grid, 1)
        } else {
            let splits = (ATT_BLOCKS / (nh * t).max(1))
                .min(seen.div_ceil(ATT_MIN_RUN))
                .clamp(1, ATT_MAX_SPLITS);
            let name = match splits {
                1 => format!("attention{sfx}"),
                _ => format!("attention_split{sfx}"),
            };
            (name, (nh as u32, t as u32, splits as u32), splits)
        };
        let flash = name.starts_with("attention_flash");
        let mut part = match name.contains("split") {
            false => None,
            true => Some(self.output::<f32>(t * nh * splits * (hd + 2))?),
        };
        let f = self.function(&name)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let dims = match flash {
            true => [t, nh, nkv],
            false => [nh, nkv, hd],
        }
        .map(|v| v as i32);
        let window = s.window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        let null = 0u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(q);
        push_kv(&mut launch, k_cache);
        push_kv(&mut launch, v_cache);
        match &mut part {
            Some(p) => launch.arg(p),
            None => launch.arg(&mut *out),
        };
        launch.arg(past_dev);
        for v in &dims {
            launch.arg(v);
        }
        launch.arg(&s.scale).arg(&window);
        match sinks {
            Some(z) => launch.arg(z),
            None => launch.arg(&null),
        };
        // SAFETY: the kernels take (const float* q, const float* (u16*) kc, vc, float* out
        // or part, const int* pastp, then int t, nh, nkv (attention_flash*) or int nh, nkv, hd
        // (attention*), float scale, int window, const float* sinks), their cache element type
        // the name's suffix; blocks of 4 warps as their launch bounds say. They read positions
        // < *pastp + t of the caches (*pastp is `past`, see kv_store), checked above,
        // t · nh · hd floats of q and nh sinks when given; the f32 kernels hold at most 256
        // dimensions per head (lanes past hd idle), the flash kernels exactly hd (64 or 128,
        // their instance). Unsplit they write t · nh · hd floats of out, split
        // t · nh · splits · (hd + 2) floats of part (allocated so).
        launched(unsafe { launch.launch(cfg) }.map(drop))?;
        let Some(part) = part else {
            return Ok(());
        };
        let f = self.function("attention_merge")?;
        let cfg = LaunchConfig {
            grid_dim: (nh as u32, t as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (nhi, hdi, si) = (nh as i32, hd as i32, splits as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&part).arg(out).arg(&nhi).arg(&hdi).arg(&si);
        match sinks {
            Some(z) => launch.arg(z),
            None => launch.arg(&null),
        };
        // SAFETY: attention_merge(const float* part, float* out, int nh, int hd, int splits,
        // const float* sinks), a block per head and token: it reads the t · nh · splits
        // partials attention wrote above, writes t · nh · hd floats of out and reads nh sinks
        // when given (lengths checked above).
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// MoE routing of `t` tokens' router logits (t × n_expert) as `gating` says: the top `k`
    /// into `ids` and their weights into `wts` (t × k each); selections counted in `counts`.
    #[allow(clippy::too_many_arguments)]
    pub fn route_topk(
        &self,
        logits: &CudaSlice<f32>,
        gating: DeviceGating,
        ids: &mut CudaSlice<i32>,
        wts: &mut CudaSlice<f32>,
        counts: &mut CudaSlice<u32>,
        t: usize,
        k: usize,
        norm: bool,
        scale: f32,
    ) -> Result<()> {
        let ne = counts.len();
        if ne == 0
            || ne > 1024
            || k == 0
            || k > 32
            || k > ne
            || logits.len() < t * ne
            || ids.len() < t * k
            || wts.len() < t * k
            || matches!(gating, DeviceGating::SigmoidBias(b) if b.len() < ne)
        {
            bail!("CUDA route_topk: unsupported shape ({ne} experts, {k} used)");
        }
        let f = self.function("route_topk")?;
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (nei, ki, ni) = (ne as i32, k as i32, norm as i32);
        let null = 0u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(logits);
        let mode: i32 = match gating {
            DeviceGating::SigmoidBias(b) => {
                launch.arg(b);
                0
            }
            DeviceGating::Softmax => {
                launch.arg(&null);
                1
            }
            DeviceGating::SoftmaxSelected => {
                launch.arg(&null);
                2
            }
        };
        launch.arg(ids).arg(wts).arg(counts);
        launch.arg(&nei).arg(&ki).arg(&ni).arg(&scale).arg(&mode);
        // SAFETY: route_topk(const float* logits, const float* bias, int* ids, float* wts,
        // unsigned* counts, int ne, int k, int norm, float scale, int gating), one warp per
        // token; ne ≤ 1024 fits its shared arrays and k ≤ 32 its lanes; the bias (read by
        // gating 0 only) and the other lengths checked above.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// Attention's q and k heads (t rows of `s.n_head` and `s.n_head_kv` heads) each RMSNorm'd
    /// times `q_norm` / `k_norm` where given, then rotated by the (cos, sin) pairs of each row
    /// in `cs` (t × n_rot/2 pairs, interleaved), in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn qk_norm_rope(
        &self,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        (q_norm, k_norm): (Option<&CudaSlice<f32>>, Option<&CudaSlice<f32>>),
        cs: &CudaSlice<f32>,
        s: &AttnShape,
        t: usize,
        (n_rot, neox): (usize, bool),
        eps: f32,
    ) -> Result<()> {
        let (nh, nkv, hd) = (s.n_head, s.n_head_kv, s.head_dim);
        let heads = t * (nh + nkv);
        if hd > 256
            || n_rot > hd
            || q.len() < t * nh * hd
            || k.len() < t * nkv * hd
            || cs.len() < t * n_rot
            || q_norm.is_some_and(|w| w.len() < hd)
            || k_norm.is_some_and(|w| w.len() < hd)
            || heads > i32::MAX as usize
        {
            bail!("CUDA qk_norm_rope shape mismatch (head dim {hd} must be at most 256)");
        }
        if heads == 0 || (n_rot == 0 && q_norm.is_none() && k_norm.is_none()) {
            return Ok(());
        }
        let f = self.function("qk_norm_rope")?;
        let cfg = LaunchConfig {
            grid_dim: (heads.div_ceil(QK_WARPS) as u32, 1, 1),
            block_dim: (32 * QK_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [t, nh, nkv, hd, n_rot, neox as usize].map(|v| v as i32);
        let null = 0u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(q).arg(k);
        for w in [q_norm, k_norm] {
            match w {
                Some(w) => launch.arg(w),
                None => launch.arg(&null),
            };
        }
        launch.arg(cs);
        for v in &args {
            launch.arg(v);
        }
        launch.arg(&eps);
        // SAFETY: qk_norm_rope(float* q, float* k, const float* qw, const float* kw,
        // const float* cs, int t, int nh, int nkv, int hd, int n_rot, int neox, float eps), a
        // warp per head in blocks of QK_WARPS warps (its launch bounds): it touches t × nh × hd
        // floats of q, t × nkv × hd of k, hd of each norm weight given and t × n_rot of cs,
        // checked above, and holds a head of at most 256 values in shared memory.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// `y[r] += b[ids[r]]` for `rows` rows of n (ids None: every row adds b, n floats).
    pub fn add_bias(
        &self,
        y: &mut CudaSlice<f32>,
        b: &CudaSlice<f32>,
        ids: Option<(&CudaSlice<i32>, usize)>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        self.add_bias_view(&mut y.slice_mut(..), b, ids, rows, n)
    }

    /// [`Gpu::add_bias`] on a view.
    pub(super) fn add_bias_view(
        &self,
        y: &mut CudaViewMut<f32>,
        b: &CudaSlice<f32>,
        ids: Option<(&CudaSlice<i32>, usize)>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let b_rows = ids.map_or(1, |(_, max)| max + 1);
        if y.len() < rows * n || b.len() < b_rows * n || ids.is_some_and(|(i, _)| i.len() < rows) {
            bail!("CUDA add_bias shape mismatch");
        }
        if rows * n == 0 {
            return Ok(());
        }
        let f = self.function("add_bias")?;
        let (ri, ni) = (rows as i32, n as i32);
        let null = 0u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(y).arg(b);
        match ids {
            Some((i, _)) => launch.arg(i),
            None => launch.arg(&null),
        };
        launch.arg(&ri).arg(&ni);
        // SAFETY: add_bias(float* y, const float* b, const int* ids, int rows, int n): every id
        // is below the caller's bound on b's rows (expert ids from route_topk, or rows grouped
        // per expert), lengths checked above.
        launched(unsafe { launch.launch(LaunchConfig::for_num_elems((rows * n) as u32)) }.map(drop))
    }

    /// g = act(g) · u over the first n values (see [`DeviceAct`]).
    pub fn gated_act(
        &self,
        g: &mut CudaSlice<f32>,
        u: &CudaSlice<f32>,
        n: usize,
        act: DeviceAct,
    ) -> Result<()> {
        if g.len() < n || u.len() < n {
            bail!("CUDA gated_act shape mismatch");
        }
        if n == 0 {
            return Ok(());
        }
        let (code, alpha, limit) = act.code();
        let f = self.function("gated_act")?;
        let ni = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(g)
            .arg(u)
            .arg(&ni)
            .arg(&code)
            .arg(&alpha)
            .arg(&limit);
        // SAFETY: gated_act(float* g, const float* u, long long n, int act, float alpha,
        // float limit) touches n floats of each, checked above.
        launched(unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.map(drop))
    }

    /// x = c · tanh(x / c) over the first n values.
    pub fn softcap(&self, x: &mut CudaSlice<f32>, n: usize, c: f32) -> Result<()> {
        if x.len() < n {
            bail!("CUDA softcap shape mismatch");
        }
        if n == 0 {
            return Ok(());
        }
        let f = self.function("softcap")?;
        let ni = n as i64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(&ni).arg(&c);
        // SAFETY: softcap(float* x, long long n, float c) touches n floats, checked above.
        launched(unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.map(drop))
    }

    /// `out[i] = x[idx[i]]` for `idx.len()` rows of n floats.
    pub fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        idx: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        x_rows: usize,
        n: usize,
        max_index: usize,
    ) -> Result<()> {
        let rows = idx.len();
        if x.len() < x_rows * n || out.len() < rows * n || max_index >= x_rows {
            bail!("CUDA gather_rows shape mismatch");
        }
        let f = self.function("gather_rows")?;
        let cfg = LaunchConfig::for_num_elems((rows * n) as u32);
        let (ri, ni) = (rows as i32, n as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(idx).arg(out).arg(&ri).arg(&ni);
        // SAFETY: gather_rows(const float* x, const int* idx, float* out, int rows, int n): the
        // caller's `max_index` bounds every index (checked < x_rows), lengths checked above.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// `x[t] += Σ_s wts[t·k + s] · y[pos[t·k + s]]` (y row t·k + s without `pos`), rows of n.
    /// `x[t] += Σ_s wts[t·k + s] · y[pos[t·k + s]]` (y row t·k + s without `pos`), rows of n;
    /// without `accumulate`, x = the sum (its old values unread). With `pos`, y may have fewer
    /// rows than pairs (some pairs computed elsewhere, weight 0); positions outside y's rows
    /// are skipped.
    #[allow(clippy::too_many_arguments)]
    pub fn moe_combine(
        &self,
        y: &CudaSlice<f32>,
        pos: Option<&CudaSlice<i32>>,
        wts: &CudaSlice<f32>,
        x: &mut CudaSlice<f32>,
        t: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        let y_rows_needed = if pos.is_some() { 1 } else { t * k };
        if y.len() < y_rows_needed * n
            || wts.len() < t * k
            || x.len() < t * n
            || pos.is_some_and(|p| p.len() < t * k)
        {
            bail!("CUDA moe_combine shape mismatch");
        }
        let f = self.function("moe_combine")?;
        let cfg = LaunchConfig::for_num_elems((t * n) as u32);
        let args = [t, k, n, y.len() / n.max(1), accumulate as usize].map(|v| v as i32);
        let null = 0u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(y);
        match pos {
            Some(p) => launch.arg(p),
            None => launch.arg(&null),
        };
        launch.arg(wts).arg(x);
        for v in &args {
            launch.arg(v);
        }
        // SAFETY: moe_combine(const float* y, const int* pos, const float* wts, float* x, int t,
        // int k, int n, int y_rows, int accumulate): the kernel skips positions outside y's rows; the other
        // lengths are checked above.
        launched(unsafe { launch.launch(cfg) }.map(drop))
    }

    /// Mamba-2's causal conv + SiLU over `t` rows of `x` (t × ch) on the device, `state`
    /// holding the previous k − 1 rows (updated), `w` ch × k, optional `bias` (ch).
    #[allow(clippy::too_many_arguments)]
    pub fn mamba_conv(
        &self,
        x: &CudaView<f32>,
        state: &mut CudaSlice<f32>,
        w: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        out: &mut CudaViewMut<f32>,
        t: usize,
        ch: usize,
        k: usize,
    ) -> Result<()> {
        if !(1..=8).contains(&k)
            || x.len() < t * ch
            || out.len() < t * ch
            || state.len() < (k - 1) * ch
            || w.len() < ch * k
            || bias.is_some_and(|b| b.len() < ch)
        {
            bail!("CUDA mamba_conv shape mismatch");
        }
        let f = self.function("mamba_conv")?;
        // A thread per channel and token (tokens beyond the grid's y limit loop).
        let blocks = (ch as u32).div_ceil(128);
        let cfg = LaunchConfig {
            grid_dim: (blocks, (t as u32).clamp(1, 65535), 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ti, ci, ki) = (t as i32, ch as i32, k as i32);
        let null = 0u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(&*state).arg(w);
        match bias {
            Some(b) => launch.arg(b),
            None => launch.arg(&null),
        };
        launch.arg(out).arg(&ti).arg(&ci).arg(&ki);
        // SAFETY: mamba_conv(const float* x, const float* state, const float* w,
        // const float* bias, float* out, int t, int ch, int k): the arguments above in that
        // order (a null bias pointer when there is none); every length it indexes by was checked.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("CUDA launch: {e:?}"))?;
        let f = self.function("mamba_conv_state")?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(&mut *state).arg(&ti).arg(&ci).arg(&ki);
        // SAFETY: mamba_conv_state(const float* x, float* state, int t, int ch, int k), the
        // arguments above in that order, queued after the conv that reads the old state; it
        // reads the last min(t, k − 1) rows of x and the state's k − 1 rows, checked above.
        unsafe { launch.launch(LaunchConfig::for_num_elems(ch as u32)) }
            .map_err(|e| anyhow!("CUDA launch: {e:?}"))?;
        Ok(())
    }

    /// Mamba-2's selective scan on the device (see kernels.cu `mamba_scan`): `xbc` t × channels,
    /// `dt` t × n_head (softplus-ed), `a` and `d` per head, `ssm` the state (updated), `y`
    /// t × d_inner.
    #[allow(clippy::too_many_arguments)]
    pub fn mamba_scan(
        &self,
        s: &crate::backend::ssm::SsmShape,
        xbc: &CudaView<f32>,
        dt: &CudaView<f32>,
        a: &CudaSlice<f32>,
        d: &CudaSlice<f32>,
        ssm: &mut CudaSlice<f32>,
        y: &mut CudaViewMut<f32>,
        t: usize,
    ) -> Result<()> {
        let (hd, ds, nh) = (s.head_dim(), s.d_state, s.n_head);
        if ds > 256 {
            bail!("the CUDA scan holds a state of at most 256 per head row (this model has {ds})");
        }
        if ds == 0
            || nh % s.n_group != 0
            || xbc.len() < t * s.conv_channels()
            || dt.len() < t * nh
            || a.len() < nh
            || d.len() < nh
            || ssm.len() < nh * hd * ds
            || y.len() < t * s.d_inner
        {
            bail!("CUDA mamba_scan shape mismatch");
        }
        let f = self.function("mamba_scan")?;
        // A warp per row, SCAN_ROWS (4) rows of one head per block.
        let cfg = LaunchConfig {
            grid_dim: ((hd as u32).div_ceil(4), nh as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let args = [t, s.d_inner, ds, nh, s.n_group].map(|v| v as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(xbc).arg(dt).arg(a).arg(d).arg(ssm).arg(y);
        for v in &args {
            launch.arg(v);
        }
        // SAFETY: mamba_scan(const float* xbc, const float* dt, const float* a, const float* d,
        // float* ssm, float* y, int t, int d_inner, int d_state, int n_head, int n_group): the
        // arguments above in that order; d_state ≤ 256 (eight state elements per lane); every
        // length it indexes by was checked.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("CUDA launch: {e:?}"))?;
        Ok(())
    }
}

impl DeviceRows<'_> {
    /// What both routed-expert kernels check and set up: this matrix stacks `n_expert` experts
    /// of `rows_per_expert` rows (`shape`: those two, the pairs, x's rows), `ids` and y (of
    /// `y_len`) hold a row per pair and x `x_rows` rows. Returns the kernel
    /// `<this type's decode kernel>_<suffix>` (one token a block; on int8 it reads x's rows
    /// quantized by [`Gpu::quantize_q8`], which the caller launches).
    fn expert_kernel(
        &self,
        suffix: &str,
        (rows_per_expert, n_expert, pairs, x_rows): (usize, usize, usize, usize),
        ids: &CudaSlice<i32>,
        x: &CudaView<f32>,
        y_len: usize,
    ) -> Result<CudaFunction> {
        let cols = self.m.cols;
        if self.start != 0
            || self.rows != rows_per_expert * n_expert
            || ids.len() < pairs
            || x.len() < x_rows * cols
            || y_len < pairs * rows_per_expert
        {
            bail!("CUDA matmul_{suffix} shape mismatch");
        }
        let g = self.gpu;
        let kind = g.rows_kernel(self.m.ty);
        g.function(&format!(
            "{}_{suffix}",
            super::kernel_name(self.m.ty, kind)?
        ))
    }

    /// The routed experts' products for decode, with the expert ids on the device: pair p
    /// multiplies expert `ids[p]` (rows `ids[p]·rows_per_expert ..` of this stacked matrix) by x
    /// row p / k (row p when `x_per_pair`), adds row `bias_ids[p]` of `bias` (rows of
    /// `rows_per_expert`: the experts' own ids where `ids` index a cache's slots) where given,
    /// into y row p (`rows_per_expert` wide), as `epi` says.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_id(
        &self,
        rows_per_expert: usize,
        n_expert: usize,
        ids: &CudaSlice<i32>,
        x: &CudaView<f32>,
        y: &mut CudaViewMut<f32>,
        pairs: usize,
        k: usize,
        x_per_pair: bool,
        bias: Option<(&CudaSlice<f32>, &CudaSlice<i32>)>,
        epi: super::Epilogue,
    ) -> Result<()> {
        if bias.is_some_and(|(b, i)| !expert_bias_fits(b.len(), rows_per_expert) || i.len() < pairs)
        {
            bail!("CUDA matmul_id: the bias does not fit the experts");
        }
        let x_rows = if x_per_pair { pairs } else { pairs.div_ceil(k) };
        let shape = (rows_per_expert, n_expert, pairs, x_rows);
        let f = self.expert_kernel("id", shape, ids, x, y.len())?;
        let (r, c, rbi) = (
            rows_per_expert as i32,
            self.m.cols as i32,
            self.m.row_bytes as i64,
        );
        let (p, ki, xp, ep) = (pairs as i32, k as i32, x_per_pair as i32, epi as i32);
        let null = 0u64;
        let g = self.gpu;
        let xq = g.decode_x(g.rows_kernel(self.m.ty), x, x_rows, self.m.cols)?;
        let mut launch = g.stream.launch_builder(&f);
        launch.arg(&self.m.data);
        super::push_x(&mut launch, x, &xq);
        launch.arg(y).arg(ids);
        match bias {
            Some((b, i)) => launch.arg(b).arg(i),
            None => launch.arg(&null).arg(&null),
        };
        launch
            .arg(&r)
            .arg(&c)
            .arg(&rbi)
            .arg(&p)
            .arg(&ki)
            .arg(&xp)
            .arg(&ep);
        // SAFETY: matmul_[i8_]<type>_id(const u8* w, const void* x, float* y, const int* ids,
        // const float* b, const int* bids, int rows, int cols, long long row_bytes, int pairs,
        // int k, int x_per_pair, int epi): every id comes from route_topk over this matrix's
        // n_expert experts, so it reads within the n_expert × rows_per_expert rows; every bias
        // id is an expert of the layer whose bias b holds (null both, or a row per expert); x
        // (floats, or its rows from quantize_q8 for the int8 kernels) and y lengths checked above.
        launched(unsafe { launch.launch(id_grid(rows_per_expert, pairs)) }.map(drop))
    }

    /// Decode's gate and up products of the routed experts in one pass (this matrix the gate,
    /// `up` of the same type and shape), with their biases where given and the gated
    /// activation: y row p = act(gate_e · x + bg_e) · (up_e · x + bu_e) (gpt-oss's clamped
    /// form as [`Gpu::gated_act`]), e = `ids[p]`, x row p / k. The same values as two
    /// [`DeviceRows::matmul_id`], the biases and `gated_act`, bit for bit.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_gated_id(
        &self,
        up: &DeviceRows,
        rows_per_expert: usize,
        n_expert: usize,
        ids: &CudaSlice<i32>,
        x: &CudaView<f32>,
        y: &mut CudaViewMut<f32>,
        pairs: usize,
        k: usize,
        (bg, bu, bias_ids): (
            Option<&CudaSlice<f32>>,
            Option<&CudaSlice<f32>>,
            &CudaSlice<i32>,
        ),
        act: DeviceAct,
    ) -> Result<()> {
        let (cols, rb) = (self.m.cols, self.m.row_bytes);
        let short = |b: Option<&CudaSlice<f32>>| {
            b.is_some_and(|b| !expert_bias_fits(b.len(), rows_per_expert))
        };
        if up.start != 0
            || (up.m.ty, up.rows, up.m.cols, up.m.row_bytes) != (self.m.ty, self.rows, cols, rb)
            || short(bg)
            || short(bu)
            || bias_ids.len() < pairs
        {
            bail!("CUDA matmul_gated_id: up or a bias does not fit the gate");
        }
        let shape = (rows_per_expert, n_expert, pairs, pairs.div_ceil(k));
        let f = self.expert_kernel("gated_id", shape, ids, x, y.len())?;
        let (code, alpha, limit) = act.code();
        let (r, c, rbi) = (rows_per_expert as i32, cols as i32, rb as i64);
        let (p, ki) = (pairs as i32, k as i32);
        let null = 0u64;
        let g = self.gpu;
        let xq = g.decode_x(g.rows_kernel(self.m.ty), x, pairs.div_ceil(k), cols)?;
        let mut launch = g.stream.launch_builder(&f);
        launch.arg(&self.m.data).arg(&up.m.data);
        super::push_x(&mut launch, x, &xq);
        launch.arg(y).arg(ids);
        for b in [bg, bu] {
            match b {
                Some(b) => launch.arg(b),
                None => launch.arg(&null),
            };
        }
        launch
            .arg(bias_ids)
            .arg(&r)
            .arg(&c)
            .arg(&rbi)
            .arg(&p)
            .arg(&ki);
        launch.arg(&code).arg(&alpha).arg(&limit);
        // SAFETY: matmul_[i8_]<type>_gated_id(const u8* wg, const u8* wu, const void* x, float* y,
        // const int* ids, const float* bg, const float* bu, const int* bids, int rows,
        // int cols, long long row_bytes, int pairs, int k, int act, float alpha, float limit):
        // both matrices have this shape and every id comes from route_topk over its n_expert
        // experts; every bias id is an expert of the layer whose biases bg and bu hold (null,
        // or a row per expert); x (floats, or its rows from quantize_q8 for the int8 kernels)
        // and y lengths checked above.
        launched(unsafe { launch.launch(id_grid(rows_per_expert, pairs)) }.map(drop))
    }
}

/// The decode expert kernels' grid: a block per MV_ROWS rows and pair.
fn id_grid(rows_per_expert: usize, pairs: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (rows_per_expert as u32).div_ceil(super::MV_ROWS),
            pairs as u32,
            1,
        ),
        block_dim: (32 * super::MV_WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether an expert-indexed bias of `len` values holds whole rows of `rows_per_expert` for at
/// least one expert (the kernels read `bias[id · rows_per_expert + r]` for the layer's expert
/// ids; an empty or ragged bias is a caller's bug).
fn expert_bias_fits(len: usize, rows_per_expert: usize) -> bool {
    rows_per_expert > 0 && len >= rows_per_expert && len.is_multiple_of(rows_per_expert)
}

#[cfg(test)]
mod tests {
    use super::expert_bias_fits;

    #[test]
    fn an_expert_bias_holds_whole_rows_of_at_least_one_expert() {
        assert!(expert_bias_fits(32 * 2880, 2880));
        assert!(expert_bias_fits(2880, 2880));
        assert!(!expert_bias_fits(0, 2880), "an empty bias passed");
        assert!(
            !expert_bias_fits(2 * 2880 + 1, 2880),
            "a ragged bias passed"
        );
        assert!(!expert_bias_fits(8, 0));
    }
}
