//! The bias of a linear layer, y = x + b with b broadcast over the rows of x.
//! Backward: dx = dy, db = Σ_rows dy. candle reduces a broadcast over leading dimensions one
//! element at a time on one thread; here the column sums run over blocks of rows in parallel.
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{as_rows, f32_data, fused_cpu, par_rows, rows_of, rows_per_task, with_cpu_rows};

/// x + b over the last dimension; fused on the CPU for f32, else [`bias_add_plain`].
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_cpu(x) && b.rank() == 1 && b.dim(0)? == x.dim(candle_core::D::Minus1)? {
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

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn accumulate_row(dy: &[f32], acc: &mut [f32]) {
    for j in 0..acc.len() {
        acc[j] += dy[j];
    }
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

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = with_cpu_rows(dy, self.name(), |dys, dyr| {
            let per = rows_per_task(dyr.cols);
            let blocks = dyr.rows.div_ceil(per);
            let partials: Vec<Vec<f32>> = (0..blocks)
                .into_par_iter()
                .map(|k| {
                    let mut acc = vec![0f32; dyr.cols];
                    for r in k * per..((k + 1) * per).min(dyr.rows) {
                        accumulate_row(dyr.row(dys, r), &mut acc);
                    }
                    acc
                })
                .collect();
            let mut db = vec![0f32; dyr.cols];
            for p in &partials {
                accumulate_row(p, &mut db);
            }
            Ok(db)
        })?;
        Ok((
            Some(dy.clone()),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
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
}
