//! Grafting a precomputed result onto the autograd graph, with a backward pass written in tensor ops.
//!
//! A candle `CustomOp`'s forward (`cpu_fwd`, `cuda_fwd`) receives raw storage, one device at a time, while its
//! `bwd` receives tensors. An op whose forward is easiest to write with candle's tensor ops (so that the same code
//! runs on every device, and cuBLAS does the products on a GPU) therefore computes its result *outside* the op, on
//! detached inputs (so no graph is recorded and no intermediate is kept), and attaches it here:
//! [`graft1`]/[`graft3`] apply a small custom op to the real inputs whose forward returns a copy of the
//! precomputed result's storage (CPU or CUDA), and whose `bwd` is the given closure. The precomputed tensor is
//! handed over to the op and dropped after the copy, so the result exists once.
//!
//! Why not [`Tensor::from_storage`]: it is public in candle 0.11.1, but the `BackpropOp` it needs to record a
//! backward step can only be built inside candle; a custom op is the public way in. The copy is of the op's
//! output only (attention's O, a scalar loss), small next to the work that produced it.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

/// The backward step of a one-input graft: (input, output, d output) → d input.
type Bwd1 = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync;
/// Two gradients, one per input of a two-input graft.
pub(crate) type Grads2 = (Option<Tensor>, Option<Tensor>);
/// The backward step of a two-input graft: (a, b, output, d output) → (da, db).
type Bwd2 = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads2> + Send + Sync;
/// Three gradients, one per input of a three-input graft.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
/// The backward step of a three-input graft: (a, b, c, output, d output) → (da, db, dc).
type Bwd3 = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3> + Send + Sync;

/// The precomputed result, taken (once) by the op's forward.
struct Precomputed {
    name: &'static str,
    out: Mutex<Option<Tensor>>,
}

/// A compact, row-major copy of the `l` part of `s` (the precomputed tensor may be a view).
fn compact<B>(s: &B, l: &Layout) -> Result<B>
where
    B: BackendStorage,
    B::Device: BackendDevice<Storage = B>,
{
    let mut dst = s.device().zeros_impl(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

impl Precomputed {
    fn new(name: &'static str, out: Tensor) -> Self {
        Self { name, out: Mutex::new(Some(out)) }
    }

    fn take(&self) -> Result<Tensor> {
        let out = self.out.lock().map_err(|_| candle_core::Error::Msg("poisoned lock".into()))?.take();
        out.ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let out = self.take()?;
        let (st, l) = out.storage_and_layout();
        match &*st {
            Storage::Cpu(s) => Ok((compact(s, l)?, l.shape().clone())),
            _ => candle_core::bail!("{}: inputs on the CPU but the precomputed result is not", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take()?;
        let (st, l) = out.storage_and_layout();
        match &*st {
            Storage::Cuda(s) => Ok((compact(s, l)?, l.shape().clone())),
            _ => candle_core::bail!("{}: inputs on CUDA but the precomputed result is not", self.name),
        }
    }
}

struct Graft1 {
    out: Precomputed,
    bwd: Box<Bwd1>,
}

impl CustomOp1 for Graft1 {
    fn name(&self) -> &'static str {
        self.out.name
    }
    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _s: &candle_core::CudaStorage, _l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }
    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(x, res, grad)
    }
}

struct Graft2 {
    out: Precomputed,
    bwd: Box<Bwd2>,
}

impl CustomOp2 for Graft2 {
    fn name(&self) -> &'static str {
        self.out.name
    }
    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, _s2: &CpuStorage, _l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Grads2> {
        (self.bwd)(a, b, res, grad)
    }
}

struct Graft3 {
    out: Precomputed,
    bwd: Box<Bwd3>,
}

impl CustomOp3 for Graft3 {
    fn name(&self) -> &'static str {
        self.out.name
    }
    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _s1: &candle_core::CudaStorage,
        _l1: &Layout,
        _s2: &candle_core::CudaStorage,
        _l2: &Layout,
        _s3: &candle_core::CudaStorage,
        _l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Grads3> {
        (self.bwd)(a, b, c, res, grad)
    }
}

/// `out` (computed from `x` outside the graph, on `x`'s device) as the result of an op on `x` whose backward is
/// `bwd(x, out, d out) → d x`. Returns `out` itself when `x` needs no gradient.
pub(crate) fn graft1<F>(x: &Tensor, out: Tensor, name: &'static str, bwd: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
{
    if !x.track_op() {
        return Ok(out);
    }
    x.apply_op1(Graft1 { out: Precomputed::new(name, out), bwd: Box::new(bwd) })
}

/// `out` (computed from `a`, `b` outside the graph) as the result of an op on them whose backward is
/// `bwd(a, b, out, d out) → (da, db)`. Returns `out` itself when no input needs a gradient.
pub(crate) fn graft2<F>(a: &Tensor, b: &Tensor, out: Tensor, name: &'static str, bwd: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads2> + Send + Sync + 'static,
{
    if !(a.track_op() || b.track_op()) {
        return Ok(out);
    }
    a.apply_op2(b, Graft2 { out: Precomputed::new(name, out), bwd: Box::new(bwd) })
}

/// `out` (computed from `a`, `b`, `c` outside the graph) as the result of an op on them whose backward is
/// `bwd(a, b, c, out, d out) → (da, db, dc)`. Returns `out` itself when no input needs a gradient.
pub(crate) fn graft3<F>(a: &Tensor, b: &Tensor, c: &Tensor, out: Tensor, name: &'static str, bwd: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<Grads3> + Send + Sync + 'static,
{
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(out);
    }
    a.apply_op3(b, c, Graft3 { out: Precomputed::new(name, out), bwd: Box::new(bwd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn graft_returns_the_result_and_runs_the_given_backward() {
        // y = (x²)ᵀ computed outside the graph, a strided view (copied compactly); backward 2x ⊙ gᵀ.
        let x = Var::from_tensor(&Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap()).unwrap();
        let sq = x.as_tensor().detach().sqr().unwrap().t().unwrap();
        let y = graft1(x.as_tensor(), sq, "square", |x, _, g| Ok(Some((x * 2.0)?.mul(&g.t()?)?))).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![1., 9.], vec![4., 16.]]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(g, vec![vec![2., 4.], vec![6., 8.]]);
        // No gradient wanted: the result is returned as is.
        let c = Tensor::new(&[5f32], &Device::Cpu).unwrap();
        let r = graft1(&c, c.clone(), "id", |_, _, _| unreachable!()).unwrap();
        assert!(!r.track_op());
    }
}
