//! The CUDA kernels against the CPU kernels, forward and backward, on random inputs (each test says SKIPPED and
//! passes without a GPU; `PEFTKIT_REQUIRE_GPU=1` makes that a failure). The CPU kernels are themselves checked
//! against finite differences and the reference compositions in their own files, so agreement here carries those
//! checks over to the GPU.
//!
//! Metric: max |gpu − cpu| / max |cpu| per output and gradient. f32 ≤ 1e-5; bf16 ≤ [`BF16_TOL`] (the two sides
//! round the same f32 values to bf16, but sums taken in another order can land one bf16 step apart).

use super::super::testutil::{rand, BF16_TOL};
use crate::ops;
use crate::train::optim::AdamW;
use candle_core::{DType, Device, Tensor, Var};

/// Max |a − b| / max |b|, both read as f32 on the CPU.
fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> =
        a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> =
        b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
    if diff == 0.0 {
        0.0
    } else {
        diff / scale.max(f32::MIN_POSITIVE)
    }
}

/// y = f(inputs) on `dev` and the gradients of Σ y⊙p (p random, the same on every device) for every input, all
/// returned on the CPU.
fn forward_backward(inputs: &[Tensor], dev: &Device, f: &dyn Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    assert!(y.device().same_device(dev), "the output stayed on the input's device");
    let p = rand(y.dims(), 99).to_dtype(y.dtype()).unwrap().to_device(dev).unwrap();
    let grads = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
    let g = ts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let g = grads.get(t).unwrap_or_else(|| panic!("no gradient reached input {i}"));
            assert_eq!(g.dtype(), t.dtype(), "gradient {i} dtype");
            g.to_device(&Device::Cpu).unwrap()
        })
        .collect();
    (y.to_device(&Device::Cpu).unwrap(), g)
}

/// Runs `f` on the CPU and on the GPU with `inputs` cast to `dtype`; checks output and gradients within `tol`.
fn gpu_matches_cpu(
    what: &str,
    dev: &Device,
    inputs: &[Tensor],
    dtype: DType,
    tol: f32,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
    let (yc, gc) = forward_backward(&inputs, &Device::Cpu, f);
    let (yg, gg) = forward_backward(&inputs, dev, f);
    assert_eq!(yg.dtype(), yc.dtype(), "{what}: output dtype");
    assert_eq!(yg.dims(), yc.dims(), "{what}: output shape");
    let e = rel(&yg, &yc);
    println!("{what} {dtype:?}: forward rel {e:e}");
    assert!(e <= tol, "{what} {dtype:?}: forward rel {e:e} > {tol:e}");
    for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
        let e = rel(a, b);
        println!("{what} {dtype:?}: gradient {i} rel {e:e}");
        assert!(e <= tol, "{what} {dtype:?}: gradient {i} rel {e:e} > {tol:e}");
    }
}

fn tol(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        1e-5
    } else {
        BF16_TOL
    }
}

#[test]
fn rms_norm_gpu_matches_cpu() {
    let Some(dev) = crate::compute::test_gpu("rms_norm_gpu_matches_cpu") else { return };
    // Rows shorter than a warp, odd lengths, longer than the block (several elements per thread), many rows.
    for (i, shape) in [&[3usize, 7, 40][..], &[5, 67], &[2, 4096], &[300, 1000], &[1, 17]].iter().enumerate() {
        let d = *shape.last().unwrap();
        let x = (rand(shape, 10 + i as u64) * 3.0).unwrap();
        for (dt, wdt) in
            [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::BF16, DType::F32), (DType::F32, DType::BF16)]
        {
            let w = (rand(&[d], 20 + i as u64) + 1.5).unwrap().to_dtype(wdt).unwrap();
            gpu_matches_cpu(
                &format!("rms_norm {shape:?} w {wdt:?}"),
                &dev,
                std::slice::from_ref(&x),
                dt,
                tol(dt),
                &|t| ops::rms_norm(&t[0], &w.to_device(t[0].device()).unwrap(), 1e-5).unwrap(),
            );
        }
    }
    // An input that starts at an offset in its storage (a contiguous view).
    let big = rand(&[9, 96], 30);
    let w = (rand(&[96], 31) + 1.5).unwrap();
    gpu_matches_cpu("rms_norm view", &dev, &[big], DType::F32, 1e-5, &|t| {
        ops::rms_norm(&t[0].narrow(0, 2, 5).unwrap(), &w.to_device(t[0].device()).unwrap(), 1e-5).unwrap()
    });
}

#[test]
fn rope_gpu_matches_cpu() {
    let Some(dev) = crate::compute::test_gpu("rope_gpu_matches_cpu") else { return };
    for (i, &(b, t, h, d)) in [(2usize, 5usize, 3usize, 8usize), (1, 33, 4, 128), (3, 64, 9, 64)].iter().enumerate() {
        let ang = (rand(&[t, d / 2], 40 + i as u64) * 3.0).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let x = rand(&[b, t, h, d], 50 + i as u64);
        for dt in [DType::F32, DType::BF16] {
            gpu_matches_cpu(&format!("rope {:?}", (b, t, h, d)), &dev, std::slice::from_ref(&x), dt, tol(dt), &|x| {
                let dev = x[0].device();
                ops::rope(&x[0], &cos.to_device(dev).unwrap(), &sin.to_device(dev).unwrap()).unwrap()
            });
        }
    }
    // A view with an offset, and angle tables that are views too.
    let x = rand(&[3, 6, 2, 16], 60);
    let ang = rand(&[10, 8], 61);
    gpu_matches_cpu("rope view", &dev, &[x], DType::F32, 1e-5, &|x| {
        let dev = x[0].device();
        let cos = ang.cos().unwrap().to_device(dev).unwrap().narrow(0, 3, 6).unwrap();
        let sin = ang.sin().unwrap().to_device(dev).unwrap().narrow(0, 3, 6).unwrap();
        ops::rope(&x[0].narrow(0, 1, 2).unwrap(), &cos, &sin).unwrap()
    });
}

#[test]
fn swiglu_gpu_matches_cpu() {
    let Some(dev) = crate::compute::test_gpu("swiglu_gpu_matches_cpu") else { return };
    for (i, shape) in [&[5usize, 9][..], &[3, 1000, 11], &[1], &[70_001]].iter().enumerate() {
        let a = (rand(shape, 70 + i as u64) * 4.0).unwrap();
        let b = rand(shape, 80 + i as u64);
        for dt in [DType::F32, DType::BF16] {
            gpu_matches_cpu(&format!("swiglu {shape:?}"), &dev, &[a.clone(), b.clone()], dt, tol(dt), &|t| {
                ops::swiglu(&t[0], &t[1]).unwrap()
            });
        }
    }
    let (a, b) = (rand(&[4, 50], 90), rand(&[4, 50], 91));
    gpu_matches_cpu("swiglu views", &dev, &[a, b], DType::F32, 1e-5, &|t| {
        ops::swiglu(&t[0].narrow(0, 1, 3).unwrap(), &t[1].narrow(0, 1, 3).unwrap()).unwrap()
    });
}

#[test]
fn dropout_gpu_draws_the_cpu_mask() {
    let Some(dev) = crate::compute::test_gpu("dropout_gpu_draws_the_cpu_mask") else { return };
    // The mask itself, bit for bit, over more elements than one grid of 65 535 blocks of 256 threads covers.
    let n = 65_535 * 256 + 12_345;
    for (p, seed) in [(0.1, 1u64), (0.5, 0xdead_beef), (0.05, u64::MAX)] {
        let ones = Tensor::ones(n, DType::F32, &dev).unwrap();
        let got: Vec<f32> = ops::dropout(&ones, p, seed).unwrap().to_vec1().unwrap();
        let want = super::super::dropout::dropout_mask(n, p, seed);
        let bad = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(bad, 0, "p {p} seed {seed}: {bad} of {n} mask values differ");
    }
    // Values and gradients, f32 and bf16, bit for bit (the same f32 product, the same rounding).
    let x = rand(&[6, 1000], 92);
    for dt in [DType::F32, DType::BF16] {
        gpu_matches_cpu("dropout", &dev, std::slice::from_ref(&x), dt, 0.0, &|t| ops::dropout(&t[0], 0.3, 7).unwrap());
    }
    gpu_matches_cpu("dropout view", &dev, &[x], DType::F32, 0.0, &|t| {
        ops::dropout(&t[0].narrow(0, 2, 3).unwrap(), 0.3, 7).unwrap()
    });
}

#[test]
fn fused_adamw_matches_the_cpu_optimizer() {
    let Some(dev) = crate::compute::test_gpu("fused_adamw_matches_the_cpu_optimizer") else { return };
    let shapes: [&[usize]; 3] = [&[7, 5], &[1], &[65_535 * 256 + 3]];
    let init: Vec<Tensor> = shapes.iter().enumerate().map(|(i, s)| rand(s, 100 + i as u64)).collect();
    let vars_cpu: Vec<Var> = init.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let vars_gpu: Vec<Var> = init.iter().map(|t| Var::from_tensor(&t.to_device(&dev).unwrap()).unwrap()).collect();
    let mut cpu = AdamW::new(vars_cpu.clone(), 0.9, 0.999, 1e-8, 0.01).unwrap();
    let mut gpu = AdamW::new(vars_gpu.clone(), 0.9, 0.999, 1e-8, 0.01).unwrap();
    // State that shares one buffer (as a careless restore could leave it) must still come out right.
    gpu.v[1] = gpu.m[1].clone();
    for step in 0..3u64 {
        let grads: Vec<Tensor> =
            shapes.iter().enumerate().map(|(i, s)| (rand(s, 200 + 10 * step + i as u64) * 0.5).unwrap()).collect();
        let lr = 1e-3 * (step + 1) as f64;
        cpu.step(&grads, lr).unwrap();
        let on_gpu: Vec<Tensor> = grads.iter().map(|g| g.to_device(&dev).unwrap()).collect();
        gpu.step(&on_gpu, lr).unwrap();
        for i in 0..shapes.len() {
            for (what, a, b) in [
                ("p", vars_gpu[i].as_tensor(), vars_cpu[i].as_tensor()),
                ("m", &gpu.m[i], &cpu.m[i]),
                ("v", &gpu.v[i], &cpu.v[i]),
            ] {
                assert!(a.device().same_device(&dev), "step {step} {what}{i} left the GPU");
                let d = (a.to_device(&Device::Cpu).unwrap() - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                println!("step {step} {what}{i}: max |gpu − cpu| = {d:e}");
                assert!(d <= 1e-6, "step {step} {what}{i}: max |gpu − cpu| = {d:e}");
            }
        }
    }
}
