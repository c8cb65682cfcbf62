//! Standard normal noise generated where the tensor lives, from a 64-bit key: value 2j and 2j+1
//! come from the counter j alone (SplitMix64 of key + (j+1)·γ, Box–Muller on its two 32-bit
//! halves), so the CPU and the GPU produce the same numbers (to the last bits of log/sin/cos),
//! nothing is uploaded, and no host work grows with the tensor. The key comes from the run's
//! seeded [`crate::Rng`] stream, which checkpoints record, so resuming draws the same noise.
use candle_core::{Device, Result, Shape, Tensor};

/// SplitMix64's increment γ (Steele, Lea & Flood 2014).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser.
#[inline(always)]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A key for use number `index` of `key` (each dropout site of a forward pass takes one).
pub fn derive_key(key: u64, index: u64) -> u64 {
    mix64(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// The key whose counter `i` is counter `offset + i` of `key`: since every value depends on
/// key + (counter + 1)·γ alone, a data-parallel rank draws its rows' part of a tensor of the whole
/// batch by shifting the key (dropout masks count values, [`gaussian_noise_at`] pairs of them).
pub fn shift_key(key: u64, offset: u64) -> u64 {
    key.wrapping_add(offset.wrapping_mul(GAMMA))
}

/// The 24-bit uniform integer of counter `i` (the top bits of SplitMix64 of key + (i+1)·γ), as
/// dropout masks draw them.
#[inline(always)]
pub(super) fn uniform24(key: u64, i: u64) -> u32 {
    Uniform24::from(key, i).next_value()
}

/// [`uniform24`] of counters i, i + 1, … in turn: the state key + (i+1)·γ steps by γ, one 64-bit
/// multiply per value fewer than computing each counter's from scratch (dropout's masks).
#[derive(Clone, Copy)]
pub(super) struct Uniform24(u64);

impl Uniform24 {
    #[inline(always)]
    pub(super) fn from(key: u64, i: u64) -> Self {
        Uniform24(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)))
    }

    /// The value of the current counter; the state moves on to the next.
    #[inline(always)]
    pub(super) fn next_value(&mut self) -> u32 {
        let v = (mix64(self.0) >> 40) as u32;
        self.0 = self.0.wrapping_add(GAMMA);
        v
    }
}

/// The pair of normals of counter `j` (Box–Muller; u₁ in (0, 1] so that its log is finite).
#[inline(always)]
fn pair(key: u64, j: u64) -> (f32, f32) {
    let bits = mix64(key.wrapping_add(j.wrapping_add(1).wrapping_mul(GAMMA)));
    const SCALE: f32 = 1.0 / (1u32 << 24) as f32;
    let u1 = 1.0 - ((bits >> 40) as u32) as f32 * SCALE;
    let u2 = (((bits >> 8) as u32) >> 8) as f32 * SCALE;
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

/// A tensor of `shape` with independent N(0, 1) f32 values, determined by `key`.
pub fn gaussian_noise(key: u64, shape: &Shape, device: &Device) -> Result<Tensor> {
    let n = shape.elem_count();
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let storage = super::cuda::gaussian_noise(dev, key, n)?;
            Ok(Tensor::from_storage(
                candle_core::Storage::Cuda(storage),
                shape.clone(),
                candle_core::op::BackpropOp::none(),
                false,
            ))
        }
        _ => Tensor::from_vec(gaussian_noise_cpu(key, n), shape.clone(), device),
    }
}

/// Values `offset..offset + n` of the noise [`gaussian_noise`] draws from `key` for a larger
/// tensor, as a tensor of `shape` (n values): the rows of the whole batch's noise that one
/// data-parallel rank uses.
pub fn gaussian_noise_at(
    key: u64,
    offset: usize,
    shape: &Shape,
    device: &Device,
) -> Result<Tensor> {
    // values come in pairs (2j, 2j + 1) of counter j: start at the pair holding `offset`
    let skip = offset % 2;
    let key = shift_key(key, (offset / 2) as u64);
    if skip == 0 {
        return gaussian_noise(key, shape, device);
    }
    let n = shape.elem_count();
    gaussian_noise(key, &Shape::from(n + 1), device)?
        .narrow(0, 1, n)?
        .reshape(shape.clone())
}

/// [`gaussian_noise`]'s values on the CPU.
fn gaussian_noise_cpu(key: u64, n: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 14; // even, so that pairs never straddle two blocks
    super::par_fill(n, CHUNK, |first, block| {
        for (k, two) in block.chunks_mut(2).enumerate() {
            let (a, b) = pair(key, ((first + 2 * k) / 2) as u64);
            two[0] = a;
            if let Some(x) = two.get_mut(1) {
                *x = b;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stepped_uniforms_are_each_counters_own() {
        for (key, first) in [
            (7u64, 0u64),
            (u64::MAX - 3, 12_345),
            (0x1234_5678, u64::MAX - 500),
        ] {
            let mut stepped = Uniform24::from(key, first);
            for k in 0..1000u64 {
                let i = first.wrapping_add(k);
                let own =
                    (mix64(key.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA))) >> 40) as u32;
                assert_eq!(stepped.next_value(), own, "key {key}, counter {i}");
            }
        }
    }

    #[test]
    fn standard_normal_and_determined_by_the_key() -> Result<()> {
        let n = 200_001;
        let a = gaussian_noise_cpu(7, n);
        assert_eq!(a, gaussian_noise_cpu(7, n), "same key, same noise");
        assert_ne!(
            a[..8],
            gaussian_noise_cpu(8, 8)[..],
            "another key, other noise"
        );
        // a prefix is the same whatever the length (counter-based), also across the chunk border
        assert_eq!(a[..16385], gaussian_noise_cpu(7, 16385)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let beyond2 = a.iter().filter(|x| x.abs() > 2.0).count() as f64 / n as f64;
        // standard errors: mean 0.0022, variance 0.0032, P(|x| > 2) = 0.0455 ± 0.0005
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.015, "variance {var}");
        assert!((beyond2 - 0.0455).abs() < 0.0025, "tail share {beyond2}");
        assert!(a.iter().all(|x| x.is_finite()));
        let t = gaussian_noise(7, &Shape::from((3, 5)), &Device::Cpu)?;
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, a[..15]);
        // any slice of a longer draw, at even and odd offsets
        for offset in [0, 1, 6, 16383, 16384, 30001] {
            let t = gaussian_noise_at(7, offset, &Shape::from((4, 3)), &Device::Cpu)?;
            assert_eq!(
                t.flatten_all()?.to_vec1::<f32>()?,
                a[offset..offset + 12],
                "{offset}"
            );
        }
        Ok(())
    }
}
