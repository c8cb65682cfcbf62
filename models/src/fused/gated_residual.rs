//! The gated residual of adaLN-Zero blocks (DiT): y = x + h ⊙ gate.
//! Backward: dx = dy, dh = dy ⊙ gate, dgate = dy ⊙ h.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;

use super::{as_rows, f32_data, fused, par_rows, par_rows2, rows_of, stacked2};

/// x + h ⊙ gate; fused for f32 tensors of one shape (CPU, and CUDA with the `cuda` feature),
/// else [`gated_residual_plain`].
pub fn gated_residual(x: &Tensor, h: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if fused(x) && x.dims() == h.dims() && x.dims() == gate.dims() {
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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        h: &candle_core::CudaStorage,
        hl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let inputs = [(x, xl), (h, hl), (g, gl)];
        let y = super::cuda::elementwise("fused_gated_residual_fwd", x.device(), &inputs, 1)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        h: &Tensor,
        gate: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = GatedResidualBackward;
        let out = as_rows(h)?.apply_op3_no_bwd(&as_rows(gate)?, &as_rows(dy)?, &op)?;
        Ok((Some(dy.clone()), Some(out.get(0)?), Some(out.get(1)?)))
    }
}

/// (dh, dgate) of [`GatedResidual`] from (h, gate, dy), stacked into one (2, …h's shape) tensor.
struct GatedResidualBackward;

impl CustomOp3 for GatedResidualBackward {
    fn name(&self) -> &'static str {
        "fused-gated-residual-backward"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        hl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (hs, gs, dys) = (f32_data(h, name)?, f32_data(g, name)?, f32_data(dy, name)?);
        let (hr, gr, dyr) = (rows_of(hl, name)?, rows_of(gl, name)?, rows_of(dyl, name)?);
        // [dh; dgate]
        let out = par_rows2(hr.rows, hr.cols, |r, dh, dgate| {
            backward_row(hr.row(hs, r), gr.row(gs, r), dyr.row(dys, r), dh, dgate)
        });
        Ok((CpuStorage::F32(out), stacked2(hl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        h: &candle_core::CudaStorage,
        hl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let inputs = [(h, hl), (g, gl), (dy, dyl)];
        let out = super::cuda::elementwise("fused_gated_residual_bwd", h.device(), &inputs, 2)?;
        Ok((out, stacked2(hl)))
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
