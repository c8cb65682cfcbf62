//! Reference MAR checkpoints. `import` reads a PyTorch `.pth` written by the official MAR code
//! (a dict with `model`, `model_ema`, maybe `optimizer`, `epoch`, `args`), infers the MAR
//! configuration from tensor shapes, checks every tensor against what our `models::mar::Mar`
//! needs, and writes `model.safetensors`, `model_ema.safetensors` (names unchanged) and
//! `config.json`. `load_mar` builds our MAR back from such a folder.
use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use models::diffusion::Schedule;
use models::mar::Mar;

use crate::Error;
use models::{GeneratorConfig, GeneratorKind, HeadConfig, Order, Precision};
use serde::{Deserialize, Serialize};

/// A checkpoint, weight file or configuration that cannot be used as asked, naming the file.
/// The CLI exits with code 2 on it (the input is at fault, not the work).
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub struct CheckpointError {
    pub path: PathBuf,
    pub msg: String,
}

fn fail<T>(path: &Path, msg: impl Into<String>) -> Result<T, CheckpointError> {
    Err(CheckpointError {
        path: path.to_path_buf(),
        msg: msg.into(),
    })
}

/// The MAR configuration under the reference's argument names (`main_mar.py` / `models/mar.py`),
/// plus the derived sequence length and token width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarConfig {
    pub img_size: usize,
    pub vae_stride: usize,
    pub patch_size: usize,
    pub encoder_embed_dim: usize,
    pub encoder_depth: usize,
    pub encoder_num_heads: usize,
    pub decoder_embed_dim: usize,
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    pub mlp_ratio: f64,
    pub vae_embed_dim: usize,
    pub class_num: usize,
    pub buffer_size: usize,
    pub diffloss_d: usize,
    pub diffloss_w: usize,
    /// the reference passes this as a string (a respacing spec); we support a step count
    pub num_sampling_steps: String,
    pub diffusion_batch_mul: usize,
    /// tokens per image: (img_size / vae_stride / patch_size)²
    pub seq_len: usize,
    /// width of a token: vae_embed_dim · patch_size²
    pub token_embed_dim: usize,
    /// the Diffusion Loss MLP predicts the variance range too (its output is 2 · token width)
    pub learn_sigma: bool,
}

impl MarConfig {
    /// Our generator configuration for this MAR (Diffusion Loss head, cosine schedule, 1000
    /// training steps, as in the reference). `sampling_steps` overrides `num_sampling_steps`.
    pub fn generator_config(
        &self,
        sampling_steps: Option<usize>,
    ) -> Result<GeneratorConfig, String> {
        let sampling_steps = match sampling_steps {
            Some(s) => s,
            None => self.num_sampling_steps.trim().parse().map_err(|_| {
                format!(
                    "num_sampling_steps '{}': only an even respacing to N steps (a number) is \
                     supported",
                    self.num_sampling_steps
                )
            })?,
        };
        if sampling_steps == 0 || sampling_steps > 1000 {
            return Err(format!(
                "diffusion sampling steps must be in 1..=1000, found {sampling_steps}"
            ));
        }
        let cfg = GeneratorConfig {
            kind: GeneratorKind::Mar,
            order: Order::Random,
            seq_len: self.seq_len,
            token_dim: self.token_embed_dim,
            width: self.encoder_embed_dim,
            depth: self.encoder_depth,
            decoder_width: self.decoder_embed_dim,
            decoder_depth: self.decoder_depth,
            heads: self.encoder_num_heads,
            decoder_heads: self.decoder_num_heads,
            mlp_ratio: self.mlp_ratio,
            num_classes: self.class_num,
            buffer_size: self.buffer_size,
            label_drop: 0.0,
            // an imported model only samples, where dropout is off
            attn_dropout: 0.0,
            proj_dropout: 0.0,
            head: HeadConfig::Diffusion {
                width: self.diffloss_w,
                depth: self.diffloss_d,
                batch_mul: self.diffusion_batch_mul,
                train_steps: 1000,
                sampling_steps,
                schedule: Schedule::Cosine,
                learn_sigma: self.learn_sigma,
                clip_denoised: false,
            },
            precision: Precision::F32,
        };
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// Side of the token grid.
    pub fn grid_side(&self) -> usize {
        self.img_size / self.vae_stride / self.patch_size
    }
}

/// What `import` cannot read from tensor shapes: given on the command line, else taken from the
/// checkpoint's `args`, else the reference defaults.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// attention heads of encoder and decoder (default: the reference model's, from `args.model`,
    /// else width / 64)
    pub heads: Option<usize>,
    /// attention heads of the decoder (default: `args.decoder_num_heads`, else `heads`)
    pub decoder_heads: Option<usize>,
    pub patch_size: Option<usize>,
    pub vae_stride: Option<usize>,
    pub diffusion_batch_mul: Option<usize>,
    pub num_sampling_steps: Option<String>,
}

/// A scalar of the checkpoint's `args` namespace.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    None,
}

impl ArgValue {
    fn from_object(o: &Object) -> Option<Self> {
        Some(match o {
            Object::Int(i) => ArgValue::Int(*i as i64),
            Object::Long(i) => ArgValue::Int(*i),
            Object::Float(f) => ArgValue::Float(*f),
            Object::Unicode(s) => ArgValue::Str(s.clone()),
            Object::Bool(b) => ArgValue::Bool(*b),
            Object::None => ArgValue::None,
            _ => return None,
        })
    }

    fn as_usize(&self) -> Option<usize> {
        match self {
            ArgValue::Int(i) if *i > 0 => Some(*i as usize),
            _ => None,
        }
    }

    fn as_string(&self) -> Option<String> {
        match self {
            ArgValue::Str(s) => Some(s.clone()),
            ArgValue::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }
}

/// A parsed PyTorch checkpoint: its top-level entries, the tensors of its state dicts (read on
/// demand from the zip archive) and the scalars of `epoch` and `args`.
pub struct PthCheckpoint {
    pub path: PathBuf,
    /// top-level keys of the checkpoint dict, sorted
    pub entries: Vec<String>,
    pub epoch: Option<i64>,
    pub args: BTreeMap<String, ArgValue>,
    state_dicts: BTreeMap<String, Vec<TensorInfo>>,
}

fn key_name(o: &Object) -> Option<String> {
    match o {
        Object::Unicode(s) => Some(s.clone()),
        Object::Int(i) => Some(i.to_string()),
        Object::Long(i) => Some(i.to_string()),
        _ => None,
    }
}

/// The attribute dict of a pickled plain object (e.g. an `argparse.Namespace`).
fn object_attributes(o: &Object) -> Option<&Vec<(Object, Object)>> {
    match o {
        Object::Build { args, .. } => match args.as_ref() {
            Object::Dict(d) => Some(d),
            _ => None,
        },
        Object::Dict(d) => Some(d),
        _ => None,
    }
}

impl PthCheckpoint {
    /// Read the checkpoint's pickle (not yet the tensor data).
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => return fail(path, format!("cannot open: {e}")),
        };
        let mut head = [0u8; 2];
        let legacy = std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && head[0] == 0x80;
        let mut zip = match zip::ZipArchive::new(BufReader::new(file)) {
            Ok(z) => z,
            Err(e) if legacy => {
                return fail(
                    path,
                    format!(
                        "not a zip archive ({e}): this looks like the legacy (torch < 1.6) \
                         format; re-save it with a recent torch (`torch.save(torch.load(p), p2)`)"
                    ),
                )
            }
            Err(e) => {
                return fail(
                    path,
                    format!(
                        "not a PyTorch checkpoint: not a zip archive ({e}); the file may be \
                         truncated or of another format"
                    ),
                )
            }
        };
        let pkl = (0..zip.len())
            .filter_map(|i| zip.name_for_index(i).and_then(|n| n.ok()))
            .map(|n| n.into_owned())
            .find(|n| n.ends_with("data.pkl"));
        let Some(pkl) = pkl else {
            return fail(
                path,
                "not a PyTorch checkpoint: the zip archive has no data.pkl",
            );
        };
        let dir_name = PathBuf::from(pkl.trim_end_matches(".pkl"));
        let obj = {
            let reader = match zip.by_name(&pkl) {
                Ok(r) => r,
                Err(e) => return fail(path, format!("cannot read {pkl}: {e}")),
            };
            let mut reader = BufReader::new(reader);
            let mut stack = Stack::empty();
            if let Err(e) = stack.read_loop(&mut reader) {
                return fail(path, format!("cannot read the pickle {pkl}: {e}"));
            }
            match stack.finalize() {
                Ok(o) => o,
                Err(e) => return fail(path, format!("cannot read the pickle {pkl}: {e}")),
            }
        };
        let Object::Dict(items) = obj else {
            return fail(
                path,
                "the checkpoint is not a dict (expected the official MAR format: \
                 {'model': state_dict, 'model_ema': state_dict, ...})",
            );
        };
        let mut ckpt = PthCheckpoint {
            path: path.to_path_buf(),
            entries: Vec::new(),
            epoch: None,
            args: BTreeMap::new(),
            state_dicts: BTreeMap::new(),
        };
        for (k, v) in items {
            let Some(key) = key_name(&k) else { continue };
            ckpt.entries.push(key.clone());
            match key.as_str() {
                "model" | "model_ema" => {
                    let Object::Dict(sd) = v else {
                        return fail(path, format!("entry '{key}' is not a state dict"));
                    };
                    let mut infos = Vec::new();
                    for (name, value) in sd {
                        let label = key_name(&name).unwrap_or_else(|| format!("{name:?}"));
                        match value.into_tensor_info(name, &dir_name) {
                            Ok(Some(info)) => infos.push(info),
                            Ok(None) => {} // `_metadata` and other non-tensor values
                            Err(e) => {
                                return fail(path, format!("{key}: tensor '{label}': {e}"));
                            }
                        }
                    }
                    ckpt.state_dicts.insert(key, infos);
                }
                "epoch" => {
                    ckpt.epoch = match v {
                        Object::Int(i) => Some(i as i64),
                        Object::Long(i) => Some(i),
                        _ => None,
                    }
                }
                "args" => {
                    if let Some(attrs) = object_attributes(&v) {
                        for (name, value) in attrs {
                            if let (Some(n), Some(a)) =
                                (key_name(name), ArgValue::from_object(value))
                            {
                                ckpt.args.insert(n, a);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        // candle's pickle reader does not keep the dict's insertion order
        ckpt.entries.sort();
        if !ckpt.state_dicts.contains_key("model") {
            let found = match ckpt.entries.len() {
                0 => "nothing".to_string(),
                n if n > 8 => format!("{}, … ({n} in all)", ckpt.entries[..8].join(", ")),
                _ => ckpt.entries.join(", "),
            };
            let hint = if ckpt.entries.iter().any(|e| e == "z_proj.weight") {
                "; this looks like a bare state_dict: save it as torch.save({'model': sd}, path)"
            } else {
                ""
            };
            return fail(
                path,
                format!(
                    "no 'model' entry (found: {found}); expected the official MAR checkpoint \
                     format {{'model': state_dict, 'model_ema': state_dict, ...}}{hint}"
                ),
            );
        }
        Ok(ckpt)
    }

    /// Whether the checkpoint holds the state dict `key` (`model`, `model_ema`).
    pub fn has(&self, key: &str) -> bool {
        self.state_dicts.contains_key(key)
    }

    /// Name → shape of the tensors of state dict `key`.
    pub fn shapes(&self, key: &str) -> BTreeMap<String, Vec<usize>> {
        self.state_dicts
            .get(key)
            .map(|infos| {
                infos
                    .iter()
                    .map(|i| (i.name.clone(), i.layout.dims().to_vec()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Read every tensor of state dict `key` (dtype as stored, contiguous).
    pub fn tensors(&self, key: &str) -> Result<Vec<(String, Tensor)>, CheckpointError> {
        let path = &self.path;
        let Some(infos) = self.state_dicts.get(key) else {
            return fail(path, format!("no '{key}' entry"));
        };
        let file =
            std::fs::File::open(path).or_else(|e| fail(path, format!("cannot open: {e}")))?;
        let mut zip = zip::ZipArchive::new(BufReader::new(file))
            .or_else(|e| fail(path, format!("not a zip archive: {e}")))?;
        let mut out = Vec::with_capacity(infos.len());
        for info in infos {
            let t = read_tensor(&mut zip, info)
                .or_else(|e| fail(path, format!("{key}: tensor '{}': {e}", info.name)))?;
            out.push((info.name.clone(), t));
        }
        Ok(out)
    }
}

/// One tensor's data from the archive (after candle's `PthTensors::get`, sharing one archive).
fn read_tensor<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    info: &TensorInfo,
) -> candle_core::Result<Tensor> {
    let mut reader = zip
        .by_name(&info.path)
        .map_err(|e| candle_core::Error::Msg(format!("storage {}: {e}", info.path)))?;
    let layout = &info.layout;
    let fortran = layout.is_fortran_contiguous();
    if !layout.is_contiguous() && !fortran {
        candle_core::bail!("non-contiguous tensor ({:?}) is not supported", layout)
    }
    let start = layout.start_offset();
    if start > 0 {
        std::io::copy(
            &mut reader.by_ref().take(start as u64),
            &mut std::io::sink(),
        )?;
    }
    let mut bytes = vec![0u8; layout.shape().elem_count() * info.dtype.size_in_bytes()];
    reader.read_exact(&mut bytes).map_err(|e| {
        candle_core::Error::Msg(format!(
            "storage {}: {e} (the archive is truncated or the storage is smaller than the tensor)",
            info.path
        ))
    })?;
    let t = Tensor::from_raw_buffer(&bytes, info.dtype, layout.dims(), &Device::Cpu)?;
    let rank = layout.shape().rank();
    if rank > 1 && fortran && !layout.is_contiguous() {
        let reversed: Vec<usize> = layout.dims().iter().rev().cloned().collect();
        let perm: Vec<usize> = (0..rank).rev().collect();
        return t.reshape(reversed)?.permute(perm)?.contiguous();
    }
    Ok(t)
}

/// Records the name and shape of every parameter a model asks for; hands out zero views.
struct ShapeRecorder(Arc<Mutex<Vec<Parameter>>>);

/// A parameter's name and shape.
pub type Parameter = (String, Vec<usize>);

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .expect("shape recorder lock")
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: a parameter without a known shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// Name → shape of every parameter our MAR needs for `cfg`, in construction order.
pub fn expected_parameters(cfg: &GeneratorConfig) -> models::Result<Vec<(String, Vec<usize>)>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(
        Box::new(ShapeRecorder(seen.clone())),
        DType::F32,
        Device::Cpu,
    );
    Mar::new(cfg, vb)?;
    let v = seen.lock().expect("shape recorder lock").clone();
    Ok(v)
}

/// How a set of tensors compares with what our model needs.
#[derive(Debug, Default)]
pub struct Coverage {
    pub missing: Vec<(String, Vec<usize>)>,
    /// (name, expected, found)
    pub misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// names in the file our model does not use
    pub unused: Vec<String>,
    /// parameters our model uses (count of scalars)
    pub used_scalars: usize,
}

impl Coverage {
    pub fn check(expected: &[(String, Vec<usize>)], found: &BTreeMap<String, Vec<usize>>) -> Self {
        let mut c = Coverage::default();
        for (name, shape) in expected {
            match found.get(name) {
                None => c.missing.push((name.clone(), shape.clone())),
                Some(f) if f != shape => c.misshaped.push((name.clone(), shape.clone(), f.clone())),
                Some(_) => c.used_scalars += shape.iter().product::<usize>(),
            }
        }
        let wanted: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        c.unused = found
            .keys()
            .filter(|k| !wanted.contains(k.as_str()))
            .cloned()
            .collect();
        c
    }

    /// An error text naming every missing and mis-shaped tensor, or None when all fit.
    pub fn problems(&self, what: &str) -> Option<String> {
        if self.missing.is_empty() && self.misshaped.is_empty() {
            return None;
        }
        let mut lines = Vec::new();
        for (n, e, f) in &self.misshaped {
            lines.push(format!(
                "{what}: tensor '{n}' has shape {f:?}, expected {e:?}"
            ));
        }
        if !self.missing.is_empty() {
            let names: Vec<String> = self
                .missing
                .iter()
                .map(|(n, s)| format!("{n} {s:?}"))
                .collect();
            lines.push(format!(
                "{what}: {} tensor(s) our MAR needs are missing: {}",
                self.missing.len(),
                names.join(", ")
            ));
        }
        Some(lines.join("; "))
    }
}

fn dims_of<'a>(
    path: &Path,
    shapes: &'a BTreeMap<String, Vec<usize>>,
    name: &str,
    rank: usize,
) -> Result<&'a [usize], CheckpointError> {
    match shapes.get(name) {
        None => fail(
            path,
            format!(
                "model: no tensor '{name}', needed to infer the MAR configuration (is this an \
                 official MAR checkpoint with a Diffusion Loss head?)"
            ),
        ),
        Some(d) if d.len() != rank => fail(
            path,
            format!("model: tensor '{name}' has shape {d:?}, expected rank {rank}"),
        ),
        Some(d) => Ok(d),
    }
}

/// Number of `prefix.{i}.` groups (blocks) among the names.
fn count_blocks(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> usize {
    shapes
        .keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Heads of the reference's named models (`models/mar.py`: mar_base, mar_large, mar_huge).
fn reference_heads(model: &str, width: usize) -> Option<usize> {
    match (model, width) {
        ("mar_base", 768) => Some(12),
        ("mar_large", 1024) | ("mar_huge", 1280) => Some(16),
        _ => None,
    }
}

/// The MAR configuration of a `model` state dict, from its tensor shapes, `opts` and `args`.
pub fn infer_config(
    path: &Path,
    shapes: &BTreeMap<String, Vec<usize>>,
    args: &BTreeMap<String, ArgValue>,
    opts: &ImportOptions,
) -> Result<MarConfig, CheckpointError> {
    let arg_usize = |k: &str| args.get(k).and_then(ArgValue::as_usize);
    let z_proj = dims_of(path, shapes, "z_proj.weight", 2)?;
    let (width, token_dim) = (z_proj[0], z_proj[1]);
    let class_num = dims_of(path, shapes, "class_emb.weight", 2)?[0];
    let enc_pos = dims_of(path, shapes, "encoder_pos_embed_learned", 3)?[1];
    let diff_pos = dims_of(path, shapes, "diffusion_pos_embed_learned", 3)?;
    let (seq_len, decoder_width) = (diff_pos[1], diff_pos[2]);
    if enc_pos < seq_len {
        return fail(
            path,
            format!(
                "model: encoder_pos_embed_learned holds {enc_pos} positions, fewer than the \
                 {seq_len} tokens of diffusion_pos_embed_learned"
            ),
        );
    }
    let fc1 = dims_of(path, shapes, "encoder_blocks.0.mlp.fc1.weight", 2)?;
    let mlp_ratio = fc1[0] as f64 / width as f64;
    let dl_in = dims_of(path, shapes, "diffloss.net.input_proj.weight", 2)?;
    let dl_out = dims_of(path, shapes, "diffloss.net.final_layer.linear.weight", 2)?;
    let diffloss_w = dl_in[0];
    let learn_sigma = dl_out[0] == 2 * token_dim;

    let patch_size = opts
        .patch_size
        .or_else(|| arg_usize("patch_size"))
        .unwrap_or(1);
    let vae_stride = opts
        .vae_stride
        .or_else(|| arg_usize("vae_stride"))
        .unwrap_or(16);
    if !token_dim.is_multiple_of(patch_size * patch_size) {
        return fail(
            path,
            format!(
                "token width {token_dim} (z_proj.weight) is not divisible by patch_size² = {}; \
                 give the right --patch-size",
                patch_size * patch_size
            ),
        );
    }
    let side = (seq_len as f64).sqrt().round() as usize;
    if side * side != seq_len {
        return fail(
            path,
            format!("model: {seq_len} tokens (diffusion_pos_embed_learned) is not a square grid"),
        );
    }
    let model_name = args.get("model").and_then(ArgValue::as_string);
    let heads = match opts.heads.or_else(|| arg_usize("encoder_num_heads")) {
        Some(h) => h,
        None => match model_name
            .as_deref()
            .and_then(|m| reference_heads(m, width))
        {
            Some(h) => h,
            None if width.is_multiple_of(64) => width / 64,
            None => {
                return fail(
                    path,
                    format!("cannot infer the head count of width {width}: give --heads"),
                )
            }
        },
    };
    let decoder_heads = opts
        .decoder_heads
        .or_else(|| arg_usize("decoder_num_heads"))
        .unwrap_or(heads);
    for (what, w, h, flag) in [
        ("encoder", width, heads, "--heads"),
        ("decoder", decoder_width, decoder_heads, "--decoder-heads"),
    ] {
        if h == 0 || !w.is_multiple_of(h) {
            return fail(
                path,
                format!("{what} width {w} is not divisible by {h} heads; give {flag}"),
            );
        }
    }
    let num_sampling_steps = opts
        .num_sampling_steps
        .clone()
        .or_else(|| args.get("num_sampling_steps").and_then(ArgValue::as_string))
        .unwrap_or_else(|| "100".into());
    Ok(MarConfig {
        img_size: side * patch_size * vae_stride,
        vae_stride,
        patch_size,
        encoder_embed_dim: width,
        encoder_depth: count_blocks(shapes, "encoder_blocks."),
        encoder_num_heads: heads,
        decoder_embed_dim: decoder_width,
        decoder_depth: count_blocks(shapes, "decoder_blocks."),
        decoder_num_heads: decoder_heads,
        mlp_ratio,
        vae_embed_dim: token_dim / (patch_size * patch_size),
        class_num,
        buffer_size: enc_pos - seq_len,
        diffloss_d: count_blocks(shapes, "diffloss.net.res_blocks."),
        diffloss_w,
        num_sampling_steps,
        diffusion_batch_mul: opts
            .diffusion_batch_mul
            .or_else(|| arg_usize("diffusion_batch_mul"))
            .unwrap_or(4),
        seq_len,
        token_embed_dim: token_dim,
        learn_sigma,
    })
}

/// What `import` did, for the summary.
#[derive(Debug)]
pub struct ImportReport {
    pub out: PathBuf,
    pub config: MarConfig,
    pub files: Vec<PathBuf>,
    pub entries: Vec<String>,
    pub epoch: Option<i64>,
    /// scalars of the `model` state dict our MAR uses
    pub parameters: usize,
    /// tensors per written state dict
    pub tensors: BTreeMap<String, usize>,
    pub unused: Vec<String>,
    pub has_ema: bool,
}

/// Convert `checkpoint` into `out`: `model.safetensors`, `model_ema.safetensors` (when present)
/// and `config.json`. Everything is checked and written to a temporary folder beside `out` first;
/// on any error nothing appears under `out`.
pub fn import(checkpoint: &Path, out: &Path, opts: &ImportOptions) -> crate::Result<ImportReport> {
    let ckpt = PthCheckpoint::open(checkpoint)?;
    let shapes = ckpt.shapes("model");
    let config = infer_config(checkpoint, &shapes, &ckpt.args, opts)?;
    let gen_cfg = config
        .generator_config(None)
        .or_else(|m| fail(checkpoint, format!("inferred configuration: {m}")))?;
    let expected = expected_parameters(&gen_cfg)
        .or_else(|e| fail(checkpoint, format!("inferred configuration: {e}")))?;
    let keys: Vec<&str> = ["model", "model_ema"]
        .into_iter()
        .filter(|k| ckpt.has(k))
        .collect();
    let mut coverage = BTreeMap::new();
    for key in &keys {
        let c = Coverage::check(&expected, &ckpt.shapes(key));
        if let Some(p) = c.problems(key) {
            return Err(CheckpointError {
                path: checkpoint.to_path_buf(),
                msg: p,
            }
            .into());
        }
        coverage.insert(*key, c);
    }

    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    db::files::create_folder(&parent).map_err(Error::file(&parent))?;
    let tmp = tempdir_beside(out)?;
    let result = (|| -> crate::Result<(Vec<String>, BTreeMap<String, usize>)> {
        let mut names = Vec::new();
        let mut tensors = BTreeMap::new();
        for key in &keys {
            let ts: HashMap<String, Tensor> = ckpt.tensors(key)?.into_iter().collect();
            tensors.insert(key.to_string(), ts.len());
            let file = format!("{key}.safetensors");
            save_safetensors(&ts, &tmp.join(&file))?;
            names.push(file);
        }
        let config_file = tmp.join("config.json");
        std::fs::write(&config_file, serde_json::to_string_pretty(&config)? + "\n")
            .map_err(Error::file(&config_file))?;
        names.push("config.json".into());
        Ok((names, tensors))
    })();
    let (names, tensors) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    publish(&tmp, out, &names, &["model_ema.safetensors"])?;
    let model_cov = &coverage["model"];
    Ok(ImportReport {
        out: out.to_path_buf(),
        files: names.iter().map(|n| out.join(n)).collect(),
        config,
        entries: ckpt.entries.clone(),
        epoch: ckpt.epoch,
        parameters: model_cov.used_scalars,
        tensors,
        unused: model_cov.unused.clone(),
        has_ema: keys.contains(&"model_ema"),
    })
}

/// A fresh empty folder next to `target` (same file system, so renames are atomic).
fn tempdir_beside(target: &Path) -> crate::Result<PathBuf> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let stem = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    for i in 0..1000u32 {
        let p = parent.join(format!(".{stem}.tmp-{}-{i}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::file(&p)(e)),
        }
    }
    Err(Error::Other(format!(
        "no free temporary folder name in {}",
        parent.display()
    )))
}

/// Move the finished files of `tmp` into `out`: one rename of the folder when `out` does not
/// exist, else one rename per file (and `stale` files of an earlier import that this one did not
/// write are removed).
fn publish(tmp: &Path, out: &Path, names: &[String], stale: &[&str]) -> crate::Result<()> {
    if !out.exists() {
        return std::fs::rename(tmp, out).map_err(Error::file(out));
    }
    if !out.is_dir() {
        let _ = std::fs::remove_dir_all(tmp);
        return Err(Error::Usage(format!(
            "{} exists and is not a folder",
            out.display()
        )));
    }
    for n in names {
        let to = out.join(n);
        std::fs::rename(tmp.join(n), &to).map_err(Error::file(&to))?;
    }
    for s in stale {
        if !names.iter().any(|n| n == s) {
            let _ = std::fs::remove_file(out.join(s));
        }
    }
    let _ = std::fs::remove_dir_all(tmp);
    Ok(())
}

/// `candle_core::safetensors::save`, made readable by others like any file we write: the
/// safetensors crate writes through a private (0600) temporary file.
fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> crate::Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::Other(format!("writing {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(Error::file(path))?;
    }
    Ok(())
}

/// Write `tensors` to `path` through a temporary file and a rename.
pub fn save_safetensors_atomic(
    tensors: &HashMap<String, Tensor>,
    path: &Path,
) -> crate::Result<()> {
    db::files::write_atomic(path, |tmp| save_safetensors(tensors, tmp)).map_err(Error::file(path))
}

/// Where the weights and the configuration of an imported model are.
pub fn resolve_weights(
    weights: &Path,
    config: Option<&Path>,
    ema: bool,
) -> Result<(PathBuf, PathBuf), CheckpointError> {
    if weights.is_dir() {
        let file = weights.join(if ema {
            "model_ema.safetensors"
        } else {
            "model.safetensors"
        });
        if !file.exists() {
            return fail(
                &file,
                if ema {
                    "no EMA weights in this folder (the checkpoint had no 'model_ema'): use \
                     --no-ema for model.safetensors"
                } else {
                    "missing: import a checkpoint into this folder with `ablate import`"
                },
            );
        }
        let cfg = config
            .map(Path::to_path_buf)
            .unwrap_or_else(|| weights.join("config.json"));
        return Ok((file, cfg));
    }
    if !weights.exists() {
        return fail(weights, "no such file or folder");
    }
    let cfg = match config {
        Some(c) => c.to_path_buf(),
        None => weights
            .parent()
            .map(|p| p.join("config.json"))
            .unwrap_or_else(|| PathBuf::from("config.json")),
    };
    Ok((weights.to_path_buf(), cfg))
}

/// Read a `config.json` written by `import`.
pub fn read_config(path: &Path) -> Result<MarConfig, CheckpointError> {
    let text = std::fs::read_to_string(path).or_else(|e| {
        fail(
            path,
            format!("cannot read the MAR configuration ({e}); give --config"),
        )
    })?;
    serde_json::from_str(&text).or_else(|e| fail(path, format!("invalid MAR configuration: {e}")))
}

/// Our MAR with the weights of a safetensors file (checked name by name against `config`).
pub fn load_mar(
    weights: &Path,
    config: &MarConfig,
    config_path: &Path,
    sampling_steps: Option<usize>,
    device: &Device,
) -> crate::Result<Mar> {
    let gen_cfg = config
        .generator_config(sampling_steps)
        .or_else(|m| fail(config_path, m))?;
    let expected = expected_parameters(&gen_cfg)?;
    let tensors = candle_core::safetensors::load(weights, device)
        .or_else(|e| fail(weights, format!("not a readable safetensors file: {e}")))?;
    let shapes: BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    if let Some(p) = Coverage::check(&expected, &shapes).problems("weights") {
        return fail(
            weights,
            format!("{p} (for the configuration {})", config_path.display()),
        )
        .map_err(Into::into);
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(Mar::new(&gen_cfg, vb)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MarConfig {
        MarConfig {
            img_size: 64,
            vae_stride: 16,
            patch_size: 1,
            encoder_embed_dim: 32,
            encoder_depth: 2,
            encoder_num_heads: 2,
            decoder_embed_dim: 32,
            decoder_depth: 1,
            decoder_num_heads: 2,
            mlp_ratio: 4.0,
            vae_embed_dim: 4,
            class_num: 3,
            buffer_size: 2,
            diffloss_d: 2,
            diffloss_w: 16,
            num_sampling_steps: "10".into(),
            diffusion_batch_mul: 4,
            seq_len: 16,
            token_embed_dim: 4,
            learn_sigma: true,
        }
    }

    /// The configuration inferred from our own model's parameter shapes is the one it was built
    /// with (given the head count, which shapes do not hold).
    #[test]
    fn inference_inverts_the_parameter_shapes() {
        let c = cfg();
        let expected = expected_parameters(&c.generator_config(None).unwrap()).unwrap();
        let shapes: BTreeMap<String, Vec<usize>> = expected.iter().cloned().collect();
        let opts = ImportOptions {
            heads: Some(2),
            num_sampling_steps: Some("10".into()),
            ..Default::default()
        };
        let inferred = infer_config(Path::new("x.pth"), &shapes, &BTreeMap::new(), &opts).unwrap();
        assert_eq!(inferred, c);
        // reference argument names: encoder/decoder blocks, Diffusion Loss MLP
        assert!(shapes.contains_key("encoder_blocks.1.attn.qkv.weight"));
        assert!(shapes.contains_key("diffloss.net.res_blocks.1.adaLN_modulation.1.weight"));
        assert!(shapes.contains_key("fake_latent"));
    }

    /// Encoder and decoder head counts are separate: from --heads / --decoder-heads, else from
    /// the checkpoint's args (`encoder_num_heads`, `decoder_num_heads`); a count that does not
    /// divide its width names the flag to give.
    #[test]
    fn decoder_heads_come_from_the_flag_or_the_args() {
        let c = MarConfig {
            decoder_num_heads: 4,
            ..cfg()
        };
        let gen = c.generator_config(None).unwrap();
        assert_eq!((gen.heads, gen.decoder_heads), (2, 4));
        let expected = expected_parameters(&gen).unwrap();
        let shapes: BTreeMap<String, Vec<usize>> = expected.iter().cloned().collect();
        let by_flag = ImportOptions {
            heads: Some(2),
            decoder_heads: Some(4),
            num_sampling_steps: Some("10".into()),
            ..Default::default()
        };
        let inferred =
            infer_config(Path::new("x.pth"), &shapes, &BTreeMap::new(), &by_flag).unwrap();
        assert_eq!(inferred, c);
        let args: BTreeMap<String, ArgValue> = [
            ("encoder_num_heads".to_string(), ArgValue::Int(2)),
            ("decoder_num_heads".to_string(), ArgValue::Int(4)),
        ]
        .into_iter()
        .collect();
        let by_args = ImportOptions {
            num_sampling_steps: Some("10".into()),
            ..Default::default()
        };
        assert_eq!(
            infer_config(Path::new("x.pth"), &shapes, &args, &by_args).unwrap(),
            c
        );
        let bad = ImportOptions {
            decoder_heads: Some(5),
            ..by_flag
        };
        let e = infer_config(Path::new("x.pth"), &shapes, &BTreeMap::new(), &bad).unwrap_err();
        assert!(e.to_string().contains("--decoder-heads"), "{e}");
    }

    #[test]
    fn coverage_names_missing_misshaped_and_unused() {
        let expected = vec![("a".to_string(), vec![2, 3]), ("b".to_string(), vec![4])];
        let found: BTreeMap<String, Vec<usize>> =
            [("a".to_string(), vec![3, 2]), ("c".to_string(), vec![1])]
                .into_iter()
                .collect();
        let c = Coverage::check(&expected, &found);
        let p = c.problems("model").unwrap();
        assert!(p.contains("'a' has shape [3, 2], expected [2, 3]"), "{p}");
        assert!(p.contains("missing: b [4]"), "{p}");
        assert_eq!(c.unused, vec!["c".to_string()]);
    }

    #[test]
    fn heads_default_to_the_reference_models_or_width_over_64() {
        assert_eq!(reference_heads("mar_huge", 1280), Some(16));
        assert_eq!(reference_heads("mar_base", 768), Some(12));
        assert_eq!(reference_heads("mar_base", 64), None);
    }
}
