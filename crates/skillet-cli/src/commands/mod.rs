//! One file per subcommand.

pub mod convert;
pub mod generate;
pub mod inspect;
pub mod score;
pub mod tokenize;
