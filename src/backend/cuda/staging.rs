//! Routed experts that stay in RAM, brought to the GPU for a prefill batch: the mapped expert
//! tensors are page-locked where the driver allows (so copies from them are DMA at PCIe speed,
//! not staged through the driver's bounce buffers), and a staging buffer on the device takes the
//! experts a batch selected, one layer at a time; the costs measured so far say whether a batch
//! copies its experts or leaves them to the CPU.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use ggrun_quants::GgmlType;

use super::{DeviceMatrix, Gpu};

/// Host ranges page-locked for DMA; unlocked on drop.
pub struct HostPins {
    ctx: Arc<CudaContext>,
    starts: Vec<usize>,
    /// Bytes locked.
    pub bytes: usize,
}

const PAGE: usize = 4096;

impl Gpu {
    /// Page-locks `ranges` (rounded out to pages, overlapping ones merged), read-only. Errors
    /// when the driver refuses (the copies then go through pageable memory).
    pub fn pin_host(&self, ranges: &[&[u8]]) -> Result<HostPins> {
        let mut spans: Vec<(usize, usize)> = ranges
            .iter()
            .filter(|r| !r.is_empty())
            .map(|r| {
                let a = r.as_ptr() as usize;
                (a / PAGE * PAGE, (a + r.len()).div_ceil(PAGE) * PAGE)
            })
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("CUDA: {e:?}"))?;
        let mut pins = HostPins {
            ctx: self.ctx.clone(),
            starts: Vec::new(),
            bytes: 0,
        };
        for (a, b) in merged {
            // SAFETY: [a, b) covers pages of the model's mapping, which stays mapped while the
            // model (and so these pins, held by the model's device parts) lives; read-only
            // registration matches the mapping's protection. Unregistered in Drop.
            let r = unsafe {
                sys::cuMemHostRegister_v2(
                    a as *mut std::ffi::c_void,
                    b - a,
                    sys::CU_MEMHOSTREGISTER_READ_ONLY,
                )
            };
            if r != sys::CUresult::CUDA_SUCCESS {
                bail!(
                    "page-locking {} MiB of mapped experts: {r:?}",
                    (b - a) >> 20
                );
            }
            pins.starts.push(a);
            pins.bytes += b - a;
        }
        Ok(pins)
    }

    /// A device buffer of `bytes` for staging weights (typed by [`DeviceMatrix::restage`]).
    pub fn staging(&self, bytes: usize) -> Result<DeviceMatrix> {
        Ok(DeviceMatrix {
            ty: GgmlType::F32,
            rows: 0,
            cols: 0,
            row_bytes: 0,
            data: self.output(bytes.max(1))?,
        })
    }

    /// A stream for copies that run beside the compute stream's work (non-blocking: no implicit
    /// ordering with it; order them with [`Gpu::compute_event`] and [`Gpu::compute_wait`]).
    pub fn copy_stream(&self) -> Result<Arc<CudaStream>> {
        self.ctx
            .new_stream()
            .map_err(|e| anyhow!("CUDA stream: {e:?}"))
    }

    /// An event that completes once everything queued on the compute stream so far has.
    pub fn compute_event(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(None)
            .map_err(|e| anyhow!("CUDA event: {e:?}"))
    }

    /// Makes the compute stream's later work wait for `ev`.
    pub fn compute_wait(&self, ev: &CudaEvent) -> Result<()> {
        self.stream
            .wait(ev)
            .map_err(|e| anyhow!("CUDA event wait: {e:?}"))
    }

    /// Copies `src` (whole rows of `m`'s current type) to rows `at..` of staging matrix `m`,
    /// queued on the compute stream (DMA when `src` is page-locked).
    pub fn stage_rows(&self, m: &mut DeviceMatrix, at: usize, src: &[u8]) -> Result<()> {
        self.stage_rows_on(&self.stream, m, at, src)
    }

    /// [`Gpu::stage_rows`] queued on `stream`.
    pub fn stage_rows_on(
        &self,
        stream: &Arc<CudaStream>,
        m: &mut DeviceMatrix,
        at: usize,
        src: &[u8],
    ) -> Result<()> {
        let rb = m.row_bytes;
        if rb == 0 || !src.len().is_multiple_of(rb) || (at + src.len() / rb) > m.rows {
            bail!("staging copy out of bounds");
        }
        let mut dst = m.data.slice_mut(at * rb..at * rb + src.len());
        stream
            .memcpy_htod(src, &mut dst)
            .map_err(|e| anyhow!("CUDA copy: {e:?}"))
    }
}

impl DeviceMatrix {
    /// Re-types a staging buffer as a matrix of `ty` with room for as many rows of `cols` as
    /// fit.
    pub fn restage(&mut self, ty: GgmlType, cols: usize) -> Result<()> {
        let rb = ty
            .row_bytes(cols as u64)
            .ok_or_else(|| anyhow!("{ty}: {cols} columns do not make whole blocks"))?
            as usize;
        self.ty = ty;
        self.cols = cols;
        self.row_bytes = rb;
        self.rows = self.data.len() / rb.max(1);
        Ok(())
    }
}

impl Drop for HostPins {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_err() {
            return;
        }
        for &a in &self.starts {
            // SAFETY: `a` was registered by pin_host and not yet unregistered.
            unsafe { sys::cuMemHostUnregister(a as *mut std::ffi::c_void) };
        }
    }
}

/// Costs measured on the runs so far (moving averages), and how often each path ran.
#[derive(Default)]
pub struct OffloadCosts {
    /// Seconds the CPU took per (token, expert) pair of a prefill batch.
    pub cpu_s_per_pair: Option<f64>,
    /// Bytes per second of copying selected experts to the GPU: the best of the samples (a
    /// copy only gets slower than the link by disturbance, and the first copies of a run can be
    /// several times slower; a moving average of them kept decode from ever copying again).
    pub copy_bytes_per_s: Option<f64>,
    /// Copies timed so far (decode times its first [`COPY_SAMPLES`], waiting for each).
    pub copy_samples: u32,
    /// Seconds the CPU took per selected expert of a decode step.
    pub cpu_s_per_decode_expert: Option<f64>,
    /// Decode steps that copied part of a RAM layer's experts to the GPU.
    pub split_steps: u64,
    /// Prefill layer-batches computed from a prefetched copy of the whole layer.
    pub prefetched_batches: u64,
    pub cpu_batches: u64,
    pub gpu_batches: u64,
}

/// Decode steps whose copies are timed (each waits for its copy, losing the overlap).
pub const COPY_SAMPLES: u32 = 4;

pub fn average(old: Option<f64>, sample: f64) -> Option<f64> {
    Some(old.map_or(sample, |o| 0.7 * o + 0.3 * sample))
}

/// Waits for the copies queued since `started` (`bytes` of them) and records their speed in
/// `costs` (the best sample: a copy only gets slower than the link by disturbance).
pub fn time_copies(
    g: &Gpu,
    costs: &std::sync::Mutex<OffloadCosts>,
    bytes: usize,
    started: std::time::Instant,
) -> Result<()> {
    g.synchronize()?;
    let mut c = costs.lock().unwrap_or_else(|e| e.into_inner());
    let bw = bytes as f64 / started.elapsed().as_secs_f64().max(1e-9);
    c.copy_bytes_per_s = Some(c.copy_bytes_per_s.map_or(bw, |b| b.max(bw)));
    c.copy_samples += 1;
    Ok(())
}

impl OffloadCosts {
    /// How many of `n` experts (of `eb` bytes, `cpu` seconds each on the CPU) a decode step
    /// copies to the GPU while the CPU computes the others: g·copy ≈ (n − g)·cpu, one while
    /// copies are unmeasured. The CPU keeps at least one (when there are two) so that its cost
    /// stays measured: an inflated sample that sent every expert to the GPU was never
    /// corrected, and decode kept copying them all.
    pub fn copies_beside_cpu(&self, n: usize, cpu: f64, eb: usize) -> usize {
        match self.copy_bytes_per_s {
            _ if n == 0 => 0,
            None => 1,
            Some(bw) => {
                let copy = eb as f64 / bw;
                ((n as f64 * cpu / (cpu + copy)).round() as usize).min(n.saturating_sub(1).max(1))
            }
        }
    }

    /// Whether copying `bytes` of experts beats the CPU on `pairs` (token, expert) pairs. With
    /// nothing measured yet the CPU runs first, then the copy, so that both get a measurement.
    pub fn prefers_copy(&self, bytes: usize, pairs: usize) -> bool {
        match (self.cpu_s_per_pair, self.copy_bytes_per_s) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(c), Some(bw)) => bytes as f64 / bw < c * pairs as f64,
        }
    }
}
