//! One file per subcommand.

pub mod bench;
pub mod convert;
pub mod data;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod reward;
pub mod score;
pub mod serve;
pub mod tokenize;
pub mod train;
