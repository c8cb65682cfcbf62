//! Metric math in float64: Gaussian feature statistics, Fréchet distance (FID), FID∞, Inception
//! Score, Kernel Inception Distance and k-NN precision / recall.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, Side};
use rayon::prelude::*;

/// Rows per block for the parallel and blocked reductions (fixed, so results do not depend on
/// the number of threads).
const BLOCK_ROWS: usize = 2048;

/// Mean and covariance of a feature set; `sigma` is d×d row-major. `n` is the sample count the
/// statistics came from (0 when unknown, e.g. read from a reference `.npz`).
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    pub mu: Vec<f64>,
    pub sigma: Vec<f64>,
    pub dim: usize,
    pub n: usize,
}

/// Why a metric could not be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    #[error("{what}: expected {expected} values, found {found}")]
    DimensionMismatch {
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("{what}: need at least {min} samples, got {n}")]
    TooFewSamples {
        what: &'static str,
        n: usize,
        min: usize,
    },
    #[error("{what} contains non-finite values")]
    NonFinite { what: &'static str },
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    #[error("symmetric eigendecomposition did not converge")]
    NoConvergence,
}

impl Gaussian {
    /// Checks that the lengths agree with `dim` and every value is finite.
    pub fn validate(&self) -> Result<(), MetricError> {
        if self.dim == 0 {
            return Err(MetricError::InvalidArgument(
                "Gaussian dimension must be positive",
            ));
        }
        check_len("mu", self.mu.len(), self.dim)?;
        check_len("sigma", self.sigma.len(), self.dim.saturating_mul(self.dim))?;
        if !self.mu.iter().chain(&self.sigma).all(|v| v.is_finite()) {
            return Err(MetricError::NonFinite {
                what: "Gaussian statistics",
            });
        }
        Ok(())
    }
}

fn check_len(what: &'static str, found: usize, expected: usize) -> Result<(), MetricError> {
    if found == expected {
        Ok(())
    } else {
        Err(MetricError::DimensionMismatch {
            what,
            expected,
            found,
        })
    }
}

/// Shape checks shared by the functions that take an n×d row-major f32 matrix.
fn check_matrix(
    what: &'static str,
    values: &[f32],
    n: usize,
    dim: usize,
) -> Result<(), MetricError> {
    if dim == 0 {
        return Err(MetricError::InvalidArgument(
            "feature dimension must be positive",
        ));
    }
    let expected = n
        .checked_mul(dim)
        .ok_or(MetricError::InvalidArgument("n × dim overflows usize"))?;
    check_len(what, values.len(), expected)?;
    if n < 2 {
        return Err(MetricError::TooFewSamples { what, n, min: 2 });
    }
    if !values.par_iter().all(|v| v.is_finite()) {
        return Err(MetricError::NonFinite { what });
    }
    Ok(())
}

/// Mean and unbiased covariance (ddof = 1, as `np.cov`) of `n` row-major feature vectors of
/// length `dim`, accumulated in f64 (two passes: mean, then centred products through faer).
pub fn gaussian_stats(features: &[f32], n: usize, dim: usize) -> Result<Gaussian, MetricError> {
    check_matrix("features", features, n, dim)?;
    let block = BLOCK_ROWS * dim;

    // Pass 1: the mean, from per-block partial sums added in block order.
    let partials: Vec<Vec<f64>> = features
        .par_chunks(block)
        .map(|rows| {
            let mut acc = vec![0f64; dim];
            for row in rows.chunks_exact(dim) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v as f64;
                }
            }
            acc
        })
        .collect();
    let mut mu = vec![0f64; dim];
    for p in &partials {
        for (m, v) in mu.iter_mut().zip(p) {
            *m += v;
        }
    }
    let inv_n = 1.0 / n as f64;
    mu.iter_mut().for_each(|m| *m *= inv_n);

    // Pass 2: Σ (x − μ)(x − μ)ᵀ, one d×rows centred block at a time (columns are samples).
    let par = faer::get_global_parallelism();
    let mut scatter = Mat::<f64>::zeros(dim, dim);
    for rows in features.chunks(block) {
        let count = rows.len() / dim;
        let centred = Mat::<f64>::from_fn(dim, count, |j, i| rows[i * dim + j] as f64 - mu[j]);
        // the scatter is symmetric: only its lower triangle is computed (half the flops)
        triangular::matmul(
            scatter.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            centred.as_ref(),
            BlockStructure::Rectangular,
            centred.transpose(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
    }
    let scale = 1.0 / (n - 1) as f64;
    let mut sigma = vec![0f64; dim * dim];
    for i in 0..dim {
        for j in 0..dim {
            sigma[i * dim + j] = scatter[(i.max(j), i.min(j))] * scale;
        }
    }
    Ok(Gaussian { mu, sigma, dim, n })
}

/// Symmetric faer matrix from a row-major d×d slice (averaging the two triangles).
fn symmetric(values: &[f64], d: usize) -> Mat<f64> {
    Mat::from_fn(d, d, |i, j| 0.5 * (values[i * d + j] + values[j * d + i]))
}

/// Fréchet distance ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂) (Dowson & Landau 1982; pytorch-fid).
///
/// tr √(Σ₁Σ₂) is computed through symmetric eigendecompositions only: with Σ₁ = V Λ Vᵀ and
/// W = V Λ^{1/2} (negative eigenvalues clipped to 0), WᵀΣ₂W is orthogonally similar to
/// Σ₁^{1/2} Σ₂ Σ₁^{1/2}, which is symmetric PSD and has the eigenvalues of Σ₁Σ₂; so
/// tr √(Σ₁Σ₂) = Σᵢ √max(λᵢ(WᵀΣ₂W), 0). This stays finite for singular covariances (n < d).
pub fn frechet_distance(a: &Gaussian, b: &Gaussian) -> Result<f64, MetricError> {
    a.validate()?;
    b.validate()?;
    check_len("second Gaussian dimension", b.dim, a.dim)?;
    let d = a.dim;

    let mean_term: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let s1 = symmetric(&a.sigma, d);
    let s2 = symmetric(&b.sigma, d);
    let trace1: f64 = (0..d).map(|i| s1[(i, i)]).sum();
    let trace2: f64 = (0..d).map(|i| s2[(i, i)]).sum();

    // tr √(Σ₁Σ₂) = Σ √λ over the eigenvalues of Wᵀ Σ₂ W for any W with W Wᵀ = Σ₁: the Cholesky
    // factor when Σ₁ is positive definite (cheap), else V √Λ from its eigendecomposition (stable
    // for singular covariances, e.g. fewer samples than dimensions)
    let w = match s1.llt(Side::Lower) {
        Ok(llt) => llt.L().to_owned(),
        Err(_) => {
            let eig = s1
                .self_adjoint_eigen(Side::Lower)
                .map_err(|_| MetricError::NoConvergence)?;
            let root_lambda: Vec<f64> = eig
                .S()
                .column_vector()
                .iter()
                .map(|l| l.max(0.0).sqrt())
                .collect();
            let v = eig.U();
            Mat::<f64>::from_fn(d, d, |i, j| v[(i, j)] * root_lambda[j])
        }
    };
    let s2w = &s2 * &w;
    let m = w.transpose() * &s2w;
    let m = Mat::<f64>::from_fn(d, d, |i, j| 0.5 * (m[(i, j)] + m[(j, i)]));
    let eigenvalues = m
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|_| MetricError::NoConvergence)?;
    let trace_sqrt: f64 = eigenvalues.iter().map(|l| l.max(0.0).sqrt()).sum();

    Ok(mean_term + trace1 + trace2 - 2.0 * trace_sqrt)
}

/// Softmax of one row of logits in f64: writes p into `p` and log p into `log_p`.
fn softmax_row(row: &[f32], p: &mut [f64], log_p: &mut [f64]) {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let mut sum = 0f64;
    for (e, &x) in p.iter_mut().zip(row) {
        *e = (x as f64 - max).exp();
        sum += *e;
    }
    let log_sum = sum.ln();
    for ((e, lp), &x) in p.iter_mut().zip(log_p.iter_mut()).zip(row) {
        *e /= sum;
        *lp = x as f64 - max - log_sum;
    }
}

/// Inception Score over `splits` contiguous splits of `n` rows of `classes` logits: per split
/// exp(mean KL(p(y|x) ‖ p(y))), p(y) the split's mean prediction; returns (mean, population std)
/// over splits. Formula of torch-fidelity's `isc_features_to_metric` (softmax in f64, split
/// i of n/splits rows each (the remainder n mod splits is left out), `np.std`); torch-fidelity
/// shuffles rows first unless `isc_samples_shuffle=False`, this
/// function keeps the given order, so pass rows in random or class-balanced order. Terms with
/// p = 0 count as 0 (the limit of p log p).
pub fn inception_score(
    logits: &[f32],
    n: usize,
    classes: usize,
    splits: usize,
) -> Result<(f64, f64), MetricError> {
    if splits == 0 {
        return Err(MetricError::InvalidArgument("splits must be positive"));
    }
    check_matrix("logits", logits, n, classes)?;
    if n < splits {
        return Err(MetricError::TooFewSamples {
            what: "logits (one per split)",
            n,
            min: splits,
        });
    }
    let block = BLOCK_ROWS * classes;
    let mut scores = Vec::with_capacity(splits);
    for s in 0..splits {
        let (start, end) = (s * (n / splits), (s + 1) * (n / splits));
        let chunk = &logits[start * classes..end * classes];
        let rows = (end - start) as f64;

        // p(y): mean of the split's softmax rows.
        let partials: Vec<Vec<f64>> = chunk
            .par_chunks(block)
            .map(|blk| {
                let mut acc = vec![0f64; classes];
                let mut p = vec![0f64; classes];
                let mut log_p = vec![0f64; classes];
                for row in blk.chunks_exact(classes) {
                    softmax_row(row, &mut p, &mut log_p);
                    acc.iter_mut().zip(&p).for_each(|(a, v)| *a += v);
                }
                acc
            })
            .collect();
        let mut log_q = vec![0f64; classes];
        for part in &partials {
            log_q.iter_mut().zip(part).for_each(|(a, v)| *a += v);
        }
        log_q.iter_mut().for_each(|q| *q = (*q / rows).ln());

        // mean over rows of KL(p(y|x) ‖ p(y)) = Σ_y p log p − p log q.
        let kl_partials: Vec<f64> = chunk
            .par_chunks(block)
            .map(|blk| {
                let mut p = vec![0f64; classes];
                let mut log_p = vec![0f64; classes];
                let mut total = 0f64;
                for row in blk.chunks_exact(classes) {
                    softmax_row(row, &mut p, &mut log_p);
                    total += p
                        .iter()
                        .zip(&log_p)
                        .zip(&log_q)
                        .filter(|((&pi, _), _)| pi > 0.0)
                        .map(|((pi, lp), lq)| pi * (lp - lq))
                        .sum::<f64>();
                }
                total
            })
            .collect();
        let mean_kl = kl_partials.iter().sum::<f64>() / rows;
        scores.push(mean_kl.exp());
    }
    let k = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / k;
    let var = scores.iter().map(|s| (s - mean) * (s - mean)).sum::<f64>() / k;
    Ok((mean, var.sqrt()))
}

/// An n×d f64 faer matrix from row-major f32 rows `rows` (a subset of `features`' rows).
fn rows_f64(features: &[f32], dim: usize, rows: &[usize]) -> Mat<f64> {
    Mat::from_fn(rows.len(), dim, |i, j| features[rows[i] * dim + j] as f64)
}

/// Σ over all (i, j) of k(xᵢ, yⱼ) = (xᵢ·yⱼ / d + 1)³, and the same sum restricted to i = j
/// (meaningful when x and y are the same set), in row blocks.
fn cubic_kernel_sums(x: &Mat<f64>, y: &Mat<f64>) -> (f64, f64) {
    let d = x.ncols() as f64;
    let par = faer::get_global_parallelism();
    let (mut total, mut diag) = (0f64, 0f64);
    let mut start = 0;
    while start < x.nrows() {
        let rows = BLOCK_ROWS.min(x.nrows() - start);
        let xb = x.subrows(start, rows);
        let mut k = Mat::<f64>::zeros(rows, y.nrows());
        matmul(k.as_mut(), Accum::Replace, xb, y.transpose(), 1.0, par);
        for i in 0..rows {
            for j in 0..y.nrows() {
                let v = (k[(i, j)] / d + 1.0).powi(3);
                total += v;
                if start + i == j {
                    diag += v;
                }
            }
        }
        start += rows;
    }
    (total, diag)
}

/// Unbiased MMD² with the cubic polynomial kernel between two sets of rows.
fn mmd2_unbiased(x: &Mat<f64>, y: &Mat<f64>) -> f64 {
    let (m, n) = (x.nrows() as f64, y.nrows() as f64);
    let (xx, xx_diag) = cubic_kernel_sums(x, x);
    let (yy, yy_diag) = cubic_kernel_sums(y, y);
    let (xy, _) = cubic_kernel_sums(x, y);
    (xx - xx_diag) / (m * (m - 1.0)) + (yy - yy_diag) / (n * (n - 1.0)) - 2.0 * xy / (m * n)
}

/// Kernel Inception Distance (Bińkowski et al. 2018, torch-fidelity's `kid`): the unbiased MMD²
/// with kernel k(x, y) = (x·y / d + 1)³, averaged over `subsets` random subsets of
/// `subset_size` rows of each set (drawn without replacement from `seed`); returns (mean, std)
/// over subsets. When `subset_size` is at least both set sizes the whole sets are used once
/// (no randomness), which is torch-fidelity's value when n₁ = n₂ = subset size.
#[allow(clippy::too_many_arguments)]
pub fn kernel_inception_distance(
    a: &[f32],
    n1: usize,
    b: &[f32],
    n2: usize,
    dim: usize,
    subsets: usize,
    subset_size: usize,
    seed: u64,
) -> Result<(f64, f64), MetricError> {
    check_matrix("KID features (first set)", a, n1, dim)?;
    check_matrix("KID features (second set)", b, n2, dim)?;
    if subsets == 0 || subset_size < 2 {
        return Err(MetricError::InvalidArgument(
            "KID needs at least one subset of at least 2 rows",
        ));
    }
    if subset_size >= n1 && subset_size >= n2 {
        let all1: Vec<usize> = (0..n1).collect();
        let all2: Vec<usize> = (0..n2).collect();
        let v = mmd2_unbiased(&rows_f64(a, dim, &all1), &rows_f64(b, dim, &all2));
        return Ok((v, 0.0));
    }
    let m = subset_size.min(n1).min(n2);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    let mut values = Vec::with_capacity(subsets);
    for _ in 0..subsets {
        let i1 = rand::seq::index::sample(&mut rng, n1, m).into_vec();
        let i2 = rand::seq::index::sample(&mut rng, n2, m).into_vec();
        values.push(mmd2_unbiased(
            &rows_f64(a, dim, &i1),
            &rows_f64(b, dim, &i2),
        ));
    }
    let k = values.len() as f64;
    let mean = values.iter().sum::<f64>() / k;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / k;
    Ok((mean, var.sqrt()))
}

/// Squared Euclidean distances between every row of `x` and every row of `y`, one row block of
/// `x` at a time: calls `visit(i, row)` with row i's distances to all of `y`.
fn for_each_distance_row(x: &Mat<f64>, y: &Mat<f64>, mut visit: impl FnMut(usize, &[f64])) {
    let par = faer::get_global_parallelism();
    let norm = |m: &Mat<f64>| -> Vec<f64> {
        (0..m.nrows())
            .map(|i| (0..m.ncols()).map(|j| m[(i, j)] * m[(i, j)]).sum())
            .collect()
    };
    let (nx, ny) = (norm(x), norm(y));
    let mut row = vec![0f64; y.nrows()];
    let mut start = 0;
    while start < x.nrows() {
        let rows = BLOCK_ROWS.min(x.nrows() - start);
        let mut g = Mat::<f64>::zeros(rows, y.nrows());
        matmul(
            g.as_mut(),
            Accum::Replace,
            x.subrows(start, rows),
            y.transpose(),
            1.0,
            par,
        );
        for i in 0..rows {
            for (j, r) in row.iter_mut().enumerate() {
                *r = (nx[start + i] + ny[j] - 2.0 * g[(i, j)]).max(0.0);
            }
            visit(start + i, &row);
        }
        start += rows;
    }
}

/// Squared distance of each row to its k-th nearest neighbour in the same set (itself excluded).
fn knn_radii(x: &Mat<f64>, k: usize) -> Vec<f64> {
    let mut radii = vec![0f64; x.nrows()];
    for_each_distance_row(x, x, |i, row| {
        let mut r = row.to_vec();
        r[i] = f64::NEG_INFINITY; // itself: sorts first, so index k is the k-th neighbour
        let (_, kth, _) = r.select_nth_unstable_by(k, |a, b| a.total_cmp(b));
        radii[i] = *kth;
    });
    radii
}

/// Share of rows of `queries` inside the manifold of `support` (the union of balls around each
/// support row reaching its k-th nearest neighbour).
fn manifold_coverage(queries: &Mat<f64>, support: &Mat<f64>, radii: &[f64]) -> f64 {
    let mut inside = 0usize;
    for_each_distance_row(queries, support, |_, row| {
        if row.iter().zip(radii).any(|(d, r)| d <= r) {
            inside += 1;
        }
    });
    inside as f64 / queries.nrows() as f64
}

/// Improved precision and recall (Kynkäänniemi et al. 2019, torch-fidelity's `prc`) with
/// `k`-nearest-neighbour manifolds: precision = share of generated samples inside the real
/// manifold, recall = share of real samples inside the generated manifold. Returns
/// (precision, recall).
pub fn precision_recall(
    real: &[f32],
    n_real: usize,
    generated: &[f32],
    n_generated: usize,
    dim: usize,
    k: usize,
) -> Result<(f64, f64), MetricError> {
    check_matrix("precision/recall real features", real, n_real, dim)?;
    check_matrix(
        "precision/recall generated features",
        generated,
        n_generated,
        dim,
    )?;
    if k == 0 {
        return Err(MetricError::InvalidArgument("k must be positive"));
    }
    for (what, n) in [
        ("precision/recall real features", n_real),
        ("precision/recall generated features", n_generated),
    ] {
        if n <= k {
            return Err(MetricError::TooFewSamples {
                what,
                n,
                min: k + 1,
            });
        }
    }
    let r = rows_f64(real, dim, &(0..n_real).collect::<Vec<_>>());
    let g = rows_f64(generated, dim, &(0..n_generated).collect::<Vec<_>>());
    let real_radii = knn_radii(&r, k);
    let gen_radii = knn_radii(&g, k);
    let precision = manifold_coverage(&g, &r, &real_radii);
    let recall = manifold_coverage(&r, &g, &gen_radii);
    Ok((precision, recall))
}

/// FID∞ (Chong & Forsyth 2020): FID is biased in 1/N; evaluate it on `points` random subsets of
/// sizes evenly spaced from `min_n` to n, fit FID = a + b / N by least squares and return the
/// intercept a (the FID of infinitely many samples) with the fitted points (N, FID).
pub fn fid_infinity(
    features: &[f32],
    n: usize,
    dim: usize,
    reference: &Gaussian,
    min_n: usize,
    points: usize,
    seed: u64,
) -> Result<(f64, Vec<(usize, f64)>), MetricError> {
    check_matrix("FID∞ features", features, n, dim)?;
    if points < 2 || min_n < 2 || min_n >= n {
        return Err(MetricError::InvalidArgument(
            "FID∞ needs at least 2 points and 2 ≤ min_n < n",
        ));
    }
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    let mut fitted = Vec::with_capacity(points);
    for p in 0..points {
        let size = min_n + (n - min_n) * p / (points - 1);
        let mut idx = rand::seq::index::sample(&mut rng, n, size).into_vec();
        idx.sort_unstable();
        let subset: Vec<f32> = idx
            .iter()
            .flat_map(|&i| features[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        let stats = gaussian_stats(&subset, size, dim)?;
        fitted.push((size, frechet_distance(&stats, reference)?));
    }
    let xs: Vec<f64> = fitted.iter().map(|(s, _)| 1.0 / *s as f64).collect();
    let ys: Vec<f64> = fitted.iter().map(|(_, f)| *f).collect();
    let k = xs.len() as f64;
    let (mx, my) = (xs.iter().sum::<f64>() / k, ys.iter().sum::<f64>() / k);
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    Ok((my - slope * mx, fitted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn gaussian(mu: Vec<f64>, sigma: Vec<f64>) -> Gaussian {
        let dim = mu.len();
        Gaussian {
            mu,
            sigma,
            dim,
            n: 0,
        }
    }

    fn random_features(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Correlated features: x = A z + b with a random A, so the covariance is not diagonal.
        let a: Vec<f32> = (0..dim * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let z: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            for i in 0..dim {
                let v: f32 = (0..dim).map(|j| a[i * dim + j] * z[j]).sum();
                out.push(v + 0.5 * i as f32);
            }
        }
        out
    }

    fn naive_stats(x: &[f32], n: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
        let mut mu = vec![0f64; d];
        for r in 0..n {
            for j in 0..d {
                mu[j] += x[r * d + j] as f64 / n as f64;
            }
        }
        let mut cov = vec![0f64; d * d];
        for r in 0..n {
            for i in 0..d {
                for j in 0..d {
                    cov[i * d + j] += (x[r * d + i] as f64 - mu[i]) * (x[r * d + j] as f64 - mu[j])
                        / (n - 1) as f64;
                }
            }
        }
        (mu, cov)
    }

    // --- small dense helpers for the brute-force reference (Denman–Beavers square root) ---

    fn matmul_naive(a: &[f64], b: &[f64], d: usize) -> Vec<f64> {
        let mut c = vec![0f64; d * d];
        for i in 0..d {
            for k in 0..d {
                for j in 0..d {
                    c[i * d + j] += a[i * d + k] * b[k * d + j];
                }
            }
        }
        c
    }

    fn inverse(a: &[f64], d: usize) -> Vec<f64> {
        // Gauss–Jordan with partial pivoting.
        let mut m = a.to_vec();
        let mut inv: Vec<f64> = (0..d * d)
            .map(|k| if k / d == k % d { 1.0 } else { 0.0 })
            .collect();
        for col in 0..d {
            let pivot = (col..d)
                .max_by(|&x, &y| m[x * d + col].abs().total_cmp(&m[y * d + col].abs()))
                .expect("non-empty range");
            for j in 0..d {
                m.swap(col * d + j, pivot * d + j);
                inv.swap(col * d + j, pivot * d + j);
            }
            let p = m[col * d + col];
            for j in 0..d {
                m[col * d + j] /= p;
                inv[col * d + j] /= p;
            }
            for r in 0..d {
                if r != col {
                    let f = m[r * d + col];
                    for j in 0..d {
                        m[r * d + j] -= f * m[col * d + j];
                        inv[r * d + j] -= f * inv[col * d + j];
                    }
                }
            }
        }
        inv
    }

    /// tr √A by the Denman–Beavers iteration (A with positive real spectrum, non-symmetric).
    fn trace_sqrt_denman_beavers(a: &[f64], d: usize) -> f64 {
        let mut y = a.to_vec();
        let mut z: Vec<f64> = (0..d * d)
            .map(|k| if k / d == k % d { 1.0 } else { 0.0 })
            .collect();
        for _ in 0..100 {
            let yi = inverse(&y, d);
            let zi = inverse(&z, d);
            let ny: Vec<f64> = y.iter().zip(&zi).map(|(p, q)| 0.5 * (p + q)).collect();
            let nz: Vec<f64> = z.iter().zip(&yi).map(|(p, q)| 0.5 * (p + q)).collect();
            y = ny;
            z = nz;
        }
        (0..d).map(|i| y[i * d + i]).sum()
    }

    fn random_spd(d: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let a: Vec<f64> = (0..d * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut s = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                s[i * d + j] = (0..d).map(|k| a[i * d + k] * a[j * d + k]).sum::<f64>();
            }
            s[i * d + i] += 0.1;
        }
        s
    }

    #[test]
    fn stats_match_naive() {
        let (n, d) = (3000, 7);
        let x = random_features(n, d, 1);
        let g = gaussian_stats(&x, n, d).expect("stats");
        let (mu, cov) = naive_stats(&x, n, d);
        assert_eq!(g.n, n);
        assert_eq!(g.dim, d);
        for (a, b) in g.mu.iter().zip(&mu) {
            assert!((a - b).abs() < 1e-9, "{a} {b}");
        }
        for (a, b) in g.sigma.iter().zip(&cov) {
            assert!((a - b).abs() < 1e-9 * (1.0 + b.abs()), "{a} {b}");
        }
    }

    #[test]
    fn stats_errors() {
        let x = vec![0.0f32; 10];
        assert!(matches!(
            gaussian_stats(&x, 3, 3),
            Err(MetricError::DimensionMismatch { .. })
        ));
        assert!(matches!(
            gaussian_stats(&x[..5], 1, 5),
            Err(MetricError::TooFewSamples { .. })
        ));
        assert!(matches!(
            gaussian_stats(&x, 2, 0),
            Err(MetricError::InvalidArgument(_))
        ));
        let mut y = x.clone();
        y[3] = f32::NAN;
        assert!(matches!(
            gaussian_stats(&y, 2, 5),
            Err(MetricError::NonFinite { .. })
        ));
    }

    #[test]
    fn fid_of_identical_stats_is_zero() {
        let (n, d) = (500, 12);
        let g = gaussian_stats(&random_features(n, d, 2), n, d).expect("stats");
        let fid = frechet_distance(&g, &g).expect("fid");
        let trace: f64 = (0..d).map(|i| g.sigma[i * d + i]).sum();
        assert!(fid.abs() < 1e-8 * trace, "fid {fid}, trace {trace}");
    }

    #[test]
    fn fid_one_dimensional_closed_form() {
        let (mu1, s1, mu2, s2) = (1.5f64, 2.0f64, -0.5f64, 3.0f64);
        let a = gaussian(vec![mu1], vec![s1 * s1]);
        let b = gaussian(vec![mu2], vec![s2 * s2]);
        let fid = frechet_distance(&a, &b).expect("fid");
        let expected = (mu1 - mu2).powi(2) + (s1 - s2).powi(2);
        assert!((fid - expected).abs() < 1e-12, "{fid} vs {expected}");
    }

    #[test]
    fn fid_diagonal_closed_form() {
        let d = 6;
        let v1 = [1.0, 0.5, 2.0, 0.0, 3.0, 0.25];
        let v2 = [4.0, 0.5, 1.0, 1.0, 0.1, 0.0];
        let mut s1 = vec![0f64; d * d];
        let mut s2 = vec![0f64; d * d];
        for i in 0..d {
            s1[i * d + i] = v1[i];
            s2[i * d + i] = v2[i];
        }
        let mu1: Vec<f64> = (0..d).map(|i| i as f64 * 0.3).collect();
        let mu2: Vec<f64> = (0..d).map(|i| 1.0 - i as f64 * 0.1).collect();
        let expected: f64 = (0..d)
            .map(|i| (mu1[i] - mu2[i]).powi(2) + (v1[i].sqrt() - v2[i].sqrt()).powi(2))
            .sum();
        let fid = frechet_distance(&gaussian(mu1, s1), &gaussian(mu2, s2)).expect("fid");
        assert!((fid - expected).abs() < 1e-10, "{fid} vs {expected}");
    }

    #[test]
    fn fid_two_by_two_analytic_sqrt() {
        // Non-commuting 2×2 covariances: for A = Σ₁Σ₂ with eigenvalues λ₁, λ₂ ≥ 0,
        // tr √A = √λ₁ + √λ₂ = √(tr A + 2 √det A).
        let s1 = vec![2.0, 0.7, 0.7, 1.0];
        let s2 = vec![0.5, -0.3, -0.3, 1.5];
        let prod = matmul_naive(&s1, &s2, 2);
        let tr = prod[0] + prod[3];
        let det = prod[0] * prod[3] - prod[1] * prod[2];
        let trace_sqrt = (tr + 2.0 * det.sqrt()).sqrt();
        let mu1 = vec![0.2, -1.0];
        let mu2 = vec![1.0, 0.5];
        let expected = (0.8f64).powi(2) + (1.5f64).powi(2) + (3.0 + 2.0) - 2.0 * trace_sqrt;
        let fid = frechet_distance(&gaussian(mu1, s1), &gaussian(mu2, s2)).expect("fid");
        assert!((fid - expected).abs() < 1e-12, "{fid} vs {expected}");
    }

    #[test]
    fn fid_matches_denman_beavers_reference() {
        let d = 5;
        let s1 = random_spd(d, 10);
        let s2 = random_spd(d, 11);
        let mu1 = vec![0.0; d];
        let mu2: Vec<f64> = (0..d).map(|i| i as f64).collect();
        let tr1: f64 = (0..d).map(|i| s1[i * d + i]).sum();
        let tr2: f64 = (0..d).map(|i| s2[i * d + i]).sum();
        let mean_term: f64 = mu2.iter().map(|m| m * m).sum();
        let reference =
            mean_term + tr1 + tr2 - 2.0 * trace_sqrt_denman_beavers(&matmul_naive(&s1, &s2, d), d);
        let fid = frechet_distance(&gaussian(mu1, s1), &gaussian(mu2, s2)).expect("fid");
        assert!(
            (fid - reference).abs() < 1e-8 * reference.abs().max(1.0),
            "{fid} vs {reference}"
        );
    }

    #[test]
    fn fid_singular_covariances() {
        // n = 5 samples in d = 16: both covariances have rank ≤ 4.
        let (n, d) = (5, 16);
        let a = gaussian_stats(&random_features(n, d, 3), n, d).expect("stats");
        let b = gaussian_stats(&random_features(n, d, 4), n, d).expect("stats");
        for (x, y) in [(&a, &b), (&a, &a), (&b, &a)] {
            let fid = frechet_distance(x, y).expect("fid");
            assert!(fid.is_finite() && fid >= -1e-9, "{fid}");
        }
        let self_fid = frechet_distance(&a, &a).expect("fid");
        let trace: f64 = (0..d).map(|i| a.sigma[i * d + i]).sum();
        assert!(self_fid.abs() < 1e-7 * trace, "{self_fid}");
    }

    #[test]
    fn fid_symmetric_and_errors() {
        let (n, d) = (300, 6);
        let a = gaussian_stats(&random_features(n, d, 5), n, d).expect("stats");
        let b = gaussian_stats(&random_features(n, d, 6), n, d).expect("stats");
        let ab = frechet_distance(&a, &b).expect("fid");
        let ba = frechet_distance(&b, &a).expect("fid");
        assert!((ab - ba).abs() < 1e-9 * ab.abs().max(1.0), "{ab} {ba}");

        let small = gaussian(vec![0.0; 2], vec![1.0, 0.0, 0.0, 1.0]);
        assert!(matches!(
            frechet_distance(&a, &small),
            Err(MetricError::DimensionMismatch { .. })
        ));
        let mut bad = small.clone();
        bad.sigma[1] = f64::INFINITY;
        assert!(matches!(
            frechet_distance(&small, &bad),
            Err(MetricError::NonFinite { .. })
        ));
        let mut short = small.clone();
        short.sigma.pop();
        assert!(matches!(
            frechet_distance(&short, &small),
            Err(MetricError::DimensionMismatch { .. })
        ));
    }

    #[test]
    fn is_of_uniform_logits_is_one() {
        let (n, c) = (200, 1008);
        let logits = vec![0.37f32; n * c];
        let (mean, std) = inception_score(&logits, n, c, 10).expect("is");
        assert!((mean - 1.0).abs() < 1e-12, "{mean}");
        assert!(std.abs() < 1e-12, "{std}");
    }

    #[test]
    fn is_of_confident_balanced_predictions_is_class_count() {
        let c = 7;
        let n = 10 * c * 4;
        let mut logits = vec![0f32; n * c];
        for i in 0..n {
            logits[i * c + i % c] = 60.0;
        }
        let (mean, std) = inception_score(&logits, n, c, 10).expect("is");
        assert!((mean - c as f64).abs() < 1e-9, "{mean}");
        assert!(std < 1e-9, "{std}");
        // Fully saturated probabilities (p underflows to 0) stay finite.
        logits.iter_mut().for_each(|v| {
            if *v > 0.0 {
                *v = 1e4
            }
        });
        let (mean, _) = inception_score(&logits, n, c, 10).expect("is");
        assert!((mean - c as f64).abs() < 1e-9, "{mean}");
    }

    #[test]
    fn is_matches_direct_formula() {
        let (n, c, splits) = (103, 5, 4);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let logits: Vec<f32> = (0..n * c).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let (mean, std) = inception_score(&logits, n, c, splits).expect("is");
        let mut scores = Vec::new();
        for s in 0..splits {
            let rows: Vec<Vec<f64>> = (s * (n / splits)..(s + 1) * (n / splits))
                .map(|r| {
                    let row = &logits[r * c..(r + 1) * c];
                    let z: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
                    row.iter().map(|&x| (x as f64).exp() / z).collect()
                })
                .collect();
            let q: Vec<f64> = (0..c)
                .map(|j| rows.iter().map(|p| p[j]).sum::<f64>() / rows.len() as f64)
                .collect();
            let kl: f64 = rows
                .iter()
                .map(|p| (0..c).map(|j| p[j] * (p[j] / q[j]).ln()).sum::<f64>())
                .sum::<f64>()
                / rows.len() as f64;
            scores.push(kl.exp());
        }
        let m = scores.iter().sum::<f64>() / splits as f64;
        let sd = (scores.iter().map(|s| (s - m).powi(2)).sum::<f64>() / splits as f64).sqrt();
        assert!((mean - m).abs() < 1e-12, "{mean} {m}");
        assert!((std - sd).abs() < 1e-12, "{std} {sd}");
        assert!(mean > 1.0);
    }

    #[test]
    fn is_errors() {
        let logits = vec![0f32; 20];
        assert!(matches!(
            inception_score(&logits, 4, 4, 2),
            Err(MetricError::DimensionMismatch { .. })
        ));
        assert!(matches!(
            inception_score(&logits, 5, 4, 10),
            Err(MetricError::TooFewSamples { .. })
        ));
        assert!(matches!(
            inception_score(&logits, 5, 4, 0),
            Err(MetricError::InvalidArgument(_))
        ));
        let mut bad = logits.clone();
        bad[0] = f32::NAN;
        assert!(matches!(
            inception_score(&bad, 5, 4, 2),
            Err(MetricError::NonFinite { .. })
        ));
    }

    #[test]
    fn kid_whole_sets_and_subsets() {
        let d = 6;
        let a = random_features(400, d, 20);
        let b = random_features(300, d, 20); // same distribution (same mixing seed)
        let mut shifted = random_features(300, d, 20);
        shifted.iter_mut().for_each(|v| *v += 1.5);
        let (same, s0) = kernel_inception_distance(&a, 400, &b, 300, d, 1, 1000, 0).expect("kid");
        assert_eq!(s0, 0.0);
        let (far, _) =
            kernel_inception_distance(&a, 400, &shifted, 300, d, 1, 1000, 0).expect("kid");
        assert!(far > 10.0 * same.abs(), "{far} vs {same}");
        let (m, sd) =
            kernel_inception_distance(&a, 400, &shifted, 300, d, 20, 100, 7).expect("kid");
        assert!(
            m > 0.0 && sd > 0.0 && (m - far).abs() < 0.5 * far,
            "{m} ± {sd} vs {far}"
        );
        assert!(matches!(
            kernel_inception_distance(&a, 400, &b, 300, d, 0, 100, 0),
            Err(MetricError::InvalidArgument(_))
        ));
    }

    #[test]
    fn precision_recall_of_identical_and_disjoint_sets() {
        let d = 4;
        let a = random_features(200, d, 30);
        assert_eq!(
            precision_recall(&a, 200, &a, 200, d, 3).expect("prc"),
            (1.0, 1.0)
        );
        let far: Vec<f32> = a.iter().map(|v| v + 1e3).collect();
        assert_eq!(
            precision_recall(&a, 200, &far, 200, d, 3).expect("prc"),
            (0.0, 0.0)
        );
        assert!(matches!(
            precision_recall(&a[..3 * d], 3, &a, 200, d, 3),
            Err(MetricError::TooFewSamples { .. })
        ));
    }

    #[test]
    fn fid_infinity_removes_the_small_sample_bias() {
        let d = 8;
        let reference = gaussian_stats(&random_features(20_000, d, 40), 20_000, d).expect("stats");
        let x = random_features(2000, d, 40);
        let (fid_inf, points) = fid_infinity(&x, 2000, d, &reference, 100, 5, 1).expect("fid∞");
        assert_eq!(points.len(), 5);
        assert_eq!(points[0].0, 100);
        assert_eq!(points[4].0, 2000);
        assert!(fid_inf < points[0].1, "{fid_inf} vs {:?}", points);
    }
}
