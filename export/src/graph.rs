//! A graph builder that keeps ONNX's structural rules as it goes.
//!
//! ONNX graphs are in SSA form and topologically sorted: every value is defined once, before it is
//! read. The builder tracks defined names, so a typo in a weight name or an out-of-order node fails
//! at the `add_node` call that caused it, with the node's name, instead of as an opaque checker or
//! session error after the whole encoder has been written.

use std::collections::HashSet;

use crate::error::{ExportError, Result};
use crate::onnx::{
    attribute_proto::AttributeType, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::tensor::{tensor_f16, tensor_f16_bits, tensor_f32, tensor_i64, ElemType};

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A named dynamic size (`batch`, `seq`): ONNX Runtime accepts any size and ties equal names
    /// together for shape inference.
    Symbolic(String),
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Fixed(v)
    }
}

impl From<i32> for Dim {
    fn from(v: i32) -> Self {
        Dim::Fixed(i64::from(v))
    }
}

impl From<usize> for Dim {
    fn from(v: usize) -> Self {
        Dim::Fixed(v as i64)
    }
}

impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Symbolic(v.to_string())
    }
}

impl From<String> for Dim {
    fn from(v: String) -> Self {
        Dim::Symbolic(v)
    }
}

/// A node attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// `INT` (also booleans and enum codes such as `Cast.to`).
    Int(i64),
    /// `FLOAT`.
    Float(f32),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `FLOATS`.
    Floats(Vec<f32>),
    /// `STRING` (UTF-8).
    String(String),
    /// `TENSOR` (e.g. `Constant.value`).
    Tensor(Box<TensorProto>),
}

impl From<i64> for Attr {
    fn from(v: i64) -> Self {
        Attr::Int(v)
    }
}
impl From<i32> for Attr {
    fn from(v: i32) -> Self {
        Attr::Int(i64::from(v))
    }
}
impl From<f32> for Attr {
    fn from(v: f32) -> Self {
        Attr::Float(v)
    }
}
impl From<Vec<i64>> for Attr {
    fn from(v: Vec<i64>) -> Self {
        Attr::Ints(v)
    }
}
impl From<&[i64]> for Attr {
    fn from(v: &[i64]) -> Self {
        Attr::Ints(v.to_vec())
    }
}
impl<const N: usize> From<[i64; N]> for Attr {
    fn from(v: [i64; N]) -> Self {
        Attr::Ints(v.to_vec())
    }
}
impl From<Vec<f32>> for Attr {
    fn from(v: Vec<f32>) -> Self {
        Attr::Floats(v)
    }
}
impl<const N: usize> From<[f32; N]> for Attr {
    fn from(v: [f32; N]) -> Self {
        Attr::Floats(v.to_vec())
    }
}
impl From<&str> for Attr {
    fn from(v: &str) -> Self {
        Attr::String(v.to_string())
    }
}
impl From<String> for Attr {
    fn from(v: String) -> Self {
        Attr::String(v)
    }
}
impl From<TensorProto> for Attr {
    fn from(v: TensorProto) -> Self {
        Attr::Tensor(Box::new(v))
    }
}

impl Attr {
    fn into_proto(self, name: &str) -> AttributeProto {
        let mut a = AttributeProto {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let ty = match self {
            Attr::Int(v) => {
                a.i = Some(v);
                AttributeType::Int
            }
            Attr::Float(v) => {
                a.f = Some(v);
                AttributeType::Float
            }
            Attr::Ints(v) => {
                a.ints = v;
                AttributeType::Ints
            }
            Attr::Floats(v) => {
                a.floats = v;
                AttributeType::Floats
            }
            Attr::String(v) => {
                a.s = Some(v.into_bytes());
                AttributeType::String
            }
            Attr::Tensor(v) => {
                a.t = Some(*v);
                AttributeType::Tensor
            }
        };
        a.r#type = Some(ty as i32);
        a
    }
}

/// A node under construction: `Node::new("MatMul", "text.l0.attn.q").inputs([x, w]).output(q)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    op_type: String,
    name: String,
    domain: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    attrs: Vec<(String, Attr)>,
}

impl Node {
    /// A node of operator `op_type` (default ONNX domain) with a readable, unique `name`.
    pub fn new(op_type: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            op_type: op_type.into(),
            name: name.into(),
            domain: String::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            attrs: Vec::new(),
        }
    }

    /// Appends an input; `""` marks an omitted optional input, as in ONNX.
    #[must_use]
    pub fn input(mut self, name: impl Into<String>) -> Self {
        self.inputs.push(name.into());
        self
    }

    /// Appends several inputs.
    #[must_use]
    pub fn inputs<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.inputs.extend(names.into_iter().map(Into::into));
        self
    }

    /// Appends an output.
    #[must_use]
    pub fn output(mut self, name: impl Into<String>) -> Self {
        self.outputs.push(name.into());
        self
    }

    /// Appends several outputs.
    #[must_use]
    pub fn outputs<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.outputs.extend(names.into_iter().map(Into::into));
        self
    }

    /// Sets an attribute (a later value for the same key replaces the earlier one).
    #[must_use]
    pub fn attr(mut self, key: impl Into<String>, value: impl Into<Attr>) -> Self {
        let key = key.into();
        let value = value.into();
        match self.attrs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.attrs.push((key, value)),
        }
        self
    }

    /// Sets the operator domain (default: the ONNX domain `""`; e.g. `com.microsoft`). The model
    /// must import an opset for it.
    #[must_use]
    pub fn domain(mut self, domain: impl Into<String>) -> Self {
        self.domain = domain.into();
        self
    }

    fn into_proto(self) -> NodeProto {
        NodeProto {
            input: self.inputs,
            output: self.outputs,
            name: Some(self.name),
            op_type: Some(self.op_type),
            domain: Some(self.domain),
            attribute: self
                .attrs
                .into_iter()
                .map(|(k, v)| v.into_proto(&k))
                .collect(),
            ..Default::default()
        }
    }
}

fn value_info(name: &str, ty: ElemType, dims: Option<&[Dim]>) -> ValueInfoProto {
    let shape = dims.map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                value: Some(match d {
                    Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n),
                    Dim::Symbolic(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
                }),
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(ty.data_type() as i32),
                shape,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds an ONNX `GraphProto`: inputs, initializers, nodes in order, outputs.
#[derive(Debug, Clone, Default)]
pub struct GraphBuilder {
    name: String,
    doc: Option<String>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    value_infos: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
    nodes: Vec<NodeProto>,
    defined: HashSet<String>,
    node_names: HashSet<String>,
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Sets the graph's doc string.
    pub fn set_doc(&mut self, doc: impl Into<String>) {
        self.doc = Some(doc.into());
    }

    fn define(&mut self, name: &str, what: &'static str) -> Result<()> {
        if name.is_empty() {
            return Err(ExportError::EmptyName { what });
        }
        if !self.defined.insert(name.to_string()) {
            return Err(ExportError::DuplicateValue {
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Whether `name` is already an input, initializer or node output.
    pub fn is_defined(&self, name: &str) -> bool {
        self.defined.contains(name)
    }

    /// Declares a graph input; `dims` mixes fixed sizes and symbolic names, e.g.
    /// `&["batch".into(), 3.into()]`. Returns the name for use as a node input.
    pub fn input(&mut self, name: &str, ty: ElemType, dims: &[Dim]) -> Result<String> {
        self.define(name, "input")?;
        self.inputs.push(value_info(name, ty, Some(dims)));
        Ok(name.to_string())
    }

    /// Declares a graph output with a shape. It must be produced (by a node, or be an input or
    /// initializer) by the time the model is built.
    pub fn output(&mut self, name: &str, ty: ElemType, dims: &[Dim]) -> Result<()> {
        self.declare_output(name, ty, Some(dims))
    }

    /// Declares a graph output whose shape is left to ONNX shape inference.
    pub fn output_unshaped(&mut self, name: &str, ty: ElemType) -> Result<()> {
        self.declare_output(name, ty, None)
    }

    fn declare_output(&mut self, name: &str, ty: ElemType, dims: Option<&[Dim]>) -> Result<()> {
        if name.is_empty() {
            return Err(ExportError::EmptyName { what: "output" });
        }
        if self.outputs.iter().any(|o| o.name.as_deref() == Some(name)) {
            return Err(ExportError::DuplicateValue {
                name: name.to_string(),
            });
        }
        self.outputs.push(value_info(name, ty, dims));
        Ok(())
    }

    /// Annotates an intermediate value's type and shape (optional; helps tools and debugging).
    pub fn value_info(&mut self, name: &str, ty: ElemType, dims: &[Dim]) {
        self.value_infos.push(value_info(name, ty, Some(dims)));
    }

    /// Adds a prepared initializer tensor (see the `tensor_*` functions); its name must be set.
    pub fn initializer(&mut self, tensor: TensorProto) -> Result<String> {
        let name = tensor.name.clone().unwrap_or_default();
        self.define(&name, "initializer")?;
        self.initializers.push(tensor);
        Ok(name)
    }

    /// Adds an f32 initializer from row-major `data` with shape `dims`.
    pub fn initializer_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> Result<String> {
        self.initializer(tensor_f32(name, dims, data)?)
    }

    /// Adds an f16 initializer from f32 values (rounded to nearest, ties to even).
    pub fn initializer_f16(&mut self, name: &str, dims: &[usize], data: &[f32]) -> Result<String> {
        self.initializer(tensor_f16(name, dims, data)?)
    }

    /// Adds an f16 initializer from binary16 bit patterns.
    pub fn initializer_f16_bits(
        &mut self,
        name: &str,
        dims: &[usize],
        bits: &[u16],
    ) -> Result<String> {
        self.initializer(tensor_f16_bits(name, dims, bits)?)
    }

    /// Adds an i64 initializer (Reshape shapes, Slice bounds, Gather indices).
    pub fn initializer_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) -> Result<String> {
        self.initializer(tensor_i64(name, dims, data)?)
    }

    /// Adds a node after checking that its name is new, its inputs are defined and its outputs are
    /// not.
    pub fn add_node(&mut self, node: Node) -> Result<()> {
        if node.name.is_empty() {
            return Err(ExportError::EmptyName { what: "node" });
        }
        if node.op_type.is_empty() {
            return Err(ExportError::EmptyName { what: "operator" });
        }
        if self.node_names.contains(&node.name) {
            return Err(ExportError::DuplicateNode { name: node.name });
        }
        if let Some(missing) = node
            .inputs
            .iter()
            .find(|i| !i.is_empty() && !self.defined.contains(*i))
        {
            return Err(ExportError::UnknownValue {
                node: node.name.clone(),
                input: missing.clone(),
            });
        }
        let mut seen = HashSet::new();
        for out in &node.outputs {
            if out.is_empty() {
                continue; // an omitted optional output
            }
            if self.defined.contains(out) || !seen.insert(out.as_str()) {
                return Err(ExportError::DuplicateValue { name: out.clone() });
            }
        }
        for out in &node.outputs {
            if !out.is_empty() {
                self.defined.insert(out.clone());
            }
        }
        self.node_names.insert(node.name.clone());
        self.nodes.push(node.into_proto());
        Ok(())
    }

    /// Adds a single-output node whose output value has the node's own name, and returns that
    /// name: `let h = g.op("Add", "l0.add", &[&xw, &b], [])?;`.
    pub fn op<'a>(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attrs: impl IntoIterator<Item = (&'a str, Attr)>,
    ) -> Result<String> {
        let mut node = Node::new(op_type, name)
            .inputs(inputs.iter().copied())
            .output(name);
        for (k, v) in attrs {
            node = node.attr(k, v);
        }
        self.add_node(node)?;
        Ok(name.to_string())
    }

    /// Checks that every output is defined and returns the `GraphProto`.
    pub fn build(self) -> Result<GraphProto> {
        for o in &self.outputs {
            let name = o.name.clone().unwrap_or_default();
            if !self.defined.contains(&name) {
                return Err(ExportError::UndefinedOutput { name });
            }
        }
        Ok(GraphProto {
            node: self.nodes,
            name: Some(self.name),
            initializer: self.initializers,
            doc_string: self.doc,
            input: self.inputs,
            output: self.outputs,
            value_info: self.value_infos,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Result<GraphBuilder> {
        let mut g = GraphBuilder::new("g");
        g.input("x", ElemType::F32, &["batch".into(), 2.into()])?;
        g.initializer_f32("w", &[2, 2], &[1.0, 0.0, 0.0, 1.0])?;
        Ok(g)
    }

    #[test]
    fn rejects_undefined_inputs_and_redefinitions() -> Result<()> {
        let mut g = small()?;
        assert!(matches!(
            g.op("MatMul", "mm", &["x", "W"], []),
            Err(ExportError::UnknownValue { ref node, ref input }) if node == "mm" && input == "W"
        ));
        g.op("MatMul", "mm", &["x", "w"], [])?;
        assert!(matches!(
            g.op("Relu", "mm", &["mm"], []),
            Err(ExportError::DuplicateNode { .. })
        ));
        assert!(matches!(
            g.add_node(Node::new("Relu", "r").input("mm").output("x")),
            Err(ExportError::DuplicateValue { .. })
        ));
        assert!(matches!(
            g.initializer_f32("w", &[1], &[0.0]),
            Err(ExportError::DuplicateValue { .. })
        ));
        assert!(matches!(
            g.op("Relu", "", &["mm"], []),
            Err(ExportError::EmptyName { what: "node" })
        ));
        Ok(())
    }

    #[test]
    fn outputs_must_be_produced() -> Result<()> {
        let mut g = small()?;
        g.output("y", ElemType::F32, &["batch".into(), 2.into()])?;
        assert!(matches!(
            g.clone().build(),
            Err(ExportError::UndefinedOutput { .. })
        ));
        g.add_node(Node::new("MatMul", "mm").inputs(["x", "w"]).output("y"))?;
        let proto = g.build()?;
        assert_eq!(proto.node.len(), 1);
        assert_eq!(proto.output[0].name.as_deref(), Some("y"));
        Ok(())
    }

    #[test]
    fn attributes_carry_their_types() -> Result<()> {
        let mut g = small()?;
        g.add_node(
            Node::new("Foo", "n")
                .input("x")
                .input("")
                .output("o")
                .attr("i", 3)
                .attr("f", 0.5f32)
                .attr("is", [1, -1])
                .attr("fs", [0.5, 1.5])
                .attr("s", "tanh")
                .attr("i", 4i64),
        )?;
        let proto = g.build()?;
        let attrs = &proto.node[0].attribute;
        assert_eq!(attrs.len(), 5);
        assert_eq!(attrs[0].i, Some(4));
        assert_eq!(attrs[0].r#type, Some(AttributeType::Int as i32));
        assert_eq!(attrs[1].f, Some(0.5));
        assert_eq!(attrs[2].ints, vec![1, -1]);
        assert_eq!(attrs[2].r#type, Some(AttributeType::Ints as i32));
        assert_eq!(attrs[3].floats, vec![0.5, 1.5]);
        assert_eq!(attrs[4].s.as_deref(), Some(&b"tanh"[..]));
        assert_eq!(attrs[4].r#type, Some(AttributeType::String as i32));
        assert_eq!(proto.node[0].input, vec!["x".to_string(), String::new()]);
        Ok(())
    }
}
