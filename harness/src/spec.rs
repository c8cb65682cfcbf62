//! The experiment spec: serde types (`deny_unknown_fields` everywhere), validation with
//! file:line:column errors, `--set` overrides, grid expansion into cells × arms × seeds, and the
//! content hash that is each run's identity.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped when a change to the code changes what a run with the same spec produces.
/// 2: causal AR runs have depth + decoder_depth blocks (size parity with MAR).
/// 3: Gaussian noise is generated on the run's device from a key of its seeded stream
///    (`fused::gaussian_noise`), so the noise values differ from version 2's; the generator's
///    blocks have dropout 0.1 by default (generator.attn_dropout / proj_dropout, as the
///    reference), generator.decoder_heads is a key, and causal AR's linear guidance counts the
///    tokens known after each step as MAR does (`models::generator::ar_tokens_known_after`).
pub const RESULTS_VERSION: &str = "3";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: cannot read the spec: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {key}{message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    #[error("{origin}: {key}: {message}")]
    Override {
        origin: String,
        key: String,
        message: String,
    },
}

// ---------------------------------------------------------------- types

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// experiment name, the key for `ablate report NAME`
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// "cpu" or "cuda:N"; `--device` overrides
    #[serde(default = "default_device")]
    pub device: String,
    pub data: DataSpec,
    pub tokenizers: BTreeMap<String, TokenizerSpec>,
    pub generator: GeneratorSpec,
    #[serde(default)]
    pub head: HeadSpec,
    #[serde(default)]
    pub train: TrainSpec,
    #[serde(default)]
    pub sample: SampleSpec,
    #[serde(default)]
    pub eval: EvalSpec,
    pub arms: ArmsSpec,
    /// dotted key → values; the cartesian product of all lists
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<toml::Value>>,
    /// grid points to leave out: every key given must match
    #[serde(default)]
    pub exclude: Vec<BTreeMap<String, toml::Value>>,
    /// per-metric drift tolerances for `ablate check`
    #[serde(default)]
    pub drift: BTreeMap<String, DriftTolerance>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_device() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataSource {
    Synthetic,
    Mnist,
    Cifar10,
    ImageFolder,
}

impl DataSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DataSource::Synthetic => "synthetic",
            DataSource::Mnist => "mnist",
            DataSource::Cifar10 => "cifar10",
            DataSource::ImageFolder => "image-folder",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub source: DataSource,
    /// folder holding the files (mnist, cifar10, image-folder); relative to the working directory
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    /// synthetic: number of classes (default 10); real sets: keep the first k classes (default all)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
    #[serde(default = "d_train")]
    pub train: usize,
    #[serde(default = "d_test")]
    pub test: usize,
    /// seed of the generated data set (fixed across run seeds so every run sees the same data)
    #[serde(default)]
    pub seed: u64,
    /// random horizontal flip of training images for the generator, as the reference's loader
    /// (and its cached latents of both flips) does; off for digits, whose mirror images are not
    /// digits
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hflip: bool,
}
fn d_image_size() -> usize {
    16
}
fn d_train() -> usize {
    5000
}
fn d_test() -> usize {
    1000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizerKind {
    /// pixels of p×p patches as continuous tokens
    Patch,
    /// k-means codebook over the same patches: the discrete twin of `patch`
    Kmeans,
    /// conv autoencoder with a vector-quantized bottleneck (discrete codes)
    Vq,
    /// the same autoencoder with a diagonal Gaussian (KL) bottleneck (continuous latents)
    Kl,
}

impl TokenizerKind {
    pub fn is_discrete(self) -> bool {
        matches!(self, TokenizerKind::Kmeans | TokenizerKind::Vq)
    }

    pub fn is_autoencoder(self) -> bool {
        matches!(self, TokenizerKind::Vq | TokenizerKind::Kl)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    pub kind: TokenizerKind,
    /// patch side in pixels (patch, kmeans)
    #[serde(default = "d_patch")]
    pub patch: usize,
    /// codebook size (kmeans, vq)
    #[serde(default = "d_codebook")]
    pub codebook: usize,
    /// k-means iterations
    #[serde(default = "d_iters")]
    pub iters: usize,
    /// autoencoder (vq, kl): spatial downsampling factor, 4 or 8
    #[serde(default = "d_downsample")]
    pub downsample: usize,
    /// autoencoder: channels of the first level (deeper levels use twice as many)
    #[serde(default = "d_ae_width")]
    pub width: usize,
    /// autoencoder: channels per latent position = token dimension (kl) or code dimension (vq)
    #[serde(default = "d_latent_dim")]
    pub latent_dim: usize,
    /// vq: commitment weight β (0.25 in VQ-VAE)
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// kl: weight of the mean KL per latent value against the pixel MSE
    #[serde(default = "d_kl_weight")]
    pub kl_weight: f64,
    /// vq: re-seed codes unused for `restart_every` steps with encoder outputs (0 = never)
    #[serde(default = "d_restart_every")]
    pub restart_every: usize,
    /// kl: fixed latent scale (the paper's KL-16 uses 0.2325); default 1/std of the training latents
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<f64>,
    /// seed of the tokenizer's fit; unset = each run's seed (a tokenizer per generator seed), set =
    /// one tokenizer shared by every seed, like the paper's single pretrained tokenizer
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// autoencoder training steps, batch size and Adam learning rate
    #[serde(default = "d_ae_steps")]
    pub steps: usize,
    #[serde(default = "d_ae_batch")]
    pub batch: usize,
    #[serde(default = "d_ae_lr")]
    pub lr: f64,
    /// kl: the generator trains on a fresh draw from each token's posterior every step (mean +
    /// std·ε, as the reference's engine_mar.py), instead of on the posterior mean. Not part of the
    /// tokenizer's own identity: the fitted tokenizer is the same either way
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sample_posterior: bool,
}
impl TokenizerSpec {
    /// Tokens per image of side `image_size`: patches, or positions of the latent grid.
    pub fn seq_len(&self, image_size: usize) -> usize {
        let side = if self.kind.is_autoencoder() {
            self.downsample
        } else {
            self.patch
        };
        (image_size / side.max(1)).pow(2)
    }
}

fn d_patch() -> usize {
    4
}
fn d_codebook() -> usize {
    256
}
fn d_iters() -> usize {
    20
}
fn d_downsample() -> usize {
    4
}
fn d_ae_width() -> usize {
    32
}
fn d_latent_dim() -> usize {
    8
}
fn d_beta() -> f64 {
    0.25
}
fn d_kl_weight() -> f64 {
    1e-4
}
fn d_restart_every() -> usize {
    50
}
fn d_ae_steps() -> usize {
    1000
}
fn d_ae_batch() -> usize {
    64
}
fn d_ae_lr() -> f64 {
    1e-3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GeneratorKindSpec {
    Ar,
    Mar,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSpec {
    pub kind: GeneratorKindSpec,
    /// causal AR generation order: raster or random (MAR is always random)
    #[serde(default = "d_order")]
    pub order: OrderSpec,
    #[serde(default = "d_width")]
    pub width: usize,
    #[serde(default = "d_depth")]
    pub depth: usize,
    /// MAR decoder (defaults to width/depth)
    #[serde(default)]
    pub decoder_width: Option<usize>,
    #[serde(default)]
    pub decoder_depth: Option<usize>,
    #[serde(default = "d_heads")]
    pub heads: usize,
    /// MAR decoder's attention heads (the reference's `decoder_num_heads`; defaults to heads)
    #[serde(default)]
    pub decoder_heads: Option<usize>,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    /// MAR's class buffer slots
    #[serde(default = "d_buffer")]
    pub buffer: usize,
    #[serde(default = "d_label_drop")]
    pub label_drop: f64,
    /// dropout of the blocks' attention probabilities in training (the reference's 0.1)
    #[serde(default = "d_dropout")]
    pub attn_dropout: f64,
    /// dropout of the attention projection's and both MLP layers' outputs (the reference's 0.1)
    #[serde(default = "d_dropout")]
    pub proj_dropout: f64,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrderSpec {
    Raster,
    Random,
}
fn d_order() -> OrderSpec {
    OrderSpec::Raster
}
fn d_width() -> usize {
    64
}
fn d_depth() -> usize {
    2
}
fn d_heads() -> usize {
    4
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_buffer() -> usize {
    4
}
fn d_label_drop() -> f64 {
    0.1
}
/// timm's Block as MAR builds it: `attn_drop = proj_drop = 0.1` (models/mar.py defaults)
fn d_dropout() -> f64 {
    0.1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleSpec {
    Cosine,
    Linear,
}

/// The Diffusion Loss head (the cross-entropy head has no settings of its own).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    #[serde(default = "d_head_width")]
    pub width: usize,
    #[serde(default = "d_head_depth")]
    pub depth: usize,
    #[serde(default = "d_batch_mul")]
    pub batch_mul: usize,
    #[serde(default = "d_train_steps")]
    pub train_steps: usize,
    #[serde(default = "d_sampling_steps")]
    pub sampling_steps: usize,
    #[serde(default = "d_schedule")]
    pub schedule: ScheduleSpec,
    #[serde(default = "d_true")]
    pub learn_sigma: bool,
    /// clip the predicted x_0 to [-1, 1] while sampling; right for pixel tokens (MAR: false)
    #[serde(default)]
    pub clip_denoised: bool,
}
fn d_head_width() -> usize {
    128
}
fn d_head_depth() -> usize {
    2
}
fn d_batch_mul() -> usize {
    4
}
fn d_train_steps() -> usize {
    1000
}
fn d_sampling_steps() -> usize {
    100
}
fn d_schedule() -> ScheduleSpec {
    ScheduleSpec::Cosine
}
fn d_true() -> bool {
    true
}
impl Default for HeadSpec {
    fn default() -> Self {
        HeadSpec {
            width: d_head_width(),
            depth: d_head_depth(),
            batch_mul: d_batch_mul(),
            train_steps: d_train_steps(),
            sampling_steps: d_sampling_steps(),
            schedule: d_schedule(),
            learn_sigma: true,
            clip_denoised: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrScheduleSpec {
    Constant,
    Cosine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    #[serde(default = "d_steps")]
    pub steps: usize,
    #[serde(default = "d_batch")]
    pub batch: usize,
    /// base learning rate; the rate used is base_lr × batch / 256 (MAR)
    #[serde(default = "d_base_lr")]
    pub base_lr: f64,
    #[serde(default = "d_warmup")]
    pub warmup: usize,
    #[serde(default = "d_lr_schedule")]
    pub lr_schedule: LrScheduleSpec,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_clip")]
    pub grad_clip: f64,
    #[serde(default = "d_log_every")]
    pub log_every: usize,
    /// 0 = only at the end
    #[serde(default)]
    pub checkpoint_every: usize,
    /// EMA decay of the weights used for evaluation; 0 evaluates the raw weights
    #[serde(default = "d_ema")]
    pub ema: f64,
    /// arithmetic of the generator's matrix products, in training and sampling (weights,
    /// optimizer state and losses stay f32); left out of the identity at its default so the
    /// hashes of existing runs stay the same
    #[serde(default, skip_serializing_if = "PrecisionSpec::is_default")]
    pub precision: PrecisionSpec,
}

/// `train.precision`: f32 everywhere, or bf16 matrix products with f32 master weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrecisionSpec {
    #[default]
    F32,
    Bf16,
}

impl PrecisionSpec {
    pub fn is_default(&self) -> bool {
        *self == PrecisionSpec::default()
    }

    pub fn to_model(self) -> models::Precision {
        match self {
            PrecisionSpec::F32 => models::Precision::F32,
            PrecisionSpec::Bf16 => models::Precision::Bf16,
        }
    }
}
fn d_ema() -> f64 {
    0.999
}
fn d_steps() -> usize {
    500
}
fn d_batch() -> usize {
    64
}
fn d_base_lr() -> f64 {
    4e-3
}
fn d_warmup() -> usize {
    50
}
fn d_lr_schedule() -> LrScheduleSpec {
    LrScheduleSpec::Constant
}
fn d_wd() -> f64 {
    0.02
}
fn d_clip() -> f64 {
    3.0
}
fn d_log_every() -> usize {
    10
}
impl Default for TrainSpec {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CfgScheduleSpec {
    Linear,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSpec {
    /// images generated per run for evaluation
    #[serde(default = "d_count")]
    pub count: usize,
    /// MAR sampling iterations (≤ number of tokens)
    #[serde(default = "d_mar_steps")]
    pub mar_steps: usize,
    #[serde(default = "d_one")]
    pub cfg: f64,
    #[serde(default = "d_cfg_schedule")]
    pub cfg_schedule: CfgScheduleSpec,
    #[serde(default = "d_one")]
    pub temperature: f64,
    #[serde(default = "d_sample_batch")]
    pub batch: usize,
}
fn d_count() -> usize {
    500
}
fn d_mar_steps() -> usize {
    8
}
fn d_one() -> f64 {
    1.0
}
fn d_cfg_schedule() -> CfgScheduleSpec {
    CfgScheduleSpec::Linear
}
fn d_sample_batch() -> usize {
    250
}
impl Default for SampleSpec {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureNetSpec {
    Classifier,
    /// the Inception-v3 FID network (weights from `eval.inception_weights`)
    Inception,
}

/// Resize and normalisation of images before the Inception network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConventionSpec {
    /// TF1-style bilinear resize without half-pixel offset, (x − 128) / 128 (the paper's numbers)
    #[default]
    TorchFidelity,
    /// half-pixel bilinear resize, 2x/255 − 1
    PytorchFid,
}

impl ConventionSpec {
    pub fn is_default(&self) -> bool {
        *self == ConventionSpec::default()
    }

    pub fn to_model(self) -> models::inception::Convention {
        match self {
            ConventionSpec::TorchFidelity => models::inception::Convention::TorchFidelity,
            ConventionSpec::PytorchFid => models::inception::Convention::PytorchFid,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    #[serde(default = "d_feature_net")]
    pub feature_net: FeatureNetSpec,
    #[serde(default = "d_classifier_steps")]
    pub classifier_steps: usize,
    #[serde(default = "d_classifier_features")]
    pub classifier_features: usize,
    /// seed of the feature net; fixed so every run is measured in the same feature space
    #[serde(default)]
    pub classifier_seed: u64,
    #[serde(default = "d_is_splits")]
    pub is_splits: usize,
    /// weight file of the Inception network (`pt_inception-2015-12-05-6726825d.pth` or a
    /// safetensors copy); default ROOT/weights/pt_inception-2015-12-05-6726825d.pth
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inception_weights: Option<String>,
    /// input convention of the Inception network (left out of the identity at its default so
    /// the hashes of existing runs stay the same)
    #[serde(default, skip_serializing_if = "ConventionSpec::is_default")]
    pub convention: ConventionSpec,
    /// also evaluate every this many training steps (0 = only at the end), for FID over training
    #[serde(default, skip_serializing_if = "is_zero")]
    pub every: usize,
    /// samples per evaluation during training (default: sample.count)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_count: Option<usize>,
}
fn is_zero(v: &usize) -> bool {
    *v == 0
}
fn d_feature_net() -> FeatureNetSpec {
    FeatureNetSpec::Classifier
}
fn d_classifier_steps() -> usize {
    600
}
fn d_classifier_features() -> usize {
    64
}
fn d_is_splits() -> usize {
    10
}
impl Default for EvalSpec {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmSpec {
    /// name of a `[tokenizers.NAME]` table
    pub tokenizer: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmsSpec {
    #[serde(rename = "cross-entropy")]
    pub cross_entropy: ArmSpec,
    pub diffusion: ArmSpec,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftTolerance {
    /// allowed change in the metric's own units
    pub absolute: Option<f64>,
    /// allowed change as a fraction of the baseline value
    pub relative: Option<f64>,
    /// allowed change in units of the baseline's standard deviation over seeds
    pub seed_spread: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arm {
    CrossEntropy,
    Diffusion,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::CrossEntropy => "cross-entropy",
            Arm::Diffusion => "diffusion",
        }
    }
}

// ---------------------------------------------------------------- loading

/// One grid point with everything resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub label: String,
    pub spec: Spec,
}

/// One run to do: a cell, an arm and a seed.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedRun {
    pub cell: String,
    pub arm: Arm,
    pub seed: u64,
    pub spec: Spec,
}

impl PlannedRun {
    pub fn tokenizer_name(&self) -> &str {
        match self.arm {
            Arm::CrossEntropy => &self.spec.arms.cross_entropy.tokenizer,
            Arm::Diffusion => &self.spec.arms.diffusion.tokenizer,
        }
    }

    pub fn tokenizer(&self) -> &TokenizerSpec {
        // validated to exist
        &self.spec.tokenizers[self.tokenizer_name()]
    }

    /// The configuration that decides what this run computes (device and bookkeeping excluded).
    /// `data_fingerprint` is the hash of the data set's bytes (`data::Dataset::fingerprint`): part
    /// of the identity for data read from files, whose content can change under the same path;
    /// synthetic data is a function of its spec, so its runs keep their hashes.
    pub fn identity(&self, data_fingerprint: &str) -> serde_json::Value {
        let s = &self.spec;
        let mut id = serde_json::json!({
            "results_version": RESULTS_VERSION,
            "data": s.data,
            "tokenizer": self.tokenizer(),
            "generator": s.generator,
            "head": if self.arm == Arm::Diffusion { serde_json::to_value(&s.head).unwrap_or_default() } else { serde_json::Value::Null },
            "train": s.train,
            "sample": s.sample,
            "eval": s.eval,
            "arm": self.arm,
            "seed": self.seed,
        });
        if s.data.source != DataSource::Synthetic {
            id["data_fingerprint"] = data_fingerprint.into();
        }
        id
    }

    /// The run's identity as a short hash (see [`PlannedRun::identity`]).
    pub fn hash(&self, data_fingerprint: &str) -> String {
        content_hash(&self.identity(data_fingerprint))
    }

    /// Identity of the trained weights alone: runs that differ only in sampling or evaluation
    /// settings (a CFG or temperature sweep) share one training.
    pub fn train_hash(&self, data_fingerprint: &str) -> String {
        let mut id = self.identity(data_fingerprint);
        if let Some(o) = id.as_object_mut() {
            o.remove("sample");
            o.remove("eval");
        }
        content_hash(&id)
    }
}

/// sha256 of the canonical JSON (serde_json sorts object keys) of a value, hex, 16 chars.
pub fn content_hash(v: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(v.to_string().as_bytes());
    hex::encode(h.finalize())[..16].to_string()
}

/// A loaded spec: the source text, the base spec, and its expansion.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub path: PathBuf,
    pub source: String,
    pub base: Spec,
    pub cells: Vec<Cell>,
}

impl LoadedSpec {
    pub fn runs(&self) -> Vec<PlannedRun> {
        let mut out = Vec::new();
        for cell in &self.cells {
            for &seed in &cell.spec.seeds {
                for arm in [Arm::CrossEntropy, Arm::Diffusion] {
                    out.push(PlannedRun {
                        cell: cell.label.clone(),
                        arm,
                        seed,
                        spec: cell.spec.clone(),
                    });
                }
            }
        }
        out
    }
}

/// 1-based line and column of a byte offset.
fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

/// The dotted key defined on the line holding `offset`, with its table header.
fn key_at(source: &str, offset: usize) -> String {
    let mut table = String::new();
    let mut pos = 0;
    for line in source.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') {
            table = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
        if offset < pos + line.len() {
            if let Some(eq) = t.find('=') {
                let k = t[..eq].trim().trim_matches('"');
                return if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                };
            }
            return table;
        }
        pos += line.len();
    }
    table
}

/// Where a dotted key (e.g. "train.base_lr") is written in the source: (line, column).
pub fn locate(source: &str, key: &str) -> Option<(usize, usize)> {
    let mut table = String::new();
    let mut table_line = None;
    for (i, line) in source.lines().enumerate() {
        let t = line.trim_start();
        let indent = line.len() - t.len();
        if t.starts_with('[') {
            table = t
                .trim_matches(|c| c == '[' || c == ']' || c == ' ')
                .to_string();
            if table == key {
                table_line = Some((i + 1, indent + 1));
            }
            continue;
        }
        if let Some(eq) = t.find('=') {
            let k = t[..eq].trim().trim_matches('"');
            let full = if table.is_empty() {
                k.to_string()
            } else {
                format!("{table}.{k}")
            };
            if full == key {
                return Some((i + 1, indent + 1));
            }
        }
    }
    table_line.or_else(|| {
        // fall back to the enclosing table
        let parent = key.rsplit_once('.')?.0;
        if parent == key {
            None
        } else {
            locate(source, parent)
        }
    })
}

/// Split a dotted key into its parts; a quoted part may hold dots: `grid."train.steps"`.
fn split_key(key: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for ch in key.chars() {
        match ch {
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

/// Set a dotted key in a TOML table, creating tables on the way.
fn set_dotted(root: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let parts = split_key(key);
    let mut table = root;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("'{part}' is not a table"))?;
    }
    table.insert(parts[parts.len() - 1].clone(), value);
    Ok(())
}

fn get_dotted<'a>(root: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let parts = split_key(key);
    let mut v = root.get(&parts[0])?;
    for p in &parts[1..] {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

/// Parse the right-hand side of `--set key=value` as TOML, or as a bare string.
pub fn parse_override(s: &str) -> Result<(String, toml::Value), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("--set {s}: expected KEY=VALUE"))?;
    let k = k.trim().to_string();
    let v = v.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(v.to_string()));
    Ok((k, value))
}

fn fmt_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Read, parse, override, validate and expand a spec file.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedSpec, SpecError> {
    let source = std::fs::read_to_string(path).map_err(|e| SpecError::Read {
        path: path.display().to_string(),
        source: e,
    })?;
    load_str(&path.display().to_string(), &source, overrides).map(|mut l| {
        l.path = path.to_path_buf();
        l
    })
}

/// Bytes one cell of a spec holds in memory at its peak, by the key that sizes each part, as a
/// lower bound: the data set's images (f32), the samples (images and their tokens, f32) and their
/// feature vectors (f64, up to Inception's 2048 per image).
pub fn memory_needed(spec: &Spec) -> Vec<(&'static str, usize, u128)> {
    let d = &spec.data;
    let channels: u128 = match d.source {
        DataSource::Mnist => 1,
        _ => 3,
    };
    let image = channels * (d.image_size as u128).pow(2) * 4;
    vec![
        ("data.train", d.train, d.train as u128 * image),
        ("data.test", d.test, d.test as u128 * image),
        (
            "sample.count",
            spec.sample.count,
            spec.sample.count as u128 * (2 * image + 2048 * 8),
        ),
    ]
}

/// Refuse a spec whose cells need more memory than `available` bytes: the error names the key
/// that asks for most, its value, the estimate and the limit (exit 2 before anything is written,
/// instead of an allocation abort after hours of training).
pub fn check_memory(loaded: &LoadedSpec, available: u64) -> Result<(), SpecError> {
    for cell in &loaded.cells {
        let parts = memory_needed(&cell.spec);
        let total: u128 = parts.iter().map(|p| p.2).sum();
        if total <= available as u128 {
            continue;
        }
        let (key, value, _) =
            parts
                .iter()
                .max_by_key(|p| p.2)
                .copied()
                .unwrap_or(("data.train", 0, 0));
        let (line, column) = locate(&loaded.source, key).unwrap_or((1, 1));
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        return Err(SpecError::Invalid {
            path: loaded.path.display().to_string(),
            line,
            column,
            key: format!("{key}: "),
            message: format!(
                "{value} needs at least {:.1} GiB of memory in all (images, samples, features), \
                 more than the {:.1} GiB available here; lower it",
                gib(total),
                gib(available as u128)
            ),
        });
    }
    Ok(())
}

/// Memory this process may use: the cgroup's limit where one is set, else the system's
/// available memory (`/proc/meminfo`); None where neither can be read.
pub fn available_memory() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, meminfo) {
        (Some(c), Some(m)) => Some(c.min(m)),
        (c, m) => c.or(m),
    }
}

/// The offset of the `[` of an array value that is still open at `offset` (brackets counted
/// outside strings and comments, from the start of the file), if there is one.
fn unclosed_array_before(source: &str, offset: usize) -> Option<usize> {
    let mut open: Vec<usize> = Vec::new();
    let (mut in_string, mut in_comment, mut after_equals) = (None::<char>, false, false);
    let mut chars = source
        .char_indices()
        .take_while(|&(i, _)| i < offset)
        .peekable();
    while let Some((i, c)) = chars.next() {
        match (in_string, in_comment, c) {
            (_, true, '\n') => in_comment = false,
            (_, true, _) => {}
            (Some('"'), _, '\\') => {
                chars.next();
            }
            (Some(q), _, c) if c == q => in_string = None,
            (Some(_), _, _) => {}
            (None, _, '"' | '\'') => in_string = Some(c),
            (None, _, '#') => in_comment = true,
            (None, _, '=') => after_equals = true,
            (None, _, '\n') if open.is_empty() => after_equals = false,
            // a `[` opens an array inside a value; at the start of a line it is a table header
            (None, _, '[') if after_equals || !open.is_empty() => open.push(i),
            (None, _, ']') if !open.is_empty() => {
                open.pop();
            }
            _ => {}
        }
    }
    open.first().copied()
}

pub fn load_str(name: &str, source: &str, overrides: &[String]) -> Result<LoadedSpec, SpecError> {
    let at = |offset: usize, message: String| {
        let (line, column) = line_col(source, offset);
        let key = key_at(source, offset);
        SpecError::Invalid {
            path: name.to_string(),
            line,
            column,
            key: if key.is_empty() {
                String::new()
            } else {
                format!("{key}: ")
            },
            message,
        }
    };
    // 1. the file as written, with spans for every error. An array left open (`seeds = [0`) is
    // only noticed where the next key or table starts: point at the array's opening instead.
    let syntax = |e: toml::de::Error| {
        let offset = e.span().map(|s| s.start).unwrap_or(0);
        let about_arrays = ["comma", "`]`", "unclosed"]
            .iter()
            .any(|w| e.message().contains(w));
        let open = unclosed_array_before(source, offset)
            .filter(|&open| about_arrays && line_col(source, open).0 < line_col(source, offset).0);
        match open {
            Some(open) => at(
                open,
                format!(
                    "this array is not closed: expected `,` or `]` before line {} ({})",
                    line_col(source, offset).0,
                    e.message().trim()
                ),
            ),
            None => at(offset, e.message().to_string()),
        }
    };
    let base: Spec = toml::from_str(source).map_err(syntax)?;
    let mut table: toml::Table = toml::from_str(source).map_err(syntax)?;
    // 2. command-line overrides
    for o in overrides {
        let (k, v) = parse_override(o).map_err(|m| SpecError::Override {
            origin: "--set".into(),
            key: o.clone(),
            message: m,
        })?;
        set_dotted(&mut table, &k, v).map_err(|m| SpecError::Override {
            origin: "--set".into(),
            key: k.clone(),
            message: m,
        })?;
        toml::Value::Table(table.clone())
            .try_into::<Spec>()
            .map_err(|e| SpecError::Override {
                origin: "--set".into(),
                key: k.clone(),
                message: e.message().to_string(),
            })?;
    }
    let resolved: Spec = toml::Value::Table(table.clone())
        .try_into()
        .map_err(|e: toml::de::Error| at(0, e.message().to_string()))?;
    let invalid = |key: &str, message: String| {
        let (line, column) = locate(source, key).unwrap_or((1, 1));
        SpecError::Invalid {
            path: name.to_string(),
            line,
            column,
            key: format!("{key}: "),
            message,
        }
    };
    // 3. the grid
    let mut cells: Vec<(String, toml::Table)> = vec![(String::new(), table.clone())];
    for (key, values) in &resolved.grid {
        let gkey = format!("grid.{key}");
        if values.is_empty() {
            return Err(invalid(
                &gkey,
                "a grid axis needs at least one value".into(),
            ));
        }
        let mut next = Vec::new();
        for (label, t) in &cells {
            for v in values {
                let mut t = t.clone();
                t.remove("grid");
                set_dotted(&mut t, key, v.clone()).map_err(|m| invalid(&gkey, m))?;
                let l = if label.is_empty() {
                    format!("{key}={}", fmt_value(v))
                } else {
                    format!("{label} · {key}={}", fmt_value(v))
                };
                next.push((l, t));
            }
        }
        cells = next;
    }
    let mut out = Vec::new();
    for (label, mut t) in cells {
        if resolved.exclude.iter().any(|ex| {
            !ex.is_empty()
                && ex
                    .iter()
                    .all(|(k, v)| get_dotted(&t, k).map(|x| x == v).unwrap_or(false))
        }) {
            continue;
        }
        t.remove("grid");
        let spec: Spec = toml::Value::Table(t)
            .try_into()
            .map_err(|e: toml::de::Error| {
                invalid(
                    &format!(
                        "grid.{}",
                        label
                            .split(" · ")
                            .last()
                            .and_then(|s| s.split('=').next())
                            .unwrap_or("")
                    ),
                    format!("in cell '{label}': {}", e.message()),
                )
            })?;
        let mut spec = spec;
        if spec.data.source == DataSource::Synthetic && spec.data.classes.is_none() {
            spec.data.classes = Some(10);
        }
        validate(&spec, &invalid)?;
        out.push(Cell {
            label: if label.is_empty() {
                "base".into()
            } else {
                label
            },
            spec,
        });
    }
    if out.is_empty() {
        return Err(invalid("exclude", "every grid cell is excluded".into()));
    }
    Ok(LoadedSpec {
        path: PathBuf::from(name),
        source: source.to_string(),
        base,
        cells: out,
    })
}

/// Range and consistency checks; `err(key, message)` builds the located error.
/// Conditions are written positively so that NaN fails them.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn validate(s: &Spec, err: &dyn Fn(&str, String) -> SpecError) -> Result<(), SpecError> {
    macro_rules! check {
        ($cond:expr, $key:expr, $($msg:tt)*) => {
            if !($cond) {
                return Err(err($key, format!($($msg)*)));
            }
        };
    }
    check!(!s.name.trim().is_empty(), "name", "must not be empty");
    // the name becomes a folder and lock-file name: stay far below file systems' 255 bytes
    check!(
        s.name.len() <= 100,
        "name",
        "must be at most 100 bytes long, found {}",
        s.name.len()
    );
    check!(!s.seeds.is_empty(), "seeds", "needs at least one seed");
    check!(
        s.device == "cpu"
            || s.device
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>().is_ok())
                .unwrap_or(false),
        "device",
        "expected 'cpu' or 'cuda:N', found '{}'",
        s.device
    );
    let d = &s.data;
    check!(
        (8..=64).contains(&d.image_size),
        "data.image_size",
        "expected 8..=64, found {}",
        d.image_size
    );
    let classes = d.classes.unwrap_or(10);
    check!(
        d.source != DataSource::Synthetic || (2..=10).contains(&classes),
        "data.classes",
        "expected 2..=10 for synthetic data, found {}",
        classes
    );
    check!(
        d.classes.is_none_or(|k| k >= 2),
        "data.classes",
        "expected at least 2 classes, found {}",
        classes
    );
    check!(
        (d.source == DataSource::Synthetic) == d.path.is_none(),
        "data.path",
        "{}",
        if d.source == DataSource::Synthetic {
            "synthetic data is generated and takes no path".to_string()
        } else {
            format!(
                "data.source = \"{}\" needs data.path, the folder holding its files",
                d.source.as_str()
            )
        }
    );
    check!(
        d.train >= classes * 2,
        "data.train",
        "needs at least 2 images per class: at least {} for {classes} classes, found {}",
        classes * 2,
        d.train
    );
    check!(
        d.test >= classes * 2,
        "data.test",
        "needs at least 2 images per class: at least {} for {classes} classes, found {}",
        classes * 2,
        d.test
    );
    for (name, t) in &s.tokenizers {
        let key = |k: &str| format!("tokenizers.{name}.{k}");
        check!(
            !t.sample_posterior || t.kind == TokenizerKind::Kl,
            &key("sample_posterior"),
            "only a kl tokenizer has a posterior to sample, this one is {:?}",
            t.kind
        );
        if t.kind.is_autoencoder() {
            check!(
                [4, 8].contains(&t.downsample) && d.image_size.is_multiple_of(t.downsample),
                &key("downsample"),
                "expected 4 or 8, dividing data.image_size ({}), found {}",
                d.image_size,
                t.downsample
            );
            check!(
                (4..=256).contains(&t.width),
                &key("width"),
                "expected 4..=256, found {}",
                t.width
            );
            check!(
                (1..=64).contains(&t.latent_dim),
                &key("latent_dim"),
                "expected 1..=64, found {}",
                t.latent_dim
            );
            check!(t.steps >= 1, &key("steps"), "must be at least 1");
            check!(t.batch >= 1, &key("batch"), "must be at least 1");
            check!(
                t.lr > 0.0 && t.lr.is_finite(),
                &key("lr"),
                "must be a positive number, found {}",
                t.lr
            );
            check!(
                t.beta >= 0.0 && t.beta.is_finite(),
                &key("beta"),
                "must be ≥ 0, found {}",
                t.beta
            );
            check!(
                t.kl_weight >= 0.0 && t.kl_weight.is_finite(),
                &key("kl_weight"),
                "must be ≥ 0, found {}",
                t.kl_weight
            );
            check!(
                t.scale.is_none_or(|v| v > 0.0 && v.is_finite()),
                &key("scale"),
                "must be a positive number, found {}",
                t.scale.unwrap_or(0.0)
            );
        } else {
            check!(
                t.patch >= 1 && d.image_size.is_multiple_of(t.patch),
                &key("patch"),
                "must divide data.image_size ({}), found {}",
                d.image_size,
                t.patch
            );
        }
        if t.kind.is_discrete() {
            check!(
                (2..=65536).contains(&t.codebook),
                &key("codebook"),
                "expected 2..=65536, found {}",
                t.codebook
            );
        }
        if t.kind == TokenizerKind::Kmeans {
            check!(
                t.codebook <= d.train * (d.image_size / t.patch).pow(2),
                &key("codebook"),
                "larger than the number of training patches"
            );
            check!(t.iters >= 1, &key("iters"), "must be at least 1");
        }
    }
    for (arm, a, discrete) in [
        ("cross-entropy", &s.arms.cross_entropy, true),
        ("diffusion", &s.arms.diffusion, false),
    ] {
        let key = format!("arms.{arm}.tokenizer");
        let t = s.tokenizers.get(&a.tokenizer);
        check!(
            t.is_some(),
            &key,
            "no tokenizer named '{}' (defined: {})",
            a.tokenizer,
            s.tokenizers.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        let kind = t.map(|t| t.kind).unwrap_or(TokenizerKind::Patch);
        check!(
            kind.is_discrete() == discrete,
            &key,
            "the {arm} arm needs a {} tokenizer, '{}' is {:?}",
            if discrete {
                "discrete (kmeans or vq)"
            } else {
                "continuous (patch or kl)"
            },
            a.tokenizer,
            kind
        );
    }
    let g = &s.generator;
    check!(
        g.width >= 8,
        "generator.width",
        "expected at least 8, found {}",
        g.width
    );
    check!(
        g.depth >= 1,
        "generator.depth",
        "expected at least 1, found {}",
        g.depth
    );
    check!(
        g.heads >= 1 && g.width.is_multiple_of(g.heads),
        "generator.heads",
        "must divide generator.width ({}), found {}",
        g.width,
        g.heads
    );
    let decoder_heads = g.decoder_heads.unwrap_or(g.heads);
    check!(
        decoder_heads >= 1,
        "generator.decoder_heads",
        "expected at least 1, found {}",
        decoder_heads
    );
    if decoder_heads >= 1 {
        let w = g.decoder_width.unwrap_or(g.width);
        check!(
            w.is_multiple_of(decoder_heads),
            "generator.decoder_heads",
            "must divide the decoder width ({}), found {}",
            w,
            decoder_heads
        );
    }
    for (key, p) in [
        ("generator.attn_dropout", g.attn_dropout),
        ("generator.proj_dropout", g.proj_dropout),
    ] {
        check!((0.0..1.0).contains(&p), key, "expected [0, 1), found {}", p);
    }
    check!(
        g.mlp_ratio > 0.0,
        "generator.mlp_ratio",
        "must be positive, found {}",
        g.mlp_ratio
    );
    check!(
        (0.0..1.0).contains(&g.label_drop),
        "generator.label_drop",
        "expected [0, 1), found {}",
        g.label_drop
    );
    check!(
        g.buffer >= 1,
        "generator.buffer",
        "expected at least 1, found {}",
        g.buffer
    );
    let h = &s.head;
    check!(
        h.width >= 1 && h.depth >= 1,
        "head.width",
        "width and depth must be positive"
    );
    check!(
        h.batch_mul >= 1,
        "head.batch_mul",
        "expected at least 1, found {}",
        h.batch_mul
    );
    check!(
        h.train_steps >= 2,
        "head.train_steps",
        "expected at least 2, found {}",
        h.train_steps
    );
    check!(
        (1..=h.train_steps).contains(&h.sampling_steps),
        "head.sampling_steps",
        "expected 1..={} (head.train_steps), found {}",
        h.train_steps,
        h.sampling_steps
    );
    let t = &s.train;
    check!(
        t.steps >= 1,
        "train.steps",
        "expected at least 1, found {}",
        t.steps
    );
    check!(
        t.batch >= 1,
        "train.batch",
        "expected at least 1, found {}",
        t.batch
    );
    check!(
        t.base_lr > 0.0 && t.base_lr.is_finite(),
        "train.base_lr",
        "must be positive, found {}",
        t.base_lr
    );
    check!(
        t.weight_decay >= 0.0,
        "train.weight_decay",
        "must be ≥ 0, found {}",
        t.weight_decay
    );
    check!(
        t.grad_clip > 0.0,
        "train.grad_clip",
        "must be positive, found {}",
        t.grad_clip
    );
    check!(
        (0.0..1.0).contains(&t.ema),
        "train.ema",
        "expected an EMA decay in [0, 1) (0 evaluates the raw weights), found {}",
        t.ema
    );
    check!(
        t.batch <= d.train,
        "train.batch",
        "expected at most data.train = {} images, found {}",
        d.train,
        t.batch
    );
    check!(
        t.log_every >= 1,
        "train.log_every",
        "expected at least 1, found {}",
        t.log_every
    );
    check!(
        s.eval.every_count.is_none_or(|c| c >= 2),
        "eval.every_count",
        "expected at least 2, found {}",
        s.eval.every_count.unwrap_or(0)
    );
    let sp = &s.sample;
    let tokens = s
        .tokenizers
        .values()
        .map(|t| t.seq_len(d.image_size))
        .min()
        .unwrap_or(1);
    check!(
        sp.count >= 2,
        "sample.count",
        "expected at least 2, found {}",
        sp.count
    );
    check!(
        sp.batch >= 1,
        "sample.batch",
        "expected at least 1, found {}",
        sp.batch
    );
    check!(
        (1..=tokens).contains(&sp.mar_steps),
        "sample.mar_steps",
        "expected 1..={tokens} (the number of tokens), found {}",
        sp.mar_steps
    );
    check!(
        sp.cfg >= 1.0,
        "sample.cfg",
        "expected ≥ 1.0 (1.0 = no guidance), found {}",
        sp.cfg
    );
    check!(
        sp.temperature > 0.0,
        "sample.temperature",
        "must be positive, found {}",
        sp.temperature
    );
    let e = &s.eval;
    check!(
        e.classifier_steps >= 1,
        "eval.classifier_steps",
        "expected at least 1"
    );
    check!(
        e.classifier_features >= 2,
        "eval.classifier_features",
        "expected at least 2"
    );
    check!(
        (1..=sp.count).contains(&e.is_splits),
        "eval.is_splits",
        "expected 1..={} (sample.count), found {}",
        sp.count,
        e.is_splits
    );
    for (metric, tol) in &s.drift {
        check!(
            tol.absolute.is_some() || tol.relative.is_some() || tol.seed_spread.is_some(),
            &format!("drift.{metric}"),
            "give at least one of absolute, relative, seed_spread"
        );
        for (mode, v) in [
            ("absolute", tol.absolute),
            ("relative", tol.relative),
            ("seed_spread", tol.seed_spread),
        ] {
            if let Some(v) = v {
                check!(
                    v.is_finite() && v >= 0.0,
                    &format!("drift.{metric}.{mode}"),
                    "expected a finite number ≥ 0, found {v}"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"
name = "t"
seeds = [1, 2]

[data]
source = "synthetic"

[tokenizers.px]
kind = "patch"

[tokenizers.km]
kind = "kmeans"

[generator]
kind = "ar"

[arms]
cross-entropy = { tokenizer = "km" }
diffusion = { tokenizer = "px" }

[grid]
"generator.kind" = ["ar", "mar"]
"train.steps" = [10, 20]
"#;

    #[test]
    fn grid_expands_to_cells_arms_and_seeds() {
        let l = load_str("mini.toml", MINI, &[]).expect("valid");
        assert_eq!(l.cells.len(), 4);
        let runs = l.runs();
        assert_eq!(runs.len(), 16);
        let hashes: std::collections::HashSet<_> = runs.iter().map(|r| r.hash("")).collect();
        assert_eq!(hashes.len(), 16, "every run has its own identity");
        assert!(l
            .cells
            .iter()
            .any(|c| c.label == "generator.kind=mar · train.steps=20"));
    }

    #[test]
    fn overrides_change_the_hash_of_what_they_touch() {
        let a = load_str("m", MINI, &[]).expect("valid").runs();
        let b = load_str("m", MINI, &["sample.count=100".into()])
            .expect("valid")
            .runs();
        assert_eq!(b[0].spec.sample.count, 100);
        assert_ne!(a[0].hash(""), b[0].hash(""));
        let c = load_str("m", MINI, &["device=\"cuda:0\"".into()])
            .expect("valid")
            .runs();
        assert_eq!(
            a[0].hash(""),
            c[0].hash(""),
            "the device is not part of a run's identity"
        );
    }

    #[test]
    fn drift_tolerances_load_and_negative_ones_are_refused() {
        let ok = format!("{MINI}\n[drift]\nfid = {{ absolute = 0.5, seed_spread = 2.0 }}\n");
        let l = load_str("d.toml", &ok, &[]).expect("valid drift");
        let fid = &l.base.drift["fid"];
        assert_eq!(
            (fid.absolute, fid.relative, fid.seed_spread),
            (Some(0.5), None, Some(2.0))
        );
        let bad = format!("{MINI}\n[drift]\nis = {{ relative = -0.1 }}\n");
        let e = load_str("d.toml", &bad, &[])
            .expect_err("negative")
            .to_string();
        assert!(e.contains("drift.is.relative") && e.contains("≥ 0"), "{e}");
        let empty = format!("{MINI}\n[drift]\nis = {{}}\n");
        let e = load_str("d.toml", &empty, &[])
            .expect_err("empty")
            .to_string();
        assert!(e.contains("drift.is") && e.contains("at least one"), "{e}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let bad = MINI.replace("kind = \"ar\"", "kind = \"ar\"\nordr = \"raster\"");
        let e = load_str("bad.toml", &bad, &[])
            .expect_err("unknown key")
            .to_string();
        assert!(e.starts_with("bad.toml:16:"), "{e}");
        assert!(
            e.contains("generator.ordr") && e.contains("unknown field"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_and_out_of_range_are_located() {
        let bad = MINI.replace(
            "seeds = [1, 2]",
            "seeds = [1, 2]\n[train]\nbase_lr = \"fast\"",
        );
        let e = load_str("b.toml", &bad, &[]).expect_err("type").to_string();
        assert!(
            e.starts_with("b.toml:5:") && e.contains("train.base_lr"),
            "{e}"
        );
        let bad = MINI.replace("seeds = [1, 2]", "seeds = [1, 2]\n[train]\nbase_lr = -1.0");
        let e = load_str("b.toml", &bad, &[])
            .expect_err("range")
            .to_string();
        assert!(
            e.starts_with("b.toml:5:1: train.base_lr: must be positive"),
            "{e}"
        );
        let e = load_str("b.toml", MINI, &["sample.mar_steps=99".into()])
            .expect_err("range")
            .to_string();
        assert!(
            e.contains("sample.mar_steps") && e.contains("1..=16"),
            "{e}"
        );
        let bad = MINI.replace(
            "diffusion = { tokenizer = \"px\" }",
            "diffusion = { tokenizer = \"km\" }",
        );
        let e = load_str("b.toml", &bad, &[]).expect_err("arm").to_string();
        assert!(
            e.contains("arms.diffusion.tokenizer") && e.contains("continuous"),
            "{e}"
        );
    }

    #[test]
    fn precision_is_in_the_identity_only_when_not_f32() {
        let base = load_str("m", MINI, &[]).expect("valid").runs();
        let f32_runs = load_str("m", MINI, &["train.precision=f32".into()])
            .expect("valid")
            .runs();
        assert_eq!(f32_runs[0].spec.train.precision, PrecisionSpec::F32);
        assert_eq!(
            base[0].hash(""),
            f32_runs[0].hash(""),
            "the default leaves existing hashes alone"
        );
        assert!(!serde_json::to_string(&base[0].spec)
            .expect("json")
            .contains("precision"));
        let bf16 = MINI.replace(
            "seeds = [1, 2]",
            "seeds = [1, 2]\n[train]\nprecision = \"bf16\"",
        );
        let bf16_runs = load_str("p.toml", &bf16, &[]).expect("valid").runs();
        assert_eq!(bf16_runs[0].spec.train.precision, PrecisionSpec::Bf16);
        assert_ne!(base[0].hash(""), bf16_runs[0].hash(""));
        assert_ne!(base[0].train_hash(""), bf16_runs[0].train_hash(""));
        let params = serde_json::to_value(&bf16_runs[0].spec).expect("json");
        assert_eq!(
            params["train"]["precision"], "bf16",
            "recorded in the params"
        );
        let bad = MINI.replace(
            "seeds = [1, 2]",
            "seeds = [1, 2]\n[train]\nprecision = \"fp16\"",
        );
        let e = load_str("p.toml", &bad, &[]).expect_err("fp16").to_string();
        assert!(
            e.starts_with("p.toml:5:")
                && e.contains("train.precision")
                && e.contains("f32")
                && e.contains("bf16")
                && e.contains("fp16"),
            "{e}"
        );
        let e = load_str("m", MINI, &["train.precision=half".into()])
            .expect_err("half")
            .to_string();
        assert!(e.contains("train.precision") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn ema_and_batch_are_bounded() {
        for bad in ["-0.5", "1", "2", "nan"] {
            let e = load_str("m", MINI, &[format!("train.ema={bad}")])
                .expect_err(bad)
                .to_string();
            assert!(
                e.contains("train.ema") && e.contains("[0, 1)"),
                "{bad}: {e}"
            );
        }
        load_str("m", MINI, &["train.ema=0".into()]).expect("0 evaluates the raw weights");
        let e = load_str(
            "m",
            MINI,
            &["data.train=120".into(), "train.batch=100000".into()],
        )
        .expect_err("a batch larger than the data")
        .to_string();
        assert!(e.contains("train.batch") && e.contains("120"), "{e}");
    }

    #[test]
    fn dropout_and_decoder_heads_are_checked_and_in_the_identity() {
        for key in ["generator.attn_dropout", "generator.proj_dropout"] {
            for bad in ["-0.1", "1", "nan"] {
                let e = load_str("m", MINI, &[format!("{key}={bad}")])
                    .expect_err(bad)
                    .to_string();
                assert!(e.contains(key) && e.contains("[0, 1)"), "{key}={bad}: {e}");
            }
        }
        let e = load_str("m", MINI, &["generator.decoder_heads=3".into()])
            .expect_err("3 heads do not divide width 64")
            .to_string();
        assert!(
            e.contains("generator.decoder_heads") && e.contains("64"),
            "{e}"
        );
        let base = load_str("m", MINI, &[]).expect("mini").runs();
        let other = load_str("m", MINI, &["generator.attn_dropout=0".into()])
            .expect("no attention dropout")
            .runs();
        assert_ne!(
            base[0].hash(""),
            other[0].hash(""),
            "dropout is part of a run's identity"
        );
    }

    #[test]
    fn an_unclosed_array_is_reported_where_it_opens() {
        let src = "name = \"x\"\n# a [comment]\nseeds = [0\n\n[data]\nsource = \"synthetic\"\n";
        let e = load_str("s.toml", src, &[])
            .expect_err("unclosed")
            .to_string();
        assert!(
            e.starts_with("s.toml:3:9: seeds: this array is not closed"),
            "{e}"
        );
        assert!(e.contains("before line 5"), "{e}");
        // arrays that close, strings with brackets, and table headers are no trouble
        let ok = format!("{MINI}\n");
        assert_eq!(unclosed_array_before(&ok, ok.len()), None);
        let s = "a = \"[\"\nb = [1, [2]]\n[t]\nc = 1\n";
        assert_eq!(unclosed_array_before(s, s.len()), None);
    }

    #[test]
    fn sizes_beyond_the_memory_are_refused_with_the_key() {
        let big = load_str("m.toml", MINI, &["sample.count=10000000000".into()]).expect("valid");
        let e = check_memory(&big, 24 << 30)
            .expect_err("160 TB of samples")
            .to_string();
        assert!(
            e.starts_with("m.toml:") && e.contains("sample.count: 10000000000 needs"),
            "{e}"
        );
        assert!(e.contains("24.0 GiB available"), "{e}");
        let small = load_str("m.toml", MINI, &[]).expect("valid");
        check_memory(&small, 24 << 30).expect("the mini spec fits");
        assert!(available_memory().is_some_and(|b| b > 0));
    }

    #[test]
    fn too_few_images_says_how_many_are_needed() {
        let e = load_str("m", MINI, &["data.classes=10".into(), "data.test=2".into()])
            .expect_err("2 test images for 10 classes")
            .to_string();
        assert!(
            e.contains("data.test") && e.contains("at least 20 for 10 classes, found 2"),
            "{e}"
        );
    }

    #[test]
    fn long_names_are_refused() {
        let long = MINI.replace("name = \"t\"", &format!("name = \"{}\"", "x".repeat(101)));
        let e = load_str("m", &long, &[])
            .expect_err("101 bytes")
            .to_string();
        assert!(e.contains("name") && e.contains("100 bytes"), "{e}");
    }
}
