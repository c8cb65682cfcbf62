//! The vendored candle's `GradStore::accumulate` (vendor/README.md, patches 1 and 5): the first
//! gradient of a node is stored as it is, and later ones are added in place when nothing else
//! holds the sum. These check that a gradient shared between two nodes is never written into.
use candle_core::{Device, Result, Tensor, Var};

fn vector(values: &[f32]) -> Result<Tensor> {
    Tensor::new(values, &Device::Cpu)
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_vec1::<f32>()
}

/// a and the variable x2 receive the same gradient tensor from `a + x2`; a has a second consumer,
/// whose gradient must go to a's sum alone (a variable's gradient stays in the store to the end,
/// so a write into the shared tensor would show there).
#[test]
fn a_gradient_shared_by_two_nodes_is_not_added_into() -> Result<()> {
    let n = 100_000; // above the in-place add's threshold for the thread pool
    let x1 = Var::from_tensor(&vector(&vec![1.0; n])?)?;
    let x2 = Var::from_tensor(&vector(&vec![2.0; n])?)?;
    let w1 = vector(&(0..n).map(|i| (i % 7) as f32).collect::<Vec<_>>())?;
    let w2 = vector(&(0..n).map(|i| (i % 5) as f32 + 0.5).collect::<Vec<_>>())?;
    let (w1v, w2v) = (values(&w1)?, values(&w2)?);
    // both orders of the two terms, so that either consumer of a may come first in the pass
    for add_first in [true, false] {
        let a = (x1.as_tensor() * 3.0)?;
        let s = (&a + x2.as_tensor())?;
        let t = (&a * &w2)?;
        let (s, t) = ((s * &w1)?.sum_all()?, t.sum_all()?);
        let loss = if add_first { (s + t)? } else { (t + s)? };
        let grads = loss.backward()?;
        let g1 = values(grads.get(x1.as_tensor()).expect("x1 has a gradient"))?;
        let g2 = values(grads.get(x2.as_tensor()).expect("x2 has a gradient"))?;
        for i in 0..n {
            assert_eq!(g1[i], 3.0 * (w1v[i] + w2v[i]), "x1 at {i}");
            assert_eq!(
                g2[i], w1v[i],
                "x2 at {i}: a's other gradient leaked into x2's"
            );
        }
    }
    Ok(())
}

/// A node with many consumers (as the Diffusion Loss MLP's SiLU(y) feeds every block's adaLN):
/// its gradient is the sum of theirs, whichever are added in place.
#[test]
fn many_consumers_sum_their_gradients() -> Result<()> {
    let n = 70_000;
    let x = Var::from_tensor(&vector(
        &(0..n).map(|i| (i % 11) as f32).collect::<Vec<_>>(),
    )?)?;
    let y = (x.as_tensor() * 1.0)?;
    let mut loss = Tensor::zeros((), candle_core::DType::F32, &Device::Cpu)?;
    for k in 1..=5 {
        loss = (loss + (&y * k as f64)?.sum_all()?)?;
    }
    let kept = (&y * 1.0)?; // a tensor the caller still holds, next to the gradients
    let before = values(&kept)?;
    let grads = loss.backward()?;
    let g = values(grads.get(x.as_tensor()).expect("x has a gradient"))?;
    assert!(g.iter().all(|&v| v == 15.0), "1 + 2 + 3 + 4 + 5");
    assert_eq!(values(&kept)?, before);
    Ok(())
}
