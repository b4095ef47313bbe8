//! The hot-expert cache of a layer whose routed experts stay in RAM: its most used experts kept
//! in device memory for decode, for any MoE family (each expert is its rows of the layer's
//! stacked expert tensors: Nemotron-H's up and down, the decoders' gate, up and down). Each
//! step counts the selections (decayed, so the counts follow recent routing); a selected expert
//! in the cache is computed there without a copy, and the experts a step copies over take the
//! slots of the least used ones that this step does not need.

use std::sync::Mutex;

use anyhow::Result;

use super::{DeviceMatrix, DeviceRows, Gpu};
use crate::backend::cpu::Matrix;

pub struct ExpertCache {
    /// One matrix per stacked expert tensor, with room for `slots` experts' rows each.
    pub mats: Vec<DeviceMatrix>,
    /// Rows of one expert in each matrix.
    rows: Vec<usize>,
    /// Expert → slot, and slot → expert.
    pub slot_of: Vec<Option<usize>>,
    holder: Vec<Option<usize>>,
    /// Selections per expert, each step's counts decayed by [`CACHE_DECAY`].
    pub uses: Vec<f64>,
    pub lookups: u64,
    pub hits: u64,
}

/// Per decode step, older selections count this much less (a memory of a few hundred tokens).
const CACHE_DECAY: f64 = 0.995;

impl ExpertCache {
    /// Slots per layer, and how many of the `layers` RAM layers get a cache, for caches
    /// sharing `budget` bytes, experts of `expert_bytes`: equal slots for every layer when
    /// that gives each at least two steps' experts (2·`n_used`: a step keeps its own and
    /// admits up to as many), else that least for as many layers as it fits (the first ones),
    /// else none (with a note when a budget was given).
    pub fn slots(
        budget: u64,
        layers: usize,
        expert_bytes: usize,
        n_expert: usize,
        n_used: usize,
    ) -> (usize, usize) {
        let eb = expert_bytes.max(1) as u64;
        let least = (2 * n_used).min(n_expert);
        let equal = ((budget / layers.max(1) as u64 / eb) as usize).min(n_expert);
        if budget == 0 || least == 0 {
            return (0, 0);
        }
        if equal >= least {
            return (equal, layers);
        }
        let cached = ((budget / (least as u64 * eb)) as usize).min(layers);
        if cached == 0 {
            eprintln!(
                "note: an expert cache of {:.2} GiB holds fewer than {least} experts; none is kept",
                budget as f64 / (1u64 << 30) as f64,
            );
            return (0, 0);
        }
        (least, cached)
    }

    /// An empty cache of `slots` experts of a layer whose stacked expert tensors are
    /// `tensors` (each holding `n_expert` experts' rows).
    pub fn new(
        gpu: &Gpu,
        tensors: &[&Matrix],
        n_expert: usize,
        slots: usize,
    ) -> Result<ExpertCache> {
        let mut mats = Vec::with_capacity(tensors.len());
        let mut rows = Vec::with_capacity(tensors.len());
        for t in tensors {
            let mut m = gpu.staging(slots * t.data.len() / n_expert.max(1))?;
            m.restage(t.ty, t.cols)?;
            mats.push(m);
            rows.push(t.rows / n_expert.max(1));
        }
        Ok(ExpertCache {
            mats,
            rows,
            slot_of: vec![None; n_expert],
            holder: vec![None; slots],
            uses: vec![0.0; n_expert],
            lookups: 0,
            hits: 0,
        })
    }

    /// Counts a step's selected experts.
    pub fn note(&mut self, selected: &[usize]) {
        for u in self.uses.iter_mut() {
            *u *= CACHE_DECAY;
        }
        for &e in selected {
            self.uses[e] += 1.0;
            self.lookups += 1;
            self.hits += self.slot_of[e].is_some() as u64;
        }
    }

    /// A slot for expert `e` (not cached): a free one, else that of the least used expert
    /// outside `keep` when `e` is used at least as much. None: `e` is not worth a slot.
    pub fn admit(&mut self, e: usize, keep: &[bool]) -> Option<usize> {
        let slot = match self.holder.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                let (s, victim) = self
                    .holder
                    .iter()
                    .enumerate()
                    .filter_map(|(s, h)| h.map(|v| (s, v)))
                    .filter(|&(_, v)| !keep[v])
                    .min_by(|a, b| self.uses[a.1].total_cmp(&self.uses[b.1]))?;
                if self.uses[victim] > self.uses[e] {
                    return None;
                }
                self.slot_of[victim] = None;
                s
            }
        };
        self.holder[slot] = Some(e);
        self.slot_of[e] = Some(slot);
        Some(slot)
    }

    /// Copies expert `e`'s rows of each tensor (`tensors`, as given to [`ExpertCache::new`])
    /// into `slot` (queued on the compute stream); the bytes copied.
    pub fn fill(&mut self, gpu: &Gpu, slot: usize, e: usize, tensors: &[&Matrix]) -> Result<usize> {
        let mut bytes = 0;
        for ((m, &rows), t) in self.mats.iter_mut().zip(&self.rows).zip(tensors) {
            let rb = t.row_bytes();
            let src = &t.data[e * rows * rb..(e + 1) * rows * rb];
            gpu.stage_rows(m, slot * rows, src)?;
            bytes += src.len();
        }
        Ok(bytes)
    }

    /// All slots of matrix `i` as one stacked tensor (slot s at rows s·rows..).
    pub fn all<'g>(&'g self, gpu: &'g Gpu, i: usize) -> DeviceRows<'g> {
        DeviceRows {
            gpu,
            m: &self.mats[i],
            start: 0,
            rows: self.holder.len() * self.rows[i],
        }
    }

    /// Slots held.
    pub fn len(&self) -> usize {
        self.holder.len()
    }

    pub fn is_empty(&self) -> bool {
        self.holder.is_empty()
    }
}

/// The hot-expert caches of a model's RAM layers, by layer index.
#[derive(Default)]
pub struct ExpertCaches(Vec<(usize, Mutex<ExpertCache>)>);

impl ExpertCaches {
    /// Equal caches for the RAM `layers` (index, stacked expert tensors) out of `budget`
    /// bytes, for all of them or the first ones (see [`ExpertCache::slots`]), as far as the
    /// device has room (a note names the first layer without).
    pub fn new(
        gpu: &Gpu,
        layers: &[(usize, Vec<&Matrix>)],
        n_expert: usize,
        n_used: usize,
        budget: u64,
    ) -> ExpertCaches {
        let mut out = ExpertCaches::default();
        let Some((_, first)) = layers.first() else {
            return out;
        };
        let eb = first.iter().map(|t| t.data.len()).sum::<usize>() / n_expert.max(1);
        let (slots, cached) = ExpertCache::slots(budget, layers.len(), eb, n_expert, n_used);
        for (i, tensors) in &layers[..cached] {
            match ExpertCache::new(gpu, tensors, n_expert, slots) {
                Ok(c) => out.0.push((*i, Mutex::new(c))),
                Err(e) => {
                    eprintln!("note: no room for the expert cache of layer {i} ({e:#})");
                    break;
                }
            }
        }
        out
    }

    /// Layer `layer`'s cache, when it has one.
    pub fn get(&self, layer: usize) -> Option<&Mutex<ExpertCache>> {
        self.0.iter().find(|(l, _)| *l == layer).map(|(_, c)| c)
    }

    /// "; expert cache: …" (slots, layers, hit rate) for an offload report; empty without
    /// caches.
    pub fn report(&self) -> String {
        let Some((_, first)) = self.0.first() else {
            return String::new();
        };
        let slots = first.lock().unwrap_or_else(|e| e.into_inner()).len();
        let (hits, lookups) = self.0.iter().fold((0, 0), |(h, l), (_, c)| {
            let c = c.lock().unwrap_or_else(|e| e.into_inner());
            (h + c.hits, l + c.lookups)
        });
        format!(
            "; expert cache: {slots} experts in each of {} RAM layers, {:.1}% of their {lookups} decode selections hit",
            self.0.len(),
            100.0 * hits as f64 / lookups.max(1) as f64
        )
    }
}

#[cfg(test)]
mod tests {
    use super::ExpertCache;

    /// Equal slots for every layer when each gets two steps' experts; else two steps' experts
    /// for as many layers as fit; else none.
    #[test]
    fn caches_take_equal_slots_or_the_least_for_the_first_layers() {
        let mb = 1u64 << 20;
        // gpt-oss widths: 32 experts of 13.2 MB, 4 used, 12 RAM layers.
        let eb = 13_200_000;
        assert_eq!(ExpertCache::slots(4096 * mb, 12, eb, 32, 4), (27, 12));
        assert_eq!(ExpertCache::slots(1024 * mb, 12, eb, 32, 4), (8, 10));
        assert_eq!(ExpertCache::slots(50 * mb, 12, eb, 32, 4), (0, 0));
        assert_eq!(ExpertCache::slots(0, 12, eb, 32, 4), (0, 0));
        // Never more slots than experts.
        assert_eq!(ExpertCache::slots(u64::MAX / 2, 2, 1000, 16, 2), (16, 2));
    }
}
