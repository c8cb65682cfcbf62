//! The experiment spec: serde types (`deny_unknown_fields` everywhere) with their defaults, and
//! the expansion of a loaded spec into cells × arms × seeds. Loading (file:line:column errors,
//! `--set` overrides, the grid) is in `load.rs`, the range and consistency checks in
//! `validate.rs`, the memory bound in `memory.rs`; what identifies a run is in `crate::identity`.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

mod load;
mod memory;
mod validate;

pub use load::{load, load_str, locate, parse_override};
pub use memory::{available_memory, check_memory, memory_needed};

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
    /// data parallelism: one rank per device named here (e.g. ["cuda:0", "cuda:1"]), threads of
    /// this process, each computing batch / N rows of every step; empty = the run's device
    /// alone. Not part of the identity: the ranks' results equal one rank's up to rounding
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
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
    /// The name stored with each run and used as the spec's `[arms]` key (`db::ARM_*`; serde's
    /// kebab-case spelling above must agree, which a test checks).
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::CrossEntropy => db::ARM_CROSS_ENTROPY,
            Arm::Diffusion => db::ARM_DIFFUSION,
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::load::unclosed_array_before;
    use super::*;

    /// The arm names serde reads and writes are the ones stored with runs (`db::ARM_*`).
    #[test]
    fn arm_names_are_the_stored_ones() {
        for arm in [Arm::CrossEntropy, Arm::Diffusion] {
            assert_eq!(serde_json::to_value(arm).expect("json"), arm.as_str());
        }
        let arms: serde_json::Value = serde_json::to_value(ArmsSpec {
            cross_entropy: ArmSpec {
                tokenizer: "a".into(),
            },
            diffusion: ArmSpec {
                tokenizer: "b".into(),
            },
        })
        .expect("json");
        assert_eq!(arms[db::ARM_CROSS_ENTROPY]["tokenizer"], "a");
        assert_eq!(arms[db::ARM_DIFFUSION]["tokenizer"], "b");
    }

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

    /// Overrides reach the base spec too: `--set name=…` names the experiment (it was read
    /// from the file alone, so the override was silently ignored).
    #[test]
    fn overrides_reach_the_base_spec() {
        let l = load_str(
            "t.toml",
            MINI,
            &["name=\"other\"".into(), "seeds=[5]".into()],
        )
        .expect("loads");
        assert_eq!(l.base.name, "other");
        assert_eq!(l.base.seeds, vec![5]);
        assert!(l.cells.iter().all(|c| c.spec.name == "other"));
    }

    /// Every spec shipped in `experiments/` loads and validates (a key renamed in the code
    /// would otherwise break them unnoticed until a user runs one).
    #[test]
    fn the_shipped_specs_load() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments");
        let mut loaded = 0;
        for entry in std::fs::read_dir(&dir).expect("experiments/") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let spec = load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!spec.runs().is_empty(), "{}: no runs", path.display());
                loaded += 1;
            }
        }
        assert!(loaded >= 6, "only {loaded} specs under {}", dir.display());
    }

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
