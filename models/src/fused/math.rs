//! Scalar math written so that loops over slices vectorise: branch-free `exp` and `erf`
//! (libm's are calls the compiler cannot vectorise) and sums with independent lanes.
//! All are `#[inline(always)]` so that they take the target features of the kernel they sit in.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so that n·ln2 is exact for the reduction (Cephes `expf`)
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x to about 1 ulp (Cephes `expf`): x = n·ln2 + r, |r| ≤ ln2/2, e^r by a degree-6
/// polynomial, 2^n by building the exponent bits. 0 below −87.3 (so −∞ gives 0), +∞ above 88.7.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    // Cephes' 5.0000001e-1, which is 0.5 in f32
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let two_n = pow2i(n);
    let y = er * two_n;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// 2ⁿ for a whole number n in [−126, 128] (128 gives +∞), built in the exponent bits without a
/// float-to-int cast: Rust's saturating `as i32` does not vectorise (a scalar convert and
/// compares per lane made SiLU 5× slower). n + 127 + 2²³ is exact and holds n + 127 in its low
/// mantissa bits; << 23 moves them into the exponent and drops the rest.
#[inline(always)]
fn pow2i(n: f32) -> f32 {
    f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23)
}

/// erf(x) by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), the formula PyTorch's vectorised
/// CPU `erf` uses.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// Σ xᵢ with 16 independent partial sums (vectorises; same order on every run).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in tail {
        s += v;
    }
    s
}

/// Σ xᵢ·yᵢ with 16 independent partial sums.
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let xc = x.chunks_exact(16);
    let yc = y.chunks_exact(16);
    let (xt, yt) = (xc.remainder(), yc.remainder());
    for (a, b) in xc.zip(yc) {
        for i in 0..16 {
            acc[i] += a[i] * b[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (a, b) in xt.iter().zip(yt) {
        s += a * b;
    }
    s
}

/// Σ (xᵢ − m)² with 16 independent partial sums.
#[inline(always)]
pub fn sum_sq_dev(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            let d = c[i] - m;
            acc[i] += d * d;
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for v in tail {
        s += (v - m) * (v - m);
    }
    s
}

/// max xᵢ (−∞ for an empty slice).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in tail {
        m = m.max(v);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_close_to_libm() {
        let mut worst = 0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01 + 0.003;
            let rel = (exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn pow2i_is_the_exponent_of_the_cast() {
        for n in -126..=128 {
            let cast = f32::from_bits(((n + 127) << 23) as u32);
            assert_eq!(pow2i(n as f32).to_bits(), cast.to_bits(), "2^{n}");
        }
    }

    #[test]
    fn erf_is_close_to_the_series() {
        // erf by its Taylor series in f64 for |x| ≤ 3
        fn erf64(x: f64) -> f64 {
            let mut term = x;
            let mut s = x;
            for n in 1..200 {
                term *= -x * x / n as f64;
                s += term / (2 * n + 1) as f64;
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        }
        for i in -300..=300 {
            let x = i as f64 * 0.01;
            let err = (erf(x as f32) as f64 - erf64(x)).abs();
            // A&S bound 1.5e-7 plus f32 rounding of the polynomial and exp
            assert!(err < 5e-7, "erf({x}) off by {err}");
        }
    }

    #[test]
    fn reductions() {
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let s: f32 = x.iter().sum();
        assert!((sum(&x) - s).abs() < 1e-4);
        assert!((dot(&x, &x) - x.iter().map(|v| v * v).sum::<f32>()).abs() < 1e-2);
        assert_eq!(max(&x), 15.0);
        let m = s / 37.0;
        let v: f32 = x.iter().map(|a| (a - m) * (a - m)).sum();
        assert!((sum_sq_dev(&x, m) - v).abs() < 1e-2);
    }
}
