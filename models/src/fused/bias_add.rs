//! The bias of a linear layer, y = x + b with b broadcast over the rows of x.
//! Backward: dx = dy, db = Σ_rows dy. candle reduces a broadcast over leading dimensions one
//! element at a time on one thread; here the column sums run over blocks of rows in parallel.
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{as_rows, f32_data, fused, par_rows, rows_of, rows_per_task};

/// x + b over the last dimension; fused for f32 (CPU, and CUDA with the `cuda` feature), else
/// [`bias_add_plain`].
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused(x) && b.rank() == 1 && b.dim(0)? == x.dim(candle_core::D::Minus1)? {
        as_rows(x)?.apply_op2(&b.contiguous()?, BiasAdd)
    } else {
        bias_add_plain(x, b)
    }
}

/// The plain composition (the reference for the tests).
pub fn bias_add_plain(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.broadcast_add(b)
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_row(x: &[f32], b: &[f32], y: &mut [f32]) {
    for j in 0..y.len() {
        y[j] = x[j] + b[j];
    }
}

/// acc += dy, element by element.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn accumulate_row(dy: &[f32], acc: &mut [f32]) {
    for j in 0..acc.len() {
        acc[j] += dy[j];
    }
}

/// Columns of `acc` that [`accumulate_rows`] holds in registers while it runs down the rows.
const TILE: usize = 64;

/// acc += Σᵣ dy[r], r in `rows`, row r at `dy[r·stride..]`: for each element the rows are added
/// in order, the same sums as [`accumulate_row`] row after row. A tile of acc's columns stays in
/// registers down all the rows, where one call per row loaded and stored acc for every row.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn accumulate_rows(
    dy: &[f32],
    stride: usize,
    rows: std::ops::Range<usize>,
    acc: &mut [f32],
) {
    let cols = acc.len();
    for (t, tile) in acc.chunks_mut(TILE).enumerate() {
        let c0 = t * TILE;
        if tile.len() == TILE {
            let mut sum = [0f32; TILE];
            sum.copy_from_slice(tile);
            for r in rows.clone() {
                let row = &dy[r * stride + c0..][..TILE];
                for j in 0..TILE {
                    sum[j] += row[j];
                }
            }
            tile.copy_from_slice(&sum);
        } else {
            for r in rows.clone() {
                accumulate_row(&dy[r * stride + c0..][..tile.len()], tile);
            }
        }
    }
    debug_assert!(rows.is_empty() || dy.len() >= (rows.end - 1) * stride + cols);
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_data(x, self.name())?;
        let xr = rows_of(xl, self.name())?;
        let bs = f32_data(b, self.name())?;
        let b = &bs[bl.start_offset()..bl.start_offset() + xr.cols];
        let out = par_rows(xr.rows, xr.cols, |first, block| {
            for (i, o) in block.chunks_exact_mut(xr.cols).enumerate() {
                add_row(xr.row(xs, first + i), b, o);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        b: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = x.device();
        let (xv, xr) = cuda::rows_view(x, xl, self.name())?;
        if bl.shape().elem_count() != xr.cols {
            candle_core::bail!("{}: the bias needs {} values", self.name(), xr.cols)
        }
        let bv = b.as_cuda_slice::<f32>()?.slice(bl.start_offset()..);
        let n = xr.rows * xr.cols;
        if n == 0 {
            return Ok((
                cuda::wrap(dev.alloc_zeros::<f32>(0)?, dev),
                xl.shape().clone(),
            ));
        }
        let y = cuda::alloc(dev, n)?;
        let kernel = cuda::Kernel::load(dev, "fused_bias_add_fwd")?;
        let mut builder = kernel.builder();
        // the bias is one row read for every row of x: stride 0
        let b_stride = 0usize;
        builder.arg(&xr.rows).arg(&xr.cols).arg(&xv).arg(&xr.stride);
        builder.arg(&bv).arg(&b_stride).arg(&y);
        cuda::launch(builder, cuda::elementwise_cfg(n))?;
        Ok((cuda::wrap(y, dev), xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.clone()), Some(row_sum(dy)?.reshape(b.shape())?)))
    }
}

/// Σ_rows dy over dy's last dimension: a bias's gradient.
fn row_sum(dy: &Tensor) -> Result<Tensor> {
    as_rows(dy)?.apply_op1_no_bwd(&BiasAddBackward)
}

/// db = Σ_rows dy of [`BiasAdd`], as a vector of dy's last dimension.
struct BiasAddBackward;

impl CustomOp1 for BiasAddBackward {
    fn name(&self) -> &'static str {
        "fused-bias-add-backward"
    }

    fn cpu_fwd(&self, dy: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dys = f32_data(dy, self.name())?;
        let dyr = rows_of(dyl, self.name())?;
        let per = rows_per_task(dyr.cols);
        let blocks = dyr.rows.div_ceil(per);
        let partials: Vec<Vec<f32>> = (0..blocks)
            .into_par_iter()
            .map(|k| {
                let mut acc = vec![0f32; dyr.cols];
                let rows = k * per..((k + 1) * per).min(dyr.rows);
                accumulate_rows(&dys[dyr.offset..], dyr.stride, rows, &mut acc);
                acc
            })
            .collect();
        let mut db = vec![0f32; dyr.cols];
        for p in &partials {
            accumulate_row(p, &mut db);
        }
        Ok((CpuStorage::F32(db), Shape::from(dyr.cols)))
    }

    /// Two stages, no atomics (the same sums on every run): `fused_bias_add_bwd_partial` sums
    /// chunks of rows into a (chunks, cols) buffer, `col_sum_finalize` adds up its rows.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let dev = dy.device();
        let (dyv, dyr) = cuda::rows_view(dy, dyl, self.name())?;
        let (rows, cols) = (dyr.rows, dyr.cols);
        let mut db = dev.alloc_zeros::<f32>(cols)?;
        if rows > 0 && cols > 0 {
            let (per, chunks) = cuda::col_sum_chunks(rows);
            let partial = cuda::alloc(dev, chunks * cols)?;
            let kernel = cuda::Kernel::load(dev, "fused_bias_add_bwd_partial")?;
            let mut b = kernel.builder();
            b.arg(&rows)
                .arg(&cols)
                .arg(&dyv)
                .arg(&dyr.stride)
                .arg(&per)
                .arg(&partial);
            cuda::launch(b, cuda::col_sum_cfg(cols, chunks))?;
            cuda::col_sum_finalize(dev, &partial, chunks, cols, &mut db.slice_mut(..))?;
        }
        Ok((cuda::wrap(db, dev), Shape::from(cols)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition() -> Result<()> {
        let x = randn(&[3, 700, 24], 1)?;
        let b = randn(&[24], 2)?;
        let seed = randn(&[3, 700, 24], 3)?;
        let (yf, gf) = grads(&[x.clone(), b.clone()], |t| bias_add(&t[0], &t[1]), &seed)?;
        let (yp, gp) = grads(&[x, b], |t| bias_add_plain(&t[0], &t[1]), &seed)?;
        assert_eq!(max_diff(&yf, &yp)?, 0.0, "the same sums");
        assert!(max_diff(&gf[0], &gp[0])? == 0.0);
        assert!(
            max_diff(&gf[1], &gp[1])? < 1e-3,
            "column sums over 2100 rows"
        );
        Ok(())
    }

    #[test]
    fn rows_summed_at_once_are_the_rows_summed_one_by_one() {
        // 150 columns: two full tiles and a short one; a stride past the columns
        let (cols, stride, rows) = (150, 157, 40);
        let dy: Vec<f32> = (0..rows * stride)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.37 - 150.0)
            .collect();
        let start: Vec<f32> = (0..cols).map(|j| j as f32 * 0.1).collect();
        let mut one_by_one = start.clone();
        for r in 3..rows {
            accumulate_row(&dy[r * stride..][..cols], &mut one_by_one);
        }
        let mut at_once = start;
        accumulate_rows(&dy, stride, 3..rows, &mut at_once);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&at_once), bits(&one_by_one));
    }
}
