//! The library's one error type, and the exit-code class each variant maps to.
//!
//! Every failure a user can cause or meet is a variant here that names the file,
//! tensor or option it is about. The CLI turns [`Error::exit_class`] into the
//! documented exit code, so the mapping lives in one place.

use std::path::{Path, PathBuf};

/// What kind of failure an error is, as the CLI reports it in its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// A check ran and failed (verify, a quality gate): exit 1.
    CheckFailed,
    /// Bad usage or invalid input: a file that does not parse or breaks a rule: exit 2.
    InvalidInput,
    /// The environment failed us: disk full, permission, read error: exit 3.
    Environment,
}

impl ExitClass {
    /// The process exit code the command line uses for this class: 1, 2 or 3
    /// (0 is success; README.md, "Exit codes").
    pub fn code(self) -> i32 {
        match self {
            ExitClass::CheckFailed => 1,
            ExitClass::InvalidInput => 2,
            ExitClass::Environment => 3,
        }
    }
}

/// Every failure the library reports. Each variant names the file, tensor or
/// option it is about, and its `Display` is a complete message for a user;
/// [`Error::exit_class`] sorts it into bad input, a failed check or a failing
/// environment.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O failure on a file we expected to be able to use.
    #[error("{}: {}", path.display(), describe_io(source))]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The OS's error (its kind decides the exit class: a path that does
        /// not exist is bad input, anything else the environment).
        source: std::io::Error,
    },

    /// A file the input needs is not there.
    #[error("{}: {what} not found", path.display())]
    MissingFile {
        /// Where the file was looked for.
        path: PathBuf,
        /// What the file is, for the message ("config.json", "tokenizer.json", ...).
        what: &'static str,
    },

    /// A JSON file that does not parse, or does not have the expected structure.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The JSON file.
        path: PathBuf,
        /// The parser's error, with line and column.
        source: serde_json::Error,
    },

    /// `config.json` parses but describes something invalid (a zero size, heads
    /// that do not divide the hidden size, a value above a sanity cap).
    #[error("{}: invalid config: {message}", path.display())]
    InvalidConfig {
        /// The `config.json`.
        path: PathBuf,
        /// Which value is wrong and why.
        message: String,
    },

    /// An architecture flashpack does not implement.
    #[error("{}: unsupported architecture {name:?} (supported: {supported})", path.display())]
    UnsupportedArchitecture {
        /// The `config.json` naming it.
        path: PathBuf,
        /// Its `architectures` entry (e.g. `"GPT2LMHeadModel"`).
        name: String,
        /// The architectures flashpack implements, as a list for the message.
        supported: &'static str,
    },

    /// A config option whose value flashpack does not implement.
    #[error("{}: unsupported {option} = {value} ({why})", path.display())]
    UnsupportedOption {
        /// The `config.json` holding it.
        path: PathBuf,
        /// The config key (`activation_function`, `use_sliding_window`, ...).
        option: &'static str,
        /// Its value, as written in the file.
        value: String,
        /// What flashpack implements instead, for the message.
        why: &'static str,
    },

    /// A safetensors file whose header or layout is invalid (truncated, offsets past
    /// the end, overlapping tensors, ...).
    #[error("{}: invalid safetensors file: {message}", path.display())]
    Safetensors {
        /// The `.safetensors` file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// `model.safetensors.index.json` names a tensor that its shard does not hold.
    #[error("{}: index maps tensor {tensor:?} to {file:?}, which does not contain it", index.display())]
    IndexTensorNotInShard {
        /// The `model.safetensors.index.json`.
        index: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shard file the index names for it.
        file: String,
    },

    /// A shard holds a tensor that the index does not map to that shard.
    #[error("{}: shard {file:?} holds tensor {tensor:?}, which the index does not map to it", index.display())]
    ShardTensorNotInIndex {
        /// The `model.safetensors.index.json`.
        index: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The shard file that holds it.
        file: String,
    },

    /// The same tensor name appears in two weight files.
    #[error("tensor {tensor:?} appears in both {first:?} and {second:?}")]
    DuplicateTensor {
        /// The tensor's name.
        tensor: String,
        /// The first weight file holding it.
        first: String,
        /// The second one.
        second: String,
    },

    /// A shard name in the index that is not a plain file name inside the checkpoint
    /// directory (an absolute path or one with `..` would read outside it).
    #[error("{}: shard name {file:?} is not a plain file name in the checkpoint directory", index.display())]
    BadShardName {
        /// The `model.safetensors.index.json`.
        index: PathBuf,
        /// The shard name as the index writes it.
        file: String,
    },

    /// A tensor the architecture requires is absent.
    #[error("tensor {tensor:?} is missing from the checkpoint")]
    MissingTensor {
        /// The name the architecture expects (Hugging Face naming).
        tensor: String,
    },

    /// A tensor's shape disagrees with what `config.json` implies.
    #[error("tensor {tensor:?} has shape {found:?}, config.json implies {expected:?}")]
    TensorShape {
        /// The tensor's name.
        tensor: String,
        /// The shape `config.json` implies, outermost dimension first.
        expected: Vec<usize>,
        /// The shape the weight file records.
        found: Vec<usize>,
    },

    /// A tensor stored in a dtype other than f32, f16 or bf16.
    #[error("tensor {tensor:?} has dtype {dtype}; flashpack reads f32, f16 and bf16")]
    UnsupportedDtype {
        /// The tensor's name.
        tensor: String,
        /// The dtype its weight file records (safetensors' name, e.g. `I8`).
        dtype: String,
    },

    /// `tokenizer.json` could not be loaded or used.
    #[error("{}: tokenizer error: {message}", path.display())]
    Tokenizer {
        /// The tokenizer file (or the packed file or checkpoint carrying it).
        path: PathBuf,
        /// The tokenizers library's message.
        message: String,
    },

    /// An output path that is (or resolves to, through symlinks or hard links) a
    /// file the command reads: writing it would destroy the input.
    #[error("refusing to write output {}: it is {what} {}{via}, which would be overwritten{hint}", output.display(), input.display())]
    OutputIsInput {
        /// The output path as given.
        output: PathBuf,
        /// The input file it is (or resolves to).
        input: PathBuf,
        /// What the input is: "checkpoint file", "the input packed file", ...
        what: &'static str,
        /// How the output names it: "", " (through a symbolic link)", ...
        via: &'static str,
        /// Advice appended to the message ("" for none).
        hint: &'static str,
    },

    /// The directory an output is to be written in does not exist (or is not a
    /// directory).
    #[error("output directory {} {problem} (for output {})", dir.display(), output.display())]
    OutputDirectory {
        /// The output's parent directory.
        dir: PathBuf,
        /// The output path as given.
        output: PathBuf,
        /// "does not exist", "is not a directory".
        problem: &'static str,
    },

    /// A file cannot be created in the output's directory (permission, a
    /// read-only or special file system).
    #[error("cannot create a file in output directory {} (for output {}): {source}", dir.display(), output.display())]
    OutputDirectoryIo {
        /// The output's parent directory.
        dir: PathBuf,
        /// The output path as given.
        output: PathBuf,
        /// The OS's error from creating a temporary file there.
        source: std::io::Error,
    },

    /// A path given by the user that names the wrong kind of thing: a file where a
    /// directory was expected, a directory where a file was expected, ...
    #[error("{} {found}, expected {expected}", path.display())]
    WrongKind {
        /// The path as given.
        path: PathBuf,
        /// "is a file", "is a directory", "does not exist", ...
        found: &'static str,
        /// "a checkpoint directory", "a file", ...
        expected: &'static str,
    },

    /// A value given to a function (or on the command line) that is out of
    /// range or inconsistent with the model; the message says which and why.
    #[error("{0}")]
    InvalidArgument(String),

    /// A library option (named by its field, e.g. `dram_budget` of
    /// `SessionOptions`) that is invalid or does not apply; the command line
    /// shows the matching flag instead of the field name.
    #[error("{option}: {problem}")]
    InvalidOption {
        /// The option's field name (`dram_budget`, `window`, `selector`, ...).
        option: &'static str,
        /// What is wrong with it, in library terms.
        problem: String,
    },

    /// A sequence (prompt, evaluation window) longer than the model's context.
    #[error("{what} needs {needed} positions, but the model's context is {max}")]
    ContextTooLong {
        /// The sequence, for the message ("the prompt (700 tokens)").
        what: String,
        /// Positions it needs.
        needed: usize,
        /// Positions available: the model's context, or a smaller one asked for.
        max: usize,
    },

    /// A flashpack file that breaks a numbered rule of `formats/flashpack-v1.md`.
    #[error("{}: {source}", path.display())]
    Format {
        /// The flashpack file.
        path: PathBuf,
        /// The rule broken (its number is in the message); integrity failures
        /// (a hash that does not match) are a failed check, the rest bad input.
        source: crate::format::FormatError,
    },

    /// Reading FFN bundles failed during a run (a read error, or a file that
    /// changed after it was opened). Never answered with wrong output.
    #[error("{}: reading FFN bundles{} failed ({ops} read(s) from offset {offset}): {source}", path.display(), layer.map_or(String::new(), |l| format!(" of layer {l}")))]
    FlashRead {
        /// The packed file read from.
        path: PathBuf,
        /// The layer whose FFN bundles were being read, when known.
        layer: Option<usize>,
        /// Byte offset in the file of the first read that failed.
        offset: u64,
        /// Reads in the failed batch.
        ops: usize,
        /// The OS's error (or `UnexpectedEof` for a file that shrank).
        source: std::io::Error,
    },
}

/// The library's result type: [`Error`] unless another error is named.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Names the layer a flash read belongs to.
    pub fn in_layer(self, layer: usize) -> Error {
        match self {
            Error::FlashRead {
                path,
                offset,
                ops,
                source,
                ..
            } => Error::FlashRead {
                path,
                layer: Some(layer),
                offset,
                ops,
                source,
            },
            other => other,
        }
    }

    /// The exit-code class of this error (see README.md, "Exit codes").
    pub fn exit_class(&self) -> ExitClass {
        match self {
            Error::Io { source, .. } => io_exit_class(source),
            // Permission or a read-only file system: the environment (exit 3).
            Error::OutputDirectoryIo { .. } => ExitClass::Environment,
            Error::FlashRead { .. } => ExitClass::Environment,
            Error::Format { source, .. } if source.is_integrity() => ExitClass::CheckFailed,
            Error::Format { .. } => ExitClass::InvalidInput,
            Error::MissingFile { .. }
            | Error::Json { .. }
            | Error::InvalidConfig { .. }
            | Error::UnsupportedArchitecture { .. }
            | Error::UnsupportedOption { .. }
            | Error::Safetensors { .. }
            | Error::IndexTensorNotInShard { .. }
            | Error::ShardTensorNotInIndex { .. }
            | Error::DuplicateTensor { .. }
            | Error::BadShardName { .. }
            | Error::MissingTensor { .. }
            | Error::TensorShape { .. }
            | Error::UnsupportedDtype { .. }
            | Error::Tokenizer { .. }
            | Error::InvalidArgument(_)
            | Error::InvalidOption { .. }
            | Error::OutputIsInput { .. }
            | Error::OutputDirectory { .. }
            | Error::WrongKind { .. }
            | Error::ContextTooLong { .. } => ExitClass::InvalidInput,
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The OS's message, with what was expected where the OS's own words leave it out
/// ("Is a directory" says what the path is, not that a file was expected).
fn describe_io(err: &std::io::Error) -> String {
    // By errno: these ErrorKinds are newer than the minimum Rust version.
    match err.raw_os_error() {
        Some(libc::EISDIR) => "is a directory, expected a file".to_string(),
        Some(libc::ENOTDIR) => {
            format!("{err} (a file where the path needs a directory: a component before the last, or a file's path ending in '/')")
        }
        _ => err.to_string(),
    }
}

/// A file that is not there, or that is a directory where a file should be, is the
/// user's input being wrong (exit 2); anything else the OS reports is the environment.
/// An unexpected end of file is the environment too: every length is checked when a
/// file is opened, so a read past the end means the file shrank while in use.
fn io_exit_class(err: &std::io::Error) -> ExitClass {
    use std::io::ErrorKind::*;
    match err.kind() {
        NotFound | InvalidData | IsADirectory | NotADirectory | InvalidInput => {
            ExitClass::InvalidInput
        }
        _ => ExitClass::Environment,
    }
}
