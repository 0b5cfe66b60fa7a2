//! Model-level fields (IR version, opset imports, producer, metadata) and writing to disk.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{ExportError, Result};
use crate::graph::GraphBuilder;
use crate::onnx::{ModelProto, OperatorSetIdProto, StringStringEntryProto};

/// ONNX IR version written by default. IR 10 (ONNX 1.16) covers opsets up to 21 and is accepted by
/// ONNX Runtime 1.17 and later, so models also load in older deployments than the 1.31 used here.
pub const DEFAULT_IR_VERSION: i64 = 10;

/// Default ONNX-domain opset: 17 is the first with `LayerNormalization`, which CLIP needs.
pub const DEFAULT_OPSET: i64 = 17;

/// Protobuf refuses messages of 2 GiB or more; ONNX models beyond that need external data.
const PROTOBUF_LIMIT: usize = i32::MAX as usize;

/// Builds a `ModelProto` around a [`GraphBuilder`].
#[derive(Debug, Clone)]
pub struct ModelBuilder {
    graph: GraphBuilder,
    ir_version: i64,
    opsets: Vec<(String, i64)>,
    producer_name: String,
    producer_version: String,
    doc: Option<String>,
    model_version: Option<i64>,
    metadata: Vec<(String, String)>,
}

impl ModelBuilder {
    /// A model for `graph`, IR [`DEFAULT_IR_VERSION`], producer `hq-export` with this crate's version;
    /// without an [`opset`](Self::opset) call the ONNX domain is imported at [`DEFAULT_OPSET`].
    pub fn new(graph: GraphBuilder) -> Self {
        Self {
            graph,
            ir_version: DEFAULT_IR_VERSION,
            opsets: Vec::new(),
            producer_name: "hq-export".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            doc: None,
            model_version: None,
            metadata: Vec::new(),
        }
    }

    /// The graph, to keep adding to it.
    pub fn graph_mut(&mut self) -> &mut GraphBuilder {
        &mut self.graph
    }

    /// Imports `domain` (`""` = ONNX, `com.microsoft`, ...) at `version`; repeating a domain
    /// replaces its version.
    #[must_use]
    pub fn opset(mut self, domain: &str, version: i64) -> Self {
        match self.opsets.iter_mut().find(|(d, _)| d == domain) {
            Some(slot) => slot.1 = version,
            None => self.opsets.push((domain.to_string(), version)),
        }
        self
    }

    /// Sets the IR version.
    #[must_use]
    pub fn ir_version(mut self, v: i64) -> Self {
        self.ir_version = v;
        self
    }

    /// Sets producer name and version.
    #[must_use]
    pub fn producer(mut self, name: &str, version: &str) -> Self {
        self.producer_name = name.to_string();
        self.producer_version = version.to_string();
        self
    }

    /// Sets the model doc string.
    #[must_use]
    pub fn doc(mut self, doc: &str) -> Self {
        self.doc = Some(doc.to_string());
        self
    }

    /// Sets the model version (an integer the producer defines).
    #[must_use]
    pub fn model_version(mut self, v: i64) -> Self {
        self.model_version = Some(v);
        self
    }

    /// Adds a `metadata_props` entry; ONNX requires unique keys, so a repeated key replaces the
    /// earlier value. Readers see these as `model.metadata_props` (Python) or custom metadata (ORT).
    #[must_use]
    pub fn metadata(mut self, key: &str, value: &str) -> Self {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value.to_string(),
            None => self.metadata.push((key.to_string(), value.to_string())),
        }
        self
    }

    /// Validates the graph and assembles the `ModelProto`.
    pub fn build(self) -> Result<ModelProto> {
        let mut opsets = self.opsets;
        if !opsets.iter().any(|(d, _)| d.is_empty()) {
            opsets.insert(0, (String::new(), DEFAULT_OPSET));
        }
        Ok(ModelProto {
            ir_version: Some(self.ir_version),
            opset_import: opsets
                .into_iter()
                .map(|(domain, version)| OperatorSetIdProto {
                    domain: Some(domain),
                    version: Some(version),
                })
                .collect(),
            producer_name: Some(self.producer_name),
            producer_version: Some(self.producer_version),
            doc_string: self.doc,
            model_version: self.model_version,
            graph: Some(self.graph.build()?),
            metadata_props: self
                .metadata
                .into_iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: Some(k),
                    value: Some(v),
                })
                .collect(),
            ..Default::default()
        })
    }

    /// Builds and serialises the model.
    pub fn to_bytes(self) -> Result<Vec<u8>> {
        encode(&self.build()?)
    }

    /// Builds the model and writes it atomically to `path` (see [`write_atomic`]).
    pub fn write(self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }
}

/// Serialises a model, refusing sizes protobuf readers reject.
pub fn encode(model: &ModelProto) -> Result<Vec<u8>> {
    let bytes = model.encoded_len();
    if bytes > PROTOBUF_LIMIT {
        return Err(ExportError::TooLarge { bytes });
    }
    Ok(model.encode_to_vec())
}

/// `path` with `.tmp` appended to its file name.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path.tmp`, syncs it, then renames it over `path`, so a reader (or a crashed
/// export) never sees a half-written model under the final name.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    if path.file_name().is_none() {
        return Err(ExportError::Io {
            action: "writing model to",
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
        });
    }
    let tmp = tmp_path(path);
    let io = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| ExportError::Io {
            action,
            path: p,
            source,
        }
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(bytes).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io("renaming temporary file onto", path))
    })();
    if result.is_err() {
        // Best effort: the original error is what matters.
        let _ = std::fs::remove_file(&tmp);
    } else if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Persist the rename itself; not all filesystems allow syncing a directory, so best effort.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Node;
    use crate::tensor::ElemType;

    fn identity_model() -> Result<ModelBuilder> {
        let mut g = GraphBuilder::new("id");
        g.input("x", ElemType::F32, &["n".into()])?;
        g.add_node(Node::new("Identity", "id").input("x").output("y"))?;
        g.output("y", ElemType::F32, &["n".into()])?;
        Ok(ModelBuilder::new(g))
    }

    #[test]
    fn default_opset_and_metadata_replacement() -> Result<()> {
        let m = identity_model()?
            .metadata("k", "1")
            .metadata("k", "2")
            .metadata("j", "x")
            .opset("com.microsoft", 1)
            .build()?;
        assert_eq!(m.ir_version, Some(DEFAULT_IR_VERSION));
        assert_eq!(m.opset_import[0].domain.as_deref(), Some(""));
        assert_eq!(m.opset_import[0].version, Some(DEFAULT_OPSET));
        assert_eq!(m.opset_import.len(), 2);
        assert_eq!(m.metadata_props.len(), 2);
        assert_eq!(m.metadata_props[0].value.as_deref(), Some("2"));
        let m = identity_model()?.opset("", 18).opset("", 19).build()?;
        assert_eq!(m.opset_import.len(), 1);
        assert_eq!(m.opset_import[0].version, Some(19));
        Ok(())
    }

    #[test]
    fn bytes_decode_back() -> Result<()> {
        let bytes = identity_model()?.metadata("a", "b").to_bytes()?;
        let m = ModelProto::decode(bytes.as_slice()).map_err(|e| ExportError::Io {
            action: "decoding",
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })?;
        assert_eq!(m.graph.and_then(|g| g.name).as_deref(), Some("id"));
        Ok(())
    }

    #[test]
    fn write_is_atomic_and_leaves_no_tmp() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("hq-export-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| ExportError::Io {
            action: "creating",
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("m.onnx");
        identity_model()?.write(&path)?;
        assert!(path.is_file());
        assert!(!dir.join("m.onnx.tmp").exists());
        // A failing write (missing folder) reports the path and leaves nothing behind.
        let bad = dir.join("missing").join("m.onnx");
        match identity_model()?.write(&bad) {
            Err(ExportError::Io { path, .. }) => assert!(path.ends_with("m.onnx.tmp")),
            other => panic!("expected an Io error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}
