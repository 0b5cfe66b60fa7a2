//! The crate's one error type.

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid device {spec:?}: {reason}")]
    Device { spec: String, reason: String },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    /// A model config field we cannot honour (named as a dotted path, e.g. `vision_cfg.layers`).
    #[error("model config `{field}`: {reason}")]
    ModelConfig { field: String, reason: String },
    /// A model input with the wrong shape, dtype or values.
    #[error("invalid model input {what}: {reason}")]
    ModelInput { what: String, reason: String },
    /// A checkpoint that cannot be read, written or does not match the model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: String, reason: String },
    #[error(transparent)]
    Data(#[from] hq_data::DataError),
    /// The training data pipeline cannot start or stopped (bad setting, no shards, dead thread).
    #[error("data loader: {0}")]
    DataLoader(String),
    /// A saved data-loader position that is invalid or does not fit the loader.
    #[error("data loader state: {0}")]
    LoaderState(String),
    /// A run setting that is missing, out of range or contradicts another (named as
    /// `section.key`, e.g. `optim.warmup_steps`).
    #[error("config `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error(transparent)]
    Kernel(#[from] hq_kernels::KernelError),
    /// A collective or the launch environment of a data-parallel run failed.
    #[error(transparent)]
    Dist(#[from] hq_dist::DistError),
    /// Evaluation during training failed.
    #[error("evaluation: {0}")]
    Eval(String),
    /// A run file (metrics, plots, the run directory) cannot be written or read.
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    /// The loss became NaN or infinite.
    #[error("training diverged at step {step}: {what}")]
    Diverged { step: u64, what: String },
}
