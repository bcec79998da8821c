//! Adapters named on a command line (`DIR` or `DIR:WEIGHT`), loaded as one
//! adapter to pass with each call: one folder as it is, several summed
//! with their weights (PEFT's multiple active adapters, each scale times
//! its weight, as `set_scale`).

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use skillet_adapters::{LoraAdapter, Stacked};
use skillet_models::{Adapter, CausalLm};

use crate::{Result, RuntimeError};

/// A PEFT adapter folder and the weight of its update.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// The folder (adapter_config.json + adapter_model.safetensors).
    pub dir: PathBuf,
    /// The factor on its scale; 1 unless given.
    pub weight: f64,
}

impl AdapterSpec {
    /// `dir` at weight 1.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            weight: 1.0,
        }
    }
}

impl FromStr for AdapterSpec {
    type Err = RuntimeError;

    /// `DIR` or `DIR:WEIGHT`; an existing folder named with a colon, or a
    /// suffix after the last `:` that is not a number, is the folder's
    /// name.
    fn from_str(s: &str) -> Result<Self> {
        if std::path::Path::new(s).is_dir() {
            return Ok(Self::new(s));
        }
        if let Some((dir, w)) = s.rsplit_once(':')
            && let Ok(weight) = w.trim().parse::<f64>()
        {
            if dir.is_empty() {
                return Err(RuntimeError::Invalid(format!(
                    "{s:?}: no adapter folder before ':'"
                )));
            }
            if !weight.is_finite() {
                return Err(RuntimeError::Invalid(format!(
                    "{s:?}: the weight must be finite"
                )));
            }
            return Ok(Self {
                dir: dir.into(),
                weight,
            });
        }
        if s.is_empty() {
            return Err(RuntimeError::Invalid("an empty adapter path".into()));
        }
        Ok(Self::new(s))
    }
}

/// The adapters of `specs` loaded for `model`: `None` for none, the one
/// adapter (scaled by its weight), or their sum. Each is refused where it
/// does not fit the model.
pub fn load_adapters(
    model: &dyn CausalLm,
    specs: &[AdapterSpec],
) -> Result<Option<Arc<dyn Adapter>>> {
    let mut parts = Vec::with_capacity(specs.len());
    for s in specs {
        let a = LoraAdapter::load(model, &s.dir)?.weighted(s.weight);
        parts.push(Arc::new(a) as Arc<dyn Adapter>);
    }
    Ok(match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(Arc::new(Stacked::new(parts, model.modules().len())?)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_and_without_weights() {
        let p = |s: &str| s.parse::<AdapterSpec>();
        assert_eq!(p("out/a").unwrap(), AdapterSpec::new("out/a"));
        let w = p("out/b:0.5").unwrap();
        assert_eq!((w.dir, w.weight), (PathBuf::from("out/b"), 0.5));
        assert_eq!(p("b:-1").unwrap().weight, -1.0);
        // A colon in a folder's name stays in the name: after it, a word,
        // or a number where the whole is an existing folder.
        assert_eq!(p("runs/12:30").unwrap().weight, 30.0);
        assert_eq!(p("runs/a:b").unwrap(), AdapterSpec::new("runs/a:b"));
        let dir = std::env::temp_dir().join(format!("skillet-spec-{}:30", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let whole = dir.display().to_string();
        assert_eq!(p(&whole).unwrap(), AdapterSpec::new(&whole));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(p(":0.5").is_err());
        assert!(p("a:inf").is_err());
        assert!(p("").is_err());
    }
}
