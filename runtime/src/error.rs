//! The crate's single error type.
//!
//! Every failure a caller can cause (a wrong library path, a provider this build of ONNX Runtime
//! lacks, a wrong input name or shape) has its own variant with the values needed to fix it, so that
//! a CLI can print the message as is and a test can match on the variant. ONNX Runtime's own errors
//! are carried as their message text: `ort::Error` holds a status pointer tied to the loaded library,
//! and a plain string keeps this type `Send + Sync + 'static` without depending on that.

use std::path::PathBuf;

/// Shorthand for results of this crate.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Everything that can go wrong while loading ONNX Runtime, building a session or running it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// `ORT_DYLIB_PATH` is unset or empty and no explicit path was given.
    #[error(
        "ORT_DYLIB_PATH is not set: point it at the ONNX Runtime shared library \
         (for the onnxruntime wheel: <site-packages>/onnxruntime/capi/libonnxruntime.so.<version>; \
         `source tools/env.sh` sets it)"
    )]
    DylibPathUnset,

    /// The given library path does not exist (checked before `dlopen`, whose message is vaguer).
    #[error("ONNX Runtime library `{path}` does not exist{hint}")]
    DylibNotFound {
        /// The path that was tried.
        path: PathBuf,
        /// Where the path came from, e.g. " (from ORT_DYLIB_PATH)".
        hint: String,
    },

    /// `dlopen` failed, the file is not ONNX Runtime, or its version is too old for ort.
    #[error("could not load ONNX Runtime from `{path}`: {message}")]
    DylibLoad {
        /// The path that was tried.
        path: PathBuf,
        /// ort's explanation (dlopen error, missing `OrtGetApiBase`, version mismatch).
        message: String,
    },

    /// ONNX Runtime is process-global; a second initialisation with another library is refused
    /// rather than silently ignored.
    #[error(
        "ONNX Runtime is already initialised from `{loaded}` in this process; \
         it cannot be re-initialised from `{requested}`"
    )]
    AlreadyInitialised {
        /// The library in use.
        loaded: PathBuf,
        /// The library the caller asked for.
        requested: PathBuf,
    },

    /// Creating the global ONNX Runtime environment failed.
    #[error("could not create the ONNX Runtime environment: {0}")]
    Environment(String),

    /// A provider string that [`crate::ExecutionProvider::from_str`](std::str::FromStr) does not know.
    #[error("unknown execution provider `{given}`: expected one of {choices}")]
    UnknownProvider {
        /// What the user wrote.
        given: String,
        /// The accepted spellings.
        choices: &'static str,
    },

    /// The loaded ONNX Runtime was built without the requested provider (e.g. the CPU-only wheel
    /// asked for CUDA).
    #[error(
        "execution provider {provider} ({requested}) is not available in the loaded ONNX Runtime \
         `{dylib}` (available here: {available}); install the onnxruntime-gpu build and point \
         ORT_DYLIB_PATH at it"
    )]
    ProviderUnavailable {
        /// ONNX Runtime's name for the provider, e.g. `CUDAExecutionProvider`.
        provider: &'static str,
        /// The user's request, e.g. `cuda:1`.
        requested: String,
        /// The library in use.
        dylib: PathBuf,
        /// The providers among those this crate knows that the library does offer.
        available: String,
    },

    /// Registering the provider on the session failed; never followed by a CPU fallback.
    #[error("could not register execution provider {provider} ({requested}): {message}")]
    ProviderRegistration {
        /// ONNX Runtime's name for the provider.
        provider: &'static str,
        /// The user's request, e.g. `tensorrt:0`.
        requested: String,
        /// ONNX Runtime's message.
        message: String,
    },

    /// A configuration value cannot be passed to ONNX Runtime (e.g. a non-UTF-8 cache path).
    #[error("invalid session option {option}: {message}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong with it.
        message: String,
    },

    /// Building the session options or loading the model failed.
    #[error("could not create an ONNX Runtime session for `{model}` with {provider}: {message}")]
    SessionCreate {
        /// The model path (or `<memory>`).
        model: String,
        /// The provider that was requested.
        provider: String,
        /// ONNX Runtime's message.
        message: String,
    },

    /// A filesystem operation this crate does itself (e.g. creating the TensorRT cache folder).
    #[error("{action} `{path}`: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// The caller passed an input the model does not have.
    #[error("model has no input named `{name}` (its inputs: {available:?})")]
    UnknownInput {
        /// The name given.
        name: String,
        /// The model's input names.
        available: Vec<String>,
    },

    /// The model needs an input the caller did not pass.
    #[error("missing model input `{name}` (given: {given:?})")]
    MissingInput {
        /// The model input that was not supplied.
        name: String,
        /// The names that were supplied.
        given: Vec<String>,
    },

    /// The same input was passed twice.
    #[error("input `{name}` was given more than once")]
    DuplicateInput {
        /// The repeated name.
        name: String,
    },

    /// An output name the model does not produce.
    #[error("model has no output named `{name}` (its outputs: {available:?})")]
    MissingOutput {
        /// The name asked for.
        name: String,
        /// The model's (or the run's) output names.
        available: Vec<String>,
    },

    /// The model declares another element type than the f32 this API passes or returns.
    #[error("{kind} `{name}` has element type {actual}, but this API only handles f32")]
    ElementType {
        /// `input` or `output`.
        kind: &'static str,
        /// The input or output name.
        name: String,
        /// The declared type, as ONNX Runtime names it.
        actual: String,
    },

    /// An input's shape disagrees with the model's declared shape (`None` = dynamic dimension).
    #[error("input `{name}` has shape {actual:?}, but the model expects {expected}")]
    ShapeMismatch {
        /// The input name.
        name: String,
        /// The model's declared shape, printed with symbolic names for dynamic dimensions.
        expected: String,
        /// The shape that was passed.
        actual: Vec<usize>,
    },

    /// Converting an input array to an ONNX Runtime tensor failed.
    #[error("could not pass input `{name}` to ONNX Runtime: {message}")]
    Input {
        /// The input name.
        name: String,
        /// ONNX Runtime's message.
        message: String,
    },

    /// `Session::run` itself failed.
    #[error("running `{model}` failed: {message}")]
    Run {
        /// The model path (or `<memory>`).
        model: String,
        /// ONNX Runtime's message.
        message: String,
    },

    /// Reading an output tensor failed.
    #[error("could not read output `{name}`: {message}")]
    Output {
        /// The output name.
        name: String,
        /// ONNX Runtime's message.
        message: String,
    },

    /// A Qwen2-VL model directory that cannot be used: a missing file, an unreadable or
    /// inconsistent config, ONNX files whose inputs or shapes disagree with the config.
    #[error("model directory `{path}`: {message}")]
    ModelDir {
        /// The model directory (or the file in it) at fault.
        path: PathBuf,
        /// What is missing or wrong, and how to fix it.
        message: String,
    },

    /// A `qwen2vl.plan` that cannot be used here: truncated, altered, not a plan, or built for
    /// another machine.
    #[error("plan `{path}`: {reason}")]
    Plan {
        /// The plan file.
        path: String,
        /// What differs, and what to do.
        reason: String,
    },

    /// An image that cannot be turned into the model's patches (undecodable, too large, too
    /// elongated).
    #[error("image: {0}")]
    Image(String),

    /// A generation request the model cannot run (e.g. image placeholders that do not match the
    /// images), or model outputs of an unexpected shape.
    #[error("generation: {0}")]
    Generation(String),

    /// Tokenizer loading, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The recaption job's data layer (shards, side-cars, atomic writes).
    #[error(transparent)]
    Data(#[from] hq_data::DataError),

    /// A recaption job setting or input that cannot be used.
    #[error("recaption: {0}")]
    Recaption(String),
}
