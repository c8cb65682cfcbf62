//! The embedded default data set: class-conditional synthetic shapes (shape, hue, position per class), generated from a seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Number of distinct class designs (shape, hue, preferred position).
pub const MAX_CLASSES: usize = 10;
/// Images are RGB.
pub const CHANNELS: usize = 3;
/// Smallest supported image side.
pub const MIN_IMAGE_SIZE: usize = 8;

/// Size and seed of the synthetic data set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Number of classes, 2..=10 (each class its own shape, hue and preferred region).
    pub classes: usize,
    /// Image side in pixels (16 or 32 are the intended sizes; any value ≥ 8 works).
    pub image_size: usize,
    /// Number of training images.
    pub train: usize,
    /// Number of test images.
    pub test: usize,
    /// Seed from which every image is derived.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            classes: MAX_CLASSES,
            image_size: 16,
            train: 10_000,
            test: 2_000,
            seed: 0,
        }
    }
}

/// Why a [`SyntheticConfig`] is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntheticError {
    #[error("data.classes: expected 2..={MAX_CLASSES}, found {0}")]
    Classes(usize),
    #[error("data.image_size: expected at least {MIN_IMAGE_SIZE}, found {0}")]
    ImageSize(usize),
}

impl SyntheticConfig {
    /// Checks the ranges [`generate`] is designed for.
    pub fn validate(&self) -> Result<(), SyntheticError> {
        if !(2..=MAX_CLASSES).contains(&self.classes) {
            return Err(SyntheticError::Classes(self.classes));
        }
        if self.image_size < MIN_IMAGE_SIZE {
            return Err(SyntheticError::ImageSize(self.image_size));
        }
        Ok(())
    }
}

/// A set of images with labels: `images` is N×C×H×W (CHW per image, H = W = `size`), values in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub n: usize,
    pub channels: usize,
    pub size: usize,
}

impl ImageSet {
    /// Number of values per image (C×H×W).
    pub fn image_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// The same images mirrored left to right (data.hflip's other half).
    pub fn mirrored(&self) -> ImageSet {
        let mut images = self.images.clone();
        for row in images.chunks_exact_mut(self.size.max(1)) {
            row.reverse();
        }
        ImageSet {
            images,
            ..self.clone()
        }
    }

    /// The images at `idx` as one (B, C, H, W) tensor of values in [0, 1].
    pub fn batch_tensor(
        &self,
        idx: &[usize],
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let len = self.image_len();
        let mut data = Vec::with_capacity(idx.len() * len);
        for &i in idx {
            data.extend_from_slice(&self.images[i * len..(i + 1) * len]);
        }
        candle_core::Tensor::from_vec(
            data,
            (idx.len(), self.channels, self.size, self.size),
            device,
        )
    }

    /// The CHW values of image `i`, if it exists.
    pub fn image(&self, i: usize) -> Option<&[f32]> {
        let len = self.image_len();
        self.images.get(i * len..(i + 1) * len)
    }
}

/// Generates the (train, test) splits. Labels are balanced (`label = i % classes`); every image
/// has its own ChaCha8 stream derived from (seed, split, index), so the result is identical for
/// any rayon thread count and the two splits never share a stream. Call
/// [`SyntheticConfig::validate`] first: out-of-range values are clamped here (classes to 1..=10,
/// image size to ≥ 8).
pub fn generate(cfg: &SyntheticConfig) -> (ImageSet, ImageSet) {
    let classes = cfg.classes.clamp(1, MAX_CLASSES);
    let size = cfg.image_size.max(MIN_IMAGE_SIZE);
    let train = generate_split(cfg.seed, Split::Train, cfg.train, classes, size);
    let test = generate_split(cfg.seed, Split::Test, cfg.test, classes, size);
    (train, test)
}

#[derive(Debug, Clone, Copy)]
enum Split {
    Train,
    Test,
}

impl Split {
    fn tag(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e5f_7370, // "train_sp"
            Split::Test => 0x7465_7374_5f73_706c,  // "test_spl"
        }
    }
}

fn generate_split(seed: u64, split: Split, n: usize, classes: usize, size: usize) -> ImageSet {
    let len = CHANNELS * size * size;
    let mut images = vec![0f32; n * len];
    let key = splitmix64(splitmix64(seed) ^ split.tag());
    let designs: Vec<Design> = (0..classes).map(|c| Design::new(c, classes)).collect();
    images.par_chunks_mut(len).enumerate().for_each(|(i, out)| {
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        rng.set_stream(i as u64);
        render(out, size, &designs[i % classes], &mut rng);
    });
    let labels = (0..n).map(|i| (i % classes) as u32).collect();
    ImageSet {
        images,
        labels,
        n,
        channels: CHANNELS,
        size,
    }
}

/// SplitMix64 finaliser (Steele, Lea, Flood 2014), used to derive independent keys.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Disc,
    Square,
    Triangle,
    Ring,
    Cross,
    HorizontalBar,
    VerticalBar,
    Diamond,
    TwoDots,
    XCross,
}

const SHAPES: [Shape; MAX_CLASSES] = [
    Shape::Disc,
    Shape::Square,
    Shape::Triangle,
    Shape::Ring,
    Shape::Cross,
    Shape::HorizontalBar,
    Shape::VerticalBar,
    Shape::Diamond,
    Shape::TwoDots,
    Shape::XCross,
];

/// What makes a class: its shape, base hue and preferred centre (normalised coordinates).
#[derive(Debug, Clone, Copy)]
struct Design {
    shape: Shape,
    hue: f32,
    cx: f32,
    cy: f32,
}

impl Design {
    fn new(class: usize, classes: usize) -> Self {
        let frac = class as f32 / classes as f32;
        let angle = std::f32::consts::TAU * frac + std::f32::consts::FRAC_PI_4;
        Self {
            shape: SHAPES[class % MAX_CLASSES],
            hue: frac,
            cx: 0.5 + 0.13 * angle.cos(),
            cy: 0.5 + 0.13 * angle.sin(),
        }
    }
}

/// Draws one image of `design` with its within-class jitter into `out` (CHW).
fn render(out: &mut [f32], size: usize, design: &Design, rng: &mut ChaCha8Rng) {
    // Per-image variation, drawn in a fixed order so the stream fully determines the image.
    let cx = design.cx + rng.random_range(-0.07f32..0.07);
    let cy = design.cy + rng.random_range(-0.07f32..0.07);
    let radius = 0.2 * rng.random_range(0.8f32..1.2);
    let rotation = rng.random_range(-0.2f32..0.2);
    let hue = design.hue + rng.random_range(-0.03f32..0.03);
    let saturation = rng.random_range(0.65f32..0.95);
    let value = rng.random_range(0.7f32..1.0);
    let fg = hsv_to_rgb(hue, saturation, value);
    let base = rng.random_range(0.08f32..0.22);
    let bg = [
        base + rng.random_range(-0.04f32..0.04),
        base + rng.random_range(-0.04f32..0.04),
        base + rng.random_range(-0.04f32..0.04),
    ];
    let (sin, cos) = rotation.sin_cos();
    let plane = size * size;
    let scale = size as f32;
    for y in 0..size {
        for x in 0..size {
            // Pixel centre in normalised coordinates, relative to the shape centre, rotated.
            let dx = (x as f32 + 0.5) / scale - cx;
            let dy = (y as f32 + 0.5) / scale - cy;
            let px = cos * dx + sin * dy;
            let py = -sin * dx + cos * dy;
            let sd = shape_sdf(design.shape, px, py, radius) * scale;
            // Anti-aliased coverage: a one-pixel ramp across the edge of the signed distance.
            let alpha = (0.5 - sd).clamp(0.0, 1.0);
            let idx = y * size + x;
            for c in 0..CHANNELS {
                let noise = rng.random_range(-0.02f32..0.02);
                let v = (bg[c] + noise) * (1.0 - alpha) + fg[c] * alpha;
                out[c * plane + idx] = v.clamp(0.0, 1.0);
            }
        }
    }
}

/// Signed distance (negative inside) of a shape of size `r` centred at the origin.
fn shape_sdf(shape: Shape, x: f32, y: f32, r: f32) -> f32 {
    match shape {
        Shape::Disc => x.hypot(y) - r,
        Shape::Square => sd_box(x, y, 0.85 * r, 0.85 * r),
        Shape::Triangle => sd_triangle(x, -y, 1.15 * r),
        Shape::Ring => (x.hypot(y) - 0.75 * r).abs() - 0.25 * r,
        Shape::Cross => sd_box(x, y, r, 0.3 * r).min(sd_box(x, y, 0.3 * r, r)),
        Shape::HorizontalBar => sd_box(x, y, 1.25 * r, 0.32 * r),
        Shape::VerticalBar => sd_box(x, y, 0.32 * r, 1.25 * r),
        // L1 ball: exact distance inside, a close bound outside, enough for the edge ramp.
        Shape::Diamond => (x.abs() + y.abs() - 1.15 * r) * std::f32::consts::FRAC_1_SQRT_2,
        Shape::TwoDots => {
            let d = 0.65 * r;
            ((x - d).hypot(y) - 0.46 * r).min((x + d).hypot(y) - 0.46 * r)
        }
        Shape::XCross => {
            let s = std::f32::consts::FRAC_1_SQRT_2;
            let (u, v) = (s * (x + y), s * (y - x));
            sd_box(u, v, 1.1 * r, 0.28 * r).min(sd_box(u, v, 0.28 * r, 1.1 * r))
        }
    }
}

/// Box of half-extents (bx, by); Inigo Quilez's 2-D distance functions.
fn sd_box(x: f32, y: f32, bx: f32, by: f32) -> f32 {
    let qx = x.abs() - bx;
    let qy = y.abs() - by;
    qx.max(0.0).hypot(qy.max(0.0)) + qx.max(qy).min(0.0)
}

/// Equilateral triangle of half-side `r` pointing up (+y); Inigo Quilez's 2-D distance functions.
fn sd_triangle(x: f32, y: f32, r: f32) -> f32 {
    let k = 3f32.sqrt();
    let mut px = x.abs() - r;
    let mut py = y + r / k;
    if px + k * py > 0.0 {
        let (nx, ny) = ((px - k * py) * 0.5, (-k * px - py) * 0.5);
        px = nx;
        py = ny;
    }
    px -= px.clamp(-2.0 * r, 0.0);
    -px.hypot(py) * py.signum()
}

/// HSV (all in [0, 1], hue wrapping) to RGB; the standard hexcone formula.
fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let sector = h6.floor();
    let f = h6 - sector;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match sector as u32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrored_reverses_every_row_of_every_channel() {
        let set = ImageSet {
            images: (0..12).map(|v| v as f32).collect(), // 1 image, 3 channels, 2×2
            labels: vec![0],
            n: 1,
            channels: 3,
            size: 2,
        };
        let m = set.mirrored();
        assert_eq!(
            m.images,
            vec![1., 0., 3., 2., 5., 4., 7., 6., 9., 8., 11., 10.]
        );
        assert_eq!(m.mirrored(), set);
    }

    fn small(seed: u64) -> SyntheticConfig {
        SyntheticConfig {
            classes: 10,
            image_size: 16,
            train: 400,
            test: 100,
            seed,
        }
    }

    fn class_mean(set: &ImageSet, class: u32) -> Vec<f64> {
        let len = set.image_len();
        let mut mean = vec![0f64; len];
        let mut count = 0usize;
        for (i, &label) in set.labels.iter().enumerate() {
            if label == class {
                let img = set.image(i).expect("image in range");
                for (m, &v) in mean.iter_mut().zip(img) {
                    *m += v as f64;
                }
                count += 1;
            }
        }
        mean.iter_mut().for_each(|m| *m /= count as f64);
        mean
    }

    #[test]
    fn shapes_and_lengths() {
        let (train, test) = generate(&small(1));
        assert_eq!(train.n, 400);
        assert_eq!(test.n, 100);
        assert_eq!(train.channels, 3);
        assert_eq!(train.size, 16);
        assert_eq!(train.images.len(), 400 * 3 * 16 * 16);
        assert_eq!(test.images.len(), 100 * 3 * 16 * 16);
        assert_eq!(train.labels.len(), 400);
        let (big, _) = generate(&SyntheticConfig {
            image_size: 32,
            train: 20,
            test: 0,
            ..small(1)
        });
        assert_eq!(big.images.len(), 20 * 3 * 32 * 32);
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let (a_train, a_test) = generate(&small(7));
        let (b_train, b_test) = generate(&small(7));
        assert_eq!(a_train, b_train);
        assert_eq!(a_test, b_test);
        let (c_train, c_test) = generate(&small(8));
        assert_ne!(a_train.images, c_train.images);
        assert_ne!(a_test.images, c_test.images);
    }

    #[test]
    fn independent_of_thread_count() {
        let cfg = small(3);
        let (parallel, _) = generate(&cfg);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("thread pool");
        let (serial, _) = pool.install(|| generate(&cfg));
        assert_eq!(parallel, serial);
    }

    #[test]
    fn train_and_test_share_no_image() {
        let (train, test) = generate(&small(5));
        for j in 0..test.n {
            let t = test.image(j).expect("test image");
            for i in 0..train.n {
                assert_ne!(train.image(i).expect("train image"), t);
            }
        }
    }

    #[test]
    fn labels_balanced() {
        for classes in [2, 3, 7, 10] {
            let (train, test) = generate(&SyntheticConfig {
                classes,
                ..small(2)
            });
            for set in [&train, &test] {
                let mut counts = vec![0usize; classes];
                for &l in &set.labels {
                    counts[l as usize] += 1;
                }
                let (min, max) = (counts.iter().min(), counts.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{counts:?}");
            }
        }
    }

    #[test]
    fn values_in_unit_range() {
        let (train, test) = generate(&small(11));
        for v in train.images.iter().chain(&test.images) {
            assert!(v.is_finite() && (0.0..=1.0).contains(v), "{v}");
        }
    }

    #[test]
    fn classes_differ_and_vary_within() {
        let (train, _) = generate(&small(4));
        let means: Vec<Vec<f64>> = (0..10).map(|c| class_mean(&train, c)).collect();
        for a in 0..10 {
            for b in (a + 1)..10 {
                let diff: f64 = means[a]
                    .iter()
                    .zip(&means[b])
                    .map(|(x, y)| (x - y).abs())
                    .sum::<f64>()
                    / means[a].len() as f64;
                assert!(diff > 0.02, "classes {a} and {b} differ by {diff}");
            }
        }
        // Within-class spread: mean per-pixel absolute deviation from the class mean.
        for c in 0..10u32 {
            let mean = &means[c as usize];
            let mut dev = 0f64;
            let mut count = 0usize;
            for i in (0..train.n).filter(|&i| train.labels[i] == c) {
                let img = train.image(i).expect("image");
                dev += img
                    .iter()
                    .zip(mean)
                    .map(|(&v, m)| (v as f64 - m).abs())
                    .sum::<f64>()
                    / img.len() as f64;
                count += 1;
            }
            let dev = dev / count as f64;
            assert!(dev > 0.01, "class {c} has too little variation: {dev}");
        }
    }

    #[test]
    fn shapes_are_visible() {
        // Every class draws a foreground clearly brighter than the dark background somewhere.
        let (train, _) = generate(&small(9));
        let plane = train.size * train.size;
        for i in 0..10 {
            let img = train.image(i).expect("image");
            let max_channel = (0..plane)
                .map(|p| (0..3).map(|c| img[c * plane + p]).fold(0f32, f32::max))
                .fold(0f32, f32::max);
            assert!(max_channel > 0.6, "image {i}: max {max_channel}");
        }
    }

    #[test]
    fn validate_ranges() {
        assert!(small(0).validate().is_ok());
        let bad = SyntheticConfig {
            classes: 11,
            ..small(0)
        };
        assert_eq!(bad.validate(), Err(SyntheticError::Classes(11)));
        let bad = SyntheticConfig {
            image_size: 4,
            ..small(0)
        };
        assert_eq!(bad.validate(), Err(SyntheticError::ImageSize(4)));
    }
}
