//! Data parallelism: the rows of a global batch that one process (a rank) computes. Every rank
//! draws the random values of the whole batch from the same seeded stream and keeps its rows'
//! part (counter-based noise and dropout masks are drawn at their offset), and every loss is
//! normalised by the whole batch, so that the ranks' losses and gradients add up to those of one
//! process training on the whole batch.
use std::ops::Range;

/// Rows `start..start + len` of a batch of `total` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub start: usize,
    pub len: usize,
    pub total: usize,
}

impl Shard {
    /// The whole batch of `total` rows (one process).
    pub fn whole(total: usize) -> Shard {
        Shard {
            start: 0,
            len: total,
            total,
        }
    }

    /// Rank `rank`'s equal share of `total` rows over `world` ranks; None unless `world`
    /// divides `total` (and `rank < world`).
    pub fn of(rank: usize, world: usize, total: usize) -> Option<Shard> {
        (world > 0 && rank < world && total.is_multiple_of(world)).then(|| {
            let len = total / world;
            Shard {
                start: rank * len,
                len,
                total,
            }
        })
    }

    pub fn is_whole(&self) -> bool {
        self.len == self.total
    }

    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }

    /// The same share with every row split into `per_row` rows (e.g. an image into its tokens).
    pub fn times(&self, per_row: usize) -> Shard {
        Shard {
            start: self.start * per_row,
            len: self.len * per_row,
            total: self.total * per_row,
        }
    }

    /// This share's part of values drawn for the whole batch, `per_row` values a row.
    pub fn take<T: Clone>(&self, all: &[T], per_row: usize) -> Vec<T> {
        all[self.start * per_row..(self.start + self.len) * per_row].to_vec()
    }
}

/// The token rows a training loss covers: rows `shard` of the batch's token rows (all of them
/// in one process; a rank's share under data parallelism), and `weight`, how many token rows of
/// the whole batch the loss is a mean over (its masked rows, or all).
#[derive(Debug, Clone, Copy)]
pub struct TokenRows {
    pub shard: Shard,
    pub weight: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_batch_once() {
        let shards: Vec<Shard> = (0..4).filter_map(|r| Shard::of(r, 4, 12)).collect();
        assert_eq!(shards.len(), 4);
        let rows: Vec<usize> = shards.iter().flat_map(|s| s.range()).collect();
        assert_eq!(rows, (0..12).collect::<Vec<_>>());
        assert_eq!(Shard::of(0, 5, 12), None, "5 does not divide 12");
        assert!(Shard::of(0, 1, 12).is_some_and(|s| s.is_whole()));
        assert_eq!(
            shards[1].times(3),
            Shard {
                start: 9,
                len: 9,
                total: 36
            }
        );
        assert_eq!(
            shards[2].take(&(0..24).collect::<Vec<_>>(), 2),
            vec![12, 13, 14, 15, 16, 17]
        );
    }
}
