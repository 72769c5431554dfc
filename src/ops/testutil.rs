//! Test helpers shared by the op files: random inputs, the finite-difference gradient check, and the two
//! comparisons every op passes — kernel against reference composition (forward and backward), and bf16 against
//! f32.

use candle_core::{DType, Device, Tensor, Var};

/// Relative L2 error allowed between a bf16 run and the f32 run of the same op (bf16 keeps 8 significant bits:
/// each rounding is within 2⁻⁹ relative; inputs, outputs and gradients are each rounded once or twice).
pub const BF16_TOL: f32 = 1.5e-2;

pub fn rand(shape: &[usize], seed: u64) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// ‖a − b‖₂ / ‖b‖₂, computed in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num.sqrt() / den.sqrt().max(1e-30)) as f32
}

/// Checks d(Σ f(x)⊙p)/dx from backward against central differences, in f64 arithmetic on f32 data.
pub fn check_grad(shape: &[usize], f: impl Fn(&Tensor) -> Tensor, tol: f32) {
    let x0 = rand(shape, 1);
    let x = Var::from_tensor(&x0).unwrap();
    let y = f(x.as_tensor());
    let p = rand(y.dims(), 2);
    let loss = (&y * &p).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(x.as_tensor()).expect("no gradient reached the input").flatten_all().unwrap();
    let g: Vec<f32> = g.to_vec1().unwrap();
    let base: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-2f32;
    let eval = |v: &[f32]| -> f64 {
        let t = Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap();
        let y = f(&t).to_dtype(DType::F64).unwrap();
        (y * p.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    for i in (0..base.len()).step_by((base.len() / 40).max(1)) {
        let mut plus = base.clone();
        plus[i] += eps;
        let mut minus = base.clone();
        minus[i] -= eps;
        let fd = ((eval(&plus) - eval(&minus)) / (2.0 * eps as f64)) as f32;
        assert!((fd - g[i]).abs() <= tol * (1.0 + fd.abs()), "element {i}: finite difference {fd}, backward {}", g[i]);
    }
}

/// y and the gradients of Σ y⊙p with respect to every input (made variables), for `f` on `inputs`.
pub fn forward_backward(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let p = rand(y.dims(), 99).to_dtype(y.dtype()).unwrap().to_device(y.device()).unwrap();
    let grads = (&y * &p).unwrap().sum_all().unwrap().backward().unwrap();
    let g = ts
        .iter()
        .enumerate()
        .map(|(i, t)| grads.get(t).unwrap_or_else(|| panic!("no gradient reached input {i}")).clone())
        .collect();
    (y, g)
}

/// The op's kernel against its reference composition: outputs and every input's gradient, elementwise within
/// `tol · (1 + |reference|)`.
pub fn compare_with_reference(
    inputs: &[Tensor],
    kernel: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let (yk, gk) = forward_backward(inputs, &kernel);
    let (yr, gr) = forward_backward(inputs, &reference);
    assert_eq!(yk.dims(), yr.dims());
    assert_eq!(yk.dtype(), yr.dtype(), "output dtype");
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{what}[{i}]: kernel {x}, reference {y}");
        }
    };
    close(&yk, &yr, "y");
    for (i, (a, b)) in gk.iter().zip(&gr).enumerate() {
        assert_eq!(a.dtype(), inputs[i].dtype(), "gradient {i} dtype");
        close(a, b, &format!("grad {i}"));
    }
}

/// The op on bf16 copies of `inputs` against the op on the f32 inputs: output and gradients within `tol`
/// relative L2 error, and the bf16 run's output and gradients in bf16.
pub fn compare_bf16_with_f32(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
    let (y32, g32) = forward_backward(inputs, &f);
    let b16: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::BF16).unwrap()).collect();
    let (y16, g16) = forward_backward(&b16, &f);
    assert_eq!(y16.dtype(), DType::BF16, "the bf16 run's output");
    let e = rel_l2(&y16, &y32);
    assert!(e <= tol, "bf16 output: relative error {e} > {tol}");
    for (i, (a, b)) in g16.iter().zip(&g32).enumerate() {
        assert_eq!(a.dtype(), DType::BF16, "gradient {i} of a bf16 input");
        let e = rel_l2(a, b);
        assert!(e <= tol, "bf16 gradient {i}: relative error {e} > {tol}");
    }
}

/// The op on `gpu` against the same op on the CPU: output and every input's gradient within `tol` relative L2
/// error, in the inputs' dtypes. The CPU op is the reference (itself checked against finite differences and the
/// composed version), so a GPU kernel is checked against an outside result.
pub fn compare_gpu_with_cpu(gpu: &Device, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
    let (yc, gc) = forward_backward(inputs, &f);
    let on_gpu: Vec<Tensor> = inputs.iter().map(|t| t.to_device(gpu).unwrap()).collect();
    let (yg, gg) = forward_backward(&on_gpu, &f);
    assert!(yg.device().same_device(gpu), "the GPU run's output is not on the GPU");
    assert_eq!((yg.dims(), yg.dtype()), (yc.dims(), yc.dtype()), "output shape/dtype");
    let e = rel_l2(&yg, &yc);
    assert!(e <= tol, "GPU output: relative error {e} > {tol}");
    for (i, (a, b)) in gg.iter().zip(&gc).enumerate() {
        assert_eq!(a.dtype(), b.dtype(), "gradient {i} dtype");
        let e = rel_l2(a, b);
        assert!(e <= tol, "GPU gradient {i}: relative error {e} > {tol}");
    }
}

/// A random (out, in) weight quantized to NF4 (double quantization), and its dequantized dense copy.
pub fn nf4_weight(out: usize, inp: usize, seed: u64) -> (std::sync::Arc<crate::quant::nf4::Nf4Tensor>, Tensor) {
    let w = rand(&[out, inp], seed);
    let data: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let q = crate::quant::nf4::Nf4Tensor::quantize(&data, &[out, inp], true).unwrap();
    let dense = Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu).unwrap();
    (std::sync::Arc::new(q), dense)
}
