//! The Inception-v3 network of FID and IS: the "FID variant" of torchvision's Inception-v3 that
//! pytorch-fid and torch-fidelity port from the TensorFlow graph `pt_inception-2015-12-05`
//! (1008-class fc, average pools that exclude padding, a max pool in `Mixed_7c`, batch norm
//! eps 1e-3). Inference only: batch norm is folded into the convolutions when the weights are
//! read, and nothing records an autograd graph.
//!
//! Parameter names are those of the standard weight file (`Conv2d_1a_3x3.conv.weight`,
//! `Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}`, `Mixed_5b.branch1x1.…`,
//! `fc.weight`), so a `VarBuilder` over that file (or a safetensors copy of it) loads directly;
//! a missing or mis-shaped tensor is an error that names it.
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Side of the square input the network expects.
pub const INPUT_SIZE: usize = 299;
/// Width of the pool features used by FID.
pub const FEATURE_DIM: usize = 2048;
/// Number of logits (the TF graph's 1008 classes) used by IS.
pub const LOGIT_DIM: usize = 1008;
const BN_EPS: f64 = 1e-3;

/// How images are resized to 299×299 and normalised before the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Convention {
    /// torch-fidelity's `inception-v3-compat` (the paper's numbers): TF1-style bilinear resize
    /// without half-pixel offset (source = destination · in/out), then (x − 128) / 128.
    TorchFidelity,
    /// pytorch-fid: PyTorch bilinear resize with `align_corners=False` (half-pixel centres),
    /// then 2·x/255 − 1.
    PytorchFid,
}

impl Convention {
    pub fn as_str(self) -> &'static str {
        match self {
            Convention::TorchFidelity => "torch-fidelity",
            Convention::PytorchFid => "pytorch-fid",
        }
    }

    /// Parse `torch-fidelity` or `pytorch-fid`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "torch-fidelity" => Some(Convention::TorchFidelity),
            "pytorch-fid" => Some(Convention::PytorchFid),
            _ => None,
        }
    }
}

/// Row-major `output × input` matrix of 1-D bilinear interpolation weights for a convention;
/// each row has at most two non-zero weights summing to 1.
pub fn resize_weights(input: usize, output: usize, convention: Convention) -> Vec<f32> {
    let mut m = vec![0f32; output * input];
    if input == 0 {
        return m;
    }
    let scale = input as f64 / output as f64;
    for dst in 0..output {
        let src = match convention {
            Convention::TorchFidelity => dst as f64 * scale,
            Convention::PytorchFid => ((dst as f64 + 0.5) * scale - 0.5).max(0.0),
        };
        let i0 = (src.floor() as usize).min(input - 1);
        let i1 = (i0 + 1).min(input - 1);
        let frac = (src - i0 as f64).clamp(0.0, 1.0);
        m[dst * input + i0] += (1.0 - frac) as f32;
        m[dst * input + i1] += frac as f32;
    }
    m
}

/// Resize (B, C, H, W) images to (B, C, 299, 299) with separable interpolation matrices
/// (two matmuls); the identity when the input already has that size.
pub fn resize(images: &Tensor, convention: Convention) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    if h == INPUT_SIZE && w == INPUT_SIZE {
        return Ok(images.clone());
    }
    let dev = images.device();
    let rw = Tensor::from_vec(
        resize_weights(w, INPUT_SIZE, convention),
        (INPUT_SIZE, w),
        dev,
    )?;
    let rh = Tensor::from_vec(
        resize_weights(h, INPUT_SIZE, convention),
        (INPUT_SIZE, h),
        dev,
    )?;
    // rows: (B·C·H, W) · (W, 299)
    let x = images
        .reshape((b * c * h, w))?
        .matmul(&rw.t()?)?
        .reshape((b * c, h, INPUT_SIZE))?;
    // columns: (299, H) · (H, 299) per image and channel
    rh.broadcast_matmul(&x)?
        .reshape((b, c, INPUT_SIZE, INPUT_SIZE))
}

/// Resize and normalise (B, 3, H, W) pixel values in [0, 255] (any dtype) for the network.
pub fn preprocess(images: &Tensor, convention: Convention) -> Result<Tensor> {
    let x = resize(&images.to_dtype(DType::F32)?, convention)?;
    match convention {
        Convention::TorchFidelity => (x - 128.0)? / 128.0,
        Convention::PytorchFid => x.affine(2.0 / 255.0, -1.0),
    }
}

/// Convolution (no bias) + batch norm (eps 1e-3) + ReLU, with the batch norm folded in.
#[derive(Debug, Clone)]
struct BasicConv {
    weight: Tensor,
    bias: Tensor,
    padding: (usize, usize),
    stride: usize,
}

impl BasicConv {
    fn new(
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize),
        padding: (usize, usize),
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let w = vb.get((c_out, c_in, kernel.0, kernel.1), "conv.weight")?;
        let bn = vb.pp("bn");
        let gamma = bn.get(c_out, "weight")?;
        let beta = bn.get(c_out, "bias")?;
        let mean = bn.get(c_out, "running_mean")?;
        let var = bn.get(c_out, "running_var")?;
        let scale = gamma.div(&(var + BN_EPS)?.sqrt()?)?;
        let weight = w.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?.detach();
        let bias = (beta - mean.mul(&scale)?)?
            .reshape((1, c_out, 1, 1))?
            .detach();
        Ok(BasicConv {
            weight,
            bias,
            padding,
            stride,
        })
    }

    fn square(c_in: usize, c_out: usize, k: usize, pad: usize, vb: VarBuilder) -> Result<Self> {
        Self::new(c_in, c_out, (k, k), (pad, pad), 1, vb)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.padding;
        let y = if ph == pw {
            x.conv2d(&self.weight, ph, self.stride, 1, 1)?
        } else {
            // candle's conv2d takes one padding for both spatial dims
            x.pad_with_zeros(2, ph, ph)?
                .pad_with_zeros(3, pw, pw)?
                .conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        y.broadcast_add(&self.bias)?.relu()
    }
}

/// 3×3 average pool, stride 1, padding 1, `count_include_pad=False`.
fn avg_pool_3x3_exclude_pad(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let summed = x
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .avg_pool2d_with_stride(3, 1)?;
    // avg_pool2d divides by 9; rescale by 9 / (number of in-image cells of each window)
    let span = |i: usize, n: usize| (i + 1).min(n - 1) + 1 - i.saturating_sub(1);
    let factor: Vec<f32> = (0..h)
        .flat_map(|i| (0..w).map(move |j| 9.0 / (span(i, h) * span(j, w)) as f32))
        .collect();
    let factor = Tensor::from_vec(factor, (1, 1, h, w), x.device())?;
    summed.broadcast_mul(&factor)
}

/// 3×3 max pool, stride 1, padding 1 (replicated borders are already inside each window, so
/// the result equals PyTorch's −∞ padding).
fn max_pool_3x3_same(x: &Tensor) -> Result<Tensor> {
    x.pad_with_same(2, 1, 1)?
        .pad_with_same(3, 1, 1)?
        .max_pool2d_with_stride(3, 1)
}

/// Mixed_5b/5c/5d (torchvision `InceptionA`, FID variant).
#[derive(Debug, Clone)]
struct BlockA {
    b1x1: BasicConv,
    b5x5_1: BasicConv,
    b5x5_2: BasicConv,
    b3x3dbl_1: BasicConv,
    b3x3dbl_2: BasicConv,
    b3x3dbl_3: BasicConv,
    pool: BasicConv,
}

impl BlockA {
    fn new(c_in: usize, pool_features: usize, vb: VarBuilder) -> Result<Self> {
        Ok(BlockA {
            b1x1: BasicConv::square(c_in, 64, 1, 0, vb.pp("branch1x1"))?,
            b5x5_1: BasicConv::square(c_in, 48, 1, 0, vb.pp("branch5x5_1"))?,
            b5x5_2: BasicConv::square(48, 64, 5, 2, vb.pp("branch5x5_2"))?,
            b3x3dbl_1: BasicConv::square(c_in, 64, 1, 0, vb.pp("branch3x3dbl_1"))?,
            b3x3dbl_2: BasicConv::square(64, 96, 3, 1, vb.pp("branch3x3dbl_2"))?,
            b3x3dbl_3: BasicConv::square(96, 96, 3, 1, vb.pp("branch3x3dbl_3"))?,
            pool: BasicConv::square(c_in, pool_features, 1, 0, vb.pp("branch_pool"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let b = self.b5x5_2.forward(&self.b5x5_1.forward(x)?)?;
        let c = self
            .b3x3dbl_3
            .forward(&self.b3x3dbl_2.forward(&self.b3x3dbl_1.forward(x)?)?)?;
        let d = self.pool.forward(&avg_pool_3x3_exclude_pad(x)?)?;
        Tensor::cat(&[a, b, c, d], 1)
    }
}

/// Mixed_6a (torchvision `InceptionB`): grid reduction.
#[derive(Debug, Clone)]
struct BlockB {
    b3x3: BasicConv,
    b3x3dbl_1: BasicConv,
    b3x3dbl_2: BasicConv,
    b3x3dbl_3: BasicConv,
}

impl BlockB {
    fn new(c_in: usize, vb: VarBuilder) -> Result<Self> {
        Ok(BlockB {
            b3x3: BasicConv::new(c_in, 384, (3, 3), (0, 0), 2, vb.pp("branch3x3"))?,
            b3x3dbl_1: BasicConv::square(c_in, 64, 1, 0, vb.pp("branch3x3dbl_1"))?,
            b3x3dbl_2: BasicConv::square(64, 96, 3, 1, vb.pp("branch3x3dbl_2"))?,
            b3x3dbl_3: BasicConv::new(96, 96, (3, 3), (0, 0), 2, vb.pp("branch3x3dbl_3"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b3x3.forward(x)?;
        let b = self
            .b3x3dbl_3
            .forward(&self.b3x3dbl_2.forward(&self.b3x3dbl_1.forward(x)?)?)?;
        let c = x.max_pool2d_with_stride(3, 2)?;
        Tensor::cat(&[a, b, c], 1)
    }
}

/// Mixed_6b..6e (torchvision `InceptionC`, FID variant): factorised 7×7 convolutions.
#[derive(Debug, Clone)]
struct BlockC {
    b1x1: BasicConv,
    b7x7: [BasicConv; 3],
    b7x7dbl: [BasicConv; 5],
    pool: BasicConv,
}

impl BlockC {
    fn new(c_in: usize, c7: usize, vb: VarBuilder) -> Result<Self> {
        let row = ((1, 7), (0, 3));
        let col = ((7, 1), (3, 0));
        let conv = |ci, co, (k, p): ((usize, usize), (usize, usize)), name: &str| {
            BasicConv::new(ci, co, k, p, 1, vb.pp(name))
        };
        let one = ((1, 1), (0, 0));
        Ok(BlockC {
            b1x1: conv(c_in, 192, one, "branch1x1")?,
            b7x7: [
                conv(c_in, c7, one, "branch7x7_1")?,
                conv(c7, c7, row, "branch7x7_2")?,
                conv(c7, 192, col, "branch7x7_3")?,
            ],
            b7x7dbl: [
                conv(c_in, c7, one, "branch7x7dbl_1")?,
                conv(c7, c7, col, "branch7x7dbl_2")?,
                conv(c7, c7, row, "branch7x7dbl_3")?,
                conv(c7, c7, col, "branch7x7dbl_4")?,
                conv(c7, 192, row, "branch7x7dbl_5")?,
            ],
            pool: conv(c_in, 192, one, "branch_pool")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let chain = |convs: &[BasicConv]| -> Result<Tensor> {
            let mut y = x.clone();
            for c in convs {
                y = c.forward(&y)?;
            }
            Ok(y)
        };
        let a = self.b1x1.forward(x)?;
        let b = chain(&self.b7x7)?;
        let c = chain(&self.b7x7dbl)?;
        let d = self.pool.forward(&avg_pool_3x3_exclude_pad(x)?)?;
        Tensor::cat(&[a, b, c, d], 1)
    }
}

/// Mixed_7a (torchvision `InceptionD`): grid reduction.
#[derive(Debug, Clone)]
struct BlockD {
    b3x3_1: BasicConv,
    b3x3_2: BasicConv,
    b7x7x3: [BasicConv; 4],
}

impl BlockD {
    fn new(c_in: usize, vb: VarBuilder) -> Result<Self> {
        Ok(BlockD {
            b3x3_1: BasicConv::square(c_in, 192, 1, 0, vb.pp("branch3x3_1"))?,
            b3x3_2: BasicConv::new(192, 320, (3, 3), (0, 0), 2, vb.pp("branch3x3_2"))?,
            b7x7x3: [
                BasicConv::square(c_in, 192, 1, 0, vb.pp("branch7x7x3_1"))?,
                BasicConv::new(192, 192, (1, 7), (0, 3), 1, vb.pp("branch7x7x3_2"))?,
                BasicConv::new(192, 192, (7, 1), (3, 0), 1, vb.pp("branch7x7x3_3"))?,
                BasicConv::new(192, 192, (3, 3), (0, 0), 2, vb.pp("branch7x7x3_4"))?,
            ],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b3x3_2.forward(&self.b3x3_1.forward(x)?)?;
        let mut b = x.clone();
        for c in &self.b7x7x3 {
            b = c.forward(&b)?;
        }
        let c = x.max_pool2d_with_stride(3, 2)?;
        Tensor::cat(&[a, b, c], 1)
    }
}

/// Mixed_7b / Mixed_7c (torchvision `InceptionE`, FID variants): 7b pools by average
/// (excluding padding), 7c by max.
#[derive(Debug, Clone)]
struct BlockE {
    b1x1: BasicConv,
    b3x3_1: BasicConv,
    b3x3_2a: BasicConv,
    b3x3_2b: BasicConv,
    b3x3dbl_1: BasicConv,
    b3x3dbl_2: BasicConv,
    b3x3dbl_3a: BasicConv,
    b3x3dbl_3b: BasicConv,
    pool: BasicConv,
    max_pool: bool,
}

impl BlockE {
    fn new(c_in: usize, max_pool: bool, vb: VarBuilder) -> Result<Self> {
        let row = |ci, co, name: &str| BasicConv::new(ci, co, (1, 3), (0, 1), 1, vb.pp(name));
        let col = |ci, co, name: &str| BasicConv::new(ci, co, (3, 1), (1, 0), 1, vb.pp(name));
        Ok(BlockE {
            b1x1: BasicConv::square(c_in, 320, 1, 0, vb.pp("branch1x1"))?,
            b3x3_1: BasicConv::square(c_in, 384, 1, 0, vb.pp("branch3x3_1"))?,
            b3x3_2a: row(384, 384, "branch3x3_2a")?,
            b3x3_2b: col(384, 384, "branch3x3_2b")?,
            b3x3dbl_1: BasicConv::square(c_in, 448, 1, 0, vb.pp("branch3x3dbl_1"))?,
            b3x3dbl_2: BasicConv::square(448, 384, 3, 1, vb.pp("branch3x3dbl_2"))?,
            b3x3dbl_3a: row(384, 384, "branch3x3dbl_3a")?,
            b3x3dbl_3b: col(384, 384, "branch3x3dbl_3b")?,
            pool: BasicConv::square(c_in, 192, 1, 0, vb.pp("branch_pool"))?,
            max_pool,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.b1x1.forward(x)?;
        let t = self.b3x3_1.forward(x)?;
        let b = Tensor::cat(&[self.b3x3_2a.forward(&t)?, self.b3x3_2b.forward(&t)?], 1)?;
        let t = self.b3x3dbl_2.forward(&self.b3x3dbl_1.forward(x)?)?;
        let c = Tensor::cat(
            &[self.b3x3dbl_3a.forward(&t)?, self.b3x3dbl_3b.forward(&t)?],
            1,
        )?;
        let pooled = if self.max_pool {
            max_pool_3x3_same(x)?
        } else {
            avg_pool_3x3_exclude_pad(x)?
        };
        let d = self.pool.forward(&pooled)?;
        Tensor::cat(&[a, b, c, d], 1)
    }
}

/// Pool features and bias-free logits of a batch.
#[derive(Debug, Clone)]
pub struct InceptionOutput {
    /// (B, 2048): the average-pooled `pool3` features used by FID.
    pub pool: Tensor,
    /// (B, 1008): `pool · fcᵀ` without the fc bias (torch-fidelity's `logits_unbiased`), for IS.
    pub logits: Tensor,
}

/// The Inception-v3 FID network.
#[derive(Debug, Clone)]
pub struct InceptionV3 {
    stem: [BasicConv; 5],
    mixed_5: [BlockA; 3],
    mixed_6a: BlockB,
    mixed_6: [BlockC; 4],
    mixed_7a: BlockD,
    mixed_7b: BlockE,
    mixed_7c: BlockE,
    fc_t: Tensor,
}

impl InceptionV3 {
    /// Read (and fold) every weight from `vb` under the standard names; float16 or float32
    /// sources are converted to `vb`'s dtype, which should be F32.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let stem = [
            BasicConv::new(3, 32, (3, 3), (0, 0), 2, vb.pp("Conv2d_1a_3x3"))?,
            BasicConv::square(32, 32, 3, 0, vb.pp("Conv2d_2a_3x3"))?,
            BasicConv::square(32, 64, 3, 1, vb.pp("Conv2d_2b_3x3"))?,
            BasicConv::square(64, 80, 1, 0, vb.pp("Conv2d_3b_1x1"))?,
            BasicConv::square(80, 192, 3, 0, vb.pp("Conv2d_4a_3x3"))?,
        ];
        let mixed_5 = [
            BlockA::new(192, 32, vb.pp("Mixed_5b"))?,
            BlockA::new(256, 64, vb.pp("Mixed_5c"))?,
            BlockA::new(288, 64, vb.pp("Mixed_5d"))?,
        ];
        let mixed_6a = BlockB::new(288, vb.pp("Mixed_6a"))?;
        let mixed_6 = [
            BlockC::new(768, 128, vb.pp("Mixed_6b"))?,
            BlockC::new(768, 160, vb.pp("Mixed_6c"))?,
            BlockC::new(768, 160, vb.pp("Mixed_6d"))?,
            BlockC::new(768, 192, vb.pp("Mixed_6e"))?,
        ];
        let mixed_7a = BlockD::new(768, vb.pp("Mixed_7a"))?;
        let mixed_7b = BlockE::new(1280, false, vb.pp("Mixed_7b"))?;
        let mixed_7c = BlockE::new(2048, true, vb.pp("Mixed_7c"))?;
        let fc = vb.pp("fc");
        let fc_t = fc
            .get((LOGIT_DIM, FEATURE_DIM), "weight")?
            .t()?
            .contiguous()?
            .detach();
        // the bias is part of the standard file; checked here so a truncated file is caught
        fc.get(LOGIT_DIM, "bias")?;
        Ok(InceptionV3 {
            stem,
            mixed_5,
            mixed_6a,
            mixed_6,
            mixed_7a,
            mixed_7b,
            mixed_7c,
            fc_t,
        })
    }

    /// The network on already preprocessed (B, 3, 299, 299) inputs.
    pub fn forward_normalised(&self, x: &Tensor) -> Result<InceptionOutput> {
        let x = self.stem[0].forward(x)?;
        let x = self.stem[1].forward(&x)?;
        let x = self.stem[2].forward(&x)?;
        let x = x.max_pool2d_with_stride(3, 2)?;
        let x = self.stem[3].forward(&x)?;
        let x = self.stem[4].forward(&x)?;
        let mut x = x.max_pool2d_with_stride(3, 2)?;
        for b in &self.mixed_5 {
            x = b.forward(&x)?;
        }
        x = self.mixed_6a.forward(&x)?;
        for b in &self.mixed_6 {
            x = b.forward(&x)?;
        }
        x = self.mixed_7a.forward(&x)?;
        x = self.mixed_7b.forward(&x)?;
        x = self.mixed_7c.forward(&x)?;
        let pool = x.mean((2, 3))?;
        let logits = pool.matmul(&self.fc_t)?;
        Ok(InceptionOutput { pool, logits })
    }

    /// Pool features and logits of (B, 3, H, W) images with pixel values in [0, 255] (u8 or
    /// float), resized and normalised by `convention`.
    pub fn forward(&self, images: &Tensor, convention: Convention) -> Result<InceptionOutput> {
        let (_, c, _, _) = images.dims4()?;
        if c != 3 {
            candle_core::bail!("Inception-v3 expects 3-channel images, got {c} channels");
        }
        self.forward_normalised(&preprocess(images, convention)?)
    }

    pub fn device(&self) -> &Device {
        self.fc_t.device()
    }
}

/// Names and shapes of every tensor the network reads, in the standard file's naming.
pub fn expected_tensors() -> Vec<(String, Vec<usize>)> {
    let backend = ShapeRecorder::default();
    let names = backend.names.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    // every weight gets a value of the requested shape, so building cannot fail
    let _ = InceptionV3::new(vb);
    let out = names.lock().map(|v| v.clone()).unwrap_or_default();
    out
}

/// (name, shape) of each tensor requested, in order.
type Requests = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<usize>)>>>;

#[derive(Default)]
struct ShapeRecorder {
    names: Requests,
}

impl candle_nn::var_builder::SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if let Ok(mut v) = self.names.lock() {
            v.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::ones(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: shape required")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_weights_rows_sum_to_one_and_match_formulas() {
        for conv in [Convention::TorchFidelity, Convention::PytorchFid] {
            for (i, o) in [(64, 299), (256, 299), (299, 299), (500, 299)] {
                let m = resize_weights(i, o, conv);
                for r in 0..o {
                    let s: f32 = m[r * i..(r + 1) * i].iter().sum();
                    assert!((s - 1.0).abs() < 1e-6, "{conv:?} {i}->{o} row {r}: {s}");
                }
            }
        }
        // TF1 style: destination 1 of 4→2 samples source 2 exactly
        let m = resize_weights(4, 2, Convention::TorchFidelity);
        assert_eq!(&m[4..8], &[0.0, 0.0, 1.0, 0.0]);
        // half-pixel: destination 0 of 4→2 samples source 0.5
        let m = resize_weights(4, 2, Convention::PytorchFid);
        assert_eq!(&m[0..4], &[0.5, 0.5, 0.0, 0.0]);
        // identity at the same size
        let m = resize_weights(3, 3, Convention::PytorchFid);
        assert_eq!(m, vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn avg_pool_excludes_padding() -> Result<()> {
        let x = Tensor::ones((1, 2, 4, 5), DType::F32, &Device::Cpu)?;
        let y = avg_pool_3x3_exclude_pad(&x)?;
        let v = y.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|a| (a - 1.0).abs() < 1e-6), "{v:?}");
        Ok(())
    }

    #[test]
    fn max_pool_same_matches_neg_inf_padding() -> Result<()> {
        let data: Vec<f32> = (0..20).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let x = Tensor::from_vec(data.clone(), (1, 1, 4, 5), &Device::Cpu)?;
        let y = max_pool_3x3_same(&x)?.flatten_all()?.to_vec1::<f32>()?;
        for i in 0..4usize {
            for j in 0..5usize {
                let mut m = f32::NEG_INFINITY;
                for di in i.saturating_sub(1)..=(i + 1).min(3) {
                    for dj in j.saturating_sub(1)..=(j + 1).min(4) {
                        m = m.max(data[di * 5 + dj]);
                    }
                }
                assert_eq!(y[i * 5 + j], m);
            }
        }
        Ok(())
    }

    #[test]
    fn expected_tensors_lists_the_standard_file() {
        let t = expected_tensors();
        // 94 conv units × (conv + 4 bn) + fc weight and bias
        assert_eq!(t.len(), 94 * 5 + 2);
        assert!(t
            .iter()
            .any(|(n, s)| n == "Mixed_7c.branch3x3dbl_3b.conv.weight" && s == &[384, 384, 3, 1]));
    }
}
