//! A thin session wrapper: f32 ndarray in, f32 ndarray out, with the model's declared names and
//! shapes checked *before* ONNX Runtime sees the data.
//!
//! ONNX Runtime does check inputs itself, but its messages for a wrong name or rank are generic and,
//! for some mistakes (a fixed dimension of the wrong size), only surface deep inside a kernel. The
//! checks here name the input and print the declared shape with its symbolic dimensions.

use std::borrow::Cow;
use std::path::Path;

use ndarray::{ArrayD, ArrayViewD, CowArray, IxDyn};
use ort::session::builder::SessionBuilder;
use ort::session::SessionInputValue;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::env::{init, Runtime};
use crate::error::{Result, RuntimeError};
use crate::provider::ExecutionProvider;

/// How to build a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Where to run; see [`ExecutionProvider`].
    pub provider: ExecutionProvider,
    /// Threads inside one operator; `None` leaves ONNX Runtime's default (one per core).
    pub intra_threads: Option<usize>,
}

impl SessionOptions {
    /// Options for `provider` with ONNX Runtime's defaults otherwise.
    pub fn new(provider: ExecutionProvider) -> Self {
        Self {
            provider,
            intra_threads: None,
        }
    }
}

/// One dimension of a declared input or output shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A dynamic size, with its symbolic name (e.g. `batch`) when the model gives one.
    Dynamic(Option<String>),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic(Some(name)) => f.write_str(name),
            Dim::Dynamic(None) => f.write_str("?"),
        }
    }
}

/// A model input or output as the model declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The name used to feed or fetch it.
    pub name: String,
    /// The element type by ONNX Runtime's name (`Float32`, `Int64`, ...), or `sequence` / `map` /
    /// `optional` for non-tensor values.
    pub element_type: String,
    /// Whether the element type is f32 (the only type [`Session::run_f32`] handles).
    pub is_f32: bool,
    /// The declared shape; empty for non-tensor values.
    pub dims: Vec<Dim>,
}

impl TensorInfo {
    fn from_outlet(o: &ort::value::Outlet) -> Self {
        let (element_type, is_f32, dims) = match o.dtype() {
            ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } => {
                let dims = shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| match usize::try_from(d) {
                        Ok(n) => Dim::Fixed(n),
                        Err(_) => Dim::Dynamic(
                            dimension_symbols.get(i).filter(|s| !s.is_empty()).cloned(),
                        ),
                    })
                    .collect();
                (format!("{ty:?}"), *ty == TensorElementType::Float32, dims)
            }
            ValueType::Sequence(_) => ("sequence".to_string(), false, Vec::new()),
            ValueType::Map { .. } => ("map".to_string(), false, Vec::new()),
            ValueType::Optional(_) => ("optional".to_string(), false, Vec::new()),
        };
        Self {
            name: o.name().to_string(),
            element_type,
            is_f32,
            dims,
        }
    }

    /// The declared shape as text, e.g. `[batch, 512]`.
    pub fn shape_string(&self) -> String {
        let parts: Vec<String> = self.dims.iter().map(ToString::to_string).collect();
        format!("[{}]", parts.join(", "))
    }

    /// Whether `shape` fits the declared shape (same rank, equal fixed dimensions).
    pub fn accepts(&self, shape: &[usize]) -> bool {
        self.dims.len() == shape.len()
            && self.dims.iter().zip(shape).all(|(d, &s)| match d {
                Dim::Fixed(n) => *n == s,
                Dim::Dynamic(_) => true,
            })
    }
}

/// The f32 outputs of one run, in the model's output order.
#[derive(Debug, Clone)]
pub struct Outputs {
    names: Vec<String>,
    arrays: Vec<ArrayD<f32>>,
}

impl Outputs {
    fn missing(&self, name: &str) -> RuntimeError {
        RuntimeError::MissingOutput {
            name: name.to_string(),
            available: self.names.clone(),
        }
    }

    /// The output called `name`.
    pub fn get(&self, name: &str) -> Result<&ArrayD<f32>> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.arrays[i])
            .ok_or_else(|| self.missing(name))
    }

    /// Moves the output called `name` out.
    pub fn take(&mut self, name: &str) -> Result<ArrayD<f32>> {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| self.missing(name))?;
        self.names.remove(i);
        Ok(self.arrays.remove(i))
    }

    /// Output names, in the model's order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// `(name, array)` pairs in the model's order.
    pub fn into_vec(self) -> Vec<(String, ArrayD<f32>)> {
        self.names.into_iter().zip(self.arrays).collect()
    }
}

/// An ONNX Runtime session plus its model's declared inputs and outputs.
pub struct Session {
    inner: ort::session::Session,
    model: String,
    provider: ExecutionProvider,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.model)
            .field("provider", &self.provider)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

/// Loads `model` on `provider`, initialising ONNX Runtime from `ORT_DYLIB_PATH` if needed.
pub fn load_session(model: impl AsRef<Path>, provider: &ExecutionProvider) -> Result<Session> {
    init()?.session_from_file(model, &SessionOptions::new(provider.clone()))
}

impl Runtime {
    fn builder(&self, opts: &SessionOptions, model: &str) -> Result<SessionBuilder> {
        let create_err = |message: String| RuntimeError::SessionCreate {
            model: model.to_string(),
            provider: opts.provider.to_string(),
            message,
        };
        let mut b =
            ort::session::Session::builder(&self.env).map_err(|e| create_err(e.to_string()))?;
        if let Some(n) = opts.intra_threads {
            b = b
                .with_intra_threads(n)
                .map_err(|e| create_err(e.to_string()))?;
        }
        if opts.provider.is_gpu() {
            // Ask first: a build without the provider gets a message that says which build it is.
            for name in opts.provider.ort_names() {
                if !crate::provider::ep_available(name)? {
                    return Err(RuntimeError::ProviderUnavailable {
                        provider: name,
                        requested: opts.provider.to_string(),
                        dylib: self.dylib().to_path_buf(),
                        available: self.available_providers()?.join(", "),
                    });
                }
            }
            // Register one at a time so the error names the provider that failed; each dispatch is
            // `error_on_failure`, so a failure never degrades to the CPU.
            for (name, dispatch) in opts.provider.dispatches()? {
                b = b.with_execution_providers([dispatch]).map_err(|e| {
                    RuntimeError::ProviderRegistration {
                        provider: name,
                        requested: opts.provider.to_string(),
                        message: e.to_string(),
                    }
                })?;
            }
        }
        Ok(b)
    }

    /// Builds a session for the ONNX file at `model`.
    pub fn session_from_file(
        &self,
        model: impl AsRef<Path>,
        opts: &SessionOptions,
    ) -> Result<Session> {
        let path = model.as_ref();
        let label = path.display().to_string();
        if !path.is_file() {
            return Err(RuntimeError::SessionCreate {
                model: label,
                provider: opts.provider.to_string(),
                message: "no such model file".to_string(),
            });
        }
        let mut b = self.builder(opts, &label)?;
        let inner = b
            .commit_from_file(path)
            .map_err(|e| RuntimeError::SessionCreate {
                model: label.clone(),
                provider: opts.provider.to_string(),
                message: e.to_string(),
            })?;
        Ok(Session::wrap(inner, label, opts.provider.clone()))
    }

    /// Builds a session from serialised ONNX bytes (ONNX Runtime copies them).
    pub fn session_from_memory(&self, model: &[u8], opts: &SessionOptions) -> Result<Session> {
        let label = "<memory>".to_string();
        let mut b = self.builder(opts, &label)?;
        let inner = b
            .commit_from_memory(model)
            .map_err(|e| RuntimeError::SessionCreate {
                model: label.clone(),
                provider: opts.provider.to_string(),
                message: e.to_string(),
            })?;
        Ok(Session::wrap(inner, label, opts.provider.clone()))
    }
}

impl Session {
    fn wrap(inner: ort::session::Session, model: String, provider: ExecutionProvider) -> Self {
        let inputs = inner.inputs().iter().map(TensorInfo::from_outlet).collect();
        let outputs = inner
            .outputs()
            .iter()
            .map(TensorInfo::from_outlet)
            .collect();
        Self {
            inner,
            model,
            provider,
            inputs,
            outputs,
        }
    }

    /// The model's declared inputs.
    pub fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    /// The model's declared outputs.
    pub fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    /// The provider the session was built for.
    pub fn provider(&self) -> &ExecutionProvider {
        &self.provider
    }

    /// The model path, or `<memory>`.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// A `metadata_props` entry of the model (exporters store e.g. the embedding width there).
    pub fn metadata(&self, key: &str) -> Result<Option<String>> {
        let md = self.inner.metadata().map_err(|e| RuntimeError::Run {
            model: self.model.clone(),
            message: format!("reading metadata: {e}"),
        })?;
        Ok(md.custom(key))
    }

    /// Checks names, element types and shapes of `inputs` against the model.
    fn check_inputs(&self, inputs: &[(&str, ArrayViewD<'_, f32>)]) -> Result<()> {
        let given: Vec<String> = inputs.iter().map(|(n, _)| n.to_string()).collect();
        for (i, (name, array)) in inputs.iter().enumerate() {
            if inputs[..i].iter().any(|(n, _)| n == name) {
                return Err(RuntimeError::DuplicateInput {
                    name: name.to_string(),
                });
            }
            let info = self
                .inputs
                .iter()
                .find(|t| t.name == *name)
                .ok_or_else(|| RuntimeError::UnknownInput {
                    name: name.to_string(),
                    available: self.inputs.iter().map(|t| t.name.clone()).collect(),
                })?;
            if !info.is_f32 {
                return Err(RuntimeError::ElementType {
                    kind: "input",
                    name: info.name.clone(),
                    actual: info.element_type.clone(),
                });
            }
            if !info.accepts(array.shape()) {
                return Err(RuntimeError::ShapeMismatch {
                    name: info.name.clone(),
                    expected: info.shape_string(),
                    actual: array.shape().to_vec(),
                });
            }
        }
        if let Some(missing) = self.inputs.iter().find(|t| !given.contains(&t.name)) {
            return Err(RuntimeError::MissingInput {
                name: missing.name.clone(),
                given,
            });
        }
        if let Some(bad) = self.outputs.iter().find(|t| !t.is_f32) {
            return Err(RuntimeError::ElementType {
                kind: "output",
                name: bad.name.clone(),
                actual: bad.element_type.clone(),
            });
        }
        Ok(())
    }

    /// Runs the model on f32 `inputs` (any memory layout; non-contiguous views are copied) and
    /// returns every output as an owned f32 array.
    ///
    /// Every model input must be given exactly once and every model output must be f32; the errors
    /// name the offending input or output.
    pub fn run_f32(&mut self, inputs: &[(&str, ArrayViewD<'_, f32>)]) -> Result<Outputs> {
        self.check_inputs(inputs)?;
        let contiguous: Vec<CowArray<'_, f32, IxDyn>> =
            inputs.iter().map(|(_, a)| a.as_standard_layout()).collect();
        let mut feed: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(inputs.len());
        for ((name, _), array) in inputs.iter().zip(&contiguous) {
            let tensor = TensorRef::from_array_view(array).map_err(|e| RuntimeError::Input {
                name: name.to_string(),
                message: e.to_string(),
            })?;
            feed.push((Cow::Borrowed(*name), tensor.into()));
        }
        let model = self.model.clone();
        let outputs = self.inner.run(feed).map_err(|e| RuntimeError::Run {
            model,
            message: e.to_string(),
        })?;
        let mut names = Vec::with_capacity(outputs.len());
        let mut arrays = Vec::with_capacity(outputs.len());
        for (name, value) in outputs.iter() {
            let view = value
                .try_extract_array::<f32>()
                .map_err(|e| RuntimeError::Output {
                    name: name.to_string(),
                    message: e.to_string(),
                })?;
            names.push(name.to_string());
            arrays.push(view.to_owned());
        }
        Ok(Outputs { names, arrays })
    }

    /// Runs the model and returns only the named outputs, in the order asked. Unknown names are
    /// reported before anything runs.
    pub fn run_f32_select(
        &mut self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
        outputs: &[&str],
    ) -> Result<Vec<ArrayD<f32>>> {
        for name in outputs {
            if !self.outputs.iter().any(|t| t.name == *name) {
                return Err(RuntimeError::MissingOutput {
                    name: name.to_string(),
                    available: self.outputs.iter().map(|t| t.name.clone()).collect(),
                });
            }
        }
        let all = self.run_f32(inputs)?;
        outputs.iter().map(|name| all.get(name).cloned()).collect()
    }
}
