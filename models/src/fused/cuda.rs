//! Launching the CUDA kernels of `kernels.cu` (compiled to PTX by build.rs under the `cuda`
//! feature). Inputs are passed as row views: the device slice advanced to the view's offset plus
//! a row stride, so column slices (chunks of a wider tensor) are read in place, as on the CPU.
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, Layout, Result};

pub(super) use super::geometry::{col_sum_cfg, col_sum_chunks, elementwise_cfg, row_cfg};
use super::geometry::{scatter_rows_cfg, Geometry};
use super::{rows_of, Rows};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "ablate_fused";

/// A kernel of the fused module, with the stream of its device.
pub(super) struct Kernel {
    stream: Arc<CudaStream>,
    func: CudaFunction,
}

impl Kernel {
    pub(super) fn load(dev: &CudaDevice, name: &str) -> Result<Kernel> {
        let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        Ok(Kernel {
            stream: dev.cuda_stream(),
            func: func.into_cuda_function(),
        })
    }

    pub(super) fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Launch a prepared kernel over the blocks and threads of `geometry`.
pub(super) fn launch(mut builder: LaunchArgs<'_>, geometry: Geometry) -> Result<()> {
    let cfg = LaunchConfig {
        grid_dim: geometry.grid,
        block_dim: geometry.block,
        shared_mem_bytes: 0,
    };
    // SAFETY: every kernel of kernels.cu reads within the row views it is given and writes within
    // the outputs allocated for it by the callers here; the argument lists match the signatures.
    unsafe { builder.launch(cfg) }.w()?;
    Ok(())
}

/// An f32 input as a row view: the slice from the view's offset, and its rows.
pub(super) fn rows_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<(CudaView<'a, f32>, Rows)> {
    let r = rows_of(l, op)?;
    Ok((s.as_cuda_slice::<f32>()?.slice(r.offset..), r))
}

/// `n` fresh f32 values on `dev`, all written by the kernel that follows.
pub(super) fn alloc(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: callers launch a kernel that writes all n values before the slice is read.
    unsafe { dev.alloc::<f32>(n) }
}

pub(super) fn wrap(out: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, dev.clone())
}

/// The element-wise kernel `name(rows, cols, in₀, stride₀, in₁, stride₁, …, out)` over inputs of
/// one (rows, cols), writing `outputs` results of rows·cols values one after the other.
pub(super) fn elementwise(
    name: &str,
    dev: &CudaDevice,
    inputs: &[(&CudaStorage, &Layout)],
    outputs: usize,
) -> Result<CudaStorage> {
    let views = inputs
        .iter()
        .map(|(s, l)| rows_view(s, l, name))
        .collect::<Result<Vec<_>>>()?;
    let Some(&(_, first)) = views.first() else {
        candle_core::bail!("{name}: no inputs")
    };
    let (rows, cols) = (first.rows, first.cols);
    if views.iter().any(|(_, r)| r.rows != rows || r.cols != cols) {
        candle_core::bail!("{name}: inputs of different shapes")
    }
    let n = rows * cols;
    if n == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(outputs * n)?, dev));
    }
    let out = alloc(dev, outputs * n)?;
    let kernel = Kernel::load(dev, name)?;
    let mut b = kernel.builder();
    b.arg(&rows);
    b.arg(&cols);
    for (view, r) in &views {
        b.arg(view);
        b.arg(&r.stride);
    }
    b.arg(&out);
    launch(b, elementwise_cfg(n))?;
    Ok(wrap(out, dev))
}

/// Second stage of a column sum: `out[j] = Σ_k partial[k·m + j]` over `chunks` chunks
/// (`out` may be a view into a larger result).
pub(super) fn col_sum_finalize(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    chunks: usize,
    m: usize,
    out: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let kernel = Kernel::load(dev, "col_sum_finalize")?;
    let mut b = kernel.builder();
    b.arg(&chunks);
    b.arg(&m);
    b.arg(partial);
    b.arg(out);
    launch(b, elementwise_cfg(m))
}

/// [`super::adamw`]'s kernel over `n` values: `[θ'; m'; v']` from contiguous θ, `[m; v]` and g.
pub(super) fn adamw(
    s: &super::AdamWStep,
    n: usize,
    theta: (&CudaStorage, &Layout),
    moments: (&CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = theta.0.device();
    let (t, m, gr) = (view(theta)?, view(moments)?, view(g)?);
    if n == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(0)?, dev));
    }
    let out = alloc(dev, 3 * n)?;
    let kernel = Kernel::load(dev, "fused_adamw")?;
    let mut b = kernel.builder();
    b.arg(&n);
    b.arg(&t);
    b.arg(&m);
    b.arg(&gr);
    for x in [
        &s.beta1,
        &s.beta2,
        &s.inv_bc1,
        &s.inv_bc2,
        &s.eps,
        &s.lr,
        &s.decay,
        &s.grad_scale,
    ] {
        b.arg(x);
    }
    b.arg(&out);
    launch(b, elementwise_cfg(n))?;
    Ok(wrap(out, dev))
}

/// An f32 input from its layout's offset on (the caller checks that it is contiguous).
fn view<'a>((s, l): (&'a CudaStorage, &Layout)) -> Result<CudaView<'a, f32>> {
    Ok(s.as_cuda_slice::<f32>()?.slice(l.start_offset()..))
}

/// [`super::gaussian_noise`]'s kernel: `n` normals from `key`.
pub(super) fn gaussian_noise(dev: &CudaDevice, key: u64, n: usize) -> Result<CudaStorage> {
    if n == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(0)?, dev));
    }
    let out = alloc(dev, n)?;
    let kernel = Kernel::load(dev, "gaussian_noise")?;
    let mut b = kernel.builder();
    b.arg(&n);
    b.arg(&key);
    b.arg(&out);
    launch(b, elementwise_cfg(n.div_ceil(2)))?;
    Ok(wrap(out, dev))
}

/// [`super::dropout`]'s kernel over `n` contiguous values.
pub(super) fn dropout(
    key: u64,
    threshold: u32,
    scale: f32,
    n: usize,
    x: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = x.0.device();
    let xv = view(x)?;
    if n == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(0)?, dev));
    }
    let out = alloc(dev, n)?;
    let kernel = Kernel::load(dev, "fused_dropout")?;
    let mut b = kernel.builder();
    b.arg(&n);
    b.arg(&key);
    b.arg(&threshold);
    b.arg(&scale);
    b.arg(&xv);
    b.arg(&out);
    launch(b, elementwise_cfg(n))?;
    Ok(wrap(out, dev))
}

/// [`super::gather_rows`] forward: rows `index` of the contiguous (rows, cols) input.
pub(super) fn gather_rows(
    index: &[u32],
    cols: usize,
    x: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = x.0.device();
    let n = index.len() * cols;
    if n == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(0)?, dev));
    }
    let xv = view(x)?;
    let index = dev.clone_htod(index)?;
    let n_out = index.len();
    let out = alloc(dev, n)?;
    let kernel = Kernel::load(dev, "gather_rows")?;
    let mut b = kernel.builder();
    b.arg(&n_out);
    b.arg(&cols);
    b.arg(&xv);
    b.arg(&index);
    b.arg(&out);
    launch(b, elementwise_cfg(n))?;
    Ok(wrap(out, dev))
}

/// [`super::gather_rows`] backward: (rows, cols) sums of dy's rows over each row's readers,
/// given as CSR (`offsets`, `order`), uploaded as one buffer.
pub(super) fn scatter_rows_sum(
    offsets: &[u32],
    order: &[u32],
    cols: usize,
    dy: (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = dy.0.device();
    let rows = offsets.len() - 1;
    if rows * cols == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(rows * cols)?, dev));
    }
    let dyv = view(dy)?;
    let inverse = dev.clone_htod(&[offsets, order].concat())?;
    let out = alloc(dev, rows * cols)?;
    let kernel = Kernel::load(dev, "scatter_rows_sum")?;
    let mut b = kernel.builder();
    b.arg(&rows);
    b.arg(&cols);
    b.arg(&dyv);
    b.arg(&inverse);
    b.arg(&out);
    launch(b, scatter_rows_cfg(rows, cols))?;
    Ok(wrap(out, dev))
}

/// `n` f32 values from `x` rounded to bf16 (as u16 bit patterns) in a fresh buffer.
fn to_bf16(dev: &CudaDevice, x: &CudaView<'_, f32>, n: usize) -> Result<CudaSlice<u16>> {
    // SAFETY: the kernel below writes all n values.
    let out = unsafe { dev.alloc::<u16>(n.max(1)) }?;
    if n > 0 {
        let kernel = Kernel::load(dev, "cast_f32_bf16")?;
        let mut b = kernel.builder();
        b.arg(&n);
        b.arg(x);
        b.arg(&out);
        launch(b, elementwise_cfg(n))?;
    }
    Ok(out)
}

/// One cuBLAS GemmEx on the device's stream, column-major as cuBLAS sees it:
/// C (m×n, ld m) = op(A)·op(B) with A and B bf16 (16-bit buffers of bf16 bit patterns: our casts'
/// u16 or candle's bf16), C f32, f32 accumulation.
#[allow(clippy::too_many_arguments)]
fn gemm_bf16_f32<A, B>(
    dev: &CudaDevice,
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    a: &impl DevicePtr<A>,
    lda: usize,
    b: &impl DevicePtr<B>,
    ldb: usize,
    c: &mut CudaSlice<f32>,
    beta: f32,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys};
    use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
    let op = |t: bool| {
        if t {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let int = |v: usize| -> Result<i32> {
        i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gemm size {v} over i32")))
    };
    let stream = dev.cuda_stream();
    let blas_handle = dev.cublas_handle();
    let alpha = 1.0f32;
    let (ap, _ra) = a.device_ptr(&stream);
    let (bp, _rb) = b.device_ptr(&stream);
    let (cp, _rc) = c.device_ptr_mut(&stream);
    // SAFETY: the handle runs on the device's stream; A is (op(A) m×k) with ld lda, B (op(B) k×n)
    // with ld ldb, C m×n with ld m, all within the buffers the callers allocated for them.
    unsafe {
        blas::gemm_ex(
            *blas_handle.handle(),
            op(ta),
            op(tb),
            int(m)?,
            int(n)?,
            int(k)?,
            (&alpha as *const f32).cast(),
            ap as *const std::ffi::c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            int(lda)?,
            bp as *const std::ffi::c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            int(ldb)?,
            (&beta as *const f32).cast(),
            cp as *mut std::ffi::c_void,
            sys::cudaDataType_t::CUDA_R_32F,
            int(m)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("cublasGemmEx: {e:?}")))?;
    Ok(())
}

/// [`super::linear_bf16`] forward: y (n×out, row-major) = bf16(x)·bf16(W)ᵀ + b, for contiguous
/// x (n×k) and W (out×k). Row-major y is column-major yᵀ (out×n) = W(k×out, col-major)ᵀ·xᵀ.
pub(super) fn linear_bf16(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: Option<(&CudaStorage, &Layout)>,
    (n, k, out): (usize, usize, usize),
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = x.0.device();
    if n * out == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(n * out)?, dev));
    }
    let xb = to_bf16(dev, &view(x)?, n * k)?;
    let wb = to_bf16(dev, &view(w)?, out * k)?;
    let y = if k == 0 {
        dev.alloc_zeros::<f32>(n * out)?
    } else {
        let mut y = alloc(dev, n * out)?;
        gemm_bf16_f32(dev, (true, false), (out, n, k), &wb, k, &xb, k, &mut y, 0.0)?;
        y
    };
    if let Some(b) = b {
        // in place: y[r, j] += b[j] (the bias row read with stride 0)
        let bv = view(b)?;
        let kernel = Kernel::load(dev, "fused_bias_add_fwd")?;
        let mut args = kernel.builder();
        let zero = 0usize;
        // the same buffer as input and output: each value is read, then written, by one thread
        args.arg(&n).arg(&out).arg(&y).arg(&out);
        args.arg(&bv).arg(&zero).arg(&y);
        launch(args, elementwise_cfg(n * out))?;
    }
    Ok(wrap(y, dev))
}

/// A bf16 input (dy already cast, contiguous) from its layout's offset on.
fn bf16_view<'a>((s, l): (&'a CudaStorage, &Layout)) -> Result<CudaView<'a, half::bf16>> {
    Ok(s.as_cuda_slice::<half::bf16>()?.slice(l.start_offset()..))
}

/// dx (n×k) = dyb·bf16(W), dyb = bf16(dy) given: column-major dxᵀ (k×n) = W(k×out,
/// col-major)·dybᵀ(out×n).
pub(super) fn linear_bf16_grad_input(
    dyb: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    (n, k, out): (usize, usize, usize),
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = dyb.0.device();
    if n * k == 0 || out == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(n * k)?, dev));
    }
    let dyb = bf16_view(dyb)?;
    let wb = to_bf16(dev, &view(w)?, out * k)?;
    let mut dx = alloc(dev, n * k)?;
    gemm_bf16_f32(
        dev,
        (false, false),
        (k, n, out),
        &wb,
        k,
        &dyb,
        out,
        &mut dx,
        0.0,
    )?;
    Ok(wrap(dx, dev))
}

/// [dW (out×k); db (out)] = [dybᵀ·bf16(x); Σ_rows dy], dyb = bf16(dy) given: column-major dWᵀ
/// (k×out) = xᵀ(k×n, col-major)·dyb(n×out); db by the deterministic column sums of the bias add
/// over the f32 dy.
pub(super) fn linear_bf16_grad_weight(
    dy: (&CudaStorage, &Layout),
    x: (&CudaStorage, &Layout),
    dyb: (&CudaStorage, &Layout),
    (n, k, out): (usize, usize, usize),
    bias: bool,
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = dy.0.device();
    let len = out * k + if bias { out } else { 0 };
    let mut g = dev.alloc_zeros::<f32>(len.max(1))?;
    if n == 0 || len == 0 {
        return Ok(wrap(g, dev));
    }
    let dyv = view(dy)?;
    if k > 0 && out > 0 {
        let dyb = bf16_view(dyb)?;
        let xb = to_bf16(dev, &view(x)?, n * k)?;
        gemm_bf16_f32(
            dev,
            (false, true),
            (k, out, n),
            &xb,
            k,
            &dyb,
            out,
            &mut g,
            0.0,
        )?;
    }
    if bias && out > 0 {
        let (per, chunks) = col_sum_chunks(n);
        let partial = alloc(dev, chunks * out)?;
        let kernel = Kernel::load(dev, "fused_bias_add_bwd_partial")?;
        let mut b = kernel.builder();
        b.arg(&n)
            .arg(&out)
            .arg(&dyv)
            .arg(&out)
            .arg(&per)
            .arg(&partial);
        launch(b, col_sum_cfg(out, chunks))?;
        col_sum_finalize(dev, &partial, chunks, out, &mut g.slice_mut(out * k..))?;
    }
    Ok(wrap(g, dev))
}

/// [`super::sum_of_squares`]'s kernel: Σ x² over `tensors` (storage, offset, length), each
/// contiguous f32 from its offset, in pieces of [`super::squares::PIECE`] values; the f64 partial
/// sums come back to the host and are added in order (one device-to-host copy, as `to_scalar`).
pub(super) fn sum_of_squares(
    dev: &CudaDevice,
    tensors: &[(&CudaStorage, usize, usize)],
) -> Result<f64> {
    let stream = dev.cuda_stream();
    let lens: Vec<usize> = tensors.iter().map(|&(_, _, n)| n).collect();
    let pieces = super::squares::pieces(&lens);
    if pieces.is_empty() {
        return Ok(0.0);
    }
    // the device address of each tensor's first value; the guards keep the buffers' events
    // (if any) until the kernel is queued
    let views = tensors
        .iter()
        .map(|&(s, offset, n)| Ok(s.as_cuda_slice::<f32>()?.slice(offset..offset + n)))
        .collect::<Result<Vec<_>>>()?;
    let (starts, guards): (Vec<u64>, Vec<_>) = views.iter().map(|v| v.device_ptr(&stream)).unzip();
    let table: Vec<u64> = pieces
        .iter()
        .flat_map(|&(t, offset, n)| [starts[t] + 4 * offset as u64, n as u64])
        .collect();
    let table = dev.clone_htod(&table)?;
    let n_pieces = pieces.len();
    // SAFETY: the kernel writes every one of the n_pieces partial sums.
    let partial = unsafe { dev.alloc::<f64>(n_pieces) }?;
    let kernel = Kernel::load(dev, "sum_squares_pieces")?;
    let mut b = kernel.builder();
    b.arg(&n_pieces);
    b.arg(&table);
    b.arg(&partial);
    launch(b, super::geometry::sum_squares_cfg(n_pieces))?;
    drop(guards);
    let partial = dev.clone_dtoh(&partial)?;
    Ok(partial.iter().sum())
}

/// The kernel `{base}_bf16` or `{base}_f32`.
fn variant(dev: &CudaDevice, base: &str, bf16: bool) -> Result<Kernel> {
    let suffix = if bf16 { "bf16" } else { "f32" };
    Kernel::load(dev, &format!("{base}_{suffix}"))
}

/// A fresh output of `n` values in f32 or bf16, for the kernels that come in an `_f32` and a
/// `_bf16` variant.
enum Out {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<half::bf16>),
}

impl Out {
    /// `n` values (at least one allocated) for a kernel that writes them all.
    fn alloc(dev: &CudaDevice, n: usize, dtype: candle_core::DType, op: &str) -> Result<Out> {
        Ok(match dtype {
            candle_core::DType::F32 => Out::F32(alloc(dev, n.max(1))?),
            // SAFETY: the kernel that follows writes all n values.
            candle_core::DType::BF16 => Out::Bf16(unsafe { dev.alloc::<half::bf16>(n.max(1)) }?),
            other => candle_core::bail!("{op}: {other:?} values, f32 or bf16 only"),
        })
    }

    fn kernel(&self, dev: &CudaDevice, base: &str) -> Result<Kernel> {
        variant(dev, base, matches!(self, Out::Bf16(_)))
    }

    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        match self {
            Out::F32(o) => b.arg(o),
            Out::Bf16(o) => b.arg(o),
        };
    }

    fn into_storage(self, dev: &CudaDevice) -> CudaStorage {
        match self {
            Out::F32(o) => wrap(o, dev),
            Out::Bf16(o) => CudaStorage::wrap_cuda_slice(o, dev.clone()),
        }
    }
}

/// An f32 or bf16 input from `offset` on, for the same kernels.
enum In<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, half::bf16>),
}

impl<'a> In<'a> {
    fn of(s: &'a CudaStorage, offset: usize, op: &str) -> Result<In<'a>> {
        use candle_core::backend::BackendStorage;
        Ok(match s.dtype() {
            candle_core::DType::F32 => In::F32(s.as_cuda_slice::<f32>()?.slice(offset..)),
            candle_core::DType::BF16 => In::Bf16(s.as_cuda_slice::<half::bf16>()?.slice(offset..)),
            other => candle_core::bail!("{op}: {other:?} values, f32 or bf16 only"),
        })
    }

    fn kernel(&self, dev: &CudaDevice, base: &str) -> Result<Kernel> {
        variant(dev, base, matches!(self, In::Bf16(_)))
    }

    fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
        match self {
            In::F32(v) => b.arg(v),
            In::Bf16(v) => b.arg(v),
        };
    }
}

/// [`super::attention_probs`] forward: `out` (F32 or BF16) probabilities of the f32 scores `s`,
/// one row per query; (scale, causal, queries) and the mask's (key, threshold, keep_scale).
pub(super) fn attention_probs(
    s: (&CudaStorage, &Layout),
    (scale, causal, queries): (f32, bool, usize),
    (key, threshold, keep_scale): (u64, u32, f32),
    out: candle_core::DType,
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = s.0.device();
    let (sv, sr) = rows_view(s.0, s.1, "attention_probs")?;
    let n = sr.rows * sr.cols;
    let p = Out::alloc(dev, n, out, "attention_probs")?;
    if n > 0 {
        let causal = causal as i32;
        let kernel = p.kernel(dev, "fused_attention_probs_fwd")?;
        let mut b = kernel.builder();
        b.arg(&sr.rows).arg(&sr.cols).arg(&sv).arg(&sr.stride);
        b.arg(&scale).arg(&causal).arg(&queries);
        b.arg(&key).arg(&threshold).arg(&keep_scale);
        p.push(&mut b);
        launch(b, row_cfg(sr.rows, sr.cols))?;
    }
    Ok(p.into_storage(dev))
}

/// [`super::attention_probs`] backward: ds (f32) from the scores and the gradient of the
/// probabilities (F32 or BF16), p recomputed and dp = dout times the mask.
pub(super) fn attention_probs_backward(
    s: (&CudaStorage, &Layout),
    dout: (&CudaStorage, &Layout),
    (scale, causal, queries): (f32, bool, usize),
    (key, threshold, keep_scale): (u64, u32, f32),
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = s.0.device();
    let (sv, sr) = rows_view(s.0, s.1, "attention_probs_backward")?;
    let dr = rows_of(dout.1, "attention_probs_backward")?;
    if (sr.rows, sr.cols) != (dr.rows, dr.cols) {
        candle_core::bail!("attention_probs_backward: scores and gradient of different shapes")
    }
    let n = sr.rows * sr.cols;
    if n == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(0)?, dev));
    }
    let dv = In::of(dout.0, dr.offset, "attention_probs_backward")?;
    let ds = alloc(dev, n)?;
    let causal = causal as i32;
    let kernel = dv.kernel(dev, "fused_attention_probs_bwd")?;
    let mut b = kernel.builder();
    b.arg(&sr.rows).arg(&sr.cols).arg(&sv).arg(&sr.stride);
    b.arg(&scale).arg(&causal).arg(&queries);
    b.arg(&key).arg(&threshold).arg(&keep_scale);
    dv.push(&mut b);
    b.arg(&dr.stride).arg(&ds);
    launch(b, row_cfg(sr.rows, sr.cols))?;
    Ok(wrap(ds, dev))
}

/// [`super::split_heads`]: f32 rows (B·L of H·hd values, a row view) → (B, H, L, hd) in `out`
/// (F32 or BF16); `dims` = (B, L, H, hd).
pub(super) fn split_heads(
    x: (&CudaStorage, &Layout),
    dims: (usize, usize, usize, usize),
    out: candle_core::DType,
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = x.0.device();
    let (xv, xr) = rows_view(x.0, x.1, "split_heads")?;
    let (b, l, h, hd) = dims;
    let n = b * l * h * hd;
    if xr.rows * xr.cols != n {
        candle_core::bail!(
            "split_heads: {} values for ({b}, {l}, {h}, {hd})",
            xr.rows * xr.cols
        )
    }
    let y = Out::alloc(dev, n, out, "split_heads")?;
    if n > 0 {
        let kernel = y.kernel(dev, "split_heads")?;
        let mut args = kernel.builder();
        args.arg(&b)
            .arg(&l)
            .arg(&h)
            .arg(&hd)
            .arg(&xv)
            .arg(&xr.stride);
        y.push(&mut args);
        launch(args, elementwise_cfg(n))?;
    }
    Ok(y.into_storage(dev))
}

/// [`super::merge_heads`]: contiguous (B, H, L, hd), F32 or BF16 → f32 (B, L, H·hd); `dims` =
/// (B, L, H, hd).
pub(super) fn merge_heads(
    y: (&CudaStorage, &Layout),
    dims: (usize, usize, usize, usize),
) -> Result<CudaStorage> {
    use candle_core::backend::BackendStorage;
    let dev = y.0.device();
    let (b, l, h, hd) = dims;
    let n = b * l * h * hd;
    if n == 0 {
        return Ok(wrap(dev.alloc_zeros::<f32>(0)?, dev));
    }
    let yv = In::of(y.0, y.1.start_offset(), "merge_heads")?;
    let out = alloc(dev, n)?;
    let kernel = yv.kernel(dev, "merge_heads")?;
    let mut args = kernel.builder();
    args.arg(&b).arg(&l).arg(&h).arg(&hd);
    yv.push(&mut args);
    args.arg(&out);
    launch(args, elementwise_cfg(n))?;
    Ok(wrap(out, dev))
}
