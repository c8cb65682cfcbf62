//! The CUDA kernels of kernels.cu, run on the CPU by the crate `cuda-emu`, against the fused ops'
//! CPU kernels: forward values, and the backward kernels against candle's gradients of the CPU
//! ops. This is what a machine without a GPU (CI) can check of the GPU code: each kernel's
//! arithmetic, indexing, strides and synchronisation, with the launch geometry cuda.rs uses
//! (`geometry.rs`). The argument lists repeat cuda.rs's; a mismatch there, and cuBLAS, show only
//! on a GPU (`cuda_tests` in mod.rs, `ablate selftest --device cuda:0`).
use candle_core::{DType, Device, Result, Shape, Tensor};
use cuda_emu::Launch;

use super::geometry::{
    col_sum_cfg, col_sum_chunks, elementwise_cfg, row_cfg, scatter_rows_cfg, sum_squares_cfg,
    Geometry, WARP_ROW_COLS,
};
use super::test_util::{grads, randn};
use super::*;

/// Runs `launch` over `geometry`.
///
/// # Safety
/// As [`Launch::run`]: every pointer among the arguments covers what the kernel touches.
unsafe fn run(launch: Launch, geometry: Geometry) {
    if let Err(e) = launch.run(geometry.grid, geometry.block) {
        panic!("{e}")
    }
}

/// A kernel input as cuda.rs passes it: `rows` rows of `cols` values `stride` apart, here a
/// column slice (from column `left`) of a wider host matrix, and the same view as a CPU tensor.
struct View {
    data: Vec<f32>,
    left: usize,
    stride: usize,
    tensor: Tensor,
}

impl View {
    /// A (rows, cols) slice of a random (rows, left + cols + 3) matrix, values N(0, scale²).
    fn random(rows: usize, cols: usize, left: usize, scale: f64, seed: u64) -> Result<View> {
        let stride = left + cols + 3;
        let wide = (randn(&[rows, stride], seed)? * scale)?;
        let data = wide.flatten_all()?.to_vec1::<f32>()?;
        let tensor = wide.narrow(1, left, cols)?;
        Ok(View {
            data,
            left,
            stride,
            tensor,
        })
    }

    fn ptr(&self) -> *const f32 {
        self.data[self.left..].as_ptr()
    }
}

/// A launch of an element-wise kernel `name(rows, cols, in₀, stride₀, in₁, stride₁, …, out)`, as
/// cuda.rs's `elementwise` builds it, up to the output.
fn rows_launch(name: &str, rows: usize, cols: usize, inputs: &[&View]) -> Launch {
    inputs
        .iter()
        .fold(Launch::new(name).arg(rows).arg(cols), |l, v| {
            l.arg(v.ptr()).arg(v.stride)
        })
}

/// `n` output values, NaN until a kernel writes them.
fn output(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Asserts `got` (row-major) equals the tensor `want` to within `tol` (absolute, or relative to
/// values above 1).
fn assert_close(what: &str, got: &[f32], want: &Tensor, tol: f32) -> Result<()> {
    let want = want.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = (g - w).abs();
        assert!(
            d <= tol * w.abs().max(1.0),
            "{what}: value {i} is {g}, the CPU's {w}"
        );
    }
    Ok(())
}

/// Σ over chunks of rows, as cuda.rs runs every column sum: `partial` (chunks, m) from a
/// `*_partial` kernel, then `col_sum_finalize` into `out` (m values).
unsafe fn finalize(partial: &[f32], chunks: usize, m: usize, out: *mut f32) {
    let l = Launch::new("col_sum_finalize")
        .arg(chunks)
        .arg(m)
        .arg(partial.as_ptr())
        .arg(out);
    run(l, elementwise_cfg(m));
}

/// Every `__global__` function of kernels.cu is launched by a test of this file (its name in
/// quotes), so that a new kernel comes with its check on the CPU.
#[test]
fn every_kernel_is_tested_here() {
    let kernels = include_str!("kernels.cu");
    let tests = include_str!("emulated.rs");
    let names: Vec<&str> = kernels
        .split("__global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .collect();
    assert!(names.len() > 20, "found only {names:?} in kernels.cu");
    for name in names {
        assert!(
            tests.contains(&format!("\"{name}\"")),
            "kernels.cu's `{name}` has no test in emulated.rs"
        );
    }
}

#[test]
fn gelu_and_silu() -> Result<()> {
    let (rows, cols) = (37, 45);
    let x = View::random(rows, cols, 2, 3.0, 1)?;
    let dy = View::random(rows, cols, 1, 1.0, 2)?;
    let n = rows * cols;
    type Op = fn(&Tensor) -> Result<Tensor>;
    for (name, op, forward, backward) in [
        ("gelu", gelu_erf as Op, "fused_gelu_fwd", "fused_gelu_bwd"),
        ("silu", silu as Op, "fused_silu_fwd", "fused_silu_bwd"),
    ] {
        let (mut y, mut dx) = (output(n), output(n));
        unsafe {
            let fwd = rows_launch(forward, rows, cols, &[&x]).arg(y.as_mut_ptr());
            run(fwd, elementwise_cfg(n));
            let bwd = rows_launch(backward, rows, cols, &[&x, &dy]).arg(dx.as_mut_ptr());
            run(bwd, elementwise_cfg(n));
        }
        let (want, g) = grads(std::slice::from_ref(&x.tensor), |t| op(&t[0]), &dy.tensor)?;
        assert_close(&format!("{name} forward"), &y, &want, 1e-5)?;
        assert_close(&format!("{name} backward"), &dx, &g[0], 1e-5)?;
    }
    Ok(())
}

#[test]
fn modulate_and_gated_residual() -> Result<()> {
    let (rows, cols) = (29, 70);
    let n = rows * cols;
    let x = View::random(rows, cols, 0, 1.0, 1)?;
    // two chunks of an adaLN projection: shift and scale, or h and the gate
    let a = View::random(rows, cols, 5, 1.0, 2)?;
    let b = View::random(rows, cols, 1, 0.5, 3)?;
    let dy = View::random(rows, cols, 4, 1.0, 4)?;
    let inputs = [x.tensor.clone(), a.tensor.clone(), b.tensor.clone()];

    let (mut y, mut back) = (output(n), output(2 * n));
    unsafe {
        let fwd = rows_launch("fused_modulate_fwd", rows, cols, &[&x, &a, &b]);
        run(fwd.arg(y.as_mut_ptr()), elementwise_cfg(n));
        let bwd = rows_launch("fused_modulate_bwd", rows, cols, &[&x, &b, &dy]);
        run(bwd.arg(back.as_mut_ptr()), elementwise_cfg(n));
    }
    let (want, g) = grads(&inputs, |t| modulate(&t[0], &t[1], &t[2]), &dy.tensor)?;
    assert_close("modulate forward", &y, &want, 1e-5)?;
    assert_close("modulate dx", &back[..n], &g[0], 1e-5)?;
    assert_close("modulate dscale", &back[n..], &g[2], 1e-5)?;

    unsafe {
        let fwd = rows_launch("fused_gated_residual_fwd", rows, cols, &[&x, &a, &b]);
        run(fwd.arg(y.as_mut_ptr()), elementwise_cfg(n));
        let bwd = rows_launch("fused_gated_residual_bwd", rows, cols, &[&a, &b, &dy]);
        run(bwd.arg(back.as_mut_ptr()), elementwise_cfg(n));
    }
    let (want, g) = grads(&inputs, |t| gated_residual(&t[0], &t[1], &t[2]), &dy.tensor)?;
    assert_close("gated residual forward", &y, &want, 1e-5)?;
    assert_close("gated residual dh", &back[..n], &g[1], 1e-5)?;
    assert_close("gated residual dgate", &back[n..], &g[2], 1e-5)?;
    Ok(())
}

#[test]
fn bias_add_and_its_column_sums() -> Result<()> {
    // 300 rows: col_sum_chunks splits them into several chunks
    let (rows, cols) = (300, 40);
    let n = rows * cols;
    let x = View::random(rows, cols, 3, 1.0, 1)?;
    let bias = randn(&[cols], 2)?;
    let bv = bias.to_vec1::<f32>()?;
    let dy = View::random(rows, cols, 0, 1.0, 3)?;
    let (per, chunks) = col_sum_chunks(rows);
    assert!(chunks > 1, "one chunk would not test the second stage");
    let (mut y, mut partial, mut db) = (output(n), output(chunks * cols), output(cols));
    unsafe {
        let fwd = rows_launch("fused_bias_add_fwd", rows, cols, &[&x])
            .arg(bv.as_ptr())
            .arg(0usize)
            .arg(y.as_mut_ptr());
        run(fwd, elementwise_cfg(n));
        let sums = rows_launch("fused_bias_add_bwd_partial", rows, cols, &[&dy])
            .arg(per)
            .arg(partial.as_mut_ptr());
        run(sums, col_sum_cfg(cols, chunks));
        finalize(&partial, chunks, cols, db.as_mut_ptr());
    }
    let inputs = [x.tensor.clone(), bias];
    let (want, g) = grads(&inputs, |t| bias_add(&t[0], &t[1]), &dy.tensor)?;
    assert_close("bias add forward", &y, &want, 1e-6)?;
    assert_close("bias add db", &db, &g[1], 1e-4)
}

#[test]
fn layer_norm_with_and_without_affine() -> Result<()> {
    let eps = 1e-6f32;
    // a warp per row (narrower than the warp, wider, the widest), then a block per row
    for (rows, cols) in [
        (21, 20),
        (70, 300),
        (9, WARP_ROW_COLS),
        (6, WARP_ROW_COLS + 5),
    ] {
        let n = rows * cols;
        let x = View::random(rows, cols, 4, 3.0, 1)?;
        let dy = View::random(rows, cols, 2, 1.0, 2)?;
        let (w, b) = (randn(&[cols], 3)?, randn(&[cols], 4)?);
        let (wv, bv) = (w.to_vec1::<f32>()?, b.to_vec1::<f32>()?);
        let geometry = row_cfg(rows, cols);

        let (mut y, mut dx) = (output(n), output(n));
        unsafe {
            let fwd = rows_launch("fused_layer_norm_fwd", rows, cols, &[&x])
                .arg(eps)
                .arg(y.as_mut_ptr());
            run(fwd, geometry);
            let bwd = rows_launch("fused_layer_norm_bwd", rows, cols, &[&x, &dy])
                .arg(eps)
                .arg(dx.as_mut_ptr());
            run(bwd, geometry);
        }
        let f = |t: &[Tensor]| layer_norm(&t[0], None, None, eps as f64);
        let (want, g) = grads(std::slice::from_ref(&x.tensor), f, &dy.tensor)?;
        assert_close(&format!("layer norm {rows}x{cols}"), &y, &want, 2e-5)?;
        assert_close(&format!("layer norm {rows}x{cols} dx"), &dx, &g[0], 2e-4)?;

        // [dx; dw; db], and (μ, r) per row between the kernels
        let (per, chunks) = col_sum_chunks(rows);
        let (mut out, mut stats) = (output(n + 2 * cols), output(2 * rows));
        let mut partial = output(chunks * 2 * cols);
        unsafe {
            let fwd = rows_launch("fused_layer_norm_affine_fwd", rows, cols, &[&x])
                .arg(wv.as_ptr())
                .arg(bv.as_ptr())
                .arg(eps)
                .arg(y.as_mut_ptr());
            run(fwd, geometry);
            let bwd = rows_launch("fused_layer_norm_affine_bwd", rows, cols, &[&x])
                .arg(wv.as_ptr())
                .arg(dy.ptr())
                .arg(dy.stride)
                .arg(eps)
                .arg(out.as_mut_ptr())
                .arg(stats.as_mut_ptr());
            run(bwd, geometry);
            let sums = rows_launch("fused_layer_norm_dwdb_partial", rows, cols, &[&x, &dy])
                .arg(stats.as_ptr())
                .arg(per)
                .arg(partial.as_mut_ptr());
            run(sums, col_sum_cfg(cols, chunks));
            finalize(&partial, chunks, 2 * cols, out[n..].as_mut_ptr());
        }
        let inputs = [x.tensor.clone(), w, b];
        let f = |t: &[Tensor]| layer_norm(&t[0], Some(&t[1]), Some(&t[2]), eps as f64);
        let (want, g) = grads(&inputs, f, &dy.tensor)?;
        let what = format!("affine layer norm {rows}x{cols}");
        assert_close(&what, &y, &want, 2e-5)?;
        assert_close(&format!("{what} dx"), &out[..n], &g[0], 2e-4)?;
        assert_close(&format!("{what} dw"), &out[n..n + cols], &g[1], 2e-4)?;
        assert_close(&format!("{what} db"), &out[n + cols..], &g[2], 2e-4)?;
    }
    Ok(())
}

#[test]
fn attention_softmax_with_and_without_the_causal_mask() -> Result<()> {
    let scale = 0.3f32;
    // (batch, heads, queries, keys): more keys than queries (a kv cache), a row wider than a
    // warp, and one wider than a warp takes (a block per row)
    for dims in [[2, 3, 5, 7], [1, 2, 40, 100], [1, 1, 3, WARP_ROW_COLS + 70]] {
        let (queries, cols) = (dims[2], dims[3]);
        let rows = dims[0] * dims[1] * queries;
        let s = View::random(rows, cols, 0, 4.0, 1)?;
        let dp = View::random(rows, cols, 0, 1.0, 2)?;
        let shaped = |t: &Tensor| t.reshape(Shape::from(dims.to_vec()));
        let (st, dpt) = (shaped(&s.tensor)?, shaped(&dp.tensor)?);
        for causal in [false, true] {
            let (mut p, mut ds) = (output(rows * cols), output(rows * cols));
            unsafe {
                // without dropout: key 0, threshold 0 and a keep factor of 1 keep every value
                let fwd = Launch::new("fused_attention_probs_fwd_f32")
                    .arg(rows)
                    .arg(cols)
                    .arg(s.ptr())
                    .arg(s.stride)
                    .arg(scale)
                    .arg(causal as i32)
                    .arg(queries)
                    .arg(0u64)
                    .arg(0u32)
                    .arg(1.0f32)
                    .arg(p.as_mut_ptr());
                run(fwd, row_cfg(rows, cols));
                let bwd = Launch::new("fused_softmax_bwd")
                    .arg(rows)
                    .arg(cols)
                    .arg(p.as_ptr())
                    .arg(cols)
                    .arg(dp.ptr())
                    .arg(dp.stride)
                    .arg(scale)
                    .arg(ds.as_mut_ptr());
                run(bwd, row_cfg(rows, cols));
            }
            let f = |t: &[Tensor]| attention_softmax(&t[0], scale as f64, causal);
            let (want, g) = grads(std::slice::from_ref(&st), f, &dpt)?;
            let what = format!("softmax {dims:?} causal={causal}");
            assert_close(&what, &p, &want, 1e-6)?;
            assert_close(&format!("{what} backward"), &ds, &g[0], 1e-5)?;
        }
    }
    Ok(())
}

#[test]
fn attention_probabilities_with_dropout_in_f32_and_bf16() -> Result<()> {
    let scale = 0.3f32;
    let d = AttentionDropout { p: 0.2, key: 99 };
    let (key, threshold, keep_scale) = (d.key, dropout::threshold(d.p), 1.0 / (1.0 - d.p));
    for dims in [[2, 3, 5, 7], [1, 2, 40, 100], [1, 1, 3, WARP_ROW_COLS + 70]] {
        let (queries, cols) = (dims[2], dims[3]);
        let rows = dims[0] * dims[1] * queries;
        let n = rows * cols;
        let s = View::random(rows, cols, 2, 4.0, 1)?;
        // the gradient of the probabilities, bf16-exact so that both kernels read the same values
        let dout = randn(&[rows, cols], 2)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        let dout32 = dout.flatten_all()?.to_vec1::<f32>()?;
        let dout16: Vec<u16> = dout32.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
        let shaped = |t: &Tensor| t.reshape(Shape::from(dims.to_vec()));
        let (st, dt) = (shaped(&s.tensor)?, shaped(&dout)?);
        for causal in [false, true] {
            let what = format!("attention probs {dims:?} causal={causal}");
            let f =
                |t: &[Tensor]| attention_probs(&t[0], scale as f64, causal, Some(d), DType::F32);
            let (want, g) = grads(std::slice::from_ref(&st), f, &dt)?;
            let (mut p32, mut p16) = (output(n), vec![0xffffu16; n]);
            let (mut ds32, mut ds16) = (output(n), output(n));
            let args = |name: &str| {
                Launch::new(name)
                    .arg(rows)
                    .arg(cols)
                    .arg(s.ptr())
                    .arg(s.stride)
                    .arg(scale)
                    .arg(causal as i32)
                    .arg(queries)
                    .arg(key)
                    .arg(threshold)
                    .arg(keep_scale)
            };
            unsafe {
                let geometry = row_cfg(rows, cols);
                run(
                    args("fused_attention_probs_fwd_f32").arg(p32.as_mut_ptr()),
                    geometry,
                );
                run(
                    args("fused_attention_probs_fwd_bf16").arg(p16.as_mut_ptr()),
                    geometry,
                );
                let bwd = args("fused_attention_probs_bwd_f32")
                    .arg(dout32.as_ptr())
                    .arg(cols)
                    .arg(ds32.as_mut_ptr());
                run(bwd, geometry);
                let bwd = args("fused_attention_probs_bwd_bf16")
                    .arg(dout16.as_ptr())
                    .arg(cols)
                    .arg(ds16.as_mut_ptr());
                run(bwd, geometry);
            }
            assert_close(&what, &p32, &want, 1e-6)?;
            let p16: Vec<f32> = p16
                .iter()
                .map(|&b| f32::from_bits((b as u32) << 16))
                .collect();
            assert_close(&format!("{what} in bf16"), &p16, &want, 8e-3)?;
            assert_close(&format!("{what} backward"), &ds32, &g[0], 1e-5)?;
            assert_close(&format!("{what} backward from bf16"), &ds16, &g[0], 1e-5)?;
        }
    }
    Ok(())
}

#[test]
fn attention_heads_split_and_merge_in_f32_and_bf16() -> Result<()> {
    let (b, l, h, hd) = (2, 7, 3, 8);
    let (c, n) = (h * hd, b * l * h * hd);
    // a projection's output as a column slice of a wider one (qkv chunks are row views)
    let x = View::random(b * l, c, 5, 1.0, 1)?;
    let x3 = x.tensor.reshape((b, l, c))?;
    let want = split_heads_plain(&x3, h, DType::F32)?;
    let (mut s32, mut s16) = (output(n), vec![0xffffu16; n]);
    let args = |name: &str| {
        Launch::new(name)
            .arg(b)
            .arg(l)
            .arg(h)
            .arg(hd)
            .arg(x.ptr())
            .arg(x.stride)
    };
    unsafe {
        run(
            args("split_heads_f32").arg(s32.as_mut_ptr()),
            elementwise_cfg(n),
        );
        run(
            args("split_heads_bf16").arg(s16.as_mut_ptr()),
            elementwise_cfg(n),
        );
    }
    assert_close("split heads", &s32, &want, 0.0)?;
    let rounded = want.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    let s16f: Vec<f32> = s16
        .iter()
        .map(|&v| f32::from_bits((v as u32) << 16))
        .collect();
    assert_close("split heads in bf16", &s16f, &rounded, 0.0)?;

    // and back: from the f32 heads, and from the bf16 ones
    let (mut m32, mut m16) = (output(n), output(n));
    unsafe {
        let merge = |name: &str| Launch::new(name).arg(b).arg(l).arg(h).arg(hd);
        run(
            merge("merge_heads_f32")
                .arg(s32.as_ptr())
                .arg(m32.as_mut_ptr()),
            elementwise_cfg(n),
        );
        run(
            merge("merge_heads_bf16")
                .arg(s16.as_ptr())
                .arg(m16.as_mut_ptr()),
            elementwise_cfg(n),
        );
    }
    assert_close("merge heads", &m32, &merge_heads_plain(&want)?, 0.0)?;
    let from16 = merge_heads_plain(&want.to_dtype(DType::BF16)?)?;
    assert_close("merge heads from bf16", &m16, &from16, 0.0)
}

#[test]
fn adamw_update() -> Result<()> {
    let n = 3 * 700 + 5;
    let theta = randn(&[n], 1)?;
    let moments = Tensor::stack(&[randn(&[n], 2)?, randn(&[n], 3)?.sqr()?], 0)?;
    let g = randn(&[n], 4)?;
    let s = AdamWStep::new(0.9, 0.95, 1e-8, 1e-3, 0.02, 3).with_grad_scale(0.7);
    let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let (tv, mv, gv) = (host(&theta)?, host(&moments)?, host(&g)?);
    let mut out = output(3 * n);
    unsafe {
        let mut l = Launch::new("fused_adamw")
            .arg(n)
            .arg(tv.as_ptr())
            .arg(mv.as_ptr())
            .arg(gv.as_ptr());
        let constants = [
            s.beta1,
            s.beta2,
            s.inv_bc1,
            s.inv_bc2,
            s.eps,
            s.lr,
            s.decay,
            s.grad_scale,
        ];
        for v in constants {
            l = l.arg(v);
        }
        run(l.arg(out.as_mut_ptr()), elementwise_cfg(n));
    }
    let (want_theta, want_moments) = adamw(&theta, &moments, &g, &s)?;
    assert_close("adamw θ", &out[..n], &want_theta, 1e-6)?;
    assert_close("adamw moments", &out[n..], &want_moments, 1e-6)
}

#[test]
fn sum_of_squares_over_pieces_of_many_tensors() -> Result<()> {
    // a tensor of several pieces, an empty one, small ones: the gradients of a model
    let lens = [3, 2 * squares::PIECE + 77, 0, 1000, 1];
    let tensors = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| randn(&[n], k as u64 + 1))
        .collect::<Result<Vec<_>>>()?;
    let host = tensors
        .iter()
        .map(|t| t.to_vec1::<f32>())
        .collect::<Result<Vec<_>>>()?;
    let pieces = squares::pieces(&lens);
    // the table cuda.rs uploads: each piece's address and length
    let table: Vec<u64> = pieces
        .iter()
        .flat_map(|&(t, offset, n)| [host[t][offset..].as_ptr() as u64, n as u64])
        .collect();
    let mut partial = vec![f64::NAN; pieces.len()];
    unsafe {
        let l = Launch::new("sum_squares_pieces")
            .arg(pieces.len())
            .arg(table.as_ptr())
            .arg(partial.as_mut_ptr());
        run(l, sum_squares_cfg(pieces.len()));
    }
    let got: f64 = partial.iter().sum();
    let want = sum_of_squares_plain(&tensors)?;
    assert!(
        (got - want).abs() < 1e-6 * want,
        "Σ x² {got}, the composition's {want}"
    );
    Ok(())
}

#[test]
fn gaussian_noise_and_dropout_draw_the_cpus_numbers() -> Result<()> {
    // odd, so that the last pair is half used
    let n = 3 * 1001;
    let key = 0x1234_5678_9abc_def0u64;
    let mut z = output(n);
    unsafe {
        let l = Launch::new("gaussian_noise")
            .arg(n)
            .arg(key)
            .arg(z.as_mut_ptr());
        run(l, elementwise_cfg(n.div_ceil(2)));
    }
    let want = gaussian_noise(key, &Shape::from(n), &Device::Cpu)?;
    assert_close("gaussian noise", &z, &want, 1e-5)?;

    let p = 0.1f32;
    let x = randn(&[n], 5)?;
    let xv = x.to_vec1::<f32>()?;
    let mut y = output(n);
    unsafe {
        let l = Launch::new("fused_dropout")
            .arg(n)
            .arg(key)
            .arg(dropout::threshold(p))
            .arg(1.0 / (1.0 - p))
            .arg(xv.as_ptr())
            .arg(y.as_mut_ptr());
        run(l, elementwise_cfg(n));
    }
    let want = dropout(&x, p, key)?;
    assert_close("dropout", &y, &want, 0.0)?;
    let dropped = y.iter().filter(|&&v| v == 0.0).count();
    assert!(
        (200..400).contains(&dropped),
        "{dropped} of {n} dropped at p = 0.1"
    );
    Ok(())
}

#[test]
fn gather_rows_and_its_sums_over_readers() -> Result<()> {
    // 500 readers of 20 rows, row 7 read by half (MAR's mask token), row 19 never
    let (rows, cols) = (20, 40);
    let index: Vec<u32> = (0..500u32)
        .map(|j| if j % 2 == 0 { 7 } else { (j * 31) % 19 })
        .collect();
    let x = randn(&[rows, cols], 1)?;
    let dy = randn(&[index.len(), cols], 2)?;
    let xv = x.flatten_all()?.to_vec1::<f32>()?;
    let dyv = dy.flatten_all()?.to_vec1::<f32>()?;
    let inverse = gather::Inverse::of(&index, rows);
    let csr = [inverse.offsets.as_slice(), &inverse.order].concat();
    let n_out = index.len();
    let (mut y, mut dx) = (output(n_out * cols), output(rows * cols));
    unsafe {
        let fwd = Launch::new("gather_rows")
            .arg(n_out)
            .arg(cols)
            .arg(xv.as_ptr())
            .arg(index.as_ptr())
            .arg(y.as_mut_ptr());
        run(fwd, elementwise_cfg(n_out * cols));
        let bwd = Launch::new("scatter_rows_sum")
            .arg(rows)
            .arg(cols)
            .arg(dyv.as_ptr())
            .arg(csr.as_ptr())
            .arg(dx.as_mut_ptr());
        run(bwd, scatter_rows_cfg(rows, cols));
    }
    let (want, g) = grads(
        std::slice::from_ref(&x),
        |t| gather_rows(&t[0], &index),
        &dy,
    )?;
    assert_close("gather rows", &y, &want, 0.0)?;
    assert_close("gather rows backward", &dx, &g[0], 1e-5)
}

#[test]
fn bf16_rounding_is_candles() -> Result<()> {
    // ties to even (1 + 2⁻⁸ rounds down, 1 + 3·2⁻⁸ up), a carry into the exponent, ±0, ∞
    let mut values = vec![
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -1.0 - 1.0 / 256.0,
        f32::from_bits(0x3fff_ffff),
        0.0,
        -0.0,
        f32::INFINITY,
        f32::MIN_POSITIVE,
        1e-40,
    ];
    values.extend(randn(&[300], 1)?.to_vec1::<f32>()?);
    let n = values.len();
    let mut bits = vec![0xffffu16; n];
    unsafe {
        let l = Launch::new("cast_f32_bf16")
            .arg(n)
            .arg(values.as_ptr())
            .arg(bits.as_mut_ptr());
        run(l, elementwise_cfg(n));
    }
    let got: Vec<f32> = bits
        .iter()
        .map(|&b| f32::from_bits((b as u32) << 16))
        .collect();
    let want = Tensor::new(values.as_slice(), &Device::Cpu)?
        .to_dtype(DType::BF16)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "value {i} ({})", values[i]);
    }
    Ok(())
}
