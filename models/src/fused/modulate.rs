//! adaLN modulation (DiT's `modulate`): y = x·(1 + scale) + shift, with shift and scale given
//! per row (the Diffusion Loss MLP conditions every token separately).
//! Backward: dx = dy·(1 + scale), dshift = dy, dscale = dy·x.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use multiversion::multiversion;

use super::{as_rows, f32_data, fused, par_rows, par_rows2, rows_of, stacked2};

/// x·(1 + scale) + shift; fused for f32 tensors of one shape (CPU, and CUDA with the `cuda`
/// feature), else
/// [`modulate_plain`] (which also broadcasts).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    if fused(x) && x.dims() == shift.dims() && x.dims() == scale.dims() {
        as_rows(x)?.apply_op3(&as_rows(shift)?, &as_rows(scale)?, Modulate)
    } else {
        modulate_plain(x, shift, scale)
    }
}

/// The plain composition of candle ops (the reference for the tests).
pub fn modulate_plain(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_row(x: &[f32], shift: &[f32], scale: &[f32], y: &mut [f32]) {
    for j in 0..y.len() {
        y[j] = x[j] * (1.0 + scale[j]) + shift[j];
    }
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_row(x: &[f32], scale: &[f32], dy: &[f32], dx: &mut [f32], dscale: &mut [f32]) {
    for j in 0..dx.len() {
        dx[j] = dy[j] * (1.0 + scale[j]);
        dscale[j] = dy[j] * x[j];
    }
}

struct Modulate;

impl CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "fused-modulate"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        shift: &CpuStorage,
        shl: &Layout,
        scale: &CpuStorage,
        scl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (xs, shs, scs) = (
            f32_data(x, name)?,
            f32_data(shift, name)?,
            f32_data(scale, name)?,
        );
        let (xr, shr, scr) = (rows_of(xl, name)?, rows_of(shl, name)?, rows_of(scl, name)?);
        let out = par_rows(xr.rows, xr.cols, |first, block| {
            for (i, o) in block.chunks_exact_mut(xr.cols).enumerate() {
                let r = first + i;
                forward_row(xr.row(xs, r), shr.row(shs, r), scr.row(scs, r), o);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        shift: &candle_core::CudaStorage,
        shl: &Layout,
        scale: &candle_core::CudaStorage,
        scl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let inputs = [(x, xl), (shift, shl), (scale, scl)];
        let y = super::cuda::elementwise("fused_modulate_fwd", x.device(), &inputs, 1)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _shift: &Tensor,
        scale: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let out =
            as_rows(x)?.apply_op3_no_bwd(&as_rows(scale)?, &as_rows(dy)?, &ModulateBackward)?;
        Ok((Some(out.get(0)?), Some(dy.clone()), Some(out.get(1)?)))
    }
}

/// (dx, dscale) of [`Modulate`] from (x, scale, dy), stacked into one (2, …x's shape) tensor.
struct ModulateBackward;

impl CustomOp3 for ModulateBackward {
    fn name(&self) -> &'static str {
        "fused-modulate-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        scale: &CpuStorage,
        scl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (xs, scs, dys) = (
            f32_data(x, name)?,
            f32_data(scale, name)?,
            f32_data(dy, name)?,
        );
        let (xr, scr, dyr) = (rows_of(xl, name)?, rows_of(scl, name)?, rows_of(dyl, name)?);
        // [dx; dscale]
        let out = par_rows2(xr.rows, xr.cols, |r, dx, dscale| {
            backward_row(xr.row(xs, r), scr.row(scs, r), dyr.row(dys, r), dx, dscale)
        });
        Ok((CpuStorage::F32(out), stacked2(xl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        scale: &candle_core::CudaStorage,
        scl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let inputs = [(x, xl), (scale, scl), (dy, dyl)];
        let out = super::cuda::elementwise("fused_modulate_bwd", x.device(), &inputs, 2)?;
        Ok((out, stacked2(xl)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition_on_adaln_chunks() -> Result<()> {
        let x = randn(&[9, 16], 1)?;
        // shift and scale as chunks of one (rows, 2·C) projection, as the MLP produces them
        let m = randn(&[9, 32], 2)?;
        let seed = randn(&[9, 16], 3)?;
        let f = |fused: bool| {
            grads(
                &[x.clone(), m.clone()],
                |t| {
                    let c = t[1].chunk(2, 1)?;
                    if fused {
                        modulate(&t[0], &c[0], &c[1])
                    } else {
                        modulate_plain(&t[0], &c[0], &c[1])
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
