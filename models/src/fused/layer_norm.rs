//! LayerNorm over the last dimension, y = (x − μ)/√(σ² + ε) · w + b, with or without the affine
//! w, b. Backward (x̂ = (x − μ)·r, r = 1/√(σ² + ε), g = dy·w):
//!   dx = r · (g − mean(g) − x̂ · mean(g·x̂)),  dw = Σ_rows dy·x̂,  db = Σ_rows dy.
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{as_rows, f32_data, fused_cpu, math, par_rows, rows_of, rows_per_task, Rows};

/// LayerNorm over the last dimension; fused on the CPU for f32, else [`layer_norm_plain`].
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    if !fused_cpu(x) {
        return layer_norm_plain(x, weight, bias, eps);
    }
    let x = as_rows(x)?;
    match (weight, bias) {
        (Some(w), Some(b)) => {
            x.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormAffine { eps })
        }
        (None, None) => x.apply_op1(LayerNormPlain { eps }),
        _ => layer_norm_plain(&x, weight, bias, eps),
    }
}

/// The plain composition of candle ops (the reference for the tests).
pub fn layer_norm_plain(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(w)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    Ok(y)
}

/// (μ, r) of one row.
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = math::sum(x) / n;
    let var = math::sum_sq_dev(x, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_rows(
    x: &[f32],
    xr: Rows,
    wb: Option<(&[f32], &[f32])>,
    eps: f32,
    first: usize,
    out: &mut [f32],
) {
    for (i, o) in out.chunks_exact_mut(xr.cols).enumerate() {
        let row = xr.row(x, first + i);
        let (mean, r) = moments(row, eps);
        match wb {
            Some((w, b)) => {
                for j in 0..o.len() {
                    o[j] = (row[j] - mean) * r * w[j] + b[j];
                }
            }
            None => {
                for j in 0..o.len() {
                    o[j] = (row[j] - mean) * r;
                }
            }
        }
    }
}

/// dx for a block of rows, and (when `w` is given) this block's partial Σ dy·x̂ and Σ dy.
#[multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn backward_rows(
    x: &[f32],
    xr: Rows,
    dy: &[f32],
    dyr: Rows,
    w: Option<&[f32]>,
    eps: f32,
    first: usize,
    dx: &mut [f32],
    dwb: Option<(&mut [f32], &mut [f32])>,
) {
    let c = xr.cols;
    let mut g = vec![0f32; c];
    let mut xhat = vec![0f32; c];
    let (mut dw, mut db) = match dwb {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    for (i, dxr) in dx.chunks_exact_mut(c).enumerate() {
        let row = xr.row(x, first + i);
        let dyrow = dyr.row(dy, first + i);
        let (mean, r) = moments(row, eps);
        for j in 0..c {
            xhat[j] = (row[j] - mean) * r;
        }
        match w {
            Some(w) => {
                for j in 0..c {
                    g[j] = dyrow[j] * w[j];
                }
            }
            None => g.copy_from_slice(dyrow),
        }
        let mg = math::sum(&g) / c as f32;
        let mgx = math::dot(&g, &xhat) / c as f32;
        for j in 0..c {
            dxr[j] = r * (g[j] - mg - xhat[j] * mgx);
        }
        if let (Some(dw), Some(db)) = (dw.as_deref_mut(), db.as_deref_mut()) {
            for j in 0..c {
                dw[j] += dyrow[j] * xhat[j];
                db[j] += dyrow[j];
            }
        }
    }
}

fn forward(
    x: &CpuStorage,
    xl: &Layout,
    wb: Option<(&[f32], &[f32])>,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let xs = f32_data(x, "layer_norm")?;
    let xr = rows_of(xl, "layer_norm")?;
    let out = par_rows(xr.rows, xr.cols, |first, block| {
        forward_rows(xs, xr, wb, eps as f32, first, block)
    });
    Ok((CpuStorage::F32(out), xl.shape().clone()))
}

/// (dx, Σ dy·x̂, Σ dy) on the CPU; the sums only when `w` is given.
fn backward(
    x: &Tensor,
    w: Option<&Tensor>,
    dy: &Tensor,
    eps: f64,
) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
    let x = as_rows(x)?;
    let dy = as_rows(dy)?;
    let (xs, xl) = x.storage_and_layout();
    let (dys, dyl) = dy.storage_and_layout();
    let (candle_core::Storage::Cpu(xs), candle_core::Storage::Cpu(dys)) = (&*xs, &*dys) else {
        candle_core::bail!("layer_norm backward: CPU tensors only")
    };
    let xv = f32_data(xs, "layer_norm backward")?;
    let dyv = f32_data(dys, "layer_norm backward")?;
    let xr = rows_of(xl, "layer_norm backward")?;
    let dyr = rows_of(dyl, "layer_norm backward")?;
    let c = xr.cols;
    let wv = match w {
        Some(w) => Some(w.contiguous()?.flatten_all()?.to_vec1::<f32>()?),
        None => None,
    };
    let per = rows_per_task(c);
    let mut dx = vec![0f32; xr.rows * c];
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(per * c)
        .enumerate()
        .map(|(i, block)| {
            let mut dw = vec![0f32; if wv.is_some() { c } else { 0 }];
            let mut db = vec![0f32; dw.len()];
            let dwb = wv.as_ref().map(|_| (&mut dw[..], &mut db[..]));
            backward_rows(
                xv,
                xr,
                dyv,
                dyr,
                wv.as_deref(),
                eps as f32,
                i * per,
                block,
                dwb,
            );
            (dw, db)
        })
        .collect();
    let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
    let sums = match wv {
        Some(_) => {
            let mut dw = vec![0f32; c];
            let mut db = vec![0f32; c];
            for (pw, pb) in &partials {
                for j in 0..c {
                    dw[j] += pw[j];
                    db[j] += pb[j];
                }
            }
            Some((
                Tensor::from_vec(dw, c, x.device())?,
                Tensor::from_vec(db, c, x.device())?,
            ))
        }
        None => None,
    };
    Ok((dx, sums))
}

struct LayerNormPlain {
    eps: f64,
}

impl CustomOp1 for LayerNormPlain {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        forward(x, xl, None, self.eps)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(backward(x, None, dy, self.eps)?.0))
    }
}

struct LayerNormAffine {
    eps: f64,
}

impl CustomOp3 for LayerNormAffine {
    fn name(&self) -> &'static str {
        "fused-layer-norm-affine"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = *xl.dims().last().unwrap_or(&0);
        let w = f32_data(w, "layer_norm weight")?;
        let b = f32_data(b, "layer_norm bias")?;
        if wl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!("layer_norm: weight and bias need {c} values")
        }
        let w = &w[wl.start_offset()..wl.start_offset() + c];
        let b = &b[bl.start_offset()..bl.start_offset() + c];
        forward(x, xl, Some((w, b)), self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, sums) = backward(x, Some(w), dy, self.eps)?;
        let (dw, db) = match sums {
            Some((dw, db)) => (dw.reshape(w.shape())?, db.reshape(w.shape())?),
            None => candle_core::bail!("layer_norm backward: affine sums missing"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    #[test]
    fn matches_the_composition_with_and_without_affine() -> Result<()> {
        let x = (randn(&[3, 7, 40], 1)? * 3.0)?.affine(1.0, 0.5)?;
        let w = randn(&[40], 2)?;
        let b = randn(&[40], 3)?;
        let seed = randn(&[3, 7, 40], 4)?;
        for affine in [true, false] {
            let inputs: Vec<Tensor> = if affine {
                vec![x.clone(), w.clone(), b.clone()]
            } else {
                vec![x.clone()]
            };
            let run = |fused: bool| {
                grads(
                    &inputs,
                    |t| {
                        let (w, b) = if affine {
                            (Some(&t[1]), Some(&t[2]))
                        } else {
                            (None, None)
                        };
                        if fused {
                            layer_norm(&t[0], w, b, 1e-6)
                        } else {
                            layer_norm_plain(&t[0], w, b, 1e-6)
                        }
                    },
                    &seed,
                )
            };
            let (yf, gf) = run(true)?;
            let (yp, gp) = run(false)?;
            assert!(max_diff(&yf, &yp)? < 2e-5, "forward, affine={affine}");
            for (i, (a, b)) in gf.iter().zip(&gp).enumerate() {
                let d = max_diff(a, b)?;
                assert!(d < 2e-4, "gradient of input {i}, affine={affine}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn column_slices_are_read_in_place() -> Result<()> {
        // one chunk of a wider tensor, as an adaLN projection's chunks are
        let wide = randn(&[5, 24], 7)?;
        let x = wide.narrow(1, 8, 8)?;
        let y = layer_norm(&x, None, None, 1e-6)?;
        let r = layer_norm_plain(&x.contiguous()?, None, None, 1e-6)?;
        assert!(max_diff(&y, &r)? < 1e-5);
        Ok(())
    }
}
