//! What identifies a result: one place for every content hash that decides whether a run, a
//! tokenizer, the feature net or the reference statistics are computed anew or reused. Each is
//! the hash of a JSON identity built here: the configuration that decides the result, the data's
//! fingerprint where the data comes from files, and [`RESULTS_VERSION`].
use sha2::{Digest, Sha256};

use crate::data::Dataset;
use crate::spec::{Arm, DataSource, EvalSpec, PlannedRun, TokenizerSpec};

/// Bumped when a change to the code changes what a run with the same spec produces.
/// 2: causal AR runs have depth + decoder_depth blocks (size parity with MAR).
/// 3: Gaussian noise is generated on the run's device from a key of its seeded stream
///    (`fused::gaussian_noise`), so the noise values differ from version 2's; the generator's
///    blocks have dropout 0.1 by default (generator.attn_dropout / proj_dropout, as the
///    reference), generator.decoder_heads is a key, and causal AR's linear guidance counts the
///    tokens known after each step as MAR does (`models::sampling::ar_tokens_known_after`).
/// 4: `head.clip_denoised = true` clamps x̂_0 to [-1, 1] when sampling; before, the flag was
///    stored but never applied, so those runs sampled without clipping.
pub const RESULTS_VERSION: &str = "4";

/// sha256 of the canonical JSON (serde_json sorts object keys) of a value, hex, 16 chars.
pub fn content_hash(v: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(v.to_string().as_bytes());
    hex::encode(h.finalize())[..16].to_string()
}

impl PlannedRun {
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
        // where the batch is computed is not what is computed (as `device`)
        if let Some(train) = id["train"].as_object_mut() {
            train.remove("devices");
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

/// The identity of a tokenizer fitted with `seed` on data `ds` (how the generator then uses the
/// tokens, e.g. `sample_posterior`, is not part of it).
pub fn tokenizer(tokenizer: &TokenizerSpec, seed: u64, ds: &Dataset) -> serde_json::Value {
    let mut tokenizer = tokenizer.clone();
    tokenizer.sample_posterior = false;
    serde_json::json!({
        "results_version": RESULTS_VERSION,
        "data": ds.fingerprint,
        "tokenizer": tokenizer,
        "seed": seed,
    })
}

/// The identity of the classifier feature net trained on data `ds`.
pub fn classifier(eval: &EvalSpec, ds: &Dataset) -> serde_json::Value {
    serde_json::json!({
        "results_version": RESULTS_VERSION,
        "data": ds.fingerprint,
        "classifier_steps": eval.classifier_steps,
        "classifier_features": eval.classifier_features,
        "classifier_seed": eval.classifier_seed,
    })
}

/// The key of the test split's reference statistics under feature net `net_id` (its weights'
/// hash for Inception) and image `convention`.
pub fn reference_stats(ds: &Dataset, net_id: &str, convention: &str) -> String {
    format!(
        "{}-{}-test-{net_id}-{convention}",
        ds.name,
        &ds.fingerprint[..ds.fingerprint.len().min(8)],
    )
}
