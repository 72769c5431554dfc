//! Rotary position embedding, transformers' "rotate_half" layout: the two halves of each head are rotated against
//! each other, y₁ = x₁·cos − x₂·sin, y₂ = x₂·cos + x₁·sin. Backward: the same rotation with −sin (a rotation's
//! transpose is its inverse).
//!
//! candle's fused `rope` has no backward, hence this op. The angles (cos, sin) are f32 tables whatever the
//! activation dtype (transformers computes them in f32 too). CPU: one rayon task per (batch, position); CUDA: one
//! thread per rotated pair (`src/ops/cuda/rope.cu`), the same f32 roundings in the same order. Reference: Su et al., "RoFormer" (2021);
//! transformers' `apply_rotary_pos_emb`.

use crate::host::{f32_view, storage_from_f32, with_f32};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(crate) struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_view(s, l, "rope")?;
        // x: (b, t, h, d); cos, sin: (n, d/2) with n = t (shared by the rows) or b·t (per row)
        let (_b, _t, h, d) = l.shape().dims4()?;
        let half = d / 2;
        let n = self.cos.dim(0)?;
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                // One chunk per (batch, position): its h heads share the position's angles.
                out.par_chunks_mut(h * d).zip(x.par_chunks(h * d)).enumerate().for_each(|(row, (o, xs))| {
                    let p = row % n;
                    let (c, sn) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
                    for (or, xr) in o.chunks_mut(d).zip(xs.chunks(d)) {
                        let (x1, x2) = xr.split_at(half);
                        let (o1, o2) = or.split_at_mut(half);
                        for i in 0..half {
                            let s = sign * sn[i];
                            o1[i] = x1[i] * c[i] - x2[i] * s;
                            o2[i] = x2[i] * c[i] + x1[i] * s;
                        }
                    }
                })
            })
        })??;
        Ok((storage_from_f32(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{self as k, alloc, elementwise, launched, suffix, view};
        use candle_core::cuda::cudarc::driver::PushKernelArg;
        use candle_core::cuda::CudaDType;
        use candle_core::{CudaStorage, DType, Storage};

        // x: (b, t, h, d); cos, sin: (n, d/2) f32, n = t or b·t (the kernel's position index is (b·t + i) mod n)
        let (_b, _t, h, d) = l.shape().dims4()?;
        let t = self.cos.dim(0)?;
        if d % 2 != 0 {
            candle_core::bail!("rope: odd head size {d}");
        }
        let half = d / 2;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (Storage::Cuda(cs), Storage::Cuda(ss)) = (&*cs, &*ss) else {
            candle_core::bail!("rope: x is on the GPU, cos/sin are not")
        };
        if cs.dtype() != DType::F32 || ss.dtype() != DType::F32 || cl.dims() != [t, half] || sl.dims() != [t, half] {
            candle_core::bail!("rope: cos/sin must be f32 ({t}, {half}), got {:?} {:?}", cs.dtype(), cl.dims());
        }
        let (cos, sin) = (view::<f32>(cs, cl, "rope")?, view::<f32>(ss, sl, "rope")?);
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let dims = |v: usize| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("rope: dimension {v}")));
        let (t32, h32, half32) = (dims(t)?, dims(h)?, dims(half)?);
        fn go<T: CudaDType + candle_core::cuda::cudarc::driver::DeviceRepr>(
            s: &CudaStorage,
            l: &Layout,
            args: (
                &candle_core::cuda::cudarc::driver::CudaView<'_, f32>,
                &candle_core::cuda::cudarc::driver::CudaView<'_, f32>,
            ),
            dims: (u32, u32, u32),
            sign: f32,
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let x = view::<T>(s, l, "rope")?;
            let n = x.len();
            let pairs = (n / 2) as u64;
            let mut y = alloc::<T>(dev, n)?;
            if pairs > 0 {
                let f = k::func(dev, &k::ROPE, &format!("rope_{}", suffix(s.dtype(), "rope")?))?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&x)
                    .arg(args.0)
                    .arg(args.1)
                    .arg(&mut y)
                    .arg(&dims.0)
                    .arg(&dims.1)
                    .arg(&dims.2)
                    .arg(&sign)
                    .arg(&pairs);
                // SAFETY: the arguments match rope.cu's signature; x and y hold 2·pairs elements, cos/sin t·half.
                launched(unsafe { b.launch(elementwise(pairs as usize)) })?;
            }
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }
        let out = match s.dtype() {
            DType::F32 => go::<f32>(s, l, (&cos, &sin), (t32, h32, half32), sign)?,
            DType::BF16 => go::<half::bf16>(s, l, (&cos, &sin), (t32, h32, half32), sign)?,
            other => candle_core::bail!("rope: the CUDA kernel takes f32 or bf16, not {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
        Ok(Some(g.contiguous()?.apply_op1(inv)?))
    }
}

/// Rotary embedding of x (b, t, h, d) with `cos`, `sin` of shape (t, d/2) (already offset to the positions of x),
/// or (b·t, d/2): one row of angles per (batch, position), for packed rows whose positions restart per example.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, t, _, d) = x.dims4()?;
    let n = cos.dim(0)?;
    if (n != t && n != b * t) || cos.dims() != [n, d / 2] || sin.dims() != cos.dims() {
        candle_core::bail!("rope: cos/sin {:?} do not match x {:?}", cos.dims(), x.dims());
    }
    if !super::use_kernel(x, true) {
        if n != t {
            return super::reference::rope_per_row(x, cos, sin);
        }
        return super::reference::rope(x, cos, sin);
    }
    // The angle tables as the kernels read them: f32, contiguous, on x's device (no-ops when they already are).
    let table = |c: &Tensor| -> Result<Tensor> {
        if x.device().is_cuda() {
            c.to_device(x.device())?.to_dtype(candle_core::DType::F32)?.contiguous()
        } else {
            c.contiguous()
        }
    };
    x.contiguous()?.apply_op1(Rope { cos: table(cos)?, sin: table(sin)?, inverse: false })
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    #[test]
    fn rope_gradient_and_reference() {
        let (t, d) = (5, 8);
        let cos = rand(&[t, d / 2], 7).cos().unwrap();
        let sin = rand(&[t, d / 2], 7).sin().unwrap();
        check_grad(&[2, t, 3, d], |x| rope(x, &cos, &sin).unwrap(), 1e-2);
        let x = rand(&[2, t, 3, d], 8);
        // candle's reference works on (b, h, t, d)
        let xt = x.transpose(1, 2).unwrap().contiguous().unwrap();
        let want = candle_nn::rotary_emb::rope_slow(&xt, &cos, &sin).unwrap().transpose(1, 2).unwrap();
        assert!(max_abs_diff(&want, &rope(&x, &cos, &sin).unwrap()) < 1e-6);
        compare_with_reference(
            std::slice::from_ref(&x),
            |t| rope(&t[0], &cos, &sin).unwrap(),
            |t| super::super::reference::rope(&t[0], &cos, &sin).unwrap(),
            1e-5,
        );
        compare_bf16_with_f32(&[x], |t| rope(&t[0], &cos, &sin).unwrap(), BF16_TOL);
    }

    #[test]
    fn per_row_tables_rotate_each_row_by_its_own_positions() {
        // Row 0 at positions 0..5, row 1 at positions (0, 1, 0, 1, 2): the packed-row layout.
        let (t, d) = (5, 8);
        let angles = rand(&[t, d / 2], 9);
        let table = |positions: &[u32]| {
            let idx = Tensor::new(positions, &candle_core::Device::Cpu).unwrap();
            (angles.cos().unwrap().index_select(&idx, 0).unwrap(), angles.sin().unwrap().index_select(&idx, 0).unwrap())
        };
        let (cos, sin) = table(&[0, 1, 2, 3, 4, 0, 1, 0, 1, 2]);
        let x = rand(&[2, t, 3, d], 10);
        let y = rope(&x, &cos, &sin).unwrap();
        let (c0, s0) = table(&[0, 1, 2, 3, 4]);
        let (c1, s1) = table(&[0, 1, 0, 1, 2]);
        let row = |i: usize| x.narrow(0, i, 1).unwrap();
        let want = Tensor::cat(&[rope(&row(0), &c0, &s0).unwrap(), rope(&row(1), &c1, &s1).unwrap()], 0).unwrap();
        assert!(max_abs_diff(&y, &want) < 1e-6);
        check_grad(&[2, t, 3, d], |x| rope(x, &cos, &sin).unwrap(), 1e-2);
        compare_with_reference(
            std::slice::from_ref(&x),
            |t| rope(&t[0], &cos, &sin).unwrap(),
            |t| super::super::reference::rope_per_row(&t[0], &cos, &sin).unwrap(),
            1e-5,
        );
        assert!(rope(&x, &cos.narrow(0, 0, 7).unwrap(), &sin.narrow(0, 0, 7).unwrap()).is_err());
    }
}
