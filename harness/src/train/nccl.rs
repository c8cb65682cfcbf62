//! Gradients summed on the GPUs with NCCL (built with `--features nccl`).
//!
//! The ranks still meet over their control collective ([`TcpRanks`](crate::train::ranks::TcpRanks)
//! for `--nproc`): it exchanges NCCL's unique id when the communicator is made, and it carries the
//! few host values of each step (the loss, a stop, the checkpoint's step). NCCL carries the
//! gradients alone, on the device's own stream, in buckets of at most [`BUCKET`] values, so no
//! gradient goes through host memory. A rank that died is noticed by the control sum that comes
//! before every gradient sum, not by a hanging NCCL call.
//!
//! A rank that dies between that control sum and its NCCL sum would leave the others' NCCL
//! kernels waiting for ever; so each rank waits for its sums with a deadline, [`PATIENCE`], then
//! aborts its communicator and fails, as PyTorch's NCCL watchdog does.
//!
//! NCCL's ring all-reduce gives every rank the same sum, so the weights stay identical; the
//! order of its additions differs from the host collectives' rank order, so NCCL training equals
//! one-rank training within rounding, not bit for bit. One process per GPU: NCCL refuses two
//! ranks on one device.
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape};
use candle_core::{Tensor, Var};

use crate::train::collective::{broadcast_bytes, Collective, CollectiveError};
use crate::{Error, Result};

/// The most gradient values summed by one NCCL call (64 MiB of f32): the flat copy that a sum
/// needs stays small beside the model.
pub const BUCKET: usize = 1 << 24;

/// How long a rank waits for the NCCL sums of one step: every rank has passed the control sum
/// just before, so they normally take milliseconds (the first one also connects the ranks).
pub const PATIENCE: std::time::Duration = std::time::Duration::from_secs(300);

/// The size of NCCL's id, which rank 0 makes and sends to the others.
const ID_BYTES: usize = 128;

/// The ranks of one training, summing gradients with NCCL on their GPUs.
pub struct NcclRanks<C> {
    control: C,
    device: CudaDevice,
    /// NCCL communicators are not safe to use from two threads at once; `None` once aborted
    comm: Mutex<Option<SendComm>>,
}

/// An NCCL communicator may move between threads; [`NcclRanks`] uses it from one at a time.
struct SendComm(Comm);

// SAFETY: NCCL allows a communicator to be used from any thread as long as no two calls on it
// overlap; the Mutex in NcclRanks serializes every use, and the CUDA context is bound before each.
unsafe impl Send for SendComm {}

impl<C: Collective> NcclRanks<C> {
    /// Make this rank's NCCL communicator on `device`: rank 0 creates the id and sends it over
    /// `control` to the others. Every rank of `control` must call this at the same point.
    pub fn new(control: C, device: &Device) -> Result<NcclRanks<C>> {
        let (rank, world) = (control.rank(), control.world());
        let fail = |what: &str, reason: String| {
            Error::Collective(CollectiveError {
                rank,
                world,
                reason: format!(
                    "{what}: {reason} (NCCL_DEBUG=WARN in the environment prints NCCL's own reason)"
                ),
            })
        };
        let Device::Cuda(device) = device else {
            return Err(Error::Usage(format!(
                "NCCL sums gradients on CUDA devices only, and rank {rank} trains on {device:?}: \
                 name CUDA devices in train.devices or --device"
            )));
        };
        let mut id = [0u8; ID_BYTES];
        if rank == 0 {
            let made = Id::new().map_err(|e| fail("creating the NCCL id", format!("{:?}", e.0)))?;
            for (b, c) in id.iter_mut().zip(made.internal()) {
                *b = c.to_ne_bytes()[0];
            }
        }
        broadcast_bytes(&control, &mut id)?;
        let internal = id.map(|b| std::ffi::c_char::from_ne_bytes([b]));
        let stream = device.cuda_stream();
        stream.context().bind_to_thread().w()?;
        let comm = Comm::from_rank(stream, rank, world, Id::uninit(internal))
            .map_err(|e| fail("joining the NCCL communicator", format!("{:?}", e.0)))?;
        Ok(NcclRanks {
            control,
            device: device.clone(),
            comm: Mutex::new(Some(SendComm(comm))),
        })
    }
}

impl<C: Collective> Collective for NcclRanks<C> {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world(&self) -> usize {
        self.control.world()
    }

    /// The few host values of a step go over the control collective.
    fn all_reduce_sum(&self, values: &mut [f32]) -> std::result::Result<(), CollectiveError> {
        self.control.all_reduce_sum(values)
    }

    fn sum_gradients(&self, grads: &mut GradStore, vars: &[Var]) -> Result<()> {
        self.sum_in_buckets(grads, vars, BUCKET)
    }
}

impl<C: Collective> NcclRanks<C> {
    /// [`Collective::sum_gradients`] with at most `limit` values per NCCL call.
    pub fn sum_in_buckets(&self, grads: &mut GradStore, vars: &[Var], limit: usize) -> Result<()> {
        let fail = |reason: String| {
            Error::Collective(CollectiveError {
                rank: self.rank(),
                world: self.world(),
                reason,
            })
        };
        let mut held = self
            .comm
            .lock()
            .map_err(|_| fail("an earlier NCCL sum panicked".into()))?;
        let Some(SendComm(comm)) = held.as_ref() else {
            return Err(fail("NCCL was aborted after an earlier failure".into()));
        };
        let stream = self.device.cuda_stream();
        stream.context().bind_to_thread().w()?;
        for bucket in buckets(vars, limit) {
            let parts = bucket
                .iter()
                .map(|v| match grads.get(v.as_tensor()) {
                    Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
                    None => Tensor::zeros(v.elem_count(), DType::F32, v.device()),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let flat = Tensor::cat(&parts, 0)?;
            let sum = flat.apply_op1_no_bwd(&AllReduceSum { comm })?;
            let mut at = 0;
            for v in bucket {
                let n = v.elem_count();
                let g = sum
                    .narrow(0, at, n)?
                    .reshape(v.shape())?
                    .to_dtype(v.dtype())?;
                grads.insert(v.as_tensor(), g);
                at += n;
            }
        }
        // wait for the sums with a deadline (the step syncs for its gradient norm right after)
        let done = stream.record_event(None).w()?;
        let start = std::time::Instant::now();
        while !done.try_is_complete().w()? {
            if start.elapsed() > PATIENCE {
                // dropping the communicator aborts it, and with it the kernels still waiting
                held.take();
                return Err(fail(format!(
                    "the NCCL gradient sum did not finish within {} s: another rank stopped in \
                     the middle of it (its log says why); NCCL was aborted",
                    PATIENCE.as_secs()
                )));
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        Ok(())
    }
}

/// Consecutive variables, at most `limit` values together (a larger variable alone).
fn buckets(vars: &[Var], limit: usize) -> Vec<&[Var]> {
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0);
    for (i, v) in vars.iter().enumerate() {
        if i > start && size + v.elem_count() > limit {
            out.push(&vars[start..i]);
            (start, size) = (i, 0);
        }
        size += v.elem_count();
    }
    if start < vars.len() {
        out.push(&vars[start..]);
    }
    out
}

/// The sum over the ranks of a contiguous f32 tensor, as a new tensor on the same stream.
struct AllReduceSum<'a> {
    comm: &'a Comm,
}

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL sums CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let Some((from, to)) = l.contiguous_offsets() else {
            candle_core::bail!("nccl-all-reduce-sum: the buffer must be contiguous")
        };
        let dev = s.device();
        let src = s.as_cuda_slice::<f32>()?.slice(from..to);
        // SAFETY: NCCL writes every value of `out` before anything reads it
        let mut out = unsafe { dev.alloc::<f32>(to - from) }?;
        self.comm
            .all_reduce(&src, &mut out, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {:?}", e.0)))?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            l.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_the_order_and_the_limit() -> candle_core::Result<()> {
        let var = |n: usize| Var::zeros(n, DType::F32, &Device::Cpu);
        let vars = [var(3)?, var(4)?, var(10)?, var(2)?, var(1)?, var(5)?];
        let sizes: Vec<Vec<usize>> = buckets(&vars, 7)
            .iter()
            .map(|b| b.iter().map(|v| v.elem_count()).collect())
            .collect();
        // 3+4 fill one; 10 is alone, over the limit; 2+1 then 5 would make 8
        assert_eq!(sizes, vec![vec![3, 4], vec![10], vec![2, 1], vec![5]]);
        assert!(buckets(&[], 7).is_empty());
        Ok(())
    }
}
