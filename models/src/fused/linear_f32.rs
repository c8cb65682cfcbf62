//! The f32 linear layer y = x·Wᵀ + b, fused on the CPU.
//!
//! As candle ops it is a product into a zero-filled output (one thread zeroes it while the others
//! wait), then a pass adding the bias. Backward, candle takes dW of an input with leading
//! dimensions (batch, tokens, in) as one small product per batch index and a sum over them. Fused:
//! - forward: the bias rows are written into the output (in parallel) and gemm adds x·Wᵀ onto
//!   them, so there is no zero fill and no separate bias pass;
//! - backward: two products over all rows at once, dx = dy·W and dW = dyᵀ·x (each into an output
//!   gemm fills without reading it), and db = Σ_rows dy.
//!
//! On CUDA (f32) and for other dtypes it is the composition, [`linear_plain`].
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{as_rows, f32_data, out_shape, rows_of, Rows};

/// y = x·Wᵀ (+ b) in f32: `x` (…, in), `w` (out, in), `b` (out).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let on_cpu = [Some(x), Some(w), b]
        .iter()
        .flatten()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32);
    if !on_cpu || w.rank() != 2 || b.is_some_and(|b| b.rank() != 1) {
        return linear_plain(x, w, b);
    }
    let x = as_rows(x)?;
    match b {
        Some(b) => x.apply_op3(w, b, Linear),
        None => x.apply_op2(w, Linear),
    }
}

/// The composition (the test's reference, and the path off the CPU): candle's product, then the
/// fused bias add.
pub fn linear_plain(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.broadcast_matmul(&w.t()?)?;
    match b {
        Some(b) => super::bias_add(&y, b),
        None => Ok(y),
    }
}

/// A strided f32 matrix for gemm: the first element, the row stride and the column stride.
#[derive(Clone, Copy)]
pub(super) struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Mat {
    /// The matrix starting at `data[0]` whose element (i, j) is `data[i·rs + j·cs]`.
    pub(super) fn at(data: &[f32], rs: usize, cs: usize) -> Mat {
        Mat {
            ptr: data.as_ptr(),
            rs: rs as isize,
            cs: cs as isize,
        }
    }
}

/// Products of fewer multiply-adds run on one thread: on 2 cores 128 × 256 × 256 took 149 µs on
/// one thread and 179 µs split over two, 512 × 256 × 256 554 µs and 405 µs (sampling runs the
/// Diffusion Loss MLP on about a hundred rows per diffusion step).
const PARALLEL_MIN: usize = 1 << 24;

/// dst (m × n, row-major, m·n values) = lhs (m × k) · rhs (k × n), plus dst's values when `add`.
/// gemm splits dst over rayon's threads when `parallel` and the product is large enough.
///
/// # Safety
/// `dst` must hold m·n values (initialised when `add`); `lhs` and `rhs` must address m × k and
/// k × n matrices inside live allocations.
pub(super) unsafe fn product(
    dst: *mut f32,
    add: bool,
    parallel: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
) {
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 && m * n * k >= PARALLEL_MIN {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // gemm computes dst = alpha·dst + beta·lhs·rhs, reading dst only when asked to
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        add,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        if add { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// A fresh m·n output that [`product`] fills without reading.
fn filled_by_product(
    parallel: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: the capacity holds m·n values, which gemm writes without reading (it writes zeros
    // when k = 0); the callers check lhs and rhs against their storages
    unsafe {
        product(out.as_mut_ptr(), false, parallel, (m, n, k), lhs, rhs);
        out.set_len(m * n);
    }
    out
}

/// The weight (out, in) as a strided matrix, checked against its storage.
fn weight<'a>(w: &'a CpuStorage, wl: &Layout, op: &str) -> Result<(&'a [f32], usize, usize)> {
    let ws = f32_data(w, op)?;
    let (out, k) = wl.shape().dims2()?;
    let last = wl.start_offset()
        + out.saturating_sub(1) * wl.stride()[0]
        + k.saturating_sub(1) * wl.stride()[1];
    if out > 0 && k > 0 && last >= ws.len() {
        candle_core::bail!("{op}: the weight's layout runs past its storage")
    }
    Ok((&ws[wl.start_offset()..], out, k))
}

/// A tensor's rows (see [`Rows`]) and its values from the first row on, checked against its
/// storage.
fn rows_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<(&'a [f32], Rows)> {
    let data = f32_data(s, op)?;
    let r = rows_of(l, op)?;
    if r.rows > 0 && r.offset + (r.rows - 1) * r.stride + r.cols > data.len() {
        candle_core::bail!("{op}: the layout runs past its storage")
    }
    Ok((&data[r.offset.min(data.len())..], r))
}

/// [`rows_data`] of an input that must have `k` features.
fn input<'a>(x: &'a CpuStorage, xl: &Layout, k: usize, op: &str) -> Result<(&'a [f32], Rows)> {
    let (xs, xr) = rows_data(x, xl, op)?;
    if xr.cols != k {
        candle_core::bail!("{op}: the input has {} features, the weight {k}", xr.cols)
    }
    Ok((xs, xr))
}

struct Linear;

impl Linear {
    fn forward(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        (w, wl): (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "fused-linear";
        let (ws, out, k) = weight(w, wl, op)?;
        let (xs, xr) = input(x, xl, k, op)?;
        let lhs = Mat::at(xs, xr.stride, 1);
        // Wᵀ: element (i, j) is W[j, i]
        let rhs = Mat::at(ws, wl.stride()[1], wl.stride()[0]);
        let dims = (xr.rows, out, k);
        let y = match b {
            None => filled_by_product(true, dims, lhs, rhs),
            Some((b, bl)) => {
                let bs = f32_data(b, op)?;
                if bl.shape().elem_count() != out || !bl.is_contiguous() {
                    candle_core::bail!("{op}: the bias must be {out} contiguous values")
                }
                let b = &bs[bl.start_offset()..bl.start_offset() + out];
                let mut y = super::repeat_rows(b, xr.rows);
                // SAFETY: y holds rows·out initialised values; lhs and rhs were checked above
                unsafe { product(y.as_mut_ptr(), true, true, dims, lhs, rhs) };
                y
            }
        };
        Ok((CpuStorage::F32(y), out_shape(xl, out)))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.forward((x, xl), (w, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(x, w, dy, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        self.forward((x, xl), (w, wl), Some((b, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = backward(x, w, dy, true)?;
        let db = db.map(|db| db.reshape(b.shape())).transpose()?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// (dx, dW, db): dx = dy·W of x's shape, dW = dyᵀ·x of W's, and with `bias` db = Σ_rows dy.
fn backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let dy = as_rows(dy)?;
    let dx = dy.apply_op2_no_bwd(w, &GradInput)?.reshape(x.shape())?;
    let g = dy.apply_op2_no_bwd(x, &GradWeight { bias })?;
    let (dw, db) = super::weight_and_bias_grads(&g, w.dims2()?, bias)?;
    Ok((dx, dw, db))
}

/// dx = dy·W, as (rows, in).
struct GradInput;

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "fused-linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dyl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (ws, out, k) = weight(w, wl, self.name())?;
        let (dys, dyr) = input(dy, dyl, out, self.name())?;
        let lhs = Mat::at(dys, dyr.stride, 1);
        let rhs = Mat::at(ws, wl.stride()[0], wl.stride()[1]);
        let dx = filled_by_product(true, (dyr.rows, k, out), lhs, rhs);
        Ok((CpuStorage::F32(dx), Shape::from((dyr.rows, k))))
    }
}

/// dW = dyᵀ·x, as out·in values, summed over blocks of rows; with `bias`, db = Σ_rows dy
/// after them (out values), each block's rows summed just before its product reads them, while
/// they are in the core's cache (a separate pass over dy read it from memory: about 3% of a
/// mar-tiny step).
struct GradWeight {
    bias: bool,
}

/// dW's sum runs over every row (16k in the Diffusion Loss MLP) into a small output (256 × 256),
/// and gemm splits only the output over the threads: one product over all rows ran at 125–150
/// GFLOP/s on 2 cores, against 200–230 for the same rows cut into blocks, each block's product on
/// one thread, and the blocks' results added. The number of blocks depends on the rows alone, not
/// on the threads, so dW is the same on every machine.
const MAX_BLOCKS: usize = 16;
const MIN_BLOCK_ROWS: usize = 256;

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "fused-linear-grad-weight"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dyl: &Layout,
        x: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let op = self.name();
        let (xs, xr) = rows_data(x, xl, op)?;
        let (dys, dyr) = rows_data(dy, dyl, op)?;
        if dyr.rows != xr.rows {
            candle_core::bail!("{op}: dy has {} rows, x {}", dyr.rows, xr.rows)
        }
        let (rows, out, k) = (xr.rows, dyr.cols, xr.cols);
        let nb = if self.bias { out } else { 0 };
        // dW over rows [first, first + n), then db over them: dyᵀ's element (o, r) is dy[r, o]
        let block = |first: usize, n: usize, parallel: bool| {
            let mut db = vec![0f32; nb];
            if self.bias {
                // dys starts at dy's first row
                super::bias_add::accumulate_rows(dys, dyr.stride, first..first + n, &mut db);
            }
            let dy = &dys[(first * dyr.stride).min(dys.len())..];
            let x = &xs[(first * xr.stride).min(xs.len())..];
            let lhs = Mat::at(dy, 1, dyr.stride);
            let rhs = Mat::at(x, xr.stride, 1);
            let mut g = Vec::with_capacity(out * k + nb);
            // SAFETY: the capacity holds out·k values, which gemm writes without reading; the
            // checks above keep lhs and rhs inside their storages
            unsafe {
                product(g.as_mut_ptr(), false, parallel, (out, k, n), lhs, rhs);
                g.set_len(out * k);
            }
            g.extend_from_slice(&db);
            g
        };
        let blocks = (rows / MIN_BLOCK_ROWS).clamp(1, MAX_BLOCKS);
        let dw = if blocks == 1 {
            block(0, rows, true)
        } else {
            let per = rows.div_ceil(blocks);
            let partials: Vec<Vec<f32>> = (0..blocks)
                .into_par_iter()
                .map(|b| block(b * per, per.min(rows - b * per), false))
                .collect();
            // added in block order, whichever thread computed each
            super::par_fill(out * k + nb, 1 << 14, |first, values| {
                let span = first..first + values.len();
                values.copy_from_slice(&partials[0][span.clone()]);
                for p in &partials[1..] {
                    super::bias_add::accumulate_row(&p[span.clone()], values);
                }
            })
        };
        Ok((CpuStorage::F32(dw), Shape::from(out * k + nb)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, max_diff, randn};
    use super::*;

    /// Forward values and the gradients of x, W (and b) against the composition.
    fn check(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<()> {
        let out = w.dim(0)?;
        let mut seed_shape = x.dims().to_vec();
        *seed_shape.last_mut().expect("x has a feature dimension") = out;
        let seed = randn(&seed_shape, 9)?;
        let mut inputs = vec![x.clone(), w.clone()];
        inputs.extend(b.cloned());
        let (yf, gf) = grads(&inputs, |t| linear(&t[0], &t[1], t.get(2)), &seed)?;
        let (yp, gp) = grads(&inputs, |t| linear_plain(&t[0], &t[1], t.get(2)), &seed)?;
        assert_eq!(yf.dims(), yp.dims());
        assert!(
            max_diff(&yf, &yp)? < 1e-4,
            "forward {}",
            max_diff(&yf, &yp)?
        );
        for (i, (f, p)) in gf.iter().zip(&gp).enumerate() {
            assert_eq!(f.dims(), p.dims(), "gradient {i}");
            let err = max_diff(f, p)?;
            assert!(err < 1e-3, "gradient {i}: {err}");
        }
        Ok(())
    }

    #[test]
    fn matches_the_composition() -> Result<()> {
        let (w, b) = (randn(&[24, 40], 2)?, randn(&[24], 3)?);
        // rows, with and without a bias, 2-d and 3-d inputs
        check(&randn(&[300, 40], 1)?, &w, Some(&b))?;
        check(&randn(&[300, 40], 1)?, &w, None)?;
        check(&randn(&[6, 50, 40], 4)?, &w, Some(&b))?;
        // enough rows for dW in blocks (3 of 334, 334 and 332 rows)
        check(&randn(&[10, 100, 40], 7)?, &w, Some(&b))?;
        // a row block of a weight (forward_chunks) and a column slice of an input
        let wide = randn(&[72, 40], 5)?;
        check(&randn(&[6, 50, 40], 4)?, &wide.narrow(0, 24, 24)?, Some(&b))?;
        let x = randn(&[6, 50, 80], 6)?.narrow(2, 40, 40)?;
        check(&x, &w, Some(&b))?;
        Ok(())
    }

    /// dy as a view with an offset, as the backward of a concatenation hands it on.
    #[test]
    fn gradients_of_a_view_with_an_offset() -> Result<()> {
        let (w, b) = (randn(&[24, 40], 2)?, randn(&[24], 3)?);
        let before = randn(&[7, 24], 4)?;
        let seed = randn(&[7 + 600, 24], 5)?;
        let inputs = [randn(&[600, 40], 1)?, w, b];
        let before = &before;
        let after_rows = |f: fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>| {
            move |t: &[Tensor]| Tensor::cat(&[before, &f(&t[0], &t[1], Some(&t[2]))?], 0)
        };
        let (_, gf) = grads(&inputs, after_rows(linear), &seed)?;
        let (_, gp) = grads(&inputs, after_rows(linear_plain), &seed)?;
        for (i, (f, p)) in gf.iter().zip(&gp).enumerate() {
            let err = max_diff(f, p)?;
            assert!(err < 1e-3, "gradient {i}: {err}");
        }
        Ok(())
    }

    #[test]
    fn no_rows_and_no_inputs_give_empty_and_bias_only_outputs() -> Result<()> {
        let b = randn(&[3], 3)?;
        let y = linear(
            &Tensor::zeros((0, 4), candle_core::DType::F32, &candle_core::Device::Cpu)?,
            &randn(&[3, 4], 1)?,
            Some(&b),
        )?;
        assert_eq!(y.dims(), &[0, 3]);
        let x = Tensor::zeros((2, 0), candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let w = Tensor::zeros((3, 0), candle_core::DType::F32, &candle_core::Device::Cpu)?;
        let y = linear(&x, &w, Some(&b))?;
        assert_eq!(y.to_vec2::<f32>()?, vec![b.to_vec1::<f32>()?; 2]);
        Ok(())
    }
}
