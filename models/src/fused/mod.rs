//! Fused element-wise ops with hand-written backward passes, for the hot paths of training.
//!
//! Each op is one named function (`layer_norm`, `gelu_erf`, `silu`, `modulate`,
//! `attention_probs` (softmax, dropout and the cast of attention's probabilities), `split_heads`
//! and `merge_heads` (attention's head layout, CUDA only), `bias_add`, `gated_residual`, `dropout`, the row gather `gather_rows`, the
//! f32 linear layer `linear` (CPU only), attention's batched products `batched_matmul` (CPU only:
//! the batch over the threads), the bf16 linear layer `linear_bf16` (CUDA only), and the
//! optimizer's `adamw` and clipping's `sum_of_squares` (CUDA only)) whose forward pass is a
//! single pass over rows and whose backward pass is one more, instead of the five to ten candle
//! ops (each allocating a full tensor, forward and backward) of the plain composition. The plain composition stays beside each op as
//! `*_plain`: it is what the unit tests compare against (forward values, and gradients from
//! candle's autograd of the composition), and it is what runs where the fused kernel does not:
//! for non-f32 tensors, and on CUDA when built without the `cuda` feature.
//!
//! CPU kernels run rayon over blocks of rows; the inner loops are compiled for AVX-512, AVX2 and
//! the baseline, picked at run time (`multiversion`), so one binary runs on any x86-64.
//! CUDA kernels (feature `cuda`) are in `kernels.cu`, compiled to PTX by build.rs and launched
//! from each op's `cuda_fwd` (helpers in `cuda.rs`). Each backward pass is itself a custom op
//! without backward (`*Backward`), with a CPU and a CUDA implementation, so that gradients are
//! computed on the device the tensors live on.
use candle_core::{CpuStorage, Layout, Result, Tensor};

mod adamw;
mod attention;
mod bias_add;
#[cfg(feature = "cuda")]
mod cuda;
mod dropout;
#[cfg(test)]
mod emulated;
mod gated_residual;
mod gather;
mod gelu;
mod geometry;
mod heads;
mod layer_norm;
mod linear;
mod linear_f32;
mod math;
mod matmul;
mod modulate;
mod noise;
mod silu;
mod squares;

pub use adamw::{adamw, adamw_plain, AdamWStep};
pub use attention::{
    attention_probs, attention_probs_plain, attention_softmax, attention_softmax_plain,
    AttentionDropout,
};
pub use bias_add::{bias_add, bias_add_plain};
pub use dropout::{dropout, dropout_plain};
pub use gated_residual::{gated_residual, gated_residual_plain};
pub use gather::{gather_rows, gather_rows_plain};
pub use gelu::{gelu_erf, gelu_erf_plain};
pub use heads::{merge_heads, merge_heads_plain, split_heads, split_heads_plain};
pub use layer_norm::{layer_norm, layer_norm_plain};
pub use linear::{linear_bf16, linear_bf16_plain};
pub use linear_f32::{linear, linear_plain};
pub use matmul::{batched_matmul, batched_matmul_plain};
pub use modulate::{modulate, modulate_plain};
pub use noise::{derive_key, gaussian_noise, gaussian_noise_at, shift_key};
pub use silu::{silu, silu_plain};
pub use squares::{sum_of_squares, sum_of_squares_plain};

/// Whether the fused kernels apply: f32 tensors on the CPU, or on CUDA with the `cuda` feature.
fn fused(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && (t.device().is_cpu() || on_cuda(t))
}

/// Whether `t` is on a GPU that this build has kernels for (the `cuda` feature).
fn on_cuda(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda()
}

/// A tensor seen as `rows` rows of `cols` contiguous values, `stride` apart from `offset`: any
/// layout whose last dimension is dense and whose leading dimensions collapse into one row
/// stride (contiguous tensors, and column slices such as one chunk of an adaLN projection).
#[derive(Debug, Clone, Copy)]
struct Rows {
    offset: usize,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl Rows {
    fn of(layout: &Layout) -> Option<Rows> {
        let dims = layout.dims();
        let strides = layout.stride();
        let (&cols, lead) = dims.split_last()?;
        if cols > 1 && strides[dims.len() - 1] != 1 {
            return None;
        }
        Some(Rows {
            offset: layout.start_offset(),
            rows: lead.iter().product(),
            cols,
            stride: collapsed_stride(lead, strides)?.unwrap_or(cols),
        })
    }

    fn row<'a>(&self, data: &'a [f32], r: usize) -> &'a [f32] {
        let start = self.offset + r * self.stride;
        &data[start..start + self.cols]
    }
}

/// The one stride of leading dimensions `dims` (with their `strides`, extra trailing strides
/// ignored) seen as a single dimension: `None` when they do not collapse into one,
/// `Some(None)` when every one has size 1 (no stride to speak of).
fn collapsed_stride(dims: &[usize], strides: &[usize]) -> Option<Option<usize>> {
    // walk the dims from the inside out; dims of size 1 carry no stride
    let mut stride = None;
    let mut expected = None;
    for (i, &d) in dims.iter().enumerate().rev() {
        if d == 1 {
            continue;
        }
        match expected {
            None => {
                stride = Some(strides[i]);
                expected = Some(strides[i] * d);
            }
            Some(e) if strides[i] == e => expected = Some(e * d),
            Some(_) => return None,
        }
    }
    Some(stride)
}

/// The shape of `l` with its last dimension `n` (a linear layer's output of `n` features).
fn out_shape(l: &Layout, n: usize) -> candle_core::Shape {
    let mut d = l.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = n;
    }
    candle_core::Shape::from(d)
}

/// The tensor itself when its layout is a [`Rows`] view, else a contiguous copy.
fn as_rows(t: &Tensor) -> Result<Tensor> {
    if Rows::of(t.layout()).is_some() {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

fn f32_data<'a>(s: &'a CpuStorage, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        other => candle_core::bail!(
            "{op}: f32 only, got {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

/// The CPU side of a CUDA-only op: on the CPU its composition runs instead, so this is reached
/// only by calling the op itself on CPU tensors.
fn cuda_only(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{op} runs on CUDA only; on the CPU its composition runs in its place"
    ))
}

fn rows_of(layout: &Layout, op: &str) -> Result<Rows> {
    match Rows::of(layout) {
        Some(r) => Ok(r),
        None => candle_core::bail!("{op}: the last dimension must be dense ({layout:?})"),
    }
}

/// The shape (2, …l's shape): two results of l's shape one after the other, as backward ops with
/// two outputs return them (split with `Tensor::get`).
fn stacked2(l: &Layout) -> candle_core::Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    candle_core::Shape::from(dims)
}

/// Rows handed to one rayon task: about 16k values, at least one row.
fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// Outputs up to this many values are computed on the calling thread: handing a small op to the
/// rayon pool (waking a worker, waiting for it) costs more than the op (sampling runs ~60 ops on
/// ~128 rows per diffusion step).
const SEQUENTIAL_MAX: usize = 1 << 16;

/// Run `f(first_row, out_block)` over blocks of whole rows of a fresh `rows × cols` output.
fn par_rows(rows: usize, cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    if cols == 0 {
        // nothing to compute (and no blocks of width 0)
        return Vec::new();
    }
    let per = rows_per_task(cols);
    par_fill(rows * cols, per * cols, |first, block| {
        f(first / cols, block)
    })
}

/// [`par_rows`] for ops with two outputs of one shape, returned stacked (`[a; b]`):
/// `f(row, a_row, b_row)` fills row `row` of both.
fn par_rows2(
    rows: usize,
    cols: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let n = rows * cols;
    if cols == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(2 * n);
    let (a, b) = out.spare_capacity_mut()[..2 * n].split_at_mut(n);
    let per = rows_per_task(cols);
    a.par_chunks_mut(per * cols)
        .zip(b.par_chunks_mut(per * cols))
        .enumerate()
        .for_each(|(i, (ab, bb))| {
            let (ab, bb) = (zeroed(ab), zeroed(bb));
            let pairs = ab.chunks_exact_mut(cols).zip(bb.chunks_exact_mut(cols));
            for (k, (ar, br)) in pairs.enumerate() {
                f(i * per + k, ar, br);
            }
        });
    // SAFETY: the blocks above covered all 2n values, each zeroed before `f` wrote it
    unsafe { out.set_len(2 * n) };
    out
}

/// A fresh output of `n` values filled by `f(first_value, block)` over blocks of `block` values
/// on the pool (outputs up to [`SEQUENTIAL_MAX`] on the calling thread). Each task zeroes its own
/// block before `f` writes it, in its core's cache: a whole output zeroed first by one thread
/// (`vec![0; n]`) left the other cores idle for a pass over memory per op.
fn par_fill(n: usize, block: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    if n <= SEQUENTIAL_MAX || block == 0 {
        let mut out = vec![0f32; n];
        f(0, &mut out);
        return out;
    }
    let mut out = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(block)
        .enumerate()
        .for_each(|(i, b)| f(i * block, zeroed(b)));
    // SAFETY: the blocks above covered all n values, each zeroed before `f` wrote it
    unsafe { out.set_len(n) };
    out
}

/// The (dW, db) of a linear layer's weight-gradient op that returns [dW | db] in one buffer
/// (out·k values, then out with `bias`).
fn weight_and_bias_grads(
    g: &Tensor,
    (out, k): (usize, usize),
    bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let dw = g.narrow(0, 0, out * k)?.reshape((out, k))?;
    let db = bias.then(|| g.narrow(0, out * k, out)).transpose()?;
    Ok((dw, db))
}

/// `rows` copies of `row`, one after the other, written straight into the fresh output (no zero
/// fill first: it was the largest memset of a training step, under every linear layer's bias),
/// on the pool like [`par_fill`].
fn repeat_rows(row: &[f32], rows: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let (cols, n) = (row.len(), row.len() * rows);
    let mut out = Vec::with_capacity(n);
    let fill = |block: &mut [std::mem::MaybeUninit<f32>]| {
        for r in block.chunks_exact_mut(cols.max(1)) {
            for (o, &v) in r.iter_mut().zip(row) {
                o.write(v);
            }
        }
    };
    let spare = &mut out.spare_capacity_mut()[..n];
    if n <= SEQUENTIAL_MAX {
        fill(spare);
    } else {
        spare
            .par_chunks_mut(rows_per_task(cols) * cols)
            .for_each(fill);
    }
    // SAFETY: the blocks are whole rows (n is a multiple of cols), and every value was written
    unsafe { out.set_len(n) };
    out
}

/// `block` set to zeros, as initialised values.
fn zeroed(block: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    block.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every element was just written, and MaybeUninit<f32> has f32's layout
    unsafe { &mut *(block as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// An element-wise op y = f(x) with dx = dy · f'(x): one pass forward, one pass backward.
trait Elementwise: Send + Sync + 'static {
    const NAME: &'static str;
    /// The kernels of kernels.cu computing y and dx.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    const CUDA_FWD: &'static str;
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    const CUDA_BWD: &'static str;
    /// y for a block of rows of x.
    fn forward(x: &[f32], y: &mut [f32]);
    /// dx for a block of rows of x and dy.
    fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]);
}

struct Unary<E>(std::marker::PhantomData<E>);

impl<E: Elementwise> Unary<E> {
    fn apply(x: &Tensor) -> Result<Tensor> {
        as_rows(x)?.apply_op1(Unary::<E>(std::marker::PhantomData))
    }
}

impl<E: Elementwise> candle_core::CustomOp1 for Unary<E> {
    fn name(&self) -> &'static str {
        E::NAME
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, candle_core::Shape)> {
        let xs = f32_data(x, E::NAME)?;
        let xr = rows_of(xl, E::NAME)?;
        let out = par_rows(xr.rows, xr.cols, |first, block| {
            for (i, o) in block.chunks_exact_mut(xr.cols).enumerate() {
                E::forward(xr.row(xs, first + i), o);
            }
        });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let y = cuda::elementwise(E::CUDA_FWD, x.device(), &[(x, xl)], 1)?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = UnaryBackward::<E>(std::marker::PhantomData);
        Ok(Some(as_rows(x)?.apply_op2_no_bwd(&as_rows(dy)?, &op)?))
    }
}

/// dx of [`Unary`] from (x, dy).
struct UnaryBackward<E>(std::marker::PhantomData<E>);

impl<E: Elementwise> candle_core::CustomOp2 for UnaryBackward<E> {
    fn name(&self) -> &'static str {
        E::NAME
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        let (xs, xr) = (f32_data(x, E::NAME)?, rows_of(xl, E::NAME)?);
        let (dys, dyr) = (f32_data(dy, E::NAME)?, rows_of(dyl, E::NAME)?);
        let dx = par_rows(xr.rows, xr.cols, |first, block| {
            for (i, o) in block.chunks_exact_mut(xr.cols).enumerate() {
                E::backward(xr.row(xs, first + i), dyr.row(dys, first + i), o);
            }
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let dx = cuda::elementwise(E::CUDA_BWD, x.device(), &[(x, xl), (dy, dyl)], 1)?;
        Ok((dx, xl.shape().clone()))
    }
}

#[cfg(test)]
mod test_util {
    use candle_core::{Device, Result, Tensor, Var};

    /// Largest |a − b| over all elements.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Gradients of Σ w·f(inputs) for fixed random weights w, for each input.
    pub fn grads(
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        seed_weights: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts)?;
        let loss = (y.broadcast_mul(seed_weights)?).sum_all()?;
        let g = loss.backward()?;
        let out = ts
            .iter()
            .map(|t| g.get(t).cloned().expect("every input receives a gradient"))
            .collect();
        Ok((y, out))
    }

    pub fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = crate::Rng::new(seed);
        rng.normal_tensor(shape, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn repeat_rows_on_the_pool_and_on_the_calling_thread() {
        let row: Vec<f32> = (0..24).map(|i| i as f32 - 3.5).collect();
        for rows in [0, 3, 5000] {
            let out = repeat_rows(&row, rows);
            assert_eq!(out.len(), rows * 24);
            assert!(
                out.chunks_exact(24).all(|r| r == row.as_slice()),
                "{rows} rows"
            );
        }
        assert!(repeat_rows(&[], 7).is_empty());
    }

    #[test]
    fn rows_views() -> Result<()> {
        let t = Tensor::zeros((4, 6, 9), candle_core::DType::F32, &Device::Cpu)?;
        let r = Rows::of(t.layout()).expect("contiguous");
        assert_eq!((r.rows, r.cols, r.stride, r.offset), (24, 9, 9, 0));
        let chunk = t.narrow(2, 3, 3)?;
        let r = Rows::of(chunk.layout()).expect("column slice");
        assert_eq!((r.rows, r.cols, r.stride, r.offset), (24, 3, 9, 3));
        assert!(Rows::of(t.transpose(1, 2)?.layout()).is_none());
        assert!(Rows::of(t.narrow(1, 0, 2)?.layout()).is_none());
        Ok(())
    }
}

/// Each fused op on CUDA (the kernels of kernels.cu) against the same op on the CPU, forward
/// values and gradients, on the input layouts the CPU tests use (column slices included). They
/// need a GPU: without one (`Device::new_cuda(0)` fails) each test says so and passes.
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::test_util::{grads, max_diff, randn};
    use super::*;
    use candle_core::Device;

    /// Forward and gradients of `f` on the GPU against the CPU, to within `tol`.
    fn compare(
        name: &str,
        inputs: &[Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f32,
    ) -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("{name}: no CUDA device, skipped");
            return Ok(());
        };
        let seed = randn(f(inputs)?.dims(), 99)?;
        let (yc, gc) = grads(inputs, &f, &seed)?;
        let on_gpu = inputs
            .iter()
            .map(|t| t.to_device(&gpu))
            .collect::<Result<Vec<_>>>()?;
        let (yg, gg) = grads(&on_gpu, &f, &seed.to_device(&gpu)?)?;
        assert!(yg.device().is_cuda(), "{name}: the result left the GPU");
        let d = max_diff(&yc, &yg.to_device(&Device::Cpu)?)?;
        assert!(d < tol, "{name}: forward differs by {d}");
        for (i, (a, b)) in gc.iter().zip(&gg).enumerate() {
            let d = max_diff(a, &b.to_device(&Device::Cpu)?)?;
            assert!(d < tol, "{name}: gradient of input {i} differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn element_wise_ops() -> Result<()> {
        let x = (randn(&[6, 33], 1)? * 3.0)?;
        compare("gelu", std::slice::from_ref(&x), |t| gelu_erf(&t[0]), 1e-5)?;
        compare("silu", std::slice::from_ref(&x), |t| silu(&t[0]), 1e-5)?;
        let x = randn(&[9, 16], 2)?;
        let m = randn(&[9, 32], 3)?;
        compare(
            "modulate on adaLN chunks",
            &[x.clone(), m],
            |t| {
                let c = t[1].chunk(2, 1)?;
                modulate(&t[0], &c[0], &c[1])
            },
            1e-5,
        )?;
        let (h, m) = (randn(&[9, 16], 4)?, randn(&[9, 48], 5)?);
        compare(
            "gated residual with a sliced gate",
            &[x, h, m],
            |t| gated_residual(&t[0], &t[1], &t[2].narrow(1, 32, 16)?),
            1e-5,
        )?;
        let (x, b) = (randn(&[3, 700, 24], 6)?, randn(&[24], 7)?);
        compare("bias add", &[x, b], |t| bias_add(&t[0], &t[1]), 1e-3)
    }

    #[test]
    fn layer_norm_with_and_without_affine() -> Result<()> {
        for (rows, cols) in [(21, 40), (300, 1030)] {
            // a column slice of a wider tensor
            let wide = (randn(&[rows, cols + 8], 1)? * 3.0)?.affine(1.0, 0.5)?;
            let (w, b) = (randn(&[cols], 2)?, randn(&[cols], 3)?);
            compare(
                &format!("layer norm {rows}x{cols}"),
                std::slice::from_ref(&wide),
                |t| layer_norm(&t[0].narrow(1, 4, cols)?, None, None, 1e-6),
                2e-4,
            )?;
            compare(
                &format!("affine layer norm {rows}x{cols}"),
                &[wide.clone(), w, b],
                |t| layer_norm(&t[0].narrow(1, 4, cols)?, Some(&t[1]), Some(&t[2]), 1e-6),
                2e-3,
            )?;
        }
        Ok(())
    }

    #[test]
    fn gaussian_noise_is_the_cpus() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("gaussian noise: no CUDA device, skipped");
            return Ok(());
        };
        let shape = candle_core::Shape::from((1001, 33));
        let g = gaussian_noise(42, &shape, &gpu)?;
        assert!(g.device().is_cuda(), "noise: not generated on the GPU");
        let c = gaussian_noise(42, &shape, &Device::Cpu)?;
        let d = max_diff(&c, &g.to_device(&Device::Cpu)?)?;
        assert!(d < 1e-5, "noise: GPU values differ from the CPU's by {d}");
        Ok(())
    }

    #[test]
    fn dropout_masks_match_the_cpus() -> Result<()> {
        let x = randn(&[37, 130], 1)?;
        compare(
            "dropout",
            std::slice::from_ref(&x),
            |t| dropout(&t[0], 0.1, 9),
            1e-6,
        )
    }

    /// Host-to-device copies go through candle's page-locked staging ring (vendor/candle-core,
    /// cuda_backend/staging.rs): 90 MB of uploads of mixed sizes wrap its 64 MB, with the copies
    /// still queued behind slow kernels, and each tensor must arrive as written.
    #[test]
    fn uploads_through_the_staging_ring_arrive_intact() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("uploads: no CUDA device, skipped");
            return Ok(());
        };
        let big = randn(&[2048, 2048], 1)?.to_device(&gpu)?;
        let mut sent = Vec::new();
        let mut total = 0usize;
        for k in 0..400usize {
            // queue work ahead of the copies so that they are still in flight when the ring wraps
            if k % 50 == 0 {
                let _ = big.matmul(&big)?;
            }
            let n = 1 + (k * 7919) % 120_000;
            let data: Vec<f32> = (0..n).map(|i| (i as f32) * 0.5 + k as f32).collect();
            total += 4 * n;
            sent.push((Tensor::from_vec(data.clone(), n, &gpu)?, data));
        }
        assert!(total > 80 << 20, "only {total} bytes uploaded");
        for (k, (t, data)) in sent.iter().enumerate() {
            assert_eq!(&t.to_vec1::<f32>()?, data, "upload {k} differs");
        }
        Ok(())
    }

    /// The bf16 linear layer on CUDA (casts, cuBLAS GemmEx with f32 results) against the
    /// composition on the CPU (bf16 results): within bf16's relative precision.
    #[test]
    fn linear_bf16_against_the_composition() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("linear bf16: no CUDA device, skipped");
            return Ok(());
        };
        for bias in [true, false] {
            let (x, w, b) = (
                randn(&[3, 70, 96], 1)?,
                randn(&[40, 96], 2)?,
                randn(&[40], 3)?,
            );
            // without a bias, only x and W are inputs (each input must receive a gradient)
            let f = |t: &[Tensor]| linear_bf16(&t[0], &t[1], t.get(2));
            let seed = randn(&[3, 70, 40], 4)?;
            let inputs = if bias { vec![x, w, b] } else { vec![x, w] };
            let (yc, gc) = grads(&inputs, f, &seed)?;
            let on_gpu = inputs
                .iter()
                .map(|t| t.to_device(&gpu))
                .collect::<Result<Vec<_>>>()?;
            let (yg, gg) = grads(&on_gpu, f, &seed.to_device(&gpu)?)?;
            let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
                let scale = a
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?
                    .max(1e-6);
                Ok(max_diff(a, &b.to_device(&Device::Cpu)?)? / scale)
            };
            let r = rel(&yc, &yg)?;
            assert!(
                r < 1e-2,
                "linear bf16 (bias {bias}): forward differs by {r} of the largest"
            );
            for (i, (a, g)) in gc.iter().zip(&gg).enumerate() {
                let r = rel(a, g)?;
                assert!(
                    r < 2e-2,
                    "linear bf16 (bias {bias}): gradient {i} differs by {r}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gather_rows_many_to_one() -> Result<()> {
        // 3000 readers of 70 rows, one of them read by half (MAR's mask token), 3 rows unread
        let index: Vec<u32> = (0..3000u32)
            .map(|j| if j % 2 == 0 { 7 } else { (j * 31) % 67 })
            .collect();
        let x = randn(&[70, 130], 1)?;
        compare(
            "gather rows",
            std::slice::from_ref(&x),
            |t| gather_rows(&t[0], &index),
            1e-4,
        )
    }

    #[test]
    fn attention_heads_split_and_merge() -> Result<()> {
        let x = randn(&[2, 9, 3 * 64 + 8], 1)?;
        let y = randn(&[2, 3, 9, 64], 2)?;
        for (dtype, tol) in [
            (candle_core::DType::F32, 0.0),
            (candle_core::DType::BF16, 1e-2),
        ] {
            compare(
                &format!("split heads of a column slice, {dtype:?}"),
                std::slice::from_ref(&x),
                |t| {
                    split_heads(&t[0].narrow(2, 8, 3 * 64)?, 3, dtype)?
                        .to_dtype(candle_core::DType::F32)
                },
                tol + 1e-7,
            )?;
            compare(
                &format!("merge heads, {dtype:?}"),
                std::slice::from_ref(&y),
                |t| merge_heads(&t[0].to_dtype(dtype)?),
                tol + 1e-7,
            )?;
        }
        Ok(())
    }

    /// Clipping's norm from the multi-tensor kernel against the composition on the CPU: many
    /// tensors, one of several pieces, one empty.
    #[test]
    fn sum_of_squares_of_many_tensors() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("sum of squares: no CUDA device, skipped");
            return Ok(());
        };
        let tensors = [3usize, 200_001, 0, 4096, 1]
            .iter()
            .enumerate()
            .map(|(k, &n)| randn(&[n], k as u64 + 1))
            .collect::<Result<Vec<_>>>()?;
        let want = sum_of_squares_plain(&tensors)?;
        let on_gpu = tensors
            .iter()
            .map(|t| t.to_device(&gpu))
            .collect::<Result<Vec<_>>>()?;
        let got = sum_of_squares(&on_gpu)?;
        assert!(
            (got - want).abs() <= 1e-5 * want,
            "sum of squares: GPU {got}, CPU {want}"
        );
        Ok(())
    }

    #[test]
    fn adamw_update() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("adamw: no CUDA device, skipped");
            return Ok(());
        };
        let theta = randn(&[300, 70], 1)?;
        let moments = Tensor::stack(&[randn(&[300, 70], 2)?, randn(&[300, 70], 3)?.sqr()?], 0)?;
        let g = randn(&[300, 70], 4)?;
        // with a clipping factor, as the training loop's clipped steps
        let s = AdamWStep::new(0.9, 0.95, 1e-8, 1e-3, 0.02, 3).with_grad_scale(0.4);
        let (tc, mc) = adamw(&theta, &moments, &g, &s)?;
        let on = |t: &Tensor| t.to_device(&gpu);
        let (tg, mg) = adamw(&on(&theta)?, &on(&moments)?, &on(&g)?, &s)?;
        assert!(tg.device().is_cuda(), "adamw: the result left the GPU");
        let d = max_diff(&tc, &tg.to_device(&Device::Cpu)?)?;
        assert!(d < 1e-6, "adamw: θ differs by {d}");
        let d = max_diff(&mc, &mg.to_device(&Device::Cpu)?)?;
        assert!(d < 1e-5, "adamw: moments differ by {d}");
        Ok(())
    }

    #[test]
    fn attention_softmax_with_and_without_the_causal_mask() -> Result<()> {
        for dims in [[2, 3, 5, 7], [2, 4, 64, 300]] {
            let s = (randn(&dims, 1)? * 4.0)?;
            for causal in [false, true] {
                compare(
                    &format!("attention softmax {dims:?} causal={causal}"),
                    std::slice::from_ref(&s),
                    |t| attention_softmax(&t[0], 0.3, causal),
                    1e-5,
                )?;
                // with dropout, in f32 and in bf16 (as a bf16 product takes them)
                let d = Some(AttentionDropout { p: 0.1, key: 7 });
                for (dtype, tol) in [
                    (candle_core::DType::F32, 1e-5),
                    (candle_core::DType::BF16, 1e-2),
                ] {
                    compare(
                        &format!("attention probs {dims:?} causal={causal} {dtype:?}"),
                        std::slice::from_ref(&s),
                        |t| {
                            attention_probs(&t[0], 0.3, causal, d, dtype)?
                                .to_dtype(candle_core::DType::F32)
                        },
                        tol,
                    )?;
                }
            }
        }
        Ok(())
    }
}
