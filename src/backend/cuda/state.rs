//! A sequence's per-layer state in device memory, for the device-resident forward pass: the
//! Mamba-2 conv and SSM state, or an attention layer's K and V cache (f16 rows in normal
//! precision, f32 in exact mode). It converts to and from the host form ([`LayerState`]) for
//! save and restore.

use anyhow::{anyhow, bail, Result};
use cudarc::driver::CudaSlice;

use super::Gpu;
use crate::backend::state::{KvRows, KvType, KvTypes, LayerState};
use ggrun_quants::float::f32_to_f16;

/// A K or V cache on the device: f32 rows (exact mode) or f16 bits (normal precision: the
/// CPU's default cache type, half the bytes of f32).
pub enum DeviceKv {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
}

impl DeviceKv {
    /// `n` zeroed values of type `ty` (the block types are not kept on the device: f16).
    fn zeros(g: &Gpu, ty: KvType, n: usize) -> Result<DeviceKv> {
        Ok(match ty {
            KvType::F32 => DeviceKv::F32(g.zeros(n)?),
            _ => DeviceKv::F16(g.zeros(n)?),
        })
    }

    /// Values held (positions × row).
    pub fn len(&self) -> usize {
        match self {
            DeviceKv::F32(s) => s.len(),
            DeviceKv::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ty(&self) -> KvType {
        match self {
            DeviceKv::F32(_) => KvType::F32,
            DeviceKv::F16(_) => KvType::F16,
        }
    }

    /// The device address (graph keys).
    pub fn address(&self, g: &Gpu) -> u64 {
        match self {
            DeviceKv::F32(s) => g.address(s),
            DeviceKv::F16(s) => g.address(s),
        }
    }

    /// The first `used` values back in host memory, the rest zero.
    fn to_host(&self, used: usize) -> Result<KvRows> {
        Ok(match self {
            DeviceKv::F32(d) => {
                let mut h = vec![0f32; d.len()];
                cuda(d.stream().memcpy_dtoh(&d.slice(..used), &mut h[..used]))?;
                KvRows::F32(h)
            }
            DeviceKv::F16(d) => {
                let mut h = vec![0u16; d.len()];
                cuda(d.stream().memcpy_dtoh(&d.slice(..used), &mut h[..used]))?;
                KvRows::F16(h)
            }
        })
    }

    /// Writes `rows` (f32 values) at the start, rounded to f16 for an f16 cache.
    fn load(&mut self, rows: &[f32]) -> Result<()> {
        match self {
            DeviceKv::F32(d) => {
                let s = d.stream().clone();
                cuda(s.memcpy_htod(rows, &mut d.slice_mut(..rows.len())))
            }
            DeviceKv::F16(d) => {
                let s = d.stream().clone();
                let h: Vec<u16> = rows.iter().map(|&v| f32_to_f16(v)).collect();
                cuda(s.memcpy_htod(&h, &mut d.slice_mut(..h.len())))
            }
        }
    }
}

/// One layer's state on the device.
pub enum DeviceState {
    /// conv: (d_conv − 1) × channels, ssm: heads × head_dim × d_state.
    Mamba {
        conv: CudaSlice<f32>,
        ssm: CudaSlice<f32>,
    },
    /// K and V rows of `row` values for positions 0..len, room for `capacity`.
    Attention {
        k: DeviceKv,
        v: DeviceKv,
        len: usize,
        row: usize,
        capacity: usize,
    },
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceState::Mamba { conv, ssm } => {
                write!(
                    f,
                    "DeviceState::Mamba({} + {} floats)",
                    conv.len(),
                    ssm.len()
                )
            }
            DeviceState::Attention { len, capacity, .. } => {
                write!(f, "DeviceState::Attention({len} of {capacity} positions)")
            }
        }
    }
}

/// Checks a sequence's state before a device pass: every layer state is on the device (Mamba
/// states, and layers without a state, only where `mamba` allows them), and every K/V cache holds exactly the state's
/// positions (the kernels read the position from device memory, so a cache that fell behind
/// would be written at the wrong place). Returns the position as the kernels take it.
pub fn device_position(state: &crate::backend::state::State, mamba: bool) -> Result<i32> {
    for st in &state.layers {
        match st {
            LayerState::Device(DeviceState::Attention { len, .. }) if *len != state.pos => bail!(
                "a device K/V cache holds {len} positions, the state {}",
                state.pos
            ),
            LayerState::Device(DeviceState::Attention { .. }) => {}
            LayerState::Device(DeviceState::Mamba { .. }) if mamba => {}
            LayerState::None if mamba => {}
            _ => bail!("a sequence's state is not on the device"),
        }
    }
    i32::try_from(state.pos).map_err(|_| anyhow!("position out of range"))
}

fn cuda<T>(r: Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| anyhow!("CUDA: {e:?}"))
}

impl DeviceState {
    /// A zeroed Mamba state of these sizes.
    pub fn mamba(g: &Gpu, conv: usize, ssm: usize) -> Result<DeviceState> {
        Ok(DeviceState::Mamba {
            conv: g.zeros(conv.max(1))?,
            ssm: g.zeros(ssm.max(1))?,
        })
    }

    /// An empty K/V cache of `capacity` positions of `row` values: f32 where the asked types
    /// are (exact mode), otherwise f16 (the block types of `-ctk/-ctv` are kept on the CPU
    /// only).
    pub fn attention(g: &Gpu, row: usize, capacity: usize, kv: KvTypes) -> Result<DeviceState> {
        let ty = match kv == KvTypes::F32 {
            true => KvType::F32,
            false => KvType::F16,
        };
        let n = row
            .checked_mul(capacity)
            .ok_or_else(|| anyhow!("KV cache size overflows"))?;
        Ok(DeviceState::Attention {
            k: DeviceKv::zeros(g, ty, n.max(1))?,
            v: DeviceKv::zeros(g, ty, n.max(1))?,
            len: 0,
            row,
            capacity,
        })
    }

    /// Empties the state in place: the Mamba state zeroed, the K/V cache at length 0.
    pub fn clear(&mut self) -> Result<()> {
        match self {
            DeviceState::Mamba { conv, ssm } => {
                let s = conv.stream().clone();
                cuda(s.memset_zeros(conv))?;
                cuda(s.memset_zeros(ssm))?;
            }
            DeviceState::Attention { len, .. } => *len = 0,
        }
        Ok(())
    }

    /// The same state in host memory (copied back).
    pub fn to_host(&self) -> Result<LayerState> {
        Ok(match self {
            DeviceState::Mamba { conv, ssm } => LayerState::Mamba {
                conv: cuda(conv.stream().clone_dtoh(conv))?,
                ssm: cuda(ssm.stream().clone_dtoh(ssm))?,
            },
            DeviceState::Attention {
                k,
                v,
                len,
                row,
                capacity,
            } => {
                // Only the rows in use cross PCIe (snapshots of a long context's cache would
                // otherwise copy its whole capacity); the rest of the host cache stays zero.
                let used = len * row;
                LayerState::Attention {
                    k: k.to_host(used)?,
                    v: v.to_host(used)?,
                    len: *len,
                    row: *row,
                    capacity: *capacity,
                    k_tiled: false,
                }
            }
        })
    }

    /// Loads a host state of the same layout (as [`DeviceState::to_host`] gives).
    pub fn load(&mut self, host: &LayerState) -> Result<()> {
        match (self, host) {
            (DeviceState::Mamba { conv, ssm }, LayerState::Mamba { conv: hc, ssm: hs })
                if conv.len() == hc.len() && ssm.len() == hs.len() =>
            {
                let s = conv.stream().clone();
                cuda(s.memcpy_htod(hc, conv))?;
                cuda(s.memcpy_htod(hs, ssm))?;
            }
            (
                DeviceState::Attention {
                    k,
                    v,
                    len,
                    row,
                    capacity,
                },
                LayerState::Attention {
                    k: hk,
                    v: hv,
                    len: hl,
                    row: hr,
                    capacity: hcap,
                    k_tiled,
                },
            ) if row == hr && capacity == hcap && *hl <= *hcap => {
                k.load(&hk.rows_f32(*hl, *hr, *k_tiled))?;
                v.load(&hv.rows_f32(*hl, *hr, false))?;
                *len = *hl;
            }
            _ => bail!("saved state does not match this model and context size"),
        }
        Ok(())
    }
}
