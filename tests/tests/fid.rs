//! `ablate fid`: FID between image folders and .npz statistics, and its error messages.
use ablate_tests::{ablate, stderr, stdout};

/// Writes `n` deterministic `size`×`size` RGB PNGs (pattern depends on `seed`) into `dir`.
fn write_pngs(dir: &std::path::Path, n: usize, size: u32, seed: u32) {
    std::fs::create_dir_all(dir).expect("folder");
    for i in 0..n as u32 {
        let img = image::RgbImage::from_fn(size, size, |x, y| {
            let v =
                |k: u32| ((x * (3 + k) + y * (5 + seed) + i * 37 + k * 11 + seed * 53) % 256) as u8;
            image::Rgb([v(0), v(1), v(2)])
        });
        img.save(dir.join(format!("{i:03}.png"))).expect("png");
    }
}

fn fid_value(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix("FID: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no FID line in:\n{text}"))
}

/// The random-weight Inception fixture (the real file is not available offline); None skips.
fn inception_fixture() -> Option<String> {
    let dir = ablate_tests::parity_dir()?;
    Some(
        dir.join("inception_fid_random_weights.safetensors")
            .display()
            .to_string(),
    )
}

#[test]
fn fid_on_folders_and_npz_statistics() {
    let Some(weights) = inception_fixture() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (a, b) = (root.join("a"), root.join("b"));
    write_pngs(&a, 12, 40, 0);
    write_pngs(&b, 12, 40, 1);
    let (a_s, b_s) = (a.display().to_string(), b.display().to_string());

    let out = ablate(root, &["fid", &a_s, &b_s, "--weights", &weights, "--is"]);
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let text = stdout(&out);
    let folders = fid_value(&text);
    assert!(folders.is_finite() && folders > 0.0, "{text}");
    assert!(text.contains("IS ("), "{text}");
    let err = stderr(&out);
    assert!(
        err.contains("only 12 samples"),
        "warned with the count:\n{err}"
    );

    // statistics saved as .npz give the same FID as the folders
    let (a_npz, b_npz) = (root.join("a.npz"), root.join("b.npz"));
    for (folder, npz) in [(&a_s, &a_npz), (&b_s, &b_npz)] {
        let npz = npz.display().to_string();
        let out = ablate(
            root,
            &["fid", "--save-stats", folder, &npz, "--weights", &weights],
        );
        assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    }
    let out = ablate(
        root,
        &[
            "fid",
            &a_npz.display().to_string(),
            &b_npz.display().to_string(),
        ],
    );
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    let from_npz = fid_value(&stdout(&out));
    assert!(
        (from_npz - folders).abs() <= 1e-9 * folders.abs().max(1.0),
        "{from_npz} vs {folders}"
    );
    // one side a folder, the other statistics
    let out = ablate(
        root,
        &[
            "fid",
            &a_s,
            &b_npz.display().to_string(),
            "--weights",
            &weights,
        ],
    );
    assert!(out.status.success(), "stderr:\n{}", stderr(&out));
    assert!((fid_value(&stdout(&out)) - folders).abs() <= 1e-9 * folders.max(1.0));
}

#[test]
fn fid_errors_are_clear() {
    let Some(weights) = inception_fixture() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let a = root.join("a");
    write_pngs(&a, 3, 16, 0);
    let a_s = a.display().to_string();

    // an empty folder
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).expect("folder");
    let out = ablate(
        root,
        &[
            "fid",
            &empty.display().to_string(),
            &a_s,
            "--weights",
            &weights,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no .png or .jpg images"),
        "{}",
        stderr(&out)
    );

    // an .npz without mu / sigma
    let bad = root.join("bad.npz");
    let t = candle_core::Tensor::from_slice(&[1.0f64, 2.0], 2, &candle_core::Device::Cpu)
        .expect("tensor");
    candle_core::Tensor::write_npz(&[("mean", &t)], &bad).expect("npz");
    let out = ablate(root, &["fid", &bad.display().to_string(), &a_s]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("bad.npz") && err.contains("no array 'mu'"),
        "{err}"
    );

    // weights with a missing and with a mis-shaped tensor
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
        .expect("fixture weights");
    let name = "Mixed_6b.branch7x7dbl_3.conv.weight";
    let original = tensors.remove(name).expect("tensor in the fixture");
    let missing = root.join("missing.safetensors");
    candle_core::safetensors::save(&tensors, &missing).expect("save");
    // `ablate fid A A --weights FILE`
    let fid_with = |weights: &std::path::Path| {
        ablate(
            root,
            &[
                "fid",
                &a_s,
                &a_s,
                "--weights",
                &weights.display().to_string(),
            ],
        )
    };
    let out = fid_with(&missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("missing tensor '{name}'")),
        "{}",
        stderr(&out)
    );
    tensors.insert(
        name.into(),
        original.t().expect("transpose").contiguous().expect("c"),
    );
    let shaped = root.join("shaped.safetensors");
    candle_core::safetensors::save(&tensors, &shaped).expect("save");
    let out = fid_with(&shaped);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("tensor '{name}' has shape")),
        "{}",
        stderr(&out)
    );

    // usage: one path, unknown convention
    let out = ablate(root, &["fid", &a_s]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = ablate(
        root,
        &[
            "fid",
            &a_s,
            &a_s,
            "--convention",
            "tf2",
            "--weights",
            &weights,
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--convention"), "{}", stderr(&out));
}
