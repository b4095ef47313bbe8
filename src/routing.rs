//! Routing statistics: how often each routed expert of each MoE layer was selected over a
//! rolling window of recent tokens, and what that means for placement — the effective number
//! of experts a layer uses (the exponential of its routing entropy) and the share of its
//! selections that the layer's hottest experts take (what a cache of them would serve).
//!
//! Models count selections cumulatively (`Forward::expert_usage`, read from the device where
//! routing runs there); a window is the difference between the newest snapshot of those counts
//! and the oldest one still inside the window, so recording costs nothing on the token path.

use std::collections::VecDeque;

use serde_json::{json, Value};

/// Selections per expert of one MoE layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRouting {
    pub layer: usize,
    pub counts: Vec<u64>,
}

impl LayerRouting {
    pub fn selections(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Experts selected at least once.
    pub fn used(&self) -> usize {
        self.counts.iter().filter(|&&c| c > 0).count()
    }

    /// exp(entropy of the selection shares): n for n equally used experts, 1 for one.
    pub fn effective_experts(&self) -> f64 {
        effective_experts(&self.counts)
    }

    /// The share of selections the `n` most selected experts take: the hit rate of a cache
    /// holding them.
    pub fn top_share(&self, n: usize) -> f64 {
        let total = self.selections();
        if total == 0 {
            return 0.0;
        }
        let mut c = self.counts.clone();
        c.sort_unstable_by(|a, b| b.cmp(a));
        c.iter().take(n).sum::<u64>() as f64 / total as f64
    }

    /// The `n` most selected experts, most selected first (ties to the lower index).
    pub fn hottest(&self, n: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.counts.len()).collect();
        idx.sort_by(|&a, &b| self.counts[b].cmp(&self.counts[a]).then(a.cmp(&b)));
        idx.truncate(n);
        idx
    }
}

/// exp(entropy) of selection counts (0 for none).
pub fn effective_experts(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let h: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// Cumulative selections per expert of each MoE layer, as `Forward::expert_usage` gives them.
pub type Usage = Vec<(usize, Vec<u64>)>;

/// Snapshots of cumulative counts, kept so that the newest minus the oldest spans at least
/// `window` tokens (when that many have run) and no more snapshots than that needs.
pub struct RoutingWindow {
    window: u64,
    /// (tokens run so far, cumulative counts per MoE layer), oldest first.
    snaps: VecDeque<(u64, Usage)>,
}

impl RoutingWindow {
    /// A window over the last `window` tokens (at least 1).
    pub fn new(window: u64) -> RoutingWindow {
        RoutingWindow {
            window: window.max(1),
            snaps: VecDeque::new(),
        }
    }

    /// Records the cumulative counts after `tokens` tokens in all (counts and tokens never
    /// decrease; a snapshot that goes back restarts the window).
    pub fn record(&mut self, tokens: u64, usage: Usage) {
        if self.snaps.back().is_some_and(|(t, _)| *t > tokens) {
            self.snaps.clear();
        }
        self.snaps.push_back((tokens, usage));
        // Drop the oldest while the next one still reaches back a whole window.
        while self.snaps.len() > 2 && tokens - self.snaps[1].0 >= self.window {
            self.snaps.pop_front();
        }
    }

    /// Tokens the window spans (the newest snapshot's minus the oldest's, or all of them when
    /// there is one snapshot).
    pub fn tokens(&self) -> u64 {
        match (self.snaps.front(), self.snaps.back()) {
            (Some(a), Some(b)) if self.snaps.len() > 1 => b.0 - a.0,
            (Some(a), _) => a.0,
            _ => 0,
        }
    }

    /// Selections per expert of each MoE layer within the window.
    pub fn layers(&self) -> Vec<LayerRouting> {
        let Some((_, newest)) = self.snaps.back() else {
            return Vec::new();
        };
        let oldest = (self.snaps.len() > 1).then(|| &self.snaps[0].1);
        newest
            .iter()
            .map(|(layer, counts)| {
                let before = oldest
                    .and_then(|o| o.iter().find(|(l, _)| l == layer))
                    .map(|(_, c)| c.as_slice())
                    .unwrap_or(&[]);
                LayerRouting {
                    layer: *layer,
                    counts: counts
                        .iter()
                        .enumerate()
                        .map(|(e, &c)| c.saturating_sub(before.get(e).copied().unwrap_or(0)))
                        .collect(),
                }
            })
            .collect()
    }

    /// The window as a table: per MoE layer the selections, experts used, effective experts,
    /// and the share of the hottest eighth and quarter of the experts.
    pub fn to_text(&self) -> String {
        let layers = self.layers();
        let mut s = format!(
            "routing over the last {} tokens ({} MoE layers)\nlayer  selections  used  effective  top 1/8  top 1/4\n",
            self.tokens(),
            layers.len()
        );
        for l in &layers {
            let ne = l.counts.len();
            s += &format!(
                "{:5}  {:10}  {:4}  {:9.1}  {:6.1}%  {:6.1}%\n",
                l.layer,
                l.selections(),
                l.used(),
                l.effective_experts(),
                100.0 * l.top_share(ne.div_ceil(8)),
                100.0 * l.top_share(ne.div_ceil(4)),
            );
        }
        s
    }

    pub fn to_json(&self) -> Value {
        json!({
            "window_tokens": self.tokens(),
            "layers": self.layers().iter().map(|l| {
                let ne = l.counts.len();
                json!({
                    "layer": l.layer,
                    "selections": l.selections(),
                    "used": l.used(),
                    "effective_experts": l.effective_experts(),
                    "top_eighth_share": l.top_share(ne.div_ceil(8)),
                    "top_quarter_share": l.top_share(ne.div_ceil(4)),
                    "counts": l.counts,
                })
            }).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(c: &[u64]) -> Vec<(usize, Vec<u64>)> {
        vec![(3, c.to_vec())]
    }

    #[test]
    fn the_window_keeps_only_recent_tokens() {
        let mut w = RoutingWindow::new(100);
        w.record(0, usage(&[0, 0, 0, 0]));
        w.record(50, usage(&[50, 0, 0, 0]));
        w.record(100, usage(&[100, 0, 0, 0]));
        // Expert 0 only so far; then expert 3 takes over.
        w.record(150, usage(&[100, 0, 0, 50]));
        w.record(200, usage(&[100, 0, 0, 100]));
        // Snapshots at 100 and 200 span the window: expert 0 left it.
        assert_eq!(w.tokens(), 100);
        assert_eq!(
            w.layers(),
            vec![LayerRouting {
                layer: 3,
                counts: vec![0, 0, 0, 100]
            }]
        );
        // A restart (counts back at zero) starts a new window.
        w.record(10, usage(&[0, 10, 0, 0]));
        assert_eq!(w.tokens(), 10);
        assert_eq!(w.layers()[0].counts, vec![0, 10, 0, 0]);
    }

    #[test]
    fn statistics_of_a_layer() {
        let l = LayerRouting {
            layer: 0,
            counts: vec![6, 0, 2, 2],
        };
        assert_eq!(l.selections(), 10);
        assert_eq!(l.used(), 3);
        assert_eq!(l.hottest(2), vec![0, 2]);
        assert!((l.top_share(1) - 0.6).abs() < 1e-12);
        assert!((l.top_share(3) - 1.0).abs() < 1e-12);
        let h = -(0.6f64 * 0.6f64.ln() + 2.0 * 0.2 * 0.2f64.ln());
        assert!((l.effective_experts() - h.exp()).abs() < 1e-12);
        assert_eq!(effective_experts(&[5, 5, 5, 5]).round(), 4.0);
        assert_eq!(effective_experts(&[0, 0]), 0.0);
    }
}
