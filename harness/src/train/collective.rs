//! Data-parallel training's one collective: the sum of a buffer over the ranks, the same on every
//! rank afterwards. Each rank computes its share of the global batch (see `models::Shard`), the
//! ranks sum their gradients and losses, and every rank then takes the same optimizer step, so
//! their weights stay identical.
//!
//! Implementations: [`Solo`] (one rank: nothing to sum), [`LocalGroup`] (ranks as threads of
//! this process, summing through host memory in rank order, so the result is deterministic),
//! [`TcpRanks`](crate::train::ranks::TcpRanks) (ranks as processes, the same sums over TCP) and,
//! built with `--features nccl`, [`NcclRanks`](crate::train::nccl::NcclRanks) (gradients summed
//! on the GPUs).
use std::sync::{Condvar, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// A failed collective: another rank stopped (an error or a panic) before taking part.
#[derive(Debug, thiserror::Error)]
#[error("data-parallel rank {rank} of {world}: {reason}")]
pub struct CollectiveError {
    pub rank: usize,
    pub world: usize,
    pub reason: String,
}

/// The ranks of one data-parallel training.
pub trait Collective: Sync {
    /// This rank, 0-based; rank 0 writes metrics, checkpoints and evaluations.
    fn rank(&self) -> usize;
    /// How many ranks share the batch.
    fn world(&self) -> usize;
    /// Replaces `values` with their sum over the ranks (every rank passes as many values).
    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError>;

    /// Replaces each variable's gradient with its sum over the ranks (a variable without one
    /// counts as zeros). By default through host memory, as one buffer of [`all_reduce_sum`];
    /// NCCL sums on the GPUs instead.
    ///
    /// [`all_reduce_sum`]: Collective::all_reduce_sum
    fn sum_gradients(&self, grads: &mut GradStore, vars: &[Var]) -> crate::Result<()> {
        let mut flat = Vec::new();
        for v in vars {
            match grads.get(v.as_tensor()) {
                Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, v.elem_count())),
            }
        }
        self.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        for v in vars {
            let n = v.elem_count();
            let g = Tensor::from_slice(&flat[at..at + n], v.shape(), v.device())?
                .to_dtype(v.dtype())?;
            grads.insert(v.as_tensor(), g);
            at += n;
        }
        Ok(())
    }
}

/// Gives every rank rank 0's `bytes` (the other ranks' bytes are overwritten): each byte travels
/// as a float 0..=255, which sums exactly with the other ranks' zeros.
pub fn broadcast_bytes(ranks: &dyn Collective, bytes: &mut [u8]) -> Result<(), CollectiveError> {
    let mut values: Vec<f32> = match ranks.rank() {
        0 => bytes.iter().map(|&b| f32::from(b)).collect(),
        _ => vec![0.0; bytes.len()],
    };
    ranks.all_reduce_sum(&mut values)?;
    for (b, v) in bytes.iter_mut().zip(values) {
        *b = v as u8;
    }
    Ok(())
}

/// One rank alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _values: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn sum_gradients(&self, _grads: &mut GradStore, _vars: &[Var]) -> crate::Result<()> {
        Ok(())
    }
}

/// Ranks as threads of one process; [`LocalGroup::rank`] gives each its handle.
#[derive(Debug)]
pub struct LocalGroup {
    world: usize,
    state: Mutex<Round>,
    done: Condvar,
}

/// The round of sums in progress.
#[derive(Debug, Default)]
struct Round {
    /// which round this is (each sum is one)
    generation: u64,
    /// the values each rank deposited in this round
    slots: Vec<Option<Vec<f32>>>,
    /// the sum of the last completed round
    sum: Vec<f32>,
    /// set when a rank stops: every waiting or later sum fails
    stopped: Option<String>,
}

impl LocalGroup {
    pub fn new(world: usize) -> LocalGroup {
        LocalGroup {
            world,
            state: Mutex::new(Round {
                slots: vec![None; world],
                ..Round::default()
            }),
            done: Condvar::new(),
        }
    }

    /// Rank `rank`'s handle. When it is dropped without [`LocalRank::finish`] (an error or a
    /// panic ended that rank's training), every other rank's next sum fails instead of waiting.
    pub fn rank(&self, rank: usize) -> LocalRank<'_> {
        LocalRank {
            group: self,
            rank,
            finished: false,
        }
    }

    fn stop(&self, rank: usize) {
        let mut round = self.state.lock().unwrap_or_else(|p| p.into_inner());
        round
            .stopped
            .get_or_insert_with(|| format!("rank {rank} stopped"));
        self.done.notify_all();
    }
}

/// One rank of a [`LocalGroup`].
#[derive(Debug)]
pub struct LocalRank<'a> {
    group: &'a LocalGroup,
    rank: usize,
    finished: bool,
}

impl LocalRank<'_> {
    /// This rank's training ended normally.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for LocalRank<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.group.stop(self.rank);
        }
    }
}

impl Collective for LocalRank<'_> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<(), CollectiveError> {
        let fail = |reason: String| CollectiveError {
            rank: self.rank,
            world: self.group.world,
            reason,
        };
        let mut round = self
            .group
            .state
            .lock()
            .map_err(|_| fail("poisoned".into()))?;
        if let Some(why) = &round.stopped {
            return Err(fail(why.clone()));
        }
        let generation = round.generation;
        round.slots[self.rank] = Some(values.to_vec());
        if round.slots.iter().all(Option::is_some) {
            // the last to arrive sums in rank order, so every run adds the same way
            let mut sum = vec![0f32; values.len()];
            for slot in round.slots.iter_mut() {
                let part = slot.take().unwrap_or_default();
                if part.len() != sum.len() {
                    round.stopped = Some("ranks summed buffers of different lengths".into());
                    self.group.done.notify_all();
                    return Err(fail("ranks summed buffers of different lengths".into()));
                }
                for (s, p) in sum.iter_mut().zip(&part) {
                    *s += p;
                }
            }
            round.sum = sum;
            round.generation += 1;
            self.group.done.notify_all();
        } else {
            while round.generation == generation && round.stopped.is_none() {
                round = self
                    .group
                    .done
                    .wait(round)
                    .map_err(|_| fail("poisoned".into()))?;
            }
            if round.generation == generation {
                let why = round.stopped.clone().unwrap_or_default();
                return Err(fail(why));
            }
        }
        values.copy_from_slice(&round.sum);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_the_sum_in_rank_order_and_rank_zeros_bytes_and_a_stopped_rank_fails_the_others() {
        let group = LocalGroup::new(3);
        let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    let group = &group;
                    s.spawn(move || {
                        let rank = group.rank(r);
                        let mut out = Vec::new();
                        for round in 0..50 {
                            let mut v = vec![r as f32 + round as f32, 1.0];
                            rank.all_reduce_sum(&mut v).expect("sum");
                            out.extend(v);
                        }
                        rank.finish();
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect()
        });
        let expected: Vec<f32> = (0..50).flat_map(|k| [3.0 + 3.0 * k as f32, 3.0]).collect();
        for s in &sums {
            assert_eq!(s, &expected);
        }
        // rank 0's bytes reach every rank, whatever the others held
        let group = LocalGroup::new(3);
        let sent: Vec<u8> = (0..=255).rev().collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    let (group, sent) = (&group, &sent);
                    s.spawn(move || {
                        let rank = group.rank(r);
                        let mut bytes = if r == 0 { sent.clone() } else { vec![7; 256] };
                        broadcast_bytes(&rank, &mut bytes).expect("broadcast");
                        rank.finish();
                        bytes
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect()
        });
        for bytes in &got {
            assert_eq!(bytes, &sent);
        }
        let group = LocalGroup::new(2);
        std::thread::scope(|s| {
            let waiting = s.spawn(|| group.rank(0).all_reduce_sum(&mut [1.0]));
            drop(group.rank(1)); // rank 1 ends without finishing
            let err = waiting.join().expect("rank 0").expect_err("rank 1 stopped");
            assert!(err.to_string().contains("rank 1 stopped"), "{err}");
        });
    }
}
