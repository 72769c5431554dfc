//! Rotary position embedding, transformers' "rotate_half" layout: the two halves of each head are rotated against
//! each other, y₁ = x₁·cos − x₂·sin, y₂ = x₂·cos + x₁·sin. Backward: the same rotation with −sin (a rotation's
//! transpose is its inverse).
//!
//! candle's fused `rope` has no backward, hence this op. The angles (cos, sin) are f32 tables whatever the
//! activation dtype (transformers computes them in f32 too). Reference: Su et al., "RoFormer" (2021);
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
        // x: (b, t, h, d); cos, sin: (t, d/2)
        let (_b, t, h, d) = l.shape().dims4()?;
        let half = d / 2;
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                // One chunk per (batch, position): its h heads share the position's angles.
                out.par_chunks_mut(h * d).zip(x.par_chunks(h * d)).enumerate().for_each(|(row, (o, xs))| {
                    let p = row % t;
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

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inv = Rope { cos: self.cos.clone(), sin: self.sin.clone(), inverse: !self.inverse };
        Ok(Some(g.contiguous()?.apply_op1(inv)?))
    }
}

/// Rotary embedding of x (b, t, h, d) with `cos`, `sin` of shape (t, d/2) (already offset to the positions of x).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, t, _, d) = x.dims4()?;
    if cos.dims() != [t, d / 2] || sin.dims() != [t, d / 2] {
        candle_core::bail!("rope: cos/sin {:?} do not match x {:?}", cos.dims(), x.dims());
    }
    if !super::use_kernel(x, false) {
        return super::reference::rope(x, cos, sin);
    }
    x.contiguous()?.apply_op1(Rope { cos: cos.contiguous()?, sin: sin.contiguous()?, inverse: false })
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
            &[x.clone()],
            |t| rope(&t[0], &cos, &sin).unwrap(),
            |t| super::super::reference::rope(&t[0], &cos, &sin).unwrap(),
            1e-5,
        );
        compare_bf16_with_f32(&[x], |t| rope(&t[0], &cos, &sin).unwrap(), BF16_TOL);
    }
}
