//! Routed experts that stay in RAM, brought to the GPU for a prefill batch: the mapped expert
//! tensors are page-locked where the driver allows (so copies from them are DMA at PCIe speed,
//! not staged through the driver's bounce buffers), and a staging buffer on the device takes the
//! experts a batch selected, one layer at a time.

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
