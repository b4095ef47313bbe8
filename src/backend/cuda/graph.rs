//! Decode steps as CUDA graphs: a step's launches are captured once and replayed with one
//! launch, so the GPU no longer waits for the host between kernels (a decode step is a few
//! hundred small launches, and about 5 µs separated each of them). A graph replays fixed
//! addresses, so it owns its input (the embedded token) and output (the logits) buffers, and
//! what changes per step (the position) is read by the kernels from device memory. On by
//! default where a whole pass is on the device; `GGRUN_CUDA_GRAPHS=off` turns it off.

use anyhow::{anyhow, Result};
use cudarc::driver::{sys, CudaGraph, CudaSlice, DevicePtr};

use super::Gpu;

/// One captured decode step: replaying it reads `x` (the embedded token) and writes `logits`.
pub struct StepGraph {
    /// What the capture depended on (state buffer addresses, precision): replay only for the
    /// same key.
    pub key: Vec<u64>,
    graph: CudaGraph,
    pub x: CudaSlice<f32>,
    pub logits: CudaSlice<f32>,
}

// SAFETY: a CUDA graph may be used from any thread as long as no two threads use it at once
// (the driver's rule for graph objects); a StepGraph is only reached through its owner's Mutex,
// and launched on the stream of the context it was captured in.
unsafe impl Send for StepGraph {}

impl StepGraph {
    /// Queues the whole step on the stream it was captured from.
    pub fn launch(&self) -> Result<()> {
        self.graph
            .launch()
            .map_err(|e| anyhow!("CUDA graph launch: {e:?}"))
    }
}

impl Gpu {
    /// Captures what `body` queues on the stream into a graph with input `x` and output
    /// `logits` (nothing runs: launch it). The capture is ended whatever happens, so a failed
    /// body or an operation that cannot be captured leaves the stream usable and returns the
    /// error.
    pub fn capture_step(
        &self,
        key: Vec<u64>,
        x: CudaSlice<f32>,
        logits: CudaSlice<f32>,
        body: impl FnOnce(&mut CudaSlice<f32>, &mut CudaSlice<f32>) -> Result<()>,
    ) -> Result<StepGraph> {
        let (mut x, mut logits) = (x, logits);
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| anyhow!("CUDA graph capture: {e:?}"))?;
        let ran = body(&mut x, &mut logits);
        let ended = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(|e| anyhow!("CUDA graph capture: {e:?}"));
        ran?;
        let graph = ended?.ok_or_else(|| anyhow!("CUDA graph capture: nothing was captured"))?;
        Ok(StepGraph {
            key,
            graph,
            x,
            logits,
        })
    }

    /// The device address of a buffer (what a captured graph depends on).
    pub fn address<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    /// Copies `src` into the start of `dst` (queued; from pageable memory the copy is staged
    /// before this returns).
    pub fn upload_into<T: cudarc::driver::DeviceRepr>(
        &self,
        src: &[T],
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        if src.len() > dst.len() {
            anyhow::bail!("CUDA upload larger than its buffer");
        }
        let mut view = dst.slice_mut(..src.len());
        self.stream
            .memcpy_htod(src, &mut view)
            .map_err(|e| anyhow!("CUDA copy: {e:?}"))
    }
}
