//! The gated residual of adaLN-Zero blocks (DiT): y = x + h ⊙ gate.
//! Backward: dx = dy, dh = dy ⊙ gate, dgate = dy ⊙ h.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{as_rows, f32_data, fused_cpu, par_rows, rows_of, rows_per_task, with_cpu_rows};

/// x + h ⊙ gate; fused on the CPU for f32 tensors of one shape, else [`gated_residual_plain`].
pub fn gated_residual(x: &Tensor, h: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if fused_cpu(x) && x.dims() == h.dims() && x.dims() == gate.dims() {
        as_rows(x)?.apply_op3(&as_rows(h)?, &as_rows(gate)?, GatedResidual)
    } else {
        gated_residual_plain(x, h, gate)
    }
}

/// The plain composition (the reference for the tests).
pub fn gated_residual_plain(x: &Tensor, h: &Tensor, gate: &Tensor) -> Result<Tensor> {
    x + h.broadcast_mul(gate)?
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_row(x: &[f32], h: &[f32], g: &[f32], y: &mut [f32]) {
    for j in 0..y.len() {
        y[j] = x[j] + h[j] * g[j];
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_row(h: &[f32], g: &[f32], dy: &[f32], dh: &mut [f32], dg: &mut [f32]) {
    for j in 0..dh.len() {
        dh[j] = dy[j] * g[j];
        dg[j] = dy[j] * h[j];
    }
}

struct GatedResidual;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "fused-gated-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        h: &CpuStorage,
        hl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (xs, hs, gs) = (f32_data(x, name)?, f32_data(h, name)?, f32_data(g, name)?);
        let (xr, hr, gr) = (rows_of(xl, name)?, rows_of(hl, name)?, rows_of(gl, name)?);
        let out = par_rows(xr.rows, xr.cols, |first, block| {
            for (i, o) in block.chunks_exact_mut(xr.cols).enumerate() {
                let r = first + i;
                forward_row(xr.row(xs, r), hr.row(hs, r), gr.row(gs, r), o);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        gate: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let name = self.name();
        let cols = x.dim(candle_core::D::Minus1)?;
        let n = x.elem_count();
        let mut dh = vec![0f32; n];
        let mut dg = vec![0f32; n];
        with_cpu_rows(h, name, |hs, hr| {
            with_cpu_rows(gate, name, |gs, gr| {
                with_cpu_rows(dy, name, |dys, dyr| {
                    let per = rows_per_task(cols);
                    dh.par_chunks_mut(per * cols)
                        .zip(dg.par_chunks_mut(per * cols))
                        .enumerate()
                        .for_each(|(i, (dhb, dgb))| {
                            let rows = dhb.chunks_exact_mut(cols).zip(dgb.chunks_exact_mut(cols));
                            for (k, (dhr, dgr)) in rows.enumerate() {
                                let r = i * per + k;
                                let (hrow, grow) = (hr.row(hs, r), gr.row(gs, r));
                                backward_row(hrow, grow, dyr.row(dys, r), dhr, dgr);
                            }
                        });
                    Ok(())
                })
            })
        })?;
        let dh = Tensor::from_vec(dh, x.shape(), x.device())?;
        let dg = Tensor::from_vec(dg, x.shape(), x.device())?;
        Ok((Some(dy.clone()), Some(dh), Some(dg)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition() -> Result<()> {
        let x = randn(&[7, 12], 1)?;
        let h = randn(&[7, 12], 2)?;
        // the gate as a column slice of a wider projection, as adaLN produces it
        let m = randn(&[7, 36], 3)?;
        let seed = randn(&[7, 12], 4)?;
        let f = |fused: bool| {
            grads(
                &[x.clone(), h.clone(), m.clone()],
                |t| {
                    let g = t[2].narrow(1, 24, 12)?;
                    if fused {
                        gated_residual(&t[0], &t[1], &g)
                    } else {
                        gated_residual_plain(&t[0], &t[1], &g)
                    }
                },
                &seed,
            )
        };
        let (yf, gf) = f(true)?;
        let (yp, gp) = f(false)?;
        assert!(max_diff(&yf, &yp)? < 1e-6);
        for (a, b) in gf.iter().zip(&gp) {
            assert!(max_diff(a, b)? < 1e-6);
        }
        Ok(())
    }
}
