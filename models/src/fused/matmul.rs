//! Batched matrix products C = A·B on the CPU with the batch over rayon's threads, forward and
//! backward (dA = dC·Bᵀ, dB = Aᵀ·dC). Attention's q·kᵀ and p·v are one small product per
//! (image, head): 256 of 72 × 32 × 72 per mar-tiny layer, too small for gemm to split, and
//! candle's matmul runs its batch one product after another on one thread (into a zero-filled
//! output). Here each product runs on one thread and the threads share the batch.
//!
//! Elsewhere (CUDA, other dtypes, batch layouts that do not collapse) it is candle's matmul,
//! [`batched_matmul_plain`].
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::f32_data;
use super::linear_f32::{product, Mat};

/// A·B for a (…, M, K) and b (…, K, N) with the same leading dimensions.
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    let (ra, rb) = (a.rank(), b.rank());
    if !cpu_f32(a)
        || !cpu_f32(b)
        || ra < 3
        || ra != rb
        || a.dims()[..ra - 2] != b.dims()[..rb - 2]
        || a.dims()[ra - 1] != b.dims()[rb - 2]
    {
        return batched_matmul_plain(a, b);
    }
    as_batch(a)?.apply_op2(&as_batch(b)?, BatchedMatMul)
}

/// candle's matmul (the test's reference).
pub fn batched_matmul_plain(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.matmul(b)
}

/// A layout seen as `batch` matrices of `rows × cols`, the first at `offset`, each `stride` after
/// the one before, element (i, j) at `i·rs + j·cs`: any strides for the last two dimensions, and
/// leading dimensions that collapse into one stride.
#[derive(Debug, Clone, Copy)]
struct Batch {
    offset: usize,
    batch: usize,
    stride: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Batch {
    fn of(l: &Layout) -> Option<Batch> {
        let (dims, strides) = (l.dims(), l.stride());
        let r = dims.len();
        if r < 2 {
            return None;
        }
        Some(Batch {
            offset: l.start_offset(),
            batch: dims[..r - 2].iter().product(),
            stride: super::collapsed_stride(&dims[..r - 2], strides)?.unwrap_or(0),
            rows: dims[r - 2],
            cols: dims[r - 1],
            rs: strides[r - 2],
            cs: strides[r - 1],
        })
    }

    /// Whether every element lies inside `len` values.
    fn fits(&self, len: usize) -> bool {
        let extent = |n: usize, s: usize| n.saturating_sub(1) * s;
        self.batch == 0
            || self.rows == 0
            || self.cols == 0
            || self.offset
                + extent(self.batch, self.stride)
                + extent(self.rows, self.rs)
                + extent(self.cols, self.cs)
                < len
    }

    /// Matrix `i` of `data`.
    fn mat(&self, data: &[f32], i: usize) -> Mat {
        Mat::at(&data[self.offset + i * self.stride..], self.rs, self.cs)
    }
}

/// The tensor itself when its layout is a [`Batch`] view, else a contiguous copy.
fn as_batch(t: &Tensor) -> Result<Tensor> {
    match Batch::of(t.layout()) {
        Some(_) => Ok(t.clone()),
        None => t.contiguous(),
    }
}

struct BatchedMatMul;

impl CustomOp2 for BatchedMatMul {
    fn name(&self) -> &'static str {
        "fused-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (av, bv) = (f32_data(a, op)?, f32_data(b, op)?);
        let (Some(ab), Some(bb)) = (Batch::of(al), Batch::of(bl)) else {
            candle_core::bail!("{op}: the leading dimensions must collapse ({al:?}, {bl:?})")
        };
        if ab.batch != bb.batch || ab.cols != bb.rows || !ab.fits(av.len()) || !bb.fits(bv.len()) {
            candle_core::bail!("{op}: operands that do not match ({al:?}, {bl:?})")
        }
        let (m, n, k) = (ab.rows, bb.cols, ab.cols);
        let mut c = Vec::with_capacity(ab.batch * m * n);
        if m * n > 0 {
            c.spare_capacity_mut()[..ab.batch * m * n]
                .par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, ci)| {
                    // SAFETY: ci holds m·n values, which gemm writes without reading (zeros when
                    // k = 0); both operands were checked against their storages above
                    unsafe {
                        product(
                            ci.as_mut_ptr().cast(),
                            false,
                            false,
                            (m, n, k),
                            ab.mat(av, i),
                            bb.mat(bv, i),
                        )
                    }
                });
        }
        // SAFETY: every product wrote its m·n values
        unsafe { c.set_len(ab.batch * m * n) };
        let mut dims = al.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(c), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        dc: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dc = as_batch(dc)?;
        let t = |x: &Tensor| x.transpose(x.rank() - 2, x.rank() - 1);
        let da = dc.apply_op2_no_bwd(&t(b)?, &BatchedMatMul)?;
        let db = as_batch(&t(a)?)?.apply_op2_no_bwd(&dc, &BatchedMatMul)?;
        Ok((Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition() -> Result<()> {
        // attention's shapes: q·kᵀ with kᵀ a transposed view, then p·v; and a 3-d batch
        let q = randn(&[3, 4, 7, 5], 1)?;
        let k = randn(&[3, 4, 7, 5], 2)?;
        let v = randn(&[3, 4, 7, 6], 3)?;
        let cases: [(Tensor, Tensor); 3] = [
            (q.clone(), k.t()?),
            (randn(&[3, 4, 7, 7], 4)?, v),
            (randn(&[5, 2, 9], 5)?, randn(&[5, 9, 3], 6)?),
        ];
        for (i, (a, b)) in cases.iter().enumerate() {
            let mut seed_shape = a.dims().to_vec();
            *seed_shape.last_mut().expect("rank ≥ 3") = *b.dims().last().expect("rank ≥ 3");
            let seed = randn(&seed_shape, 9)?;
            let inputs = [a.clone(), b.clone()];
            let (yf, gf) = grads(&inputs, |t| batched_matmul(&t[0], &t[1]), &seed)?;
            let (yp, gp) = grads(&inputs, |t| batched_matmul_plain(&t[0], &t[1]), &seed)?;
            assert_eq!(yf.dims(), yp.dims());
            assert!(max_diff(&yf, &yp)? < 1e-5, "case {i}: forward");
            for (j, (f, p)) in gf.iter().zip(&gp).enumerate() {
                assert_eq!(f.dims(), p.dims(), "case {i}: gradient {j}");
                assert!(max_diff(f, p)? < 1e-5, "case {i}: gradient {j}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_transposed_view_keeps_its_strides_and_other_layouts_are_copied() -> Result<()> {
        let k = randn(&[3, 4, 7, 5], 2)?;
        let b = Batch::of(k.t()?.layout()).expect("a transposed view");
        assert_eq!(
            (b.batch, b.stride, b.rows, b.cols, b.rs, b.cs),
            (12, 35, 5, 7, 1, 5)
        );
        // heads of a (batch, positions, heads, head_dim) tensor: the batch dims do not collapse
        let split = randn(&[3, 7, 4, 5], 3)?.transpose(1, 2)?;
        assert!(Batch::of(split.layout()).is_none());
        let a = randn(&[3, 4, 6, 7], 4)?;
        assert!(
            max_diff(
                &batched_matmul(&a, &split)?,
                &batched_matmul_plain(&a, &split.contiguous()?)?
            )? < 1e-5
        );
        Ok(())
    }
}
