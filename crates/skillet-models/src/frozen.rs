//! `y = x Wᵀ` for a frozen weight, as a custom op whose backward returns
//! only the input gradient `dy W`. candle's own matmul backward always
//! computes the weight gradient too (as much work as the forward pass, and
//! a full-size tensor per layer) even when the weight is not trainable.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};

/// The op; holds the dense `[out, in]` weight.
pub(crate) struct FrozenMatmul {
    pub(crate) weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("frozen matmul expects f32 input");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen matmul expects a contiguous input");
        };
        let dims = layout.shape().dims();
        let inp = *dims.last().expect("at least one dim");
        let rows = dims[..dims.len() - 1].iter().product::<usize>();
        let x = Tensor::from_slice(&data[start..end], (rows, inp), &Device::Cpu)?;
        let y = x.matmul(&self.weight.t()?)?; // [rows, out]
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("at least one dim") = self.weight.dim(0)?;
        Ok((
            CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            Shape::from(out_dims),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let out = self.weight.dim(0)?;
        let rows = grad.elem_count() / out;
        let g = grad.reshape((rows, out))?.matmul(&self.weight)?; // [rows, in]
        Ok(Some(g.reshape(arg.shape())?))
    }
}
