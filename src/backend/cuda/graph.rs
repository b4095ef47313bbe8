//! Decode steps as CUDA graphs: a step's launches are captured once and replayed with one
//! launch, so the GPU no longer waits for the host between kernels (a decode step is a few
//! hundred small launches, and about 5 µs separated each of them). A graph replays fixed
//! addresses, so it owns its input (the embedded tokens) and output (the logits) buffers, and
//! what changes per step (positions, RoPE angles) is read by the kernels from device memory
//! that the host refills before each replay. [`Graphs`] keeps the captured steps of a model,
//! whichever executor captured them. On by default where a whole pass is on the device
//! ([`super::PassOptions::cuda_graphs`]).

use anyhow::{anyhow, Result};
use cudarc::driver::{sys, CudaGraph, CudaSlice, DevicePtr};

use super::Gpu;

/// One captured decode step: replaying it reads `x` (the embedded tokens) and writes `logits`.
pub struct StepGraph {
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

/// Captured decode steps kept (one per state, or set of states, the server's slots use; most
/// recent first).
const MAX_GRAPHS: usize = 64;

/// A model's captured decode steps, each under the key of what its capture depended on (the
/// precision and the addresses of the states' device buffers). A key's first step runs as
/// usual (it loads the kernels), its second is captured, later ones replay. A capture that
/// fails turns graphs off for the model, with one line on stderr.
pub struct Graphs<S> {
    on: bool,
    /// Keys that ran one uncaptured step.
    seen: Vec<Vec<u64>>,
    steps: Vec<(Vec<u64>, S)>,
    /// Steps that ran as a graph.
    replays: u64,
}

/// What to do with a decode step (see [`Graphs::find`]).
pub enum Found<S> {
    /// Replay this captured step, then give it back with [`Graphs::keep`].
    Replay(S),
    /// Capture the step now (its key was seen once).
    Capture,
    /// Run it as usual (graphs off, or the key's first step).
    Run,
}

impl<S> Graphs<S> {
    pub fn new(on: bool) -> Graphs<S> {
        Graphs {
            on,
            seen: Vec::new(),
            steps: Vec::new(),
            replays: 0,
        }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Steps that ran as a graph so far.
    pub fn replays(&self) -> u64 {
        self.replays
    }

    /// The step captured under `key`, taken out to replay, or whether to capture it now.
    pub fn find(&mut self, key: &[u64]) -> Found<S> {
        if !self.on {
            return Found::Run;
        }
        if let Some(i) = self.steps.iter().position(|(k, _)| k == key) {
            self.replays += 1;
            return Found::Replay(self.steps.remove(i).1);
        }
        if self.seen.iter().any(|k| k == key) {
            return Found::Capture;
        }
        self.seen.push(key.to_vec());
        if self.seen.len() > MAX_GRAPHS {
            self.seen.remove(0);
        }
        Found::Run
    }

    /// Keeps a step (replayed, or just captured and launched) as the most recent.
    pub fn keep(&mut self, key: Vec<u64>, step: S) {
        self.steps.insert(0, (key, step));
        self.steps.truncate(MAX_GRAPHS);
    }

    /// After a failed capture: graphs off for the model, said once.
    pub fn turn_off(&mut self, e: &anyhow::Error) {
        eprintln!("CUDA graphs off for this model: {e:#}");
        self.on = false;
        self.steps.clear();
    }
}

impl Gpu {
    /// Captures what `body` queues on the stream into a graph with input `x` and output
    /// `logits` (nothing runs: launch it). The capture is ended whatever happens, so a failed
    /// body or an operation that cannot be captured leaves the stream usable and returns the
    /// error.
    pub fn capture_step(
        &self,
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
        Ok(StepGraph { graph, x, logits })
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

    /// A device copy of `x` (queued: capturable, unlike a copy from the host).
    pub fn duplicate<T: cudarc::driver::DeviceRepr>(
        &self,
        x: &CudaSlice<T>,
    ) -> Result<CudaSlice<T>> {
        self.stream
            .clone_dtod(x)
            .map_err(|e| anyhow!("CUDA copy: {e:?}"))
    }

    /// Copies `src` into the start of `dst` on the device (queued; capturable).
    pub fn copy_into<T: cudarc::driver::DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        if src.len() > dst.len() {
            anyhow::bail!("CUDA copy larger than its buffer");
        }
        let mut view = dst.slice_mut(..src.len());
        self.stream
            .memcpy_dtod(src, &mut view)
            .map_err(|e| anyhow!("CUDA copy: {e:?}"))
    }
}
