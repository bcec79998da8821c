//! Adapters chosen per call and per row. A loaded model holds only its
//! base weights and is never changed by an adapter: each forward call says
//! which adapters it uses and which rows of the batch each applies to, so
//! one model serves requests for many adapters in one batch, from many
//! threads, while adapters come and go. The same path trains an adapter
//! (one adapter on every row, with its dropout seeded by the call).
//!
//! Linear layers are numbered in the model's order (`module_names`):
//! per decoder layer q, k, v, o, gate, up, down, then the LM head.

use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use skillet_kernels::{FrozenLinear, LoraFactors, lora_linear, lora_linear_add, lora_rows};

use crate::{Linear, ModelError, Precision, Result};

/// The projections of one decoder layer, in module order.
pub const LAYER_MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// One adaptable linear layer of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Checkpoint name without `.weight` (`model.layers.0.self_attn.q_proj`, `lm_head`).
    pub name: String,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
}

/// The base layer under an update, for updates that rescale its output
/// (DoRA): the layer itself and its output for the update's rows.
pub struct BaseOutput<'a> {
    /// The base layer.
    pub linear: &'a dyn Linear,
    /// Its output (bias included) for every row of the call, `[N, out]`.
    output: &'a Tensor,
    /// The rows of `output` the update's input holds, where not all.
    rows: Option<&'a Tensor>,
}

impl BaseOutput<'_> {
    /// The base layer's output (bias included) for the update's rows,
    /// `[n, out]`.
    pub fn output(&self) -> Result<Tensor> {
        Ok(match self.rows {
            Some(idx) => self.output.index_select(idx, 0)?,
            None => self.output.clone(),
        })
    }
}

/// A set of low-rank updates to a model's linear layers (LoRA and kin).
pub trait Adapter: Send + Sync + fmt::Debug {
    /// The update of module `module` for input rows `x` (`[n, in]` →
    /// `[n, out]`), or `None` where the adapter leaves the module alone.
    /// `base` is the layer under it and its output for these rows.
    /// `dropout_seed` is set in training: the adapter's input dropout then
    /// draws its mask from it.
    fn delta(
        &self,
        module: usize,
        x: &Tensor,
        base: &BaseOutput<'_>,
        dropout_seed: Option<u64>,
    ) -> Result<Option<Tensor>>;
    /// Whether the adapter changes module `module`.
    fn adapts(&self, module: usize) -> bool;
    /// Plain LoRA factors of `module`, for the fused kernel that applies a
    /// different adapter to each row; `None` where the module is not
    /// adapted or the update is not a plain product.
    fn factors(&self, module: usize) -> Option<LoraFactors>;
    /// The probability with which training drops the adapter's inputs.
    fn dropout(&self) -> f32 {
        0.0
    }
}

#[derive(Debug, Clone, Default)]
enum Rows {
    /// No adapter.
    #[default]
    None,
    /// The one adapter on every row.
    All,
    /// Per row (of the call's leading rows), an index into the list.
    Each(Arc<[Option<u16>]>),
}

/// Which adapters a forward call uses, and where.
#[derive(Debug, Clone, Default)]
pub struct Adapters {
    list: Vec<Arc<dyn Adapter>>,
    rows: Rows,
    dropout_seed: Option<u64>,
}

impl Adapters {
    /// The base model alone.
    pub fn none() -> Self {
        Self::default()
    }

    /// One adapter on every row.
    pub fn all(adapter: Arc<dyn Adapter>) -> Self {
        Self {
            list: vec![adapter],
            rows: Rows::All,
            dropout_seed: None,
        }
    }

    /// Row `i` of the batch uses `list[rows[i]]`, or the base where `None`.
    pub fn per_row(list: Vec<Arc<dyn Adapter>>, rows: Vec<Option<usize>>) -> Result<Self> {
        if list.len() > u16::MAX as usize {
            return Err(ModelError::Input(format!(
                "{} adapters in one batch",
                list.len()
            )));
        }
        let rows = rows
            .into_iter()
            .map(|r| match r {
                Some(i) if i >= list.len() => Err(ModelError::Input(format!(
                    "a row names adapter {i} of {}",
                    list.len()
                ))),
                r => Ok(r.map(|i| i as u16)),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            list,
            rows: Rows::Each(rows.into()),
            dropout_seed: None,
        })
    }

    /// Training: adapters apply dropout with masks drawn from `seed`.
    pub fn with_dropout(mut self, seed: u64) -> Self {
        self.dropout_seed = Some(seed);
        self
    }

    /// Whether no adapter is used.
    pub fn is_empty(&self) -> bool {
        matches!(self.rows, Rows::None) || self.list.is_empty()
    }

    /// Whether some row's adapter changes `module`.
    pub fn adapts(&self, module: usize) -> bool {
        !self.is_empty() && self.list.iter().any(|a| a.adapts(module))
    }

    /// The selection for rows picked out of `[rows, per_row]` tokens:
    /// picked row `k` is token `tokens[k]`, of row `tokens[k] / per_row`.
    pub fn gather(&self, tokens: &[u32], per_row: usize) -> Self {
        let rows = match &self.rows {
            Rows::Each(each) => Rows::Each(
                tokens
                    .iter()
                    .map(|&t| each[t as usize / per_row.max(1)])
                    .collect(),
            ),
            other => other.clone(),
        };
        Self {
            list: self.list.clone(),
            rows,
            dropout_seed: self.dropout_seed,
        }
    }

    /// `lin(x)` plus each row's adapter update of module `module`. `x` is
    /// `[rows, in]` or `[rows, tokens, in]`; a per-row selection covers the
    /// leading rows.
    pub fn apply(&self, lin: &dyn Linear, module: usize, x: &Tensor) -> Result<Tensor> {
        self.add_delta(lin, module, x, lin.forward(x)?)
    }

    /// `lin(x)` plus the update as one op with its own backward
    /// ([`lora_linear`]; with `residual` added, [`lora_linear_add`]), where
    /// [`Adapters::fused_parts`] finds its parts; `None` elsewhere.
    pub(crate) fn fused(
        &self,
        lin: &dyn Linear,
        module: usize,
        x: &Tensor,
        residual: Option<&Tensor>,
        precision: Precision,
    ) -> Result<Option<Tensor>> {
        let Some((base, factors)) = self.fused_parts(lin, module, x, precision)? else {
            return Ok(None);
        };
        Ok(Some(match residual {
            Some(r) => lora_linear_add(x, r, &base, &factors, None)?,
            None => lora_linear(x, &base, &factors, None)?,
        }))
    }

    /// The frozen layer and the factors of the fused LoRA op for `lin`
    /// over `x`, where one plain LoRA adapter covers every row, something
    /// needs gradients, no dropout applies and the layer is a frozen
    /// product (its products in `precision`); `None` elsewhere.
    pub(crate) fn fused_parts(
        &self,
        lin: &dyn Linear,
        module: usize,
        x: &Tensor,
        precision: Precision,
    ) -> Result<Option<(FrozenLinear, LoraFactors)>> {
        if !matches!(self.rows, Rows::All) || self.list.is_empty() {
            return Ok(None);
        }
        let adapter = &self.list[0];
        if self.dropout_seed.is_some() && adapter.dropout() > 0.0 {
            return Ok(None);
        }
        let Some(factors) = adapter.factors(module) else {
            return Ok(None);
        };
        if !(x.track_op() || factors.a.track_op() || factors.b.track_op()) {
            return Ok(None);
        }
        Ok(lin.frozen(precision)?.map(|base| (base, factors)))
    }

    /// `y` (the base layer's output for `x`) plus each row's update.
    pub(crate) fn add_delta(
        &self,
        lin: &dyn Linear,
        module: usize,
        x: &Tensor,
        y: Tensor,
    ) -> Result<Tensor> {
        if !self.adapts(module) {
            return Ok(y);
        }
        let n = x.elem_count() / lin.in_features().max(1);
        let flat = x.reshape((n, lin.in_features()))?;
        let base = y.reshape((n, lin.out_features()))?;
        let delta = match &self.rows {
            Rows::None => None,
            Rows::All => {
                let under = BaseOutput {
                    linear: lin,
                    output: &base,
                    rows: None,
                };
                self.list[0].delta(module, &flat, &under, self.dropout_seed)?
            }
            Rows::Each(each) => {
                return Ok(self
                    .mixed(lin, module, &flat, each, &base)?
                    .reshape(y.shape())?);
            }
        };
        Ok(match delta {
            Some(d) => {
                let d = d.reshape(y.shape())?;
                (y + d)?
            }
            None => y,
        })
    }

    /// `base` (`[N, out]`) plus the updates of a batch whose rows use
    /// different adapters: the fused kernel where nothing needs gradients,
    /// else each adapter on its own rows, gathered and scattered back.
    fn mixed(
        &self,
        lin: &dyn Linear,
        module: usize,
        x: &Tensor,
        each: &[Option<u16>],
        base: &Tensor,
    ) -> Result<Tensor> {
        let out = base.dim(1)?;
        let n = x.dim(0)?;
        if each.is_empty() || n % each.len() != 0 {
            return Err(ModelError::Input(format!(
                "{} adapter rows for {n} tokens",
                each.len()
            )));
        }
        let per = n / each.len();
        let token = |i: usize| each[i / per];
        let factors: Vec<Option<LoraFactors>> =
            self.list.iter().map(|a| a.factors(module)).collect();
        // The fused kernel passes no gradient: only where none is wanted.
        let fused = self.dropout_seed.is_none()
            && !x.track_op()
            && !base.track_op()
            && self.list.iter().zip(&factors).all(|(a, f)| match f {
                Some(f) => !f.a.track_op() && !f.b.track_op(),
                None => !a.adapts(module),
            });
        if fused {
            // Adapters that leave this module alone drop out of the list.
            let mut kept = Vec::new();
            let mut remap = vec![None; factors.len()];
            for (j, f) in factors.into_iter().enumerate() {
                if let Some(f) = f {
                    remap[j] = Some(kept.len() as u16);
                    kept.push(f);
                }
            }
            let which: Vec<Option<u16>> = (0..n)
                .map(|i| token(i).and_then(|j| remap[j as usize]))
                .collect();
            return Ok(lora_rows(x, &which, &kept, Some(base))?);
        }
        let mut total = Tensor::zeros((n, out), DType::F32, &Device::Cpu)?;
        for (j, adapter) in self.list.iter().enumerate() {
            let rows: Vec<u32> = (0..n as u32)
                .filter(|&i| token(i as usize) == Some(j as u16))
                .collect();
            if rows.is_empty() {
                continue;
            }
            let idx = Tensor::new(rows.as_slice(), &Device::Cpu)?;
            let under = BaseOutput {
                linear: lin,
                output: base,
                rows: Some(&idx),
            };
            let xs = x.index_select(&idx, 0)?;
            if let Some(d) = adapter.delta(module, &xs, &under, self.dropout_seed)? {
                total = total.index_add(&idx, &d, 0)?;
            }
        }
        Ok((base + total)?)
    }
}

/// The name of every linear layer of a model with `layers` decoder
/// layers, in module order.
pub fn module_names(layers: usize) -> Vec<String> {
    let mut names: Vec<String> = (0..layers)
        .flat_map(|i| {
            LAYER_MODULES
                .iter()
                .map(move |m| format!("model.layers.{i}.{m}"))
        })
        .collect();
    names.push("lm_head".to_string());
    names
}
