//! Seeded parameter initialisation. candle's CPU random generator cannot be seeded, so variables
//! are created here from `Rng`, one stream per parameter name: the same seed gives the same
//! initial weights on any device and in any construction order.
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::rng::Rng;

/// A `VarMap` whose new variables are drawn from a seeded generator.
pub struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// FNV-1a hash of a parameter name, to give each parameter its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A `VarBuilder` that creates trainable variables in `varmap` with seeded initial values.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend: Box<dyn SimpleBackend> = Box::new(SeededVarMap {
        varmap: varmap.clone(),
        seed,
    });
    VarBuilder::from_backend(backend, dtype, device.clone())
}

/// A `VarBuilder` over detached views of the variables in `varmap` (sharing their storage): a
/// model built from it records no autograd graph, which makes sampling and feature extraction
/// several times faster. Its linear layers copy their weights ([`crate::nn::Linear::new`]), so
/// build the model again after training steps.
pub fn frozen_var_builder(
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
    let tensors = data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(VarBuilder::from_tensors(tensors, dtype, device))
}

fn init_values(shape: &Shape, init: Init, rng: &mut Rng) -> Vec<f32> {
    let n = shape.elem_count();
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Randn { mean, stdev } => (0..n)
            .map(|_| (mean + stdev * rng.normal()) as f32)
            .collect(),
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.uniform()) as f32)
            .collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = match fan {
                FanInOut::FanIn => fan.for_shape(shape),
                FanInOut::FanOut => fan.for_shape(shape),
            }
            .max(1) as f64;
            let gain = non_linearity.gain();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = gain * (3.0 / fan).sqrt();
                    (0..n)
                        .map(|_| (-bound + 2.0 * bound * rng.uniform()) as f32)
                        .collect()
                }
                NormalOrUniform::Normal => {
                    let std = gain / fan.sqrt();
                    (0..n).map(|_| (std * rng.normal()) as f32).collect()
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: {:?} vs {:?}", v.shape(), s);
            }
            return Ok(v.as_tensor().clone());
        }
        let mut rng = Rng::new(self.seed ^ name_hash(name));
        let values = init_values(&s, h, &mut rng);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        data.get(name)
            .map(|v| v.as_tensor().clone())
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights() -> Result<()> {
        let dev = Device::Cpu;
        let build = |seed| -> Result<Vec<f32>> {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &dev);
            let l = crate::nn::linear_xavier(4, 3, vb.pp("a"))?;
            l.weight().flatten_all()?.to_vec1::<f32>()
        };
        assert_eq!(build(1)?, build(1)?);
        assert_ne!(build(1)?, build(2)?);
        Ok(())
    }
}
