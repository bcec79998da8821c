//! Which weights full fine-tuning leaves frozen: `train.freeze_embeddings`
//! and `train.freeze` (regular expressions searched in checkpoint names,
//! as Axolotl's `unfrozen_parameters` picks the trained ones).

use regex::Regex;

use crate::{Result, TrainError};

/// The embedding's checkpoint name.
pub const EMBEDDINGS: &str = "model.embed_tokens.weight";

/// The frozen set.
#[derive(Debug, Clone, Default)]
pub struct Freeze {
    embeddings: bool,
    patterns: Vec<Regex>,
}

impl Freeze {
    /// From the config's values; a pattern that is not a regular
    /// expression is refused.
    pub fn new(embeddings: bool, patterns: &[String]) -> Result<Self> {
        let patterns = patterns
            .iter()
            .map(|p| {
                Regex::new(p).map_err(|e| {
                    TrainError::Invalid(format!(
                        "train.freeze: {p:?} is not a regular expression: {e}"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            patterns,
        })
    }

    /// Whether anything is frozen.
    pub fn is_empty(&self) -> bool {
        !self.embeddings && self.patterns.is_empty()
    }

    /// Whether the weight `name` stays frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        (self.embeddings && name == EMBEDDINGS) || self.patterns.iter().any(|p| p.is_match(name))
    }

    /// Refuses a pattern that matches none of `names` (a typo would
    /// otherwise train what was meant frozen), and a set that freezes all
    /// of them.
    pub fn check(&self, names: &[&str]) -> Result<()> {
        for p in &self.patterns {
            if !names.iter().any(|n| p.is_match(n)) {
                let example = names
                    .iter()
                    .find(|n| n.contains("layers.0."))
                    .or(names.first());
                return Err(TrainError::Invalid(format!(
                    "train.freeze: {:?} matches no weight of the model (names look like {})",
                    p.as_str(),
                    example.unwrap_or(&"?")
                )));
            }
        }
        if !names.is_empty() && names.iter().all(|n| self.is_frozen(n)) {
            return Err(TrainError::Invalid(
                "train.freeze leaves no weight to train".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_search_names_and_must_match() {
        let names = [
            EMBEDDINGS,
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.10.mlp.up_proj.weight",
            "model.norm.weight",
        ];
        let f = Freeze::new(true, &[r"^model\.layers\.1\.".into()]).unwrap();
        let frozen: Vec<bool> = names.iter().map(|n| f.is_frozen(n)).collect();
        assert_eq!(frozen, [true, false, true, false, false]);
        f.check(&names).unwrap();
        assert!(Freeze::new(false, &[]).unwrap().is_empty());
        let e = Freeze::new(false, &["k_prj".into()])
            .unwrap()
            .check(&names)
            .unwrap_err();
        assert!(e.to_string().contains("matches no weight"), "{e}");
        let e = Freeze::new(true, &[".".into()])
            .unwrap()
            .check(&names)
            .unwrap_err();
        assert!(e.to_string().contains("no weight to train"), "{e}");
        assert!(Freeze::new(false, &["(".into()]).is_err());
    }
}
