//! Fused element-wise ops with hand-written backward passes, for the hot paths of training.
//!
//! Each op is one named function (`layer_norm`, `gelu_erf`, `silu`, `modulate`,
//! `attention_softmax`, `bias_add`, `gated_residual`) whose forward pass is a single pass over rows and whose backward pass is
//! one more, instead of the five to ten candle ops (each allocating a full tensor, forward and
//! backward) of the plain composition. The plain composition stays beside each op as
//! `*_plain`: it is what the unit tests compare against (forward values, and gradients from
//! candle's autograd of the composition), and it is what runs where the fused kernel does not:
//! on CUDA (no kernels yet) and for non-f32 tensors.
//!
//! CPU kernels run rayon over blocks of rows; the inner loops are compiled for AVX-512, AVX2 and
//! the baseline, picked at run time (`multiversion`), so one binary runs on any x86-64.
use candle_core::{CpuStorage, Layout, Result, Tensor};

mod attention;
mod bias_add;
mod gated_residual;
mod gelu;
mod layer_norm;
mod math;
mod modulate;
mod silu;

pub use attention::{attention_softmax, attention_softmax_plain};
pub use bias_add::{bias_add, bias_add_plain};
pub use gated_residual::{gated_residual, gated_residual_plain};
pub use gelu::{gelu_erf, gelu_erf_plain};
pub use layer_norm::{layer_norm, layer_norm_plain};
pub use modulate::{modulate, modulate_plain};
pub use silu::{silu, silu_plain};

/// Whether the fused CPU kernel applies: f32 tensors on the CPU.
fn fused_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
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
        let rows: usize = lead.iter().product();
        // walk the leading dims from the inside out; dims of size 1 carry no stride
        let mut stride = None;
        let mut expected = None;
        for (i, &d) in lead.iter().enumerate().rev() {
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
        Some(Rows {
            offset: layout.start_offset(),
            rows,
            cols,
            stride: stride.unwrap_or(cols),
        })
    }

    fn row<'a>(&self, data: &'a [f32], r: usize) -> &'a [f32] {
        let start = self.offset + r * self.stride;
        &data[start..start + self.cols]
    }
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

fn rows_of(layout: &Layout, op: &str) -> Result<Rows> {
    match Rows::of(layout) {
        Some(r) => Ok(r),
        None => candle_core::bail!("{op}: the last dimension must be dense ({layout:?})"),
    }
}

/// Rows handed to one rayon task: about 16k values, at least one row.
fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// Run `f(first_row, out_block)` over blocks of whole rows of a fresh `rows × cols` output.
fn par_rows(rows: usize, cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; rows * cols];
    let per = rows_per_task(cols);
    if cols > 0 {
        out.par_chunks_mut(per * cols)
            .enumerate()
            .for_each(|(i, block)| f(i * per, block));
    }
    out
}

/// The f32 rows of a CPU tensor, handed to `f` (after `as_rows`).
fn with_cpu_rows<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32], Rows) -> Result<R>) -> Result<R> {
    let t = as_rows(t)?;
    let (s, l) = t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*s else {
        candle_core::bail!("{op}: CPU tensors only")
    };
    f(f32_data(s, op)?, rows_of(l, op)?)
}

/// An element-wise op y = f(x) with dx = dy · f'(x): one pass forward, one pass backward.
trait Elementwise: Send + Sync + 'static {
    const NAME: &'static str;
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

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = with_cpu_rows(x, E::NAME, |xs, xr| {
            with_cpu_rows(dy, E::NAME, |dys, dyr| {
                Ok(par_rows(xr.rows, xr.cols, |first, block| {
                    for (i, o) in block.chunks_exact_mut(xr.cols).enumerate() {
                        E::backward(xr.row(xs, first + i), dyr.row(dys, first + i), o);
                    }
                }))
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
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
