//! Gaussian diffusion as used by MAR's Diffusion Loss (from ADM/DiT, Nichol & Dhariwal 2021):
//! noise schedules, the training terms (ε-MSE plus the variational bound with a learned-range
//! variance) and the reverse step, with timestep respacing for sampling.
use candle_core::{Device, Result, Tensor, D};

use crate::rng::Rng;

/// The β schedule over the training steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// cosine schedule, Nichol & Dhariwal 2021 (MAR's default)
    Cosine,
    /// linear schedule, Ho et al. 2020, scaled to the number of steps
    Linear,
}

/// β_t for `steps` training steps.
pub fn betas(schedule: Schedule, steps: usize) -> Vec<f64> {
    match schedule {
        Schedule::Linear => {
            // linear from 1e-4 to 0.02 at 1000 steps, rescaled for other step counts (ADM)
            let scale = 1000.0 / steps as f64;
            let (start, end) = (scale * 0.0001, scale * 0.02);
            (0..steps)
                .map(|i| {
                    if steps == 1 {
                        start
                    } else {
                        start + (end - start) * i as f64 / (steps - 1) as f64
                    }
                })
                .collect()
        }
        Schedule::Cosine => {
            // ᾱ(t) = cos²((t + s)/(1 + s) · π/2), s = 0.008; β clipped at 0.999
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            (0..steps)
                .map(|i| {
                    let t1 = i as f64 / steps as f64;
                    let t2 = (i + 1) as f64 / steps as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                })
                .collect()
        }
    }
}

/// The timesteps kept when respacing `steps` to `count` (ADM's `space_timesteps` with one section).
pub fn space_timesteps(steps: usize, count: usize) -> Vec<usize> {
    if count >= steps {
        return (0..steps).collect();
    }
    if count <= 1 {
        return vec![0];
    }
    // ADM accumulates the fractional index and rounds with Python's round (ties to even)
    let stride = (steps - 1) as f64 / (count - 1) as f64;
    let mut cur = 0.0f64;
    let mut taken = Vec::with_capacity(count);
    for _ in 0..count {
        taken.push(cur.round_ties_even() as usize);
        cur += stride;
    }
    taken.dedup();
    taken
}

/// A diffusion process: all the per-step coefficients, in float64 like the reference.
#[derive(Debug, Clone)]
pub struct GaussianDiffusion {
    pub betas: Vec<f64>,
    /// log β_t, the upper end of the learned variance range
    pub log_betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub sqrt_alphas_cumprod: Vec<f64>,
    pub sqrt_one_minus_alphas_cumprod: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
    /// The original timestep each (respaced) step stands for; the model sees these.
    pub timestep_map: Vec<usize>,
    /// Whether the model predicts the variance (learned range) besides ε.
    pub learn_sigma: bool,
    /// Clip the predicted x_0 to [-1, 1] when sampling (ADM's `clip_denoised`; MAR uses false).
    pub clip_denoised: bool,
}

/// What the model predicts at x_t: the mean and log-variance of p(x_{t-1} | x_t).
pub struct MeanVariance {
    pub mean: Tensor,
    pub log_variance: Tensor,
    pub pred_xstart: Tensor,
}

/// The per-row training terms.
pub struct TrainingTerms {
    pub mse: Tensor,
    pub vb: Option<Tensor>,
    pub loss: Tensor,
}

impl GaussianDiffusion {
    pub fn new(betas: Vec<f64>, learn_sigma: bool) -> Self {
        let n = betas.len();
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alphas_cumprod.push(acc);
        }
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..n - 1].iter().copied())
            .collect();
        let posterior_variance: Vec<f64> = (0..n)
            .map(|i| betas[i] * (1.0 - alphas_cumprod_prev[i]) / (1.0 - alphas_cumprod[i]))
            .collect();
        // log of the posterior variance, clipped because it is 0 at t = 0 (ADM)
        let posterior_log_variance_clipped: Vec<f64> = (0..n)
            .map(|i| {
                let v = if i == 0 && n > 1 {
                    posterior_variance[1]
                } else {
                    posterior_variance[i]
                };
                v.ln()
            })
            .collect();
        GaussianDiffusion {
            sqrt_alphas_cumprod: alphas_cumprod.iter().map(|a| a.sqrt()).collect(),
            sqrt_one_minus_alphas_cumprod: alphas_cumprod
                .iter()
                .map(|a| (1.0 - a).sqrt())
                .collect(),
            sqrt_recip_alphas_cumprod: alphas_cumprod.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_alphas_cumprod: alphas_cumprod
                .iter()
                .map(|a| (1.0 / a - 1.0).sqrt())
                .collect(),
            posterior_mean_coef1: (0..n)
                .map(|i| betas[i] * alphas_cumprod_prev[i].sqrt() / (1.0 - alphas_cumprod[i]))
                .collect(),
            posterior_mean_coef2: (0..n)
                .map(|i| {
                    (1.0 - alphas_cumprod_prev[i]) * (1.0 - betas[i]).sqrt()
                        / (1.0 - alphas_cumprod[i])
                })
                .collect(),
            posterior_variance,
            posterior_log_variance_clipped,
            alphas_cumprod_prev,
            alphas_cumprod,
            timestep_map: (0..n).collect(),
            log_betas: betas.iter().map(|b| b.ln()).collect(),
            betas,
            learn_sigma,
            clip_denoised: false,
        }
    }

    /// The training process: `steps` steps of `schedule`.
    pub fn training(schedule: Schedule, steps: usize, learn_sigma: bool) -> Self {
        Self::new(betas(schedule, steps), learn_sigma)
    }

    /// The sampling process: `steps` training steps respaced to `count` (ADM's `SpacedDiffusion`).
    pub fn respaced(schedule: Schedule, steps: usize, count: usize, learn_sigma: bool) -> Self {
        let base = Self::training(schedule, steps, learn_sigma);
        let keep = space_timesteps(steps, count);
        let mut last = 1.0;
        let mut new_betas = Vec::with_capacity(keep.len());
        for &i in &keep {
            new_betas.push(1.0 - base.alphas_cumprod[i] / last);
            last = base.alphas_cumprod[i];
        }
        let mut d = Self::new(new_betas, learn_sigma);
        d.timestep_map = keep;
        d
    }

    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε
    pub fn q_sample(&self, x_start: &Tensor, t: &[usize], noise: &Tensor) -> Result<Tensor> {
        let at = AtSteps::new(self, t, x_start.device())?;
        at.mul(Coef::SqrtAlphasCumprod, x_start)?
            + at.mul(Coef::SqrtOneMinusAlphasCumprod, noise)?
    }

    /// Mean and clipped log-variance of q(x_{t-1} | x_t, x_0).
    pub fn q_posterior(
        &self,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        Self::q_posterior_at(&AtSteps::new(self, t, x_t.device())?, x_start, x_t)
    }

    fn q_posterior_at(at: &AtSteps, x_start: &Tensor, x_t: &Tensor) -> Result<(Tensor, Tensor)> {
        let mean = (at.mul(Coef::PosteriorMeanCoef1, x_start)?
            + at.mul(Coef::PosteriorMeanCoef2, x_t)?)?;
        let logvar = at.broadcast(Coef::PosteriorLogVarianceClipped, mean.shape())?;
        Ok((mean, logvar))
    }

    /// p(x_{t-1} | x_t) from the model's output ([ε] or [ε, v] with v in [-1, 1], learned range).
    pub fn p_mean_variance(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
    ) -> Result<MeanVariance> {
        self.p_mean_variance_at(&AtSteps::new(self, t, x_t.device())?, model_output, x_t)
    }

    fn p_mean_variance_at(
        &self,
        at: &AtSteps,
        model_output: &Tensor,
        x_t: &Tensor,
    ) -> Result<MeanVariance> {
        let c = x_t.dim(D::Minus1)?;
        let eps = model_output.narrow(D::Minus1, 0, c)?;
        let log_variance = if self.learn_sigma {
            let v = model_output.narrow(D::Minus1, c, c)?;
            // learned range: interpolate between β̃_t and β_t in log space (Nichol & Dhariwal 2021, eq. 15)
            let frac = ((v + 1.0)? / 2.0)?;
            (at.mul(Coef::LogBetas, &frac)?
                + at.mul(Coef::PosteriorLogVarianceClipped, &(1.0 - &frac)?)?)?
        } else {
            // fixed small variance: the posterior variance β̃_t
            at.broadcast(Coef::PosteriorLogVarianceClipped, x_t.shape())?
                .contiguous()?
        };
        let pred_xstart = (at.mul(Coef::SqrtRecipAlphasCumprod, x_t)?
            - at.mul(Coef::SqrtRecipm1AlphasCumprod, &eps)?)?;
        // ADM's clip_denoised: x̂_0 clamped to the data range [-1, 1] before the posterior mean
        // (sampling only: the training loss's vb term never clips, as the reference's
        // training_losses passes clip_denoised=False)
        let pred_xstart = if self.clip_denoised {
            pred_xstart.clamp(-1f32, 1f32)?
        } else {
            pred_xstart
        };
        let (mean, _) = Self::q_posterior_at(at, &pred_xstart, x_t)?;
        Ok(MeanVariance {
            mean,
            log_variance,
            pred_xstart,
        })
    }

    /// One reverse step: x_{t-1} = mean + [t > 0] · exp(½ log σ²) · temperature · noise.
    pub fn p_sample(
        &self,
        model_output: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        temperature: f64,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let at = AtSteps::new(self, t, x_t.device())?;
        let out = self.p_mean_variance_at(&at, model_output, x_t)?;
        if at.same_step() == Some(0) {
            return Ok(out.mean); // the last step adds no noise
        }
        let std = (out.log_variance * 0.5)?.exp()?;
        out.mean
            + at.mul(Coef::NonZero, &(std * noise)?)?
                .affine(temperature, 0.0)?
    }

    /// ε-MSE per row, plus the variational bound with a stop-gradient on ε when σ is learned
    /// (ADM's `training_losses` with `LossType.MSE` and `ModelVarType.LEARNED_RANGE`).
    pub fn training_terms(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &[usize],
        noise: &Tensor,
    ) -> Result<TrainingTerms> {
        let c = x_start.dim(D::Minus1)?;
        let eps = model_output.narrow(D::Minus1, 0, c)?;
        let mse = (noise - &eps)?.sqr()?.mean(D::Minus1)?;
        if !self.learn_sigma {
            return Ok(TrainingTerms {
                loss: mse.clone(),
                mse,
                vb: None,
            });
        }
        let frozen = Tensor::cat(
            &[eps.detach(), model_output.narrow(D::Minus1, c, c)?],
            D::Minus1,
        )?;
        let vb =
            self.vb_terms_bpd_at(&AtSteps::new(self, t, x_t.device())?, &frozen, x_start, x_t)?;
        Ok(TrainingTerms {
            loss: (&mse + &vb)?,
            mse,
            vb: Some(vb),
        })
    }

    /// KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) in bits per dimension, or the decoder NLL at t = 0.
    pub fn vb_terms_bpd(
        &self,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        t: &[usize],
    ) -> Result<Tensor> {
        self.vb_terms_bpd_at(
            &AtSteps::new(self, t, x_t.device())?,
            model_output,
            x_start,
            x_t,
        )
    }

    fn vb_terms_bpd_at(
        &self,
        at: &AtSteps,
        model_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
    ) -> Result<Tensor> {
        let (true_mean, true_logvar) = Self::q_posterior_at(at, x_start, x_t)?;
        let out = self.p_mean_variance_at(at, model_output, x_t)?;
        let ln2 = std::f64::consts::LN_2;
        let kl = (normal_kl(&true_mean, &true_logvar, &out.mean, &out.log_variance)?
            .mean(D::Minus1)?
            / ln2)?;
        let nll = |x_start: &Tensor, mean: &Tensor, log_variance: &Tensor| {
            discretized_gaussian_log_likelihood(x_start, mean, &(log_variance * 0.5)?)?
                .neg()?
                .mean(D::Minus1)?
                / ln2
        };
        // the decoder NLL at t = 0, the KL elsewhere
        match at.same_step() {
            Some(0) => nll(x_start, &out.mean, &out.log_variance),
            Some(_) => Ok(kl),
            None => {
                // the NLL of the rows at t = 0 alone (about one in a thousand): computed for every
                // row and then selected, it and its backward took about 5% of a mar-tiny step
                let rows = at.zero_rows();
                if rows.is_empty() {
                    return Ok(kl);
                }
                let idx = Tensor::new(rows, x_t.device())?;
                let pick = |t: &Tensor| t.index_select(&idx, 0);
                let picked = nll(
                    &pick(x_start)?,
                    &pick(&out.mean)?,
                    &pick(&out.log_variance)?,
                )?;
                // back at their rows (0 + v is v), each row's gradient to one side of the select
                let nll = kl.zeros_like()?.index_add(&idx, &picked, 0)?;
                at.column(Coef::NonZero)?
                    .flatten_all()?
                    .eq(0.0)?
                    .where_cond(&nll, &kl)
            }
        }
    }
}

/// The schedule arrays that the training terms and the reverse step read at each row's timestep.
#[derive(Debug, Clone, Copy)]
enum Coef {
    SqrtAlphasCumprod,
    SqrtOneMinusAlphasCumprod,
    SqrtRecipAlphasCumprod,
    SqrtRecipm1AlphasCumprod,
    PosteriorMeanCoef1,
    PosteriorMeanCoef2,
    PosteriorLogVarianceClipped,
    LogBetas,
    /// 1 where t > 0, else 0
    NonZero,
}

impl Coef {
    const COUNT: usize = 9;
    const ALL: [Coef; Coef::COUNT] = [
        Coef::SqrtAlphasCumprod,
        Coef::SqrtOneMinusAlphasCumprod,
        Coef::SqrtRecipAlphasCumprod,
        Coef::SqrtRecipm1AlphasCumprod,
        Coef::PosteriorMeanCoef1,
        Coef::PosteriorMeanCoef2,
        Coef::PosteriorLogVarianceClipped,
        Coef::LogBetas,
        Coef::NonZero,
    ];

    /// The value at step `i`, as the f32 the tensors use.
    fn at(self, d: &GaussianDiffusion, i: usize) -> f32 {
        let v = match self {
            Coef::SqrtAlphasCumprod => d.sqrt_alphas_cumprod[i],
            Coef::SqrtOneMinusAlphasCumprod => d.sqrt_one_minus_alphas_cumprod[i],
            Coef::SqrtRecipAlphasCumprod => d.sqrt_recip_alphas_cumprod[i],
            Coef::SqrtRecipm1AlphasCumprod => d.sqrt_recipm1_alphas_cumprod[i],
            Coef::PosteriorMeanCoef1 => d.posterior_mean_coef1[i],
            Coef::PosteriorMeanCoef2 => d.posterior_mean_coef2[i],
            Coef::PosteriorLogVarianceClipped => d.posterior_log_variance_clipped[i],
            Coef::LogBetas => d.log_betas[i],
            Coef::NonZero => f64::from(u8::from(i > 0)),
        };
        v as f32
    }
}

/// The schedule at the timesteps of N rows. When every row is at one step (sampling) the values
/// are scalars and nothing is uploaded; otherwise one (coefficients, N) table is uploaded once for
/// all the coefficients a call reads (one host-to-device copy instead of one per coefficient).
enum AtSteps {
    Same {
        step: usize,
        values: [f32; Coef::COUNT],
        device: Device,
    },
    Rows {
        table: Tensor,
        n: usize,
        /// the rows at step 0
        zero_rows: Vec<u32>,
    },
}

impl AtSteps {
    fn new(d: &GaussianDiffusion, t: &[usize], device: &Device) -> Result<AtSteps> {
        if let Some(&first) = t.first() {
            if t.iter().all(|&i| i == first) {
                return Ok(AtSteps::Same {
                    step: first,
                    values: Coef::ALL.map(|c| c.at(d, first)),
                    device: device.clone(),
                });
            }
        }
        let data: Vec<f32> = Coef::ALL
            .iter()
            .flat_map(|c| t.iter().map(move |&i| c.at(d, i)))
            .collect();
        let table = Tensor::from_vec(data, (Coef::ALL.len(), t.len()), device)?;
        let zero_rows = (0..t.len() as u32)
            .filter(|&r| t[r as usize] == 0)
            .collect();
        Ok(AtSteps::Rows {
            table,
            n: t.len(),
            zero_rows,
        })
    }

    /// The rows at step 0 (none when every row is at one step).
    fn zero_rows(&self) -> &[u32] {
        match self {
            AtSteps::Same { .. } => &[],
            AtSteps::Rows { zero_rows, .. } => zero_rows,
        }
    }

    fn same_step(&self) -> Option<usize> {
        match self {
            AtSteps::Same { step, .. } => Some(*step),
            AtSteps::Rows { .. } => None,
        }
    }

    /// The coefficient at each row, (N, 1) (rows case).
    fn column(&self, c: Coef) -> Result<Tensor> {
        match self {
            AtSteps::Same { .. } => candle_core::bail!("column of a single-step AtSteps"),
            AtSteps::Rows { table, n, .. } => table.get(c as usize)?.reshape((*n, 1)),
        }
    }

    /// x · coefficient, row by row.
    fn mul(&self, c: Coef, x: &Tensor) -> Result<Tensor> {
        match self {
            AtSteps::Same { values, .. } => x.affine(f64::from(values[c as usize]), 0.0),
            AtSteps::Rows { .. } => x.broadcast_mul(&self.column(c)?),
        }
    }

    /// The coefficient of each row repeated over `shape` (N, …).
    fn broadcast(&self, c: Coef, shape: &candle_core::Shape) -> Result<Tensor> {
        match self {
            AtSteps::Same { values, device, .. } => {
                Tensor::full(values[c as usize], (), device)?.broadcast_as(shape)
            }
            AtSteps::Rows { .. } => self.column(c)?.broadcast_as(shape),
        }
    }
}

/// KL divergence between two diagonal Gaussians given by mean and log-variance (elementwise).
pub fn normal_kl(
    mean1: &Tensor,
    logvar1: &Tensor,
    mean2: &Tensor,
    logvar2: &Tensor,
) -> Result<Tensor> {
    // ½(−1 + lv2 − lv1 + e^{lv1−lv2} + (m1−m2)² e^{−lv2})
    let a = ((logvar2 - logvar1)? - 1.0)?;
    let b = (logvar1 - logvar2)?.exp()?;
    let c = ((mean1 - mean2)?.sqr()? * logvar2.neg()?.exp()?)?;
    ((a + b)? + c)? * 0.5
}

/// A fast approximation of the standard normal CDF (ADM, from Page 1977).
fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
    (inner.tanh()? + 1.0)? * 0.5
}

/// log-likelihood of data in [-1, 1] discretised to 256 bins under a Gaussian (ADM).
pub fn discretized_gaussian_log_likelihood(
    x: &Tensor,
    means: &Tensor,
    log_scales: &Tensor,
) -> Result<Tensor> {
    let centered = (x - means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let cdf_plus = approx_standard_normal_cdf(&((&centered + 1.0 / 255.0)? * &inv_stdv)?)?;
    let cdf_min = approx_standard_normal_cdf(&((&centered - 1.0 / 255.0)? * &inv_stdv)?)?;
    let log_cdf_plus = cdf_plus.clamp(1e-12, f64::INFINITY)?.log()?;
    let log_one_minus_cdf_min = (1.0 - &cdf_min)?.clamp(1e-12, f64::INFINITY)?.log()?;
    let log_cdf_delta = (cdf_plus - cdf_min)?.clamp(1e-12, f64::INFINITY)?.log()?;
    let low = x.lt(-0.999)?;
    let high = x.gt(0.999)?;
    low.where_cond(
        &log_cdf_plus,
        &high.where_cond(&log_one_minus_cdf_min, &log_cdf_delta)?,
    )
}

/// Draw one timestep per row, uniformly over the training steps.
pub fn sample_timesteps(rng: &mut Rng, n: usize, steps: usize) -> Vec<usize> {
    (0..n).map(|_| rng.below(steps)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_endpoints() {
        let b = betas(Schedule::Cosine, 1000);
        assert_eq!(b.len(), 1000);
        assert!(b[0] > 0.0 && b[0] < 1e-3);
        assert!((b[999] - 0.999).abs() < 1e-12);
        let d = GaussianDiffusion::training(Schedule::Cosine, 1000, true);
        assert!(d.alphas_cumprod[999] < 1e-6);
    }

    /// With `clip_denoised`, x̂_0 is clamped to [-1, 1] and the posterior mean is taken from the
    /// clamped x̂_0; without it, the first cosine step's x̂_0 = x_t / √ᾱ is far outside.
    #[test]
    fn clip_denoised_clamps_the_x0_prediction() -> Result<()> {
        let dev = Device::Cpu;
        let mut d = GaussianDiffusion::respaced(Schedule::Cosine, 1000, 50, true);
        let x_t = Tensor::new(&[[1f32, -0.5]], &dev)?;
        // ε̂ = 0 and v = 0 (the middle of the learned variance range)
        let out = Tensor::zeros((1, 4), candle_core::DType::F32, &dev)?;
        let t = [49];
        let free = d.p_mean_variance(&out, &x_t, &t)?;
        let x0 = free.pred_xstart.to_vec2::<f32>()?[0].clone();
        assert!(x0[0] > 1e4 && x0[1] < -1e4, "{x0:?}");
        d.clip_denoised = true;
        let clipped = d.p_mean_variance(&out, &x_t, &t)?;
        assert_eq!(
            clipped.pred_xstart.to_vec2::<f32>()?,
            vec![vec![1f32, -1.0]]
        );
        let (mean, _) = d.q_posterior(&clipped.pred_xstart, &x_t, &t)?;
        assert_eq!(clipped.mean.to_vec2::<f32>()?, mean.to_vec2::<f32>()?);
        assert_eq!(
            clipped.log_variance.to_vec2::<f32>()?,
            free.log_variance.to_vec2::<f32>()?
        );
        Ok(())
    }

    /// The variational bound of a batch at mixed steps, some rows at t = 0 (the NLL computed on
    /// those rows alone), is each row's own bound, and so are the gradients.
    #[test]
    fn vb_terms_of_mixed_steps_are_each_rows_own() -> Result<()> {
        let d = GaussianDiffusion::training(Schedule::Cosine, 1000, true);
        let dev = Device::Cpu;
        let mut rng = crate::Rng::new(3);
        let t = [0, 5, 0, 999, 1, 0, 500];
        let n = t.len();
        let x_start = rng.normal_tensor(&[n, 4], &dev)?.clamp(-1f32, 1f32)?;
        let x_t = rng.normal_tensor(&[n, 4], &dev)?;
        let out = candle_core::Var::from_tensor(&(rng.normal_tensor(&[n, 8], &dev)? * 0.5)?)?;
        let batch = d.vb_terms_bpd(out.as_tensor(), &x_start, &x_t, &t)?;
        let batch_grad = batch.sum_all()?.backward()?;
        let batch_grad = batch_grad.get(out.as_tensor()).expect("a gradient");
        let batch = batch.to_vec1::<f32>()?;
        for (r, &step) in t.iter().enumerate() {
            let row = |x: &Tensor| x.narrow(0, r, 1);
            let own = candle_core::Var::from_tensor(&row(out.as_tensor())?)?;
            let v = d.vb_terms_bpd(own.as_tensor(), &row(&x_start)?, &row(&x_t)?, &[step])?;
            let g = v.sum_all()?.backward()?;
            let g = g.get(own.as_tensor()).expect("a gradient");
            assert_eq!(v.to_vec1::<f32>()?[0], batch[r], "row {r} at t = {step}");
            let diff = (g - row(batch_grad)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6, "row {r} at t = {step}: gradient off by {diff}");
        }
        Ok(())
    }

    #[test]
    fn respacing_keeps_endpoints_and_alpha_bar() {
        let base = GaussianDiffusion::training(Schedule::Cosine, 1000, true);
        let r = GaussianDiffusion::respaced(Schedule::Cosine, 1000, 100, true);
        assert_eq!(r.num_timesteps(), 100);
        assert_eq!(r.timestep_map[0], 0);
        assert_eq!(r.timestep_map[99], 999);
        for (k, &i) in r.timestep_map.iter().enumerate() {
            assert!((r.alphas_cumprod[k] - base.alphas_cumprod[i]).abs() < 1e-12);
        }
    }

    #[test]
    fn q_sample_at_zero_noise_scales() -> Result<()> {
        let d = GaussianDiffusion::training(Schedule::Linear, 1000, false);
        let x = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu)?;
        let n = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?;
        let xt = d.q_sample(&x, &[0, 999], &n)?.to_vec2::<f32>()?;
        assert!((xt[0][0] as f64 - d.sqrt_alphas_cumprod[0]).abs() < 1e-6);
        assert!((xt[1][0] as f64 - d.sqrt_alphas_cumprod[999]).abs() < 1e-6);
        Ok(())
    }
}

#[cfg(test)]
mod oracle_tests {
    use super::*;

    /// With the exact ε of a point mass at c, the reverse process must land on c.
    #[test]
    fn reverse_process_with_an_oracle_recovers_the_data() -> Result<()> {
        let dev = Device::Cpu;
        for learn_sigma in [false, true] {
            let d = GaussianDiffusion::respaced(Schedule::Cosine, 1000, 50, learn_sigma);
            let c = Tensor::new(&[[0.5f32, -0.25, 0.9]], &dev)?;
            let mut rng = Rng::new(0);
            let mut x = rng.normal_tensor(&[1, 3], &dev)?;
            for i in (0..d.num_timesteps()).rev() {
                let ac = d.alphas_cumprod[i];
                let eps = ((&x - (&c * ac.sqrt())?)? / (1.0 - ac).sqrt())?;
                let out = if learn_sigma {
                    Tensor::cat(&[&eps, &eps.zeros_like()?], 1)?
                } else {
                    eps
                };
                let noise = rng.normal_tensor(&[1, 3], &dev)?;
                x = d.p_sample(&out, &x, &[i], 1.0, &noise)?;
            }
            let err = (x - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-3, "learn_sigma={learn_sigma}: {err}");
        }
        Ok(())
    }
}
