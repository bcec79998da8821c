//! Data problems: each names the file, the line and an OpenAI-style code.

use std::path::PathBuf;

/// What is wrong with one line (codes follow OpenAI's fine-tuning file
/// validation where one exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    /// The line is not valid UTF-8.
    InvalidUtf8,
    /// The line is not valid JSON.
    InvalidJson,
    /// The line is JSON but not an object ("Line N is not a dictionary").
    DataType,
    /// A chat example without a `messages` list.
    MissingMessagesList,
    /// A message without `role` or `content`.
    MessageMissingKey,
    /// A message with a key other than role/content/weight/name.
    MessageUnrecognizedKey,
    /// A role other than system/user/assistant.
    UnrecognizedRole,
    /// Empty or non-string content.
    MissingContent,
    /// No assistant message to learn from.
    ExampleMissingAssistantMessage,
    /// `weight` other than 0 or 1.
    InvalidWeight,
    /// A field of the file's format is missing or of the wrong type.
    MissingField,
    /// After rendering and truncation nothing is left to train on.
    NoTrainableTokens,
    /// The file has no examples.
    EmptyFile,
    /// A preference pair's prompt is not a conversation ending in a user turn.
    InvalidPrompt,
    /// A preferred or rejected completion is not one assistant message.
    InvalidCompletion,
    /// `margin` is not a finite number.
    InvalidMargin,
}

impl IssueCode {
    /// The code as users see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidJson => "invalid_json",
            Self::DataType => "data_type",
            Self::MissingMessagesList => "missing_messages_list",
            Self::MessageMissingKey => "message_missing_key",
            Self::MessageUnrecognizedKey => "message_unrecognized_key",
            Self::UnrecognizedRole => "unrecognized_role",
            Self::MissingContent => "missing_content",
            Self::ExampleMissingAssistantMessage => "example_missing_assistant_message",
            Self::InvalidWeight => "invalid_weight",
            Self::MissingField => "missing_field",
            Self::NoTrainableTokens => "no_trainable_tokens",
            Self::EmptyFile => "empty_file",
            Self::InvalidPrompt => "invalid_prompt",
            Self::InvalidCompletion => "invalid_completion",
            Self::InvalidMargin => "invalid_margin",
        }
    }
}

/// One problem in a data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIssue {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number (0 for whole-file problems).
    pub line: usize,
    /// Machine-readable code.
    pub code: IssueCode,
    /// What is wrong, for a person.
    pub message: String,
}

impl std::fmt::Display for DataIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: [{}] {}",
            self.file.display(),
            self.line,
            self.code.as_str(),
            self.message
        )
    }
}

/// Errors of data loading.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// One or more lines are invalid; nothing should be trained.
    #[error("{} problem(s) in the training data:\n{}", .0.len(), .0.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<DataIssue>),
    /// The chat template cannot be used to locate message spans.
    #[error("{0}")]
    Template(String),
    /// Tokenizer failure.
    #[error(transparent)]
    Tokenizer(#[from] skillet_tokenizer::TokenizerError),
}
