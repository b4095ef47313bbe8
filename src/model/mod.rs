//! Models: one file per architecture family. This module resolves tensors by name with clear
//! errors, holds what every architecture shares (embedding lookup, output head), and picks the
//! architecture from `general.architecture`.

pub mod decoder;
pub mod gemma3;
pub mod gpt_oss;
pub mod llama;
pub mod nemotron_h;
pub mod qwen;

use anyhow::{anyhow, bail, Result};

use crate::backend::cpu::{Cpu, Matrix};
use crate::backend::cuda::{DeviceWeights, PassOptions};
use crate::backend::placement::ExecutorNeeds;
pub use crate::backend::state::{LayerState, State};
use crate::gguf::{Model as Gguf, TensorView};

/// How a model's weights are prepared at load.
#[derive(Clone, Copy, Default)]
pub struct LoadOptions<'a> {
    /// Give CPU weight matrices their packed copies ([`crate::backend::cpu::pack_tensor`]).
    pub repack: bool,
    /// The weights placed on a GPU (uploaded as the loader meets them).
    pub device: Option<&'a DeviceWeights>,
    /// How a device-resident pass runs.
    pub pass: PassOptions,
}

/// Resolves tensors of a file by name, checking shapes, and prepares weight matrices as the
/// options say.
pub struct Tensors<'a> {
    pub gguf: &'a Gguf,
    pub opts: LoadOptions<'a>,
}

impl<'a> Tensors<'a> {
    pub fn get(&self, name: &str) -> Result<TensorView<'a>> {
        self.gguf
            .tensor(name)
            .ok_or_else(|| anyhow!("tensor {name}: missing"))
    }

    pub fn opt(&self, name: &str) -> Option<TensorView<'a>> {
        self.gguf.tensor(name)
    }

    /// A tensor whose dims must be exactly `dims` (ggml order, trailing 1s ignored).
    pub fn shaped(&self, name: &str, dims: &[u64]) -> Result<TensorView<'a>> {
        let t = self.get(name)?;
        check_shape(&t, dims)?;
        Ok(t)
    }

    /// A weight matrix {cols, rows}.
    pub fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Matrix<'a>> {
        let t = self.shaped(name, &[cols as u64, rows as u64])?;
        self.weight(&t, rows, cols)
    }

    /// `t` as a matrix of `rows` × `cols` (experts stacked: all experts' rows): on the GPU when
    /// the placement put it there, else packed when repacking is on and the tensor allows.
    pub fn weight(&self, t: &TensorView<'a>, rows: usize, cols: usize) -> Result<Matrix<'a>> {
        let mut m = matrix(t, rows, cols)?;
        if let Some(dev) = self.opts.device {
            m.device = dev.get(t, rows, cols)?;
        }
        if self.opts.repack && m.device.is_none() {
            m.packed = t.derived(crate::backend::cpu::pack_tensor);
        }
        Ok(m)
    }

    /// The token embedding (never packed: it is read by rows) and the output head (its own
    /// tensor, or the embedding when tied), with the vocabulary size.
    pub fn embedding_and_output(&self, n_embd: usize) -> Result<(Matrix<'a>, Matrix<'a>, usize)> {
        let embd_t = self.get("token_embd.weight")?;
        let n_vocab = *embd_t.info.dims.get(1).unwrap_or(&0) as usize;
        check_shape(&embd_t, &[n_embd as u64, n_vocab as u64])?;
        let embd = matrix(&embd_t, n_vocab, n_embd)?;
        let output = match self.opt("output.weight") {
            Some(_) => self.matrix("output.weight", n_embd, n_vocab)?,
            None => self.weight(&embd_t, n_vocab, n_embd)?,
        };
        Ok((embd, output, n_vocab))
    }

    /// A vector of f32 values (norm weights, biases), any float type, of length `n`.
    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        if t.info.elements() != n as u64 {
            bail!(
                "tensor {name}: expected {n} elements, found shape {:?}",
                t.info.dims
            );
        }
        t.to_f32()
            .ok_or_else(|| anyhow!("tensor {name}: type {} is not supported here", t.info.ty))
    }

    pub fn opt_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
        match self.opt(name) {
            Some(_) => self.vector(name, n).map(Some),
            None => Ok(None),
        }
    }
}

pub fn check_shape(t: &TensorView, dims: &[u64]) -> Result<()> {
    let trim = |d: &[u64]| {
        let mut v = d.to_vec();
        while v.len() > 1 && v.last() == Some(&1) {
            v.pop();
        }
        v
    };
    if trim(&t.info.dims) != trim(dims) {
        bail!(
            "tensor {}: expected shape {:?}, found {:?}",
            t.info.name,
            dims,
            t.info.dims
        );
    }
    Ok(())
}

/// A view as a matrix of `rows` × `cols`, checking the type is one we compute with.
pub fn matrix<'a>(t: &TensorView<'a>, rows: usize, cols: usize) -> Result<Matrix<'a>> {
    if !t.info.ty.is_supported() {
        bail!(
            "tensor {}: type {} is not supported",
            t.info.name,
            t.info.ty
        );
    }
    Ok(Matrix::from_view(t, rows, cols))
}

/// Token embedding lookup: rows of `emb` ({n_embd, n_vocab}) for each token, dequantized.
pub fn embed(emb: &Matrix, tokens: &[u32]) -> Result<Vec<f32>> {
    let dq = ggrun_quants::dequantize_fn(emb.ty)
        .ok_or_else(|| anyhow!("embedding type {} not supported", emb.ty))?;
    let mut x = vec![0f32; tokens.len() * emb.cols];
    let rb = emb.row_bytes();
    for (t, out) in tokens.iter().zip(x.chunks_mut(emb.cols)) {
        let t = *t as usize;
        if t >= emb.rows {
            bail!("token id {t} is outside the vocabulary (0..{})", emb.rows);
        }
        dq(&emb.data[t * rb..(t + 1) * rb], out);
    }
    Ok(x)
}

/// What every architecture provides: sizes, a fresh state, and the forward pass.
pub trait Forward: Sync {
    /// Vocabulary size (logits per row).
    fn n_vocab(&self) -> usize;
    /// The architecture's trained context length.
    fn n_ctx_train(&self) -> usize;
    /// A fresh state for a context of `n_ctx` tokens (memory allocated once, here), with KV
    /// caches held in host memory of types `kv` (a GPU's caches keep their own type).
    fn new_state(&self, n_ctx: usize, kv: crate::backend::state::KvTypes) -> Result<State>;
    /// One line on how prefill treated routed experts left in RAM (GPU placements only).
    fn offload_report(&self) -> Option<String> {
        None
    }

    /// (layer, selections per expert) of every MoE layer, counted over the tokens run so far
    /// (empty for models without routed experts).
    fn expert_usage(&self) -> Result<Vec<(usize, Vec<u64>)>> {
        Ok(Vec::new())
    }
    /// The forward pass proper, over the tokens of one or more sequences (consecutive runs of
    /// `tokens`, one per [`Seq`], each with its own state); called on the context's pool by
    /// [`Forward::forward`] and [`Forward::forward_seqs`]. Logits: every row when
    /// `all_logits`, else the last row of each sequence.
    fn run(
        &self,
        cpu: &Cpu,
        seqs: &mut [Seq],
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>>;

    /// One step for several sequences: `runs[i]` (one decode token, or a prefill chunk)
    /// extends `states[i]`, all in one pass, so the products read each weight once for all of
    /// them. Returns each sequence's last row of logits.
    fn forward_seqs(
        &self,
        cpu: &Cpu,
        states: &mut [&mut State],
        runs: &[&[u32]],
    ) -> Result<Vec<Vec<f32>>> {
        if states.len() != runs.len() || runs.is_empty() || runs.iter().any(|r| r.is_empty()) {
            bail!("a batched step needs a run of tokens for each sequence");
        }
        let tokens: Vec<u32> = runs.concat();
        let mut seqs: Vec<Seq> = states
            .iter_mut()
            .zip(runs)
            .map(|(s, r)| Seq {
                state: s,
                len: r.len(),
            })
            .collect();
        let rows = cpu.install(|| self.run(cpu, &mut seqs, &tokens, false))?;
        Ok(rows.chunks(self.n_vocab()).map(<[f32]>::to_vec).collect())
    }

    /// Runs `tokens` through the model, updating `state`; returns logits for every position when
    /// `all_logits`, else only for the last (row-major, n_vocab per row). Everything (matmuls,
    /// attention heads, scans) runs on `cpu`'s pool.
    fn forward(
        &self,
        cpu: &Cpu,
        state: &mut State,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let mut seqs = [Seq {
            state,
            len: tokens.len(),
        }];
        cpu.install(|| self.run(cpu, &mut seqs, tokens, all_logits))
    }
}

/// One sequence's share of a forward pass: its state and how many of the pass's tokens (the
/// next ones, in order) are its.
pub struct Seq<'s> {
    pub state: &'s mut State,
    pub len: usize,
}

/// Rows `start..start + len` of each sequence in a pass over `seqs`, checking that every one
/// has room for its tokens and that they account for all `t` tokens.
pub fn segments(seqs: &[Seq], t: usize) -> Result<Vec<std::ops::Range<usize>>> {
    let mut at = 0;
    let mut out = Vec::with_capacity(seqs.len());
    for s in seqs {
        s.state.check_room(s.len)?;
        out.push(at..at + s.len);
        at += s.len;
    }
    if at != t {
        bail!("the sequences claim {at} tokens of {t}");
    }
    Ok(out)
}

/// The output head shared by every architecture: final RMSNorm and the vocabulary projection,
/// for every row of `x` (rows of `norm.len()`) or only the last of each segment.
pub fn logits(
    cpu: &Cpu,
    x: &[f32],
    segs: &[std::ops::Range<usize>],
    norm: &[f32],
    eps: f32,
    output: &Matrix,
    all: bool,
) -> Result<Vec<f32>> {
    let n = norm.len();
    let mut rows: Vec<f32> = if all {
        x.to_vec()
    } else {
        segs.iter()
            .flat_map(|r| x[(r.end - 1) * n..r.end * n].iter().copied())
            .collect()
    };
    crate::backend::cpu::rms_norm(&mut rows, norm, eps);
    let m = rows.len() / n;
    let mut out = vec![0f32; m * output.rows];
    cpu.matmul(output, &rows, m, &mut out)?;
    Ok(out)
}

/// One family of architectures: the `general.architecture` names it reads, its loader (the
/// family's file: hyperparameters and tensors into a description), and what its device
/// executor allocates (which the GPU planner reserves).
struct Family {
    archs: &'static [&'static str],
    load: for<'a> fn(&Tensors<'a>, &str) -> Result<Box<dyn Forward + 'a>>,
    device: ExecutorNeeds,
}

/// The families [`load`] opens: adding one is its file and a line here.
const FAMILIES: [Family; 5] = [
    Family {
        archs: &["nemotron_h", "nemotron_h_moe"],
        load: |t, _| Ok(Box::new(nemotron_h::NemotronH::load(t)?)),
        device: ExecutorNeeds::RESIDENT_WITH_STAGING,
    },
    Family {
        archs: &["llama"],
        load: |t, _| Ok(Box::new(llama::load(t)?)),
        device: ExecutorNeeds::RESIDENT_WITH_STAGING,
    },
    Family {
        archs: &["qwen2", "qwen3", "qwen3moe"],
        load: |t, arch| Ok(Box::new(qwen::load(t, arch)?)),
        device: ExecutorNeeds::RESIDENT_WITH_STAGING,
    },
    Family {
        archs: &["gemma3"],
        load: |t, _| Ok(Box::new(gemma3::load(t)?)),
        device: ExecutorNeeds::RESIDENT_WITH_STAGING,
    },
    Family {
        archs: &["gpt-oss"],
        load: |t, _| Ok(Box::new(gpt_oss::load(t)?)),
        device: ExecutorNeeds::RESIDENT_WITH_STAGING,
    },
];

/// The family of the file's architecture, or an error naming the ones we run (before any
/// weight is read).
fn family(gguf: &Gguf) -> Result<&'static Family> {
    let arch = gguf.architecture()?;
    FAMILIES
        .iter()
        .find(|f| f.archs.contains(&arch))
        .ok_or_else(|| {
            let all: Vec<&str> = FAMILIES
                .iter()
                .flat_map(|f| f.archs.iter().copied())
                .collect();
            anyhow!(
                "architecture {arch} is not supported (supported: {})",
                all.join(", ")
            )
        })
}

/// Errors at once (before any weight is read) when the file's architecture is not one we run.
pub fn check_architecture(gguf: &Gguf) -> Result<()> {
    family(gguf).map(drop)
}

/// What the executor of the file's family allocates on a device (see [`ExecutorNeeds`]).
pub fn executor_needs(gguf: &Gguf) -> Result<ExecutorNeeds> {
    Ok(family(gguf)?.device)
}

/// Opens the architecture named by the file on the CPU, with packed weight copies where the CPU
/// has kernels for them.
pub fn load(gguf: &Gguf) -> Result<Box<dyn Forward + '_>> {
    load_with(
        gguf,
        LoadOptions {
            repack: true,
            device: None,
            pass: PassOptions::default(),
        },
    )
}

/// [`load`] with explicit options (packing off: every CPU product reads the mapping, and no
/// memory is used beyond it; a device: the weights its plan names are multiplied there).
pub fn load_with<'a>(gguf: &'a Gguf, opts: LoadOptions<'a>) -> Result<Box<dyn Forward + 'a>> {
    let f = family(gguf)?;
    let t = Tensors { gguf, opts };
    (f.load)(&t, gguf.architecture()?)
}
