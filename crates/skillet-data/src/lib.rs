//! Training data. JSONL files in the formats people use are read into one
//! [`Example`] type, validated (every problem at once, with line numbers
//! and OpenAI-style codes), rendered through the model's chat template with
//! the loss mask taken from each message's rendered span, truncated,
//! optionally packed, and split into train and validation sets. Preference
//! pairs (DPO, reward models) are read and encoded the same way.
#![warn(missing_docs)]

mod check;
mod encode;
mod encode_pair;
mod error;
mod format;
mod lines;
mod pack;
mod preference;
mod prompts;
mod split;

pub use check::{FileSummary, check_training_file};
pub use encode::{EncodeOptions, Encoder, TokenizedExample, mark_trained};
pub use encode_pair::TokenizedPair;
pub use error::{DataError, DataIssue, IssueCode};
pub use format::{DataFormat, Example, Turn, read_jsonl};
pub use pack::{PackedSequence, pack};
pub use preference::{PairFormat, PairPrompt, PreferencePair, looks_like_pairs, read_pairs};
pub use prompts::{RlPrompt, read_prompts};
pub use split::split_fraction;
