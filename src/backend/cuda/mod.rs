//! The CUDA backend: the device found through cudarc with dynamic loading (the same binary runs
//! where there is no CUDA and says why in one line), kernels compiled from `kernels.cu` by NVRTC
//! on first use and cached on disk per GPU architecture, weights uploaded in their GGUF block
//! layout as a placement plan names them, and the matrix products over them.
//!
//! For now the GPU computes the matrix products of the weights placed on it (activations cross
//! PCIe per product); the other ops run on the CPU.

mod experts;
mod graph;
mod ops;
mod staging;
mod state;

pub use experts::{ExpertCache, ExpertCaches};
pub use graph::{Found, Graphs, StepGraph};
pub use ops::{DeviceAct, DeviceGating};
pub use staging::{average, time_copies, HostPins, OffloadCosts, COPY_SAMPLES};
pub use state::{device_position, DeviceKv, DeviceState};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use ggrun_quants::GgmlType;

use super::cpu::Matrix;
use super::placement::Plan;
use crate::gguf::TensorView;

/// The kernel source, compiled at run time for the device's architecture.
const KERNELS: &str = include_str!("kernels.cu");

/// One CUDA device with its stream and compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    /// Kernel handles looked up so far, by name.
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// Normal precision: batches of [`TILED_FROM`] tokens and more may run on the tensor cores
    /// (bf16 operands, f32 sums) and smaller ones on int8 activations (dp4a, for the legacy and
    /// K-quant block types); otherwise (exact) every product keeps its activations in f32.
    normal_precision: AtomicBool,
    /// The device's name, as the driver reports it.
    pub name: String,
    /// Compute capability (major, minor).
    pub arch: (i32, i32),
    /// Where the compiled kernels are cached.
    pub kernel_cache: PathBuf,
    /// Whether this start compiled the kernels (false: they came from the cache).
    pub compiled: bool,
}

/// A weight matrix on the device, in its GGUF layout.
pub struct DeviceMatrix {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    data: CudaSlice<u8>,
}

impl DeviceMatrix {
    /// Bytes of device memory the matrix holds.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
}

/// Rows `start..start + rows` of a device matrix (an expert of a stacked tensor), with the GPU
/// that holds it: what a host-side [`Matrix`] carries when its weights are on the device.
#[derive(Clone, Copy)]
pub struct DeviceRows<'a> {
    pub gpu: &'a Gpu,
    pub m: &'a DeviceMatrix,
    pub start: usize,
    pub rows: usize,
}

impl DeviceRows<'_> {
    /// y (t × rows) = x (t × cols) · wᵀ with x and y in host memory: copies x in, multiplies,
    /// copies y back (and waits).
    pub fn matmul_host(&self, x: &[f32], t: usize, y: &mut [f32]) -> Result<()> {
        let (cols, rows) = (self.m.cols, self.rows);
        if x.len() != t * cols || y.len() != t * rows {
            bail!("CUDA matmul shape mismatch");
        }
        let g = self.gpu;
        let dx = g.to_device(x)?;
        let mut dy = g.output(t * rows)?;
        self.launch(&dx.slice(..), t, &mut dy.slice_mut(..), Epilogue::Store)?;
        g.stream
            .memcpy_dtoh(&dy, y)
            .map_err(|e| anyhow!("CUDA copy: {e:?}"))
    }

    /// Queues y = x · wᵀ (or as `epi` says) for device x (t × cols) and y.
    pub fn launch(
        &self,
        x: &CudaView<f32>,
        t: usize,
        y: &mut CudaViewMut<f32>,
        epi: Epilogue,
    ) -> Result<()> {
        self.product(x, t, y, epi, None)
    }

    /// Queues y = x · wᵀ + b (b: one value per row, added in the product's kernel in decode).
    pub fn launch_biased(
        &self,
        x: &CudaView<f32>,
        t: usize,
        y: &mut CudaViewMut<f32>,
        b: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        self.product(x, t, y, Epilogue::Store, b)
    }

    fn product(
        &self,
        x: &CudaView<f32>,
        t: usize,
        y: &mut CudaViewMut<f32>,
        epi: Epilogue,
        b: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        let (w, rb) = (self.view(), self.m.row_bytes);
        let (ty, rows, cols) = (self.m.ty, self.rows, self.m.cols);
        self.gpu
            .launch_matmul(ty, &w, rb, rows, cols, x, t, y, epi, b)
    }

    /// The bytes of these rows.
    fn view(&self) -> CudaView<'_, u8> {
        let rb = self.m.row_bytes;
        self.m
            .data
            .slice(self.start * rb..(self.start + self.rows) * rb)
    }
}

/// One group of [`Gpu::matmul_grouped`]: (first weight row, first activation and output row,
/// tokens).
pub type Group = (usize, usize, usize);

/// What a product does with each result (`EPI_*` in kernels.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// y = x · wᵀ
    Store = 0,
    /// y += x · wᵀ
    Add = 1,
    /// y = relu(x · wᵀ)² (the feed-forward activation, fused into up products)
    Relu2 = 2,
}

/// One feed-forward block for [`Gpu::relu2_mlps`]: `x` holds `t` rows of `up.cols` inputs.
pub struct MlpJob<'a> {
    pub up: DeviceRows<'a>,
    pub down: DeviceRows<'a>,
    pub x: &'a [f32],
    pub t: usize,
}

impl Gpu {
    /// For each job, relu²(x · upᵀ) · downᵀ, all on the device: one copy of every job's input in,
    /// the products and activations queued back to back, one copy of every output out. Returns
    /// the outputs in job order (t × down.rows each).
    pub fn relu2_mlps(&self, jobs: &[MlpJob]) -> Result<Vec<Vec<f32>>> {
        let mut x_at = Vec::with_capacity(jobs.len());
        let mut u_at = Vec::with_capacity(jobs.len());
        let mut y_at = Vec::with_capacity(jobs.len());
        let (mut nx, mut nu, mut ny) = (0, 0, 0);
        for j in jobs {
            if j.x.len() != j.t * j.up.m.cols || j.up.rows != j.down.m.cols {
                bail!("CUDA feed-forward shape mismatch");
            }
            x_at.push(nx);
            u_at.push(nu);
            y_at.push(ny);
            nx += j.x.len();
            nu += j.t * j.up.rows;
            ny += j.t * j.down.rows;
        }
        let xs: Vec<f32> = jobs.iter().flat_map(|j| j.x.iter().copied()).collect();
        let dx = self.to_device(&xs)?;
        let mut du = self.output(nu.max(1))?;
        let mut dy = self.output(ny.max(1))?;
        for (i, j) in jobs.iter().enumerate() {
            let x = dx.slice(x_at[i]..x_at[i] + j.x.len());
            let mut u = du.slice_mut(u_at[i]..u_at[i] + j.t * j.up.rows);
            j.up.launch(&x, j.t, &mut u, Epilogue::Relu2)?;
        }
        for (i, j) in jobs.iter().enumerate() {
            let u = du.slice(u_at[i]..u_at[i] + j.t * j.up.rows);
            let mut y = dy.slice_mut(y_at[i]..y_at[i] + j.t * j.down.rows);
            j.down.launch(&u, j.t, &mut y, Epilogue::Store)?;
        }
        let ys = self.to_host(&dy)?;
        Ok(jobs
            .iter()
            .enumerate()
            .map(|(i, j)| ys[y_at[i]..y_at[i] + j.t * j.down.rows].to_vec())
            .collect())
    }
}

/// How a device-resident pass runs, where a measurement or a test needs to choose: the defaults
/// are what measured best (BENCHMARKS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassOptions {
    /// When prefill copies whole RAM expert layers ahead of the layers that need them.
    pub prefetch: Prefetch,
    /// Replay decode steps as CUDA graphs where every expert a step needs is on the device.
    pub cuda_graphs: bool,
}

impl Default for PassOptions {
    fn default() -> PassOptions {
        PassOptions {
            prefetch: Prefetch::Auto,
            cuda_graphs: true,
        }
    }
}

/// When prefill prefetches whole RAM layers: where the measured costs say copying pays
/// (`auto`), for every prefill batch (`on`), or never (`off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Prefetch {
    #[default]
    Auto,
    On,
    Off,
}

impl std::str::FromStr for Prefetch {
    type Err = String;

    fn from_str(s: &str) -> Result<Prefetch, String> {
        match s {
            "auto" => Ok(Prefetch::Auto),
            "on" => Ok(Prefetch::On),
            "off" => Ok(Prefetch::Off),
            _ => Err(format!("{s:?}: expected auto, on or off")),
        }
    }
}

/// The weights a [`Plan`] puts on a GPU, uploaded when the model loader first asks for them.
pub struct DeviceWeights {
    pub gpu: Gpu,
    pub plan: Plan,
    slots: HashMap<String, OnceLock<DeviceMatrix>>,
}

impl DeviceWeights {
    pub fn new(gpu: Gpu, plan: Plan, names: impl Iterator<Item = String>) -> DeviceWeights {
        let slots = names
            .filter(|n| plan.on_gpu(n))
            .map(|n| (n, OnceLock::new()))
            .collect();
        DeviceWeights { gpu, plan, slots }
    }

    /// The device copy of `t` (as a `rows` × `cols` matrix) when the plan puts it on the GPU.
    pub fn get(&self, t: &TensorView, rows: usize, cols: usize) -> Result<Option<DeviceRows<'_>>> {
        let Some(slot) = self.slots.get(&t.info.name) else {
            return Ok(None);
        };
        if slot.get().is_none() {
            let d = self
                .gpu
                .upload(&Matrix::from_view(t, rows, cols))
                .map_err(|e| anyhow!("{}: {e:#}", t.info.name))?;
            let _ = slot.set(d);
        }
        let m = slot.get().expect("set above");
        Ok(Some(DeviceRows {
            gpu: &self.gpu,
            m,
            start: 0,
            rows: m.rows,
        }))
    }

    /// Bytes uploaded so far.
    pub fn uploaded_bytes(&self) -> usize {
        self.slots
            .values()
            .filter_map(|s| s.get())
            .map(|m| m.bytes())
            .sum()
    }
}

impl Gpu {
    /// Device `ordinal`, or an error that says in one line why there is none (no driver
    /// library, no device, no NVRTC, ...), for callers to print before falling back to the CPU.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only probes whether the shared libraries load (dlopen), calling nothing in
        // them; a missing library makes cudarc panic at first use, which this check prevents.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("no CUDA driver library (libcuda) found");
        }
        // SAFETY: as above, for NVRTC.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            bail!("the CUDA driver is present but NVRTC (libnvrtc) is not: install the CUDA runtime compiler library");
        }
        let count = CudaContext::device_count().map_err(|e| anyhow!("CUDA: {e:?}"))?;
        if ordinal as i32 >= count {
            bail!("no CUDA device {ordinal} ({count} found)");
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        // SAFETY: every allocation, copy and launch of ours goes to this context's one stream,
        // which orders them, so cudarc's per-buffer events (two created per allocation,
        // recorded and waited on at every use) only cost time.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let name = ctx.name().map_err(|e| anyhow!("CUDA: {e:?}"))?;
        let arch = ctx
            .compute_capability()
            .map_err(|e| anyhow!("CUDA: {e:?}"))?;
        let (ptx, kernel_cache, compiled) = kernels_for(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| anyhow!("loading the CUDA kernels: {e:?}"))?;
        // A stream of our own: the legacy default stream cannot be captured into a graph.
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("CUDA stream: {e:?}"))?;
        Ok(Gpu {
            ctx,
            stream,
            module,
            functions: Mutex::default(),
            normal_precision: AtomicBool::new(false),
            name,
            arch,
            kernel_cache,
            compiled,
        })
    }

    /// Lets products use the tensor cores (prefill) and int8 activations (decode) — normal
    /// precision — or keeps their activations in f32 (exact precision).
    pub fn set_normal_precision(&self, on: bool) {
        self.normal_precision.store(on, Ordering::Relaxed);
    }

    /// (free, total) bytes of device memory.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| anyhow!("CUDA: {e:?}"))
    }

    fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(name)
            .map_err(|e| anyhow!("CUDA kernel {name}: {e:?}"))?;
        cache.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Copies `m` (GGUF layout) to the device.
    pub fn upload(&self, m: &Matrix) -> Result<DeviceMatrix> {
        kernel_name(m.ty, Kernel::Rows)?;
        let data = self
            .stream
            .clone_htod(m.data)
            .map_err(|e| anyhow!("CUDA upload: {e:?}"))?;
        Ok(DeviceMatrix {
            ty: m.ty,
            rows: m.rows,
            cols: m.cols,
            row_bytes: m.row_bytes(),
            data,
        })
    }

    /// Copies values to the device.
    pub fn to_device<T: DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(x)
            .map_err(|e| anyhow!("CUDA copy: {e:?}"))
    }

    /// Copies values back (waits for the stream).
    pub fn to_host<T: DeviceRepr>(&self, x: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(x)
            .map_err(|e| anyhow!("CUDA copy: {e:?}"))
    }

    /// A zeroed device buffer of `n` values.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n)
            .map_err(|e| anyhow!("CUDA alloc: {e:?}"))
    }

    /// A device buffer of `n` floats for a kernel to write, not cleared: only for outputs that
    /// the kernels writing them cover entirely (the matmuls write every element, which the GPU
    /// tests check by poisoning).
    pub fn output<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the buffer is only read after kernels have written all of it (see above).
        unsafe { self.stream.alloc(n) }.map_err(|e| anyhow!("CUDA alloc: {e:?}"))
    }

    /// `rows` rows of x (`cols` wide, a multiple of 32) in int8 for the decode kernels of
    /// [`Kernel::RowsI8`] that take several tokens a block: per row the cols bytes, a step per
    /// 32 and a sum per 8, as `quantize_q8` in kernels.cu lays them out ([`q8_row_bytes`] a
    /// row). Quantizing once per product spares every block quantizing all of x for each of
    /// its tokens (one-token blocks quantize their own: see kernels.cu).
    pub fn quantize_q8(
        &self,
        x: &CudaView<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<CudaSlice<u8>> {
        if rows == 0 || rows > 65535 || !cols.is_multiple_of(32) || x.len() < rows * cols {
            bail!("CUDA quantize_q8 shape mismatch ({rows} rows of {cols})");
        }
        let mut xq = self.output::<u8>(rows * q8_row_bytes(cols))?;
        let f = self.function("quantize_q8")?;
        // Eight warps a block, a warp per 256 columns.
        let cfg = LaunchConfig {
            grid_dim: ((cols as u32).div_ceil(8 * 256), rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r, c) = (rows as i32, cols as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(&mut xq).arg(&r).arg(&c);
        // SAFETY: quantize_q8(const float* x, u8* xq, int rows, int cols) reads rows × cols
        // floats and writes within rows × q8_row_bytes(cols) bytes (only the padding at the end
        // of each row is left unwritten, and no kernel reads it), checked and allocated above.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("CUDA launch: {e:?}"))?;
        Ok(xq)
    }

    /// y (t × w.rows) = x (t × w.cols) · wᵀ on the device, activations in f32.
    pub fn matmul(
        &self,
        w: &DeviceMatrix,
        x: &CudaSlice<f32>,
        t: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let wv = w.data.slice(..);
        self.launch_matmul(
            w.ty,
            &wv,
            w.row_bytes,
            w.rows,
            w.cols,
            &x.slice(..),
            t,
            &mut y.slice_mut(..),
            Epilogue::Store,
            None,
        )
    }

    /// Three products of the same x (t × cols), each with its bias where given (attention's
    /// q, k and v): one launch for decode-sized batches where the three share type and width,
    /// else one product (and bias) after another. The same values either way.
    pub fn matmul3(
        &self,
        parts: [(&DeviceRows, Option<&CudaSlice<f32>>); 3],
        x: &CudaSlice<f32>,
        t: usize,
    ) -> Result<[CudaSlice<f32>; 3]> {
        let [(w0, b0), (w1, b1), (w2, b2)] = parts;
        let (mut y0, mut y1, mut y2) = (
            self.output(t * w0.rows)?,
            self.output(t * w1.rows)?,
            self.output(t * w2.rows)?,
        );
        let (ty, cols, rb) = (w0.m.ty, w0.m.cols, w0.m.row_bytes);
        let same = [w1, w2]
            .iter()
            .all(|w| (w.m.ty, w.m.cols, w.m.row_bytes) == (ty, cols, rb));
        let kind = self.kind_for(ty, t, cols);
        let rows_kind = kind == Kernel::Rows || kind == Kernel::RowsI8;
        let short = [(b0, w0), (b1, w1), (b2, w2)]
            .iter()
            .any(|(b, w)| b.is_some_and(|b| b.len() < w.rows));
        if x.len() < t * cols || short {
            bail!("CUDA matmul3 shape mismatch");
        }
        if !same || !rows_kind {
            for ((w, b), y) in parts.iter().zip([&mut y0, &mut y1, &mut y2]) {
                w.launch_biased(&x.slice(..), t, &mut y.slice_mut(..), *b)?;
            }
        } else {
            let name = kernel_name(ty, kind)?;
            let f = self.function(&format!("{name}_3{}", if t > 1 { "_x4" } else { "" }))?;
            let per_block = if t > 1 { MV_TOKENS } else { 1 };
            let blocks: u32 = [w0, w1, w2]
                .iter()
                .map(|w| (w.rows as u32).div_ceil(MV_ROWS))
                .sum();
            let cfg = LaunchConfig {
                grid_dim: (blocks, (t as u32).div_ceil(per_block), 1),
                block_dim: (32 * MV_WARPS, 1, 1),
                shared_mem_bytes: 0,
            };
            let (v0, v1, v2) = (w0.view(), w1.view(), w2.view());
            let rows = [w0.rows, w1.rows, w2.rows].map(|r| r as i32);
            let (c, rbi, tokens) = (cols as i32, rb as i64, t as i32);
            let null = 0u64;
            let xv = x.slice(..);
            let xq = match kind {
                Kernel::RowsI8 if t > 1 => Some(self.quantize_q8(&xv, t, cols)?),
                _ => None,
            };
            let mut launch = self.stream.launch_builder(&f);
            launch.arg(&v0).arg(&v1).arg(&v2);
            launch.arg(&mut y0).arg(&mut y1).arg(&mut y2);
            for b in [b0, b1, b2] {
                match b {
                    Some(b) => launch.arg(b),
                    None => launch.arg(&null),
                };
            }
            launch.arg(&rows[0]).arg(&rows[1]).arg(&rows[2]);
            push_x(&mut launch, &xv, &xq);
            launch.arg(&c).arg(&rbi).arg(&tokens);
            // SAFETY: matmul_[i8_]<type>_3[_x4](const u8* w0, w1, w2, float* y0, y1, y2,
            // const float* b0, b1, b2, int rows0, rows1, rows2, const void* x, int cols,
            // long long row_bytes, int tokens): each w_i holds rows_i rows of row_bytes (views
            // of exactly those rows), y_i t × rows_i floats (allocated above), b_i null or at
            // least rows_i long, x t × cols floats (checked above) or, for the int8 kernels,
            // its t rows from quantize_q8.
            unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("CUDA launch: {e:?}"))?;
        }
        Ok([y0, y1, y2])
    }

    /// Which kernel a product of t tokens runs on.
    fn kind_for(&self, ty: GgmlType, t: usize, cols: usize) -> Kernel {
        // One block per four rows and one token, or four tokens of a larger decode-sized batch
        // (int8 activations in normal precision where the type has them); from eight tokens
        // up, 128 × 64 tiles on the tensor cores (normal precision, whole 32-column steps) or
        // 32 × 64 f32 tiles (weights dequantized once per tile into shared memory).
        if t < TILED_FROM {
            self.rows_kernel(ty)
        } else if self.normal_precision.load(Ordering::Relaxed) && cols.is_multiple_of(32) {
            Kernel::Mma
        } else {
            Kernel::Tiled
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn launch_matmul(
        &self,
        ty: GgmlType,
        w: &CudaView<u8>,
        row_bytes: usize,
        rows: usize,
        cols: usize,
        x: &CudaView<f32>,
        t: usize,
        y: &mut CudaViewMut<f32>,
        epi: Epilogue,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<()> {
        if x.len() < t * cols
            || y.len() < t * rows
            || w.len() < rows * row_bytes
            || bias.is_some_and(|b| b.len() < rows || epi != Epilogue::Store)
        {
            bail!("CUDA matmul shape mismatch");
        }
        let kind = self.kind_for(ty, t, cols);
        // Decode-sized batches of several tokens read each weight once for MV_TOKENS of them.
        let per_block = if kind == Kernel::Rows || kind == Kernel::RowsI8 {
            if t > 1 {
                MV_TOKENS
            } else {
                1
            }
        } else {
            1
        };
        let name = kernel_name(ty, kind)?;
        let f = if per_block > 1 {
            self.function(&format!("{name}_x4"))?
        } else {
            self.function(&name)?
        };
        let cfg = if kind == Kernel::Mma {
            LaunchConfig {
                grid_dim: (
                    (rows as u32).div_ceil(MMA_ROWS),
                    (t as u32).div_ceil(MMA_TOKENS),
                    1,
                ),
                block_dim: (MMA_THREADS, 1, 1),
                shared_mem_bytes: 0,
            }
        } else if kind == Kernel::Tiled {
            LaunchConfig {
                grid_dim: ((rows as u32).div_ceil(32), (t as u32).div_ceil(64), 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            LaunchConfig {
                grid_dim: (
                    (rows as u32).div_ceil(MV_ROWS),
                    (t as u32).div_ceil(per_block),
                    1,
                ),
                block_dim: (32 * MV_WARPS, 1, 1),
                shared_mem_bytes: 0,
            }
        };
        let (r, c, rb, tokens) = (rows as i32, cols as i32, row_bytes as i64, t as i32);
        let epi = epi as i32;
        let null = 0u64;
        let rows_kind = kind == Kernel::Rows || kind == Kernel::RowsI8;
        let xq = match kind {
            Kernel::RowsI8 if per_block > 1 => Some(self.quantize_q8(x, t, cols)?),
            _ => None,
        };
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(w);
        push_x(&mut launch, x, &xq);
        launch
            .arg(&mut *y)
            .arg(&r)
            .arg(&c)
            .arg(&rb)
            .arg(&tokens)
            .arg(&epi);
        if rows_kind {
            match bias {
                Some(b) => launch.arg(b),
                None => launch.arg(&null),
            };
        }
        // SAFETY: the kernel's signature is (const u8*, const float* (const void* for the
        // decode kernels), float*, int, int, long long, int, int), and for the decode kernels a
        // last const float* (the bias, null or `rows` long), matching the arguments pushed
        // above; it reads rows × row_bytes bytes of `w` and t × cols floats of `x` (t rows of
        // quantize_q8 for the int8 four-token kernels), writes t × rows floats of `y`, all
        // checked above.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("CUDA launch: {e:?}"))?;
        match bias {
            Some(b) if !rows_kind => self.add_bias_view(y, b, None, t, rows),
            _ => Ok(()),
        }
    }

    /// For each group `(w_row, row, count)`: rows `row..row + count` of y (each `rows` wide) =
    /// the same rows of x (`w.cols` wide) · (rows `w_row..w_row + rows` of w)ᵀ, as `epi` says. On
    /// the tensor cores, one launch for all groups (a layer's selected experts in prefill, which
    /// one by one left most of the GPU idle: an expert's product is a few dozen row tiles);
    /// otherwise (exact mode, columns not in whole 32-column steps, or no group of
    /// `TILED_FROM` tokens: decode-sized batches) one product per group.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_grouped(
        &self,
        w: &DeviceMatrix,
        rows: usize,
        groups: &[Group],
        x: &CudaView<f32>,
        y: &mut CudaViewMut<f32>,
        epi: Epilogue,
    ) -> Result<()> {
        let (cols, rb) = (w.cols, w.row_bytes);
        let end = groups.iter().map(|g| g.1 + g.2).max().unwrap_or(0);
        let fits = groups.iter().all(|g| g.0 + rows <= w.rows);
        if !fits || x.len() < end * cols || y.len() < end * rows {
            bail!("CUDA grouped matmul shape mismatch");
        }
        let most = groups.iter().map(|g| g.2).max().unwrap_or(0);
        let on_mma = self.normal_precision.load(Ordering::Relaxed)
            && cols.is_multiple_of(32)
            && most >= TILED_FROM;
        if !on_mma {
            for &(w_row, row, count) in groups.iter().filter(|g| g.2 > 0) {
                let wv = w.data.slice(w_row * rb..(w_row + rows) * rb);
                let xv = x.slice(row * cols..(row + count) * cols);
                let mut yv = y.slice_mut(row * rows..(row + count) * rows);
                self.launch_matmul(w.ty, &wv, rb, rows, cols, &xv, count, &mut yv, epi, None)?;
            }
            return Ok(());
        }
        let table: Vec<i32> = groups
            .iter()
            .filter(|g| g.2 > 0)
            .flat_map(|&(a, b, c)| [a as i32, b as i32, c as i32])
            .collect();
        if table.is_empty() {
            return Ok(());
        }
        let n_groups = (table.len() / 3) as u32;
        let table = self.to_device(&table)?;
        let f = self.function(&kernel_name(w.ty, Kernel::MmaGrouped)?)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (rows as u32).div_ceil(MMA_ROWS),
                (most as u32).div_ceil(MMA_TOKENS),
                n_groups,
            ),
            block_dim: (MMA_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r, c, rbi, epi) = (rows as i32, cols as i32, rb as i64, epi as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&w.data)
            .arg(x)
            .arg(y)
            .arg(&r)
            .arg(&c)
            .arg(&rbi)
            .arg(&table)
            .arg(&epi);
        // SAFETY: the kernel's signature is (const u8*, const float*, float*, int, int, long long,
        // const int*, int), matching the arguments above; each group reads `rows` rows of w from
        // its first row and `count` rows of x, and writes `count` rows of y, all checked above
        // against the buffers' lengths; the table holds 3 ints per group of the grid's z.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("CUDA launch: {e:?}"))?;
        Ok(())
    }

    /// The decode kernel for type `ty`: int8 activations in normal precision where it has them.
    fn rows_kernel(&self, ty: GgmlType) -> Kernel {
        use GgmlType::*;
        let int8 = matches!(
            ty,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | IQ4_XS | MXFP4 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K
        );
        if int8 && self.normal_precision.load(Ordering::Relaxed) {
            Kernel::RowsI8
        } else {
            Kernel::Rows
        }
    }

    /// Waits for all queued work and returns the memory pool's unused memory to the driver
    /// (the pool keeps what frees return: see `keep_pool_memory`), so that the free memory the
    /// device reports next counts only live buffers.
    pub fn release_pool(&self) -> Result<()> {
        self.synchronize()?;
        if let Some(pool) = default_pool(&self.ctx) {
            // SAFETY: trimming a pool only returns memory no allocation holds.
            unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) };
        }
        Ok(())
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("CUDA: {e:?}"))
    }
}

/// Pushes a decode kernel's activations: `xq` (rows of [`Gpu::quantize_q8`]) where the kernel
/// takes them quantized, else the floats x.
fn push_x<'a, 'c: 'a>(
    launch: &mut LaunchArgs<'a>,
    x: &'a CudaView<'c, f32>,
    xq: &'a Option<CudaSlice<u8>>,
) {
    match xq {
        Some(xq) => launch.arg(xq),
        None => launch.arg(x),
    };
}

/// Bytes of a row of `cols` activations quantized for the int8 decode kernels (`q8_row_bytes`
/// in kernels.cu): the int8 values, a float step per 32 and a float sum per 8, padded to 16.
pub fn q8_row_bytes(cols: usize) -> usize {
    (cols * 13 / 8 + 15) & !15
}

/// Batches from this many tokens up run the tiled kernel.
const TILED_FROM: usize = 8;

/// Warps per block of the decode kernels, and rows per block (`MV_WARPS`, `MV_ROWS` in
/// kernels.cu).
const MV_WARPS: u32 = 4;
const MV_ROWS: u32 = 4;
/// Tokens per block of the decode kernels' `_x4` variants (`MV_TOKENS` in kernels.cu).
const MV_TOKENS: u32 = 4;

/// The tensor-core kernels' tile (`MMA_ROWS`, `MMA_TOKENS`, `MMA_THREADS` in kernels.cu).
const MMA_ROWS: u32 = 128;
const MMA_TOKENS: u32 = 64;
const MMA_THREADS: u32 = 256;

/// The matmul kernels: rows per block for decode, f32 tiles and tensor-core tiles for prefill.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Rows,
    /// Rows on int8 activations (`FOR_EACH_INT8_TYPE`): quantized in the kernel by one-token
    /// blocks, by `quantize_q8` for the four-token ones.
    RowsI8,
    Tiled,
    Mma,
    /// Mma over several groups of rows and tokens in one launch.
    MmaGrouped,
}

/// The kernel of `kind` that multiplies by a matrix of type `ty`.
fn kernel_name(ty: GgmlType, kind: Kernel) -> Result<String> {
    use GgmlType::*;
    let suffix = match ty {
        F32 => "f32",
        F16 => "f16",
        BF16 => "bf16",
        Q4_0 => "q4_0",
        Q4_1 => "q4_1",
        Q5_0 => "q5_0",
        Q5_1 => "q5_1",
        Q8_0 => "q8_0",
        IQ4_NL => "iq4_nl",
        IQ4_XS => "iq4_xs",
        MXFP4 => "mxfp4",
        Q2_K => "q2_k",
        Q3_K => "q3_k",
        Q4_K => "q4_k",
        Q5_K => "q5_k",
        Q6_K => "q6_k",
        other => bail!("tensor type {other} has no CUDA kernel"),
    };
    let prefix = match kind {
        Kernel::Rows => "",
        Kernel::RowsI8 => "i8_",
        Kernel::Tiled => "tiled_",
        Kernel::Mma => "mma_",
        Kernel::MmaGrouped => "mma_grouped_",
    };
    Ok(format!("matmul_{prefix}{suffix}"))
}

/// The kernels' PTX for compute capability `arch`: from the cache when this source was compiled
/// for it before, else compiled by NVRTC and stored. Returns (ptx, cache file, compiled now).
fn kernels_for(arch: (i32, i32)) -> Result<(String, PathBuf, bool)> {
    let gpu_arch = format!("--gpu-architecture=compute_{}{}", arch.0, arch.1);
    let key = fnv1a(KERNELS.as_bytes()) ^ fnv1a(gpu_arch.as_bytes()).rotate_left(1);
    let dir = cache_dir().join("cuda");
    let file = dir.join(format!("sm_{}{}-{key:016x}.ptx", arch.0, arch.1));
    if let Ok(ptx) = std::fs::read_to_string(&file) {
        return Ok((ptx, file, false));
    }
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![gpu_arch, "--std=c++17".into()],
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
        .map_err(|e| anyhow!("compiling the CUDA kernels with NVRTC: {e}"))?
        .to_src();
    // The cache is an optimisation: failing to write it is not an error.
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&tmp, &ptx).is_ok() {
        let _ = std::fs::rename(&tmp, &file);
    }
    Ok((ptx, file, true))
}

/// Lets the device's default memory pool keep what stream-ordered frees return, instead of
/// releasing it to the driver at every synchronization: each forward pass allocates its
/// buffers again, and the free memory the device reports then counts their peak (what `tune`
/// compares with its plan). Best effort: a device without pools keeps the driver's default.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    let Some(pool) = default_pool(ctx) else {
        return;
    };
    let mut keep = u64::MAX;
    // SAFETY: the attribute value is a live local of the type the driver reads for the release
    // threshold (cuuint64_t); the pool is the device's default one.
    unsafe {
        let _ = sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        );
    }
}

/// The device's default memory pool, where stream-ordered allocations come from (None where
/// the device has none).
fn default_pool(ctx: &CudaContext) -> Option<cudarc::driver::sys::CUmemoryPool> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() || ctx.bind_to_thread().is_err() {
        return None;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: the out-pointer is a live local; the context is current on this thread.
    let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) };
    (r == sys::CUresult::CUDA_SUCCESS).then_some(pool)
}

/// `$GGRUN_CACHE_DIR`, else `$XDG_CACHE_HOME/ggrun`, else `~/.cache/ggrun`, else a temp folder.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("GGRUN_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("ggrun");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("ggrun");
    }
    std::env::temp_dir().join("ggrun")
}

/// 64-bit FNV-1a (a stable key for the kernel cache; not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
