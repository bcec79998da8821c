//! Activation (gradient) checkpointing per decoder layer (Chen et al.
//! 2016, arXiv 1604.06174; `torch.utils.checkpoint` in transformers'
//! `gradient_checkpointing_enable`). A layer runs as one custom op: its
//! forward keeps no graph, only the op's input survives for backward, and
//! backward runs the layer again on that input with autograd, returns the
//! input's gradient to the outer graph and sets the trainable variables'
//! gradients aside for the trainer (a custom op can only return gradients
//! for its own inputs). LoRA dropout masks are seeded per step and layer,
//! so the second forward draws the same masks as the first.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};

use crate::Result;
use crate::layers::{Block, Kv, LayerContext};

/// The trainable variables and the gradients set aside for them.
#[derive(Debug)]
pub(crate) struct Checkpointing {
    vars: Vec<Var>,
    grads: Mutex<Vec<Option<Tensor>>>,
}

impl Checkpointing {
    pub(crate) fn new(vars: Vec<Var>) -> Self {
        let n = vars.len();
        Self {
            vars,
            grads: Mutex::new(vec![None; n]),
        }
    }

    /// The gradients set aside since the last call, emptied.
    pub(crate) fn take(&self) -> Vec<(Tensor, Tensor)> {
        let Ok(mut grads) = self.grads.lock() else {
            return Vec::new();
        };
        self.vars
            .iter()
            .zip(grads.iter_mut())
            .filter_map(|(v, g)| g.take().map(|g| (v.as_tensor().clone(), g)))
            .collect()
    }
}

struct LayerOp {
    layer: Arc<dyn Block>,
    ctx: Arc<LayerContext>,
    state: Arc<Checkpointing>,
}

fn candle_err(e: crate::ModelError) -> candle_core::Error {
    candle_core::Error::Msg(format!("checkpointed layer: {e}"))
}

impl CustomOp1 for LayerOp {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("checkpointed layer expects f32 input");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("checkpointed layer expects a contiguous input");
        };
        let x = Tensor::from_slice(&data[a..b], layout.shape(), &Device::Cpu)?;
        // No graph survives this call: the result is copied out as plain
        // storage and every intermediate is dropped here.
        let y = self
            .layer
            .forward(&x, &self.ctx, Kv::Fresh)
            .map_err(candle_err)?;
        let y = y.detach().flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self
            .layer
            .forward(x.as_tensor(), &self.ctx, Kv::Fresh)
            .map_err(candle_err)?;
        let mut store = (y * grad.detach())?.sum_all()?.backward()?;
        let dx = store.remove(x.as_tensor());
        if let Ok(mut kept) = self.state.grads.lock() {
            for (v, slot) in self.state.vars.iter().zip(kept.iter_mut()) {
                if let Some(g) = store.remove(v.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(prev) => (prev + g)?,
                        None => g,
                    });
                }
            }
        }
        Ok(dx)
    }
}

/// Runs `layer` on `x` as a checkpointed op.
pub(crate) fn forward(
    layer: &Arc<dyn Block>,
    ctx: &Arc<LayerContext>,
    state: &Arc<Checkpointing>,
    x: &Tensor,
) -> Result<Tensor> {
    // The op's backward runs only if its input is on the graph; the first
    // layer's input (an embedding lookup) may not be, so make it a variable.
    let x = if x.track_op() {
        x.contiguous()?
    } else {
        Var::from_tensor(x)?.as_tensor().clone()
    };
    Ok(x.apply_op1(LayerOp {
        layer: layer.clone(),
        ctx: ctx.clone(),
        state: state.clone(),
    })?)
}
