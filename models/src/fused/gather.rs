//! Row gather, y[j] = x[index[j]] (an `index_select` along the first dimension), whose backward
//! sums each source row's gradients in the order of j: dx[r] = Σ_{j: index[j] = r} dy[j].
//!
//! Candle's backward of `index_select` is `index_add`, which on CUDA runs one thread per column,
//! each looping over every index in turn: for MAR's decoder gather (20k rows, one mask-token row
//! read by most of them) and the Diffusion Loss timestep embedding (65k rows from ≤1000
//! timesteps) that is thousands of dependent memory round trips per thread on a few warps. Here
//! the host, which built the index, also builds its inverse (for each source row, the j's that
//! read it, ascending) and the backward runs in parallel over source rows and column tiles. On the
//! CPU the sums are in index_add's order, so results are bit-identical to the composition.
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::{f32_data, fused, par_rows};

/// Rows `index` of the 2-D tensor `x`, with the parallel backward above; fused for f32 (CPU, and
/// CUDA with the `cuda` feature), else [`gather_rows_plain`]. Errors when an index is out of range.
pub fn gather_rows(x: &Tensor, index: &[u32]) -> Result<Tensor> {
    let (rows, _) = x.dims2()?;
    if let Some(&bad) = index.iter().find(|&&i| i as usize >= rows) {
        candle_core::bail!("gather_rows: index {bad} out of range for {rows} rows")
    }
    if !fused(x) {
        return gather_rows_plain(x, index);
    }
    x.contiguous()?.apply_op1(GatherRows {
        index: Arc::from(index),
    })
}

/// `index_select` along dimension 0 (the test's reference).
pub fn gather_rows_plain(x: &Tensor, index: &[u32]) -> Result<Tensor> {
    x.index_select(&Tensor::from_slice(index, index.len(), x.device())?, 0)
}

struct GatherRows {
    index: Arc<[u32]>,
}

impl CustomOp1 for GatherRows {
    fn name(&self) -> &'static str {
        "fused-gather-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = l.dims()[1];
        let x = &f32_data(s, self.name())?[l.start_offset()..];
        let out = par_rows(self.index.len(), cols, |first, block| {
            for (k, row) in block.chunks_exact_mut(cols).enumerate() {
                let r = self.index[first + k] as usize;
                row.copy_from_slice(&x[r * cols..(r + 1) * cols]);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((self.index.len(), cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let cols = l.dims()[1];
        let out = super::cuda::gather_rows(&self.index, cols, (s, l))?;
        Ok((out, Shape::from((self.index.len(), cols))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let rows = x.dim(0)?;
        let op = ScatterRowsSum {
            inverse: Arc::new(Inverse::of(&self.index, rows)),
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// For each source row r, the output rows that read it: `order[offsets[r]..offsets[r + 1]]`,
/// ascending (a counting sort of the index).
pub(super) struct Inverse {
    pub(super) offsets: Vec<u32>,
    pub(super) order: Vec<u32>,
}

impl Inverse {
    pub(super) fn of(index: &[u32], rows: usize) -> Inverse {
        let mut offsets = vec![0u32; rows + 1];
        for &r in index {
            offsets[r as usize + 1] += 1;
        }
        for r in 0..rows {
            offsets[r + 1] += offsets[r];
        }
        let mut next = offsets.clone();
        let mut order = vec![0u32; index.len()];
        for (j, &r) in index.iter().enumerate() {
            order[next[r as usize] as usize] = j as u32;
            next[r as usize] += 1;
        }
        Inverse { offsets, order }
    }

    fn rows(&self) -> usize {
        self.offsets.len() - 1
    }

    fn readers(&self, r: usize) -> &[u32] {
        &self.order[self.offsets[r] as usize..self.offsets[r + 1] as usize]
    }
}

/// dx of [`GatherRows`]: dx[r] = Σ dy[j] over the readers j of row r, ascending.
struct ScatterRowsSum {
    inverse: Arc<Inverse>,
}

impl CustomOp1 for ScatterRowsSum {
    fn name(&self) -> &'static str {
        "fused-gather-rows-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = l.dims()[1];
        let dy = &f32_data(s, self.name())?[l.start_offset()..];
        let inv = &self.inverse;
        let out = par_rows(inv.rows(), cols, |first, block| {
            for (k, row) in block.chunks_exact_mut(cols).enumerate() {
                for &j in inv.readers(first + k) {
                    let j = j as usize;
                    for (o, &g) in row.iter_mut().zip(&dy[j * cols..(j + 1) * cols]) {
                        *o += g;
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((inv.rows(), cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let cols = l.dims()[1];
        let inv = &self.inverse;
        let out = super::cuda::scatter_rows_sum(&inv.offsets, &inv.order, cols, (s, l))?;
        Ok((out, Shape::from((inv.rows(), cols))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{grads, randn};
    use super::*;

    #[test]
    fn matches_index_select_bit_for_bit() -> Result<()> {
        // many-to-one (row 2 read 5 times), a row never read (row 4), out-of-order reads
        let x = randn(&[6, 37], 1)?;
        let index = [2u32, 0, 2, 5, 2, 1, 2, 3, 2, 0, 5];
        let seed = randn(&[index.len(), 37], 2)?;
        let (yf, gf) = grads(
            std::slice::from_ref(&x),
            |t| gather_rows(&t[0], &index),
            &seed,
        )?;
        let (yp, gp) = grads(
            std::slice::from_ref(&x),
            |t| gather_rows_plain(&t[0], &index),
            &seed,
        )?;
        assert_eq!(yf.to_vec2::<f32>()?, yp.to_vec2::<f32>()?);
        assert_eq!(gf[0].to_vec2::<f32>()?, gp[0].to_vec2::<f32>()?);
        assert!(gf[0].get(4)?.to_vec1::<f32>()?.iter().all(|&v| v == 0.0));
        assert!(gather_rows(&x, &[6]).is_err(), "index past the last row");
        Ok(())
    }

    #[test]
    fn inverse_lists_readers_in_order() {
        let inv = Inverse::of(&[1, 0, 1, 3], 4);
        assert_eq!(inv.readers(0), &[1]);
        assert_eq!(inv.readers(1), &[0, 2]);
        assert!(inv.readers(2).is_empty());
        assert_eq!(inv.readers(3), &[3]);
    }
}
