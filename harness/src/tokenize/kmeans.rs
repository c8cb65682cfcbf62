//! k-means codebook over patch vectors: the discrete (vector-quantized) twin of the patch tokenizer.

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// k-means++ seeding runs on a random subsample of at most this many points (or k, if larger).
pub const INIT_SUBSAMPLE: usize = 20_000;
/// Points per block in the chunked reductions (fixed, so sums do not depend on thread count).
const BLOCK: usize = 1024;

/// A fitted codebook: `centroids` is k×dim row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct KMeans {
    pub centroids: Vec<f32>,
    pub k: usize,
    pub dim: usize,
}

/// Why k-means could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KMeansError {
    #[error("k-means: k must be positive")]
    ZeroK,
    #[error("k-means: dimension must be positive")]
    ZeroDim,
    #[error("k-means: need at least k = {k} points, got {n}")]
    TooFewPoints { n: usize, k: usize },
    #[error("k-means: expected {expected} values (n × dim), found {found}")]
    DimensionMismatch { expected: usize, found: usize },
    #[error("k-means: data contains non-finite values")]
    NonFinite,
    #[error("k-means: code {code} out of range for k = {k}")]
    CodeOutOfRange { code: u32, k: usize },
}

/// Squared Euclidean distance, eight independent accumulators so the loop vectorizes.
#[inline]
fn dist2(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() - a.len() % 8);
    let (b8, b_rest) = b.split_at(a8.len().min(b.len()));
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    let mut total: f32 = acc.iter().sum();
    for (x, y) in a_rest.iter().zip(b_rest) {
        let d = x - y;
        total += d * d;
    }
    total
}

/// Index and squared distance of the centroid nearest to `x` (first index on ties).
#[inline]
fn nearest(x: &[f32], centroids: &[f32], dim: usize) -> (u32, f32) {
    let mut best = (0u32, f32::INFINITY);
    for (j, c) in centroids.chunks_exact(dim).enumerate() {
        let d = dist2(x, c);
        if d < best.1 {
            best = (j as u32, d);
        }
    }
    best
}

fn check_data(data: &[f32], n: usize, dim: usize) -> Result<(), KMeansError> {
    if dim == 0 {
        return Err(KMeansError::ZeroDim);
    }
    let expected = n.saturating_mul(dim);
    if data.len() != expected {
        return Err(KMeansError::DimensionMismatch {
            expected,
            found: data.len(),
        });
    }
    if !data.par_iter().all(|v| v.is_finite()) {
        return Err(KMeansError::NonFinite);
    }
    Ok(())
}

/// Fits k centroids to `n` row-major points of length `dim`: k-means++ seeding (Arthur &
/// Vassilvitskii 2007) on a subsample of at most max([`INIT_SUBSAMPLE`], k) points, then up to
/// `iters` Lloyd iterations with parallel assignment. Stops early when no assignment changes; a cluster
/// that becomes empty is re-seeded with the farthest point not alone in its cluster (as
/// scikit-learn does). Deterministic given `seed`, for any thread count.
pub fn fit(
    data: &[f32],
    n: usize,
    dim: usize,
    k: usize,
    iters: usize,
    seed: u64,
) -> Result<KMeans, KMeansError> {
    if k == 0 {
        return Err(KMeansError::ZeroK);
    }
    check_data(data, n, dim)?;
    if n < k {
        return Err(KMeansError::TooFewPoints { n, k });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut centroids = init_plus_plus(data, n, dim, k, &mut rng);

    let mut previous: Vec<u32> = Vec::new();
    for _ in 0..iters {
        let (codes, dists): (Vec<u32>, Vec<f32>) = data
            .par_chunks_exact(dim)
            .map(|x| nearest(x, &centroids, dim))
            .unzip();
        if codes == previous {
            break;
        }
        centroids = update(data, dim, k, &codes, &dists);
        previous = codes;
    }
    Ok(KMeans { centroids, k, dim })
}

/// k-means++: each new centre drawn with probability ∝ squared distance to the nearest chosen one.
fn init_plus_plus(data: &[f32], n: usize, dim: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    // Never fewer candidates than centres, so k distinct points can always be chosen.
    let pool_size = INIT_SUBSAMPLE.max(k);
    let pool: Vec<usize> = if n > pool_size {
        let mut idx = sample(rng, n, pool_size).into_vec();
        idx.sort_unstable();
        idx
    } else {
        (0..n).collect()
    };
    let m = pool.len();
    let point = |i: usize| &data[pool[i] * dim..(pool[i] + 1) * dim];

    let mut centroids = Vec::with_capacity(k * dim);
    let mut chosen = vec![false; m];
    let first = rng.random_range(0..m);
    chosen[first] = true;
    centroids.extend_from_slice(point(first));
    let mut d2: Vec<f64> = (0..m)
        .into_par_iter()
        .map(|i| dist2(point(i), point(first)) as f64)
        .collect();

    for _ in 1..k {
        // Sequential sum so the draw does not depend on the thread count.
        let total: f64 = d2.iter().sum();
        let next = if total > 0.0 {
            let target = rng.random::<f64>() * total;
            let mut acc = 0f64;
            let mut pick = None;
            for (i, &w) in d2.iter().enumerate() {
                acc += w;
                if acc > target && w > 0.0 {
                    pick = Some(i);
                    break;
                }
            }
            // Rounding can leave `target` past the last positive weight: take that one.
            pick.or_else(|| d2.iter().rposition(|&w| w > 0.0))
        } else {
            None
        };
        // All remaining points coincide with a centre: take any point not chosen yet.
        let next = match next {
            Some(i) => i,
            None => {
                let free: Vec<usize> = (0..m).filter(|&i| !chosen[i]).collect();
                if free.is_empty() {
                    rng.random_range(0..m)
                } else {
                    free[rng.random_range(0..free.len())]
                }
            }
        };
        chosen[next] = true;
        let c = point(next);
        centroids.extend_from_slice(c);
        d2.par_iter_mut().enumerate().for_each(|(i, d)| {
            *d = d.min(dist2(point(i), c) as f64);
        });
    }
    centroids
}

/// New centroids as member means (f64 sums, per cluster in point order, so deterministic); empty
/// clusters take the farthest points, which leave their old clusters.
fn update(data: &[f32], dim: usize, k: usize, codes: &[u32], dists: &[f32]) -> Vec<f32> {
    // Members of each cluster, in point order (counting sort).
    let mut counts = vec![0usize; k];
    for &c in codes {
        counts[c as usize] += 1;
    }
    let mut starts = vec![0usize; k + 1];
    for j in 0..k {
        starts[j + 1] = starts[j] + counts[j];
    }
    let mut fill = starts.clone();
    let mut members = vec![0usize; codes.len()];
    for (i, &c) in codes.iter().enumerate() {
        members[fill[c as usize]] = i;
        fill[c as usize] += 1;
    }
    let mut sums: Vec<Vec<f64>> = (0..k)
        .into_par_iter()
        .map(|j| {
            let mut acc = vec![0f64; dim];
            for &i in &members[starts[j]..starts[j + 1]] {
                for (a, &v) in acc.iter_mut().zip(&data[i * dim..(i + 1) * dim]) {
                    *a += v as f64;
                }
            }
            acc
        })
        .collect();

    let empty: Vec<usize> = (0..k).filter(|&j| counts[j] == 0).collect();
    if !empty.is_empty() {
        let mut order: Vec<usize> = (0..codes.len()).collect();
        order.sort_unstable_by(|&a, &b| dists[b].total_cmp(&dists[a]).then(a.cmp(&b)));
        let mut candidates = order.into_iter();
        for j in empty {
            // Skip points whose departure would empty their own cluster.
            let Some(i) = candidates.find(|&i| counts[codes[i] as usize] > 1) else {
                break;
            };
            let old = codes[i] as usize;
            let x = &data[i * dim..(i + 1) * dim];
            for (s, &v) in sums[old].iter_mut().zip(x) {
                *s -= v as f64;
            }
            counts[old] -= 1;
            sums[j] = x.iter().map(|&v| v as f64).collect();
            counts[j] = 1;
        }
    }

    let mut centroids = Vec::with_capacity(k * dim);
    for (sum, &count) in sums.iter().zip(&counts) {
        let inv = 1.0 / count.max(1) as f64;
        centroids.extend(sum.iter().map(|s| (s * inv) as f32));
    }
    centroids
}

impl KMeans {
    /// Nearest-centroid code of each of the first `n` points (parallel). Like [`Self::try_assign`]
    /// without the checks: extra values, or a partial trailing point, are ignored.
    pub fn assign(&self, data: &[f32], n: usize) -> Vec<u32> {
        if self.dim == 0 {
            return Vec::new();
        }
        data.par_chunks_exact(self.dim)
            .take(n)
            .map(|x| nearest(x, &self.centroids, self.dim).0)
            .collect()
    }

    /// [`Self::assign`] with the shape and finiteness checks of [`fit`].
    pub fn try_assign(&self, data: &[f32], n: usize) -> Result<Vec<u32>, KMeansError> {
        check_data(data, n, self.dim)?;
        Ok(self.assign(data, n))
    }

    /// The centroid of each code, concatenated (codes.len() × dim). Codes ≥ k decode to zeros;
    /// [`Self::try_decode`] rejects them instead.
    pub fn decode(&self, codes: &[u32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(codes.len() * self.dim);
        for &c in codes {
            match self.centroid(c) {
                Some(row) => out.extend_from_slice(row),
                None => out.extend(std::iter::repeat_n(0.0, self.dim)),
            }
        }
        out
    }

    /// [`Self::decode`] that fails on a code outside 0..k.
    pub fn try_decode(&self, codes: &[u32]) -> Result<Vec<f32>, KMeansError> {
        if let Some(&code) = codes.iter().find(|&&c| c as usize >= self.k) {
            return Err(KMeansError::CodeOutOfRange { code, k: self.k });
        }
        Ok(self.decode(codes))
    }

    /// Centroid `code`, if it exists.
    pub fn centroid(&self, code: u32) -> Option<&[f32]> {
        let c = code as usize;
        if c >= self.k {
            return None;
        }
        self.centroids.get(c * self.dim..(c + 1) * self.dim)
    }

    /// Sum over the first `n` points of the squared distance to the nearest centroid (f64,
    /// fixed-size blocks summed in order).
    pub fn inertia(&self, data: &[f32], n: usize) -> f64 {
        if self.dim == 0 {
            return 0.0;
        }
        let len = n.saturating_mul(self.dim).min(data.len());
        let len = len - len % self.dim;
        let partials: Vec<f64> = data[..len]
            .par_chunks(BLOCK * self.dim)
            .map(|blk| {
                blk.chunks_exact(self.dim)
                    .map(|x| nearest(x, &self.centroids, self.dim).1 as f64)
                    .sum::<f64>()
            })
            .collect();
        partials.iter().sum()
    }

    /// Codebook usage of `codes`: number of distinct codes used and the perplexity
    /// exp(−Σ p log p) of the code histogram (codes ≥ k are ignored; (0, 0.0) when none).
    pub fn usage(&self, codes: &[u32]) -> (usize, f64) {
        models::autoencoder::code_usage(codes, self.k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `per` points around each of `centres` (k×dim), uniform noise of half-width `spread`.
    fn blobs(centres: &[f32], dim: usize, per: usize, spread: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let k = centres.len() / dim;
        let mut out = Vec::with_capacity(k * per * dim);
        for i in 0..k * per {
            let c = &centres[(i % k) * dim..(i % k + 1) * dim];
            out.extend(c.iter().map(|&v| v + rng.random_range(-spread..spread)));
        }
        out
    }

    fn grid_centres(k: usize, dim: usize) -> Vec<f32> {
        (0..k * dim)
            .map(|v| {
                let (j, d) = (v / dim, v % dim);
                if d == j % dim {
                    10.0 * (1 + j / dim) as f32
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn recovers_separated_clusters() {
        let (k, dim, per) = (8, 4, 150);
        let centres = grid_centres(k, dim);
        let data = blobs(&centres, dim, per, 0.5, 1);
        let n = k * per;
        let km = fit(&data, n, dim, k, 50, 3).expect("fit");
        assert_eq!((km.k, km.dim, km.centroids.len()), (k, dim, k * dim));
        // Every true centre has a fitted centroid within the noise scale.
        for c in centres.chunks_exact(dim) {
            let (_, d) = nearest(c, &km.centroids, dim);
            assert!(d < 0.1, "centre {c:?} missed by {d}");
        }
        // Points of one true cluster share one code, and the codes of different clusters differ.
        let codes = km.assign(&data, n);
        let mut map = vec![u32::MAX; k];
        for (i, &code) in codes.iter().enumerate() {
            let truth = i % k;
            if map[truth] == u32::MAX {
                map[truth] = code;
            }
            assert_eq!(map[truth], code, "point {i}");
        }
        let mut sorted = map.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), k);
        let (used, perplexity) = km.usage(&codes);
        assert_eq!(used, k);
        assert!((perplexity - k as f64).abs() < 1e-9, "{perplexity}");
        let decoded = km.decode(&codes);
        assert_eq!(decoded.len(), n * dim);
        assert!(km.inertia(&data, n) < n as f64 * dim as f64 * 0.1);
    }

    #[test]
    fn deterministic_given_seed() {
        let (k, dim, per) = (6, 3, 100);
        let data = blobs(&grid_centres(k, dim), dim, per, 4.0, 2);
        let n = k * per;
        let a = fit(&data, n, dim, 12, 20, 7).expect("fit");
        let b = fit(&data, n, dim, 12, 20, 7).expect("fit");
        assert_eq!(a, b);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        let c = pool.install(|| fit(&data, n, dim, 12, 20, 7)).expect("fit");
        assert_eq!(a, c);
        let d = fit(&data, n, dim, 12, 20, 8).expect("fit");
        assert_ne!(a.centroids, d.centroids);
    }

    #[test]
    fn inertia_decreases_with_iterations() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, dim, k) = (3000, 6, 32);
        let data: Vec<f32> = (0..n * dim)
            .map(|_| rng.random_range(0.0f32..1.0))
            .collect();
        let one = fit(&data, n, dim, k, 1, 1).expect("fit");
        let many = fit(&data, n, dim, k, 30, 1).expect("fit");
        let (i1, im) = (one.inertia(&data, n), many.inertia(&data, n));
        assert!(im < i1, "inertia {im} after 30 iterations vs {i1} after 1");
    }

    #[test]
    fn no_empty_clusters() {
        // Heavy duplicates and more clusters than distinct-ish groups stress the re-seeding.
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (n, dim, k) = (2000, 2, 64);
        let data: Vec<f32> = (0..n * dim)
            .map(|i| {
                if (i / dim) % 2 == 0 {
                    0.0
                } else {
                    rng.random_range(0.0f32..1.0)
                }
            })
            .collect();
        let km = fit(&data, n, dim, k, 25, 4).expect("fit");
        let codes = km.assign(&data, n);
        let (used, perplexity) = km.usage(&codes);
        assert_eq!(used, k, "perplexity {perplexity}");
        assert!(perplexity > 1.0 && perplexity <= k as f64);
    }

    #[test]
    fn subsampled_init_on_large_input() {
        let (k, dim, per) = (4, 2, 6000);
        let data = blobs(&grid_centres(k, dim), dim, per, 1.0, 9);
        let n = k * per;
        assert!(n > INIT_SUBSAMPLE);
        let km = fit(&data, n, dim, k, 20, 0).expect("fit");
        let (used, _) = km.usage(&km.assign(&data, n));
        assert_eq!(used, k);
    }

    #[test]
    fn errors() {
        let data = vec![0.5f32; 12];
        assert_eq!(fit(&data, 4, 3, 0, 5, 0), Err(KMeansError::ZeroK));
        assert_eq!(
            fit(&data, 4, 3, 5, 5, 0),
            Err(KMeansError::TooFewPoints { n: 4, k: 5 })
        );
        assert_eq!(
            fit(&data, 5, 3, 2, 5, 0),
            Err(KMeansError::DimensionMismatch {
                expected: 15,
                found: 12
            })
        );
        assert_eq!(fit(&data, 4, 0, 2, 5, 0), Err(KMeansError::ZeroDim));
        let mut bad = data.clone();
        bad[5] = f32::INFINITY;
        assert_eq!(fit(&bad, 4, 3, 2, 5, 0), Err(KMeansError::NonFinite));
        // Identical points still give k centroids (k-means++ falls back to unchosen points).
        let km = fit(&data, 4, 3, 4, 5, 0).expect("fit");
        assert_eq!(km.centroids.len(), 12);
        assert_eq!(
            km.try_decode(&[0, 4]),
            Err(KMeansError::CodeOutOfRange { code: 4, k: 4 })
        );
        assert_eq!(km.decode(&[9]), vec![0.0; 3]);
        assert!(km.try_assign(&data[..11], 4).is_err());
        assert_eq!(km.usage(&[]), (0, 0.0));
    }
}
