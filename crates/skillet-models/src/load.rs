//! Loading a model's tensors by name: each is checked against the shape the
//! architecture's name table gives it, made a trainable variable in full
//! fine-tuning, and wrapped as a linear layer or norm.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};

use crate::layers::RmsNorm;
use crate::linear::{BaseLinear, Linear};
use crate::names::tensor_shapes;
use crate::{
    LoadOptions, ModelConfig, ModelError, Nf4, QuantizeBase, Result, Weight, WeightSource,
};

/// Tensors by checkpoint name.
pub(crate) type Named = Vec<(String, Tensor)>;

/// Reads tensors of one model from a weight source.
pub(crate) struct Loader<'a> {
    pub cfg: &'a ModelConfig,
    pub src: &'a dyn WeightSource,
    pub opts: LoadOptions,
    shapes: HashMap<String, Vec<usize>>,
    params: RefCell<Vec<(String, Var)>>,
    /// In full fine-tuning, the weights left frozen (not variables).
    frozen: Option<&'a dyn Fn(&str) -> bool>,
    frozen_params: RefCell<Named>,
}

impl<'a> Loader<'a> {
    pub fn new(cfg: &'a ModelConfig, src: &'a dyn WeightSource, opts: LoadOptions) -> Self {
        let mut shapes: HashMap<_, _> = tensor_shapes(cfg).into_iter().collect();
        // A tied checkpoint may still carry its head (transformers writes
        // it for some models).
        if cfg.tie_word_embeddings {
            shapes.insert(
                "lm_head.weight".into(),
                vec![cfg.vocab_size, cfg.hidden_size],
            );
        }
        Self {
            cfg,
            src,
            opts,
            shapes,
            params: RefCell::new(Vec::new()),
            frozen: None,
            frozen_params: RefCell::new(Vec::new()),
        }
    }

    /// In full fine-tuning, leaves the weights `frozen` names as plain
    /// tensors instead of variables.
    pub fn freezing(mut self, frozen: &'a dyn Fn(&str) -> bool) -> Self {
        self.frozen = Some(frozen);
        self
    }

    /// The table's shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        self.shapes
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.src.path().to_path_buf(),
                tensor: format!("{name} (not in the {:?} name table)", self.cfg.architecture),
            })
    }

    /// Whether the model (by its table) has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    /// `name` as stored, shape-checked; quantized blocks kept when asked
    /// and not training every weight.
    pub fn weight(&self, name: &str, keep_quantized: bool) -> Result<Weight> {
        let keep = keep_quantized && !self.opts.trainable;
        self.src.load_checked(name, self.shape(name)?, keep)
    }

    /// `t` as the variable `name` in full fine-tuning (unless frozen),
    /// else `t`.
    pub fn var(&self, name: &str, t: Tensor) -> Result<Tensor> {
        if !self.opts.trainable {
            return Ok(t);
        }
        if self.frozen.is_some_and(|f| f(name)) {
            self.frozen_params
                .borrow_mut()
                .push((name.to_string(), t.clone()));
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let t = var.as_tensor().clone();
        self.params.borrow_mut().push((name.to_string(), var));
        Ok(t)
    }

    /// A dense f32 tensor (a variable in full fine-tuning).
    pub fn dense(&self, name: &str) -> Result<Tensor> {
        let t = self.weight(name, false)?.to_dense(&Device::Cpu)?;
        self.var(name, t)
    }

    /// The norm `name` (`….weight`), with Gemma's `1 + w` where the
    /// architecture has it.
    pub fn norm(&self, name: &str) -> Result<RmsNorm> {
        let weight = self.dense(name)?;
        let add_one = self.cfg.architecture.norm_adds_one();
        Ok(match (add_one, self.opts.trainable) {
            (true, false) => RmsNorm {
                weight: (weight + 1.0)?,
                eps: self.cfg.rms_norm_eps,
                add_one: false,
            },
            _ => RmsNorm {
                weight,
                eps: self.cfg.rms_norm_eps,
                add_one,
            },
        })
    }

    /// The linear layer `prefix` (`….weight`, and `….bias` where the table
    /// has one).
    pub fn linear(&self, prefix: &str) -> Result<Box<dyn Linear>> {
        let name = format!("{prefix}.weight");
        if let Some(QuantizeBase::Nf4 { double_quant }) = self.opts.quantize
            && prefix != "lm_head"
        {
            return self.nf4(&name, prefix, double_quant);
        }
        let mut w = self.weight(&name, self.opts.keep_quantized)?;
        if self.opts.trainable {
            w = Weight::Dense(self.var(&name, w.to_dense(&Device::Cpu)?)?);
        }
        let layer = BaseLinear::new(w, self.bias(prefix)?);
        // An untied head stays f32 for its packed bf16 copy: the fused loss
        // multiplies it three times per chunk of rows, where blocks made
        // from bf16 rows would be made each time.
        Ok(Box::new(
            if self.opts.frozen_bf16 && !self.opts.trainable && prefix != "lm_head" {
                layer.in_bf16()?
            } else {
                layer
            },
        ))
    }

    /// The projection `name` quantized to NF4 from its dense weight.
    fn nf4(&self, name: &str, prefix: &str, double_quant: bool) -> Result<Box<dyn Linear>> {
        let bad = |message: String| ModelError::BadTensor {
            path: self.src.path().to_path_buf(),
            tensor: name.to_string(),
            message,
        };
        if self.opts.trainable {
            return Err(bad(
                "a base quantized at load cannot be trained itself".into()
            ));
        }
        let w = match self.weight(name, true)? {
            Weight::Dense(t) => t,
            Weight::Quantized(q) => {
                return Err(bad(format!(
                    "already quantized ({:?}); NF4 quantization needs dense weights \
                     (a Hugging Face folder, or an f32/f16/bf16 GGUF)",
                    q.dtype()
                )));
            }
        };
        let (rows, cols) = w.dims2()?;
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        drop(w);
        let nf4 = Nf4::quantize(&values, cols, double_quant).map_err(|e| bad(e.to_string()))?;
        let blocks = Arc::new(nf4.into_matrix(rows, cols)?);
        Ok(Box::new(BaseLinear::from_blocks(
            blocks,
            self.bias(prefix)?,
        )))
    }

    /// `prefix.bias` where the table has one.
    fn bias(&self, prefix: &str) -> Result<Option<Tensor>> {
        let name = format!("{prefix}.bias");
        match self.has(&name) {
            true => Ok(Some(self.dense(&name)?)),
            false => Ok(None),
        }
    }

    /// The variables made so far, and the weights left frozen.
    pub fn into_params(self) -> (Vec<(String, Var)>, Named) {
        (self.params.into_inner(), self.frozen_params.into_inner())
    }
}
