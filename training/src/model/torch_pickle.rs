//! `torch.save` checkpoints (`.bin`, `.pt`, `.pth`: a zip archive holding `data.pkl` and one file
//! per storage) read without ever running pickle code.
//!
//! A pickle is a program for a small stack machine whose `GLOBAL` + `REDUCE` opcodes call any
//! importable Python function: `torch.load(weights_only=False)` of an untrusted file is remote code
//! execution. This reader is that machine with the calls taken out: it knows the opcodes that
//! plain data needs (numbers, strings, tuples, lists, dicts) and exactly the globals that a saved
//! state dict names: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` /
//! `_rebuild_parameter`, and the storage types (`torch.FloatStorage`, ...). Any other global (a
//! `posix.system`, a `builtins.eval`), any other opcode, and any call of a non-whitelisted value is
//! refused with an error that names it; nothing is ever executed. The same whitelist as
//! `torch.load(weights_only=True)`, minus what a CLIP checkpoint never holds.
//!
//! Limits, so that a hostile file cannot make us allocate without bound: string and bytes lengths
//! are checked against the bytes left in `data.pkl`; a storage must be exactly as long as its zip
//! member says (that member's size, not the pickle, decides what is read); a tensor's size,
//! stride and offset must stay inside its storage.
//!
//! Containers on the machine's stack are values, not shared references: a list or dict fetched
//! back from the memo is a copy of it as memoized. State dicts never rely on sharing a container
//! (tensors sharing a storage are rebuilt from the same storage bytes, which is what counts).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use tch::{Kind, Tensor};

use crate::error::TrainError;

fn bad(path: &Path, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// What the reader calls: only these, found through `GLOBAL`/`STACK_GLOBAL`.
#[derive(Debug, Clone, PartialEq)]
enum Callable {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(Kind),
}

fn allowed_global(module: &str, name: &str) -> Option<Callable> {
    let storage = |kind| Some(Callable::Storage(kind));
    match (module, name) {
        ("collections", "OrderedDict") => Some(Callable::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Callable::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Callable::RebuildParameter),
        ("torch", "FloatStorage") => storage(Kind::Float),
        ("torch", "HalfStorage") => storage(Kind::Half),
        ("torch", "BFloat16Storage") => storage(Kind::BFloat16),
        ("torch", "DoubleStorage") => storage(Kind::Double),
        ("torch", "LongStorage") => storage(Kind::Int64),
        ("torch", "IntStorage") => storage(Kind::Int),
        ("torch", "ShortStorage") => storage(Kind::Int16),
        ("torch", "CharStorage") => storage(Kind::Int8),
        ("torch", "ByteStorage") => storage(Kind::Uint8),
        ("torch", "BoolStorage") => storage(Kind::Bool),
        _ => None,
    }
}

/// A storage: `numel` elements of `kind` in the archive member `data/<key>`.
#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    kind: Kind,
    key: String,
    numel: i64,
}

/// A tensor view of a storage, as `_rebuild_tensor_v2` describes it.
#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: StorageRef,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(Callable),
    Storage(StorageRef),
    Tensor(TensorRef),
    /// The MARK opcode's marker (never a result).
    Mark,
}

impl Value {
    fn ints(&self) -> Option<Vec<i64>> {
        match self {
            Value::Tuple(v) | Value::List(v) => v
                .iter()
                .map(|x| match x {
                    Value::Int(i) => Some(*i),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }
}

/// The stack machine over `data.pkl`.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: BTreeMap<u32, Value>,
}

type Step<T> = Result<T, String>;

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Step<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "data.pkl ends early: {n} bytes wanted at byte {} of {}",
                    self.pos,
                    self.data.len()
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> Step<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn len(&mut self, n: usize) -> Step<usize> {
        let l = self.le(n)?;
        usize::try_from(l).map_err(|_| format!("length {l} does not fit in memory"))
    }

    fn line(&mut self) -> Step<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("a GLOBAL's name has no end of line")?;
        let s = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn pop(&mut self) -> Step<Value> {
        match self.stack.pop() {
            Some(Value::Mark) | None => Err("the pickle's stack underflowed".into()),
            Some(v) => Ok(v),
        }
    }

    fn top(&mut self) -> Step<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "the pickle's stack is empty".to_string())
    }

    /// The values above the last MARK (which is removed).
    fn pop_to_mark(&mut self) -> Step<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| *v == Value::Mark)
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, key: u32) -> Step<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or("MEMOIZE with an empty stack")?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Step<()> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("memo key {key} was never stored"))?;
        self.stack.push(v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> Step<()> {
        let c = allowed_global(module, name).ok_or_else(|| {
            format!(
                "refused: the pickle names the global {module}.{name}, which a state dict never \
                 needs (only tensors, storages and plain containers are read; nothing is run)"
            )
        })?;
        self.stack.push(Value::Global(c));
        Ok(())
    }

    fn reduce(&mut self) -> Step<()> {
        let args = self.pop()?;
        let f = self.pop()?;
        let Value::Tuple(args) = args else {
            return Err("REDUCE without an argument tuple".into());
        };
        let v = match f {
            Value::Global(Callable::OrderedDict) if args.is_empty() => Value::Dict(Vec::new()),
            Value::Global(Callable::RebuildTensorV2) => rebuild_tensor(&args)?,
            Value::Global(Callable::RebuildParameter) => match args.first() {
                Some(t @ Value::Tensor(_)) => t.clone(),
                _ => return Err("_rebuild_parameter of something that is not a tensor".into()),
            },
            other => return Err(format!("refused: a call of {other:?} with {args:?}")),
        };
        self.stack.push(v);
        Ok(())
    }

    fn persistent(&mut self) -> Step<()> {
        let pid = self.pop()?;
        let Value::Tuple(t) = pid else {
            return Err("a persistent id that is not a tuple".into());
        };
        match t.as_slice() {
            [Value::Str(tag), Value::Global(Callable::Storage(kind)), key, _location, Value::Int(numel)]
                if tag == "storage" =>
            {
                let key = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    other => return Err(format!("a storage key {other:?}")),
                };
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return Err(format!("a storage key {key:?} that is not a plain name"));
                }
                if *numel < 0 {
                    return Err(format!("a storage of {numel} elements"));
                }
                self.stack.push(Value::Storage(StorageRef {
                    kind: *kind,
                    key,
                    numel: *numel,
                }));
                Ok(())
            }
            other => Err(format!("refused: an unknown persistent id {other:?}")),
        }
    }

    fn run(mut self) -> Step<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.le(1)?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.le(2)?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'J' => {
                    let v = self.le(4)? as u32 as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.len(1)?;
                    if n > 8 {
                        return Err(format!("a {n}-byte integer at byte {at}"));
                    }
                    let raw = self.le(n)?;
                    let v = if n == 0 {
                        0
                    } else {
                        let shift = 64 - 8 * n as u32;
                        ((raw << shift) as i64) >> shift
                    };
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.len(4)?,
                        0x8c => self.len(1)?,
                        _ => self.len(8)?,
                    };
                    let s = std::str::from_utf8(self.take(n)?)
                        .map_err(|_| format!("a string at byte {at} is not UTF-8"))?;
                    self.stack.push(Value::Str(s.to_string()));
                }
                b'U' | b'T' | b'C' | b'B' => {
                    let n = if op == b'U' || op == b'C' {
                        self.len(1)?
                    } else {
                        self.len(4)?
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'q' => {
                    let k = self.le(1)? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.le(4)? as u32;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.le(1)? as u32;
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.le(4)? as u32;
                    self.memo_get(k)?;
                }
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("the pickle's stack underflowed".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.contains(&Value::Mark) {
                        return Err("a MARK inside a tuple".into());
                    }
                    self.stack.push(Value::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_to_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_to_mark()?;
                    let pairs = pairs(items)?;
                    self.stack.push(Value::Dict(pairs));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        _ => return Err("APPEND to something that is not a list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_to_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err("APPENDS to something that is not a list".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err("SETITEM on something that is not a dict".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_to_mark()?;
                    let new = pairs(items)?;
                    match self.top()? {
                        Value::Dict(d) => d.extend(new),
                        _ => return Err("SETITEMS on something that is not a dict".into()),
                    }
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(&module, &name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.global(&m, &n)?,
                        _ => return Err("STACK_GLOBAL of non-strings".into()),
                    }
                }
                b'R' => self.reduce()?,
                b'Q' => self.persistent()?,
                b'b' => {
                    // BUILD sets an object's state; on a state dict it is `_metadata` (versions of
                    // modules' state-dict formats), which loading does not need.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        other => return Err(format!("refused: BUILD on {other:?}")),
                    }
                }
                other => {
                    return Err(format!(
                        "refused: pickle opcode 0x{other:02x} at byte {at} is not one that plain \
                         data needs"
                    ))
                }
            }
        }
    }
}

fn pairs(items: Vec<Value>) -> Step<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return Err("a dict with an odd number of items".into());
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn rebuild_tensor(args: &[Value]) -> Step<Value> {
    let (Some(Value::Storage(storage)), Some(Value::Int(offset)), Some(size), Some(stride)) =
        (args.first(), args.get(1), args.get(2), args.get(3))
    else {
        return Err(format!("_rebuild_tensor_v2 with arguments {args:?}"));
    };
    let (Some(size), Some(stride)) = (size.ints(), stride.ints()) else {
        return Err("_rebuild_tensor_v2 with a size or stride that is not integers".into());
    };
    if size.len() != stride.len() || size.iter().chain(&stride).any(|&x| x < 0) || *offset < 0 {
        return Err(format!(
            "a tensor view with size {size:?}, stride {stride:?}, offset {offset}"
        ));
    }
    // The last element the view reaches must be inside the storage.
    let empty = size.contains(&0);
    let reach = size
        .iter()
        .zip(&stride)
        .try_fold(*offset, |acc, (&n, &s)| {
            (n.max(1) - 1)
                .checked_mul(s)
                .and_then(|x| acc.checked_add(x))
        })
        .ok_or("a tensor view whose extent overflows")?;
    if !empty && reach >= storage.numel {
        return Err(format!(
            "a tensor view reaching element {reach} of a storage of {}",
            storage.numel
        ));
    }
    Ok(Value::Tensor(TensorRef {
        storage: storage.clone(),
        offset: *offset,
        size,
        stride,
    }))
}

fn element_size(kind: Kind) -> usize {
    match kind {
        Kind::Double | Kind::Int64 => 8,
        Kind::Float | Kind::Int => 4,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        _ => 1,
    }
}

/// Reads a `torch.save` zip archive and returns its state dict's tensors by name (on the CPU,
/// contiguous, in the file's dtypes). The state dict is the top-level dict, or its `state_dict`
/// entry (open_clip's training checkpoints: `{"epoch", "name", "state_dict", "optimizer"}`); a DDP
/// `module.` prefix on every name is stripped. Entries that are not tensors are an error.
pub fn read_torch_checkpoint(path: &Path) -> Result<BTreeMap<String, Tensor>, TrainError> {
    let file = std::fs::File::open(path).map_err(|e| bad(path, format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| {
        bad(
            path,
            format!(
                "not a torch zip checkpoint ({e}); legacy (pre-1.6, non-zip) torch.save files \
                 are not read: re-save with torch.save in a current torch, or as safetensors"
            ),
        )
    })?;
    let names: Vec<String> = zip.file_names().map(str::to_string).collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| bad(path, "the archive has no <name>/data.pkl"))?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    if let Some(order) = names.iter().find(|n| **n == format!("{prefix}byteorder")) {
        let text = read_member(&mut zip, order, path, 16)?;
        if text != b"little" {
            return Err(bad(
                path,
                "a big-endian checkpoint (byteorder is not 'little')",
            ));
        }
    }
    // data.pkl of a state dict is small (names and shapes); 256 MiB bounds a hostile one.
    let data = read_member(&mut zip, &pkl, path, 256 << 20)?;
    let machine = Machine {
        data: &data,
        pos: 0,
        stack: Vec::new(),
        memo: BTreeMap::new(),
    };
    let top = machine
        .run()
        .map_err(|e| bad(path, format!("{pkl}: {e}")))?;
    let dict = match top {
        Value::Dict(d) => d,
        other => {
            return Err(bad(
                path,
                format!("holds {}, not a state dict", kind_name(&other)),
            ))
        }
    };
    let dict = match dict
        .iter()
        .find(|(k, _)| *k == Value::Str("state_dict".into()))
    {
        Some((_, Value::Dict(inner))) => inner.clone(),
        Some(_) => return Err(bad(path, "its state_dict entry is not a dict")),
        None => dict,
    };
    let mut storages: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (k, v) in dict {
        let Value::Str(name) = k else {
            return Err(bad(
                path,
                format!("a state-dict key {k:?} that is not a string"),
            ));
        };
        let Value::Tensor(t) = v else {
            return Err(bad(
                path,
                format!("{name} is {}, not a tensor", kind_name(&v)),
            ));
        };
        let flat = match storages.get(&t.storage.key) {
            Some(s) => s.shallow_clone(),
            None => {
                let s = read_storage(&mut zip, &prefix, &t.storage, path)?;
                storages.insert(t.storage.key.clone(), s.shallow_clone());
                s
            }
        };
        let view = flat
            .f_as_strided(&t.size, &t.stride, Some(t.offset))
            .and_then(|v| v.f_contiguous())
            .map_err(|e| bad(path, format!("{name}: {e}")))?;
        out.insert(name, view);
    }
    let strip = !out.is_empty() && out.keys().all(|n| n.starts_with("module."));
    Ok(if strip {
        out.into_iter()
            .map(|(n, t)| (n["module.".len()..].to_string(), t))
            .collect()
    } else {
        out
    })
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) => "an int",
        Value::Float(_) => "a float",
        Value::Str(_) => "a string",
        Value::Bytes(_) => "bytes",
        Value::Tuple(_) => "a tuple",
        Value::List(_) => "a list",
        Value::Dict(_) => "a dict",
        Value::Global(_) => "a callable",
        Value::Storage(_) => "a storage",
        Value::Tensor(_) => "a tensor",
        Value::Mark => "a mark",
    }
}

fn read_member(
    zip: &mut zip::ZipArchive<std::fs::File>,
    name: &str,
    path: &Path,
    limit: u64,
) -> Result<Vec<u8>, TrainError> {
    let member = zip
        .by_name(name)
        .map_err(|e| bad(path, format!("{name}: {e}")))?;
    let size = member.size();
    if size > limit {
        return Err(bad(path, format!("{name} is {size} bytes (limit {limit})")));
    }
    let mut buf = Vec::with_capacity(size as usize);
    member
        .take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| bad(path, format!("{name}: {e}")))?;
    if buf.len() as u64 != size {
        return Err(bad(path, format!("{name} is truncated")));
    }
    Ok(buf)
}

/// One storage as a flat CPU tensor; its member must hold exactly `numel` elements.
fn read_storage(
    zip: &mut zip::ZipArchive<std::fs::File>,
    prefix: &str,
    s: &StorageRef,
    path: &Path,
) -> Result<Tensor, TrainError> {
    let name = format!("{prefix}data/{}", s.key);
    let want = (s.numel as u64)
        .checked_mul(element_size(s.kind) as u64)
        .ok_or_else(|| bad(path, format!("{name}: a storage size that overflows")))?;
    let size = zip
        .by_name(&name)
        .map_err(|e| bad(path, format!("{name}: {e}")))?
        .size();
    if size != want {
        return Err(bad(
            path,
            format!(
                "{name} holds {size} bytes, but the pickle says {} elements of {:?} ({want} bytes)",
                s.numel, s.kind
            ),
        ));
    }
    let bytes = read_member(zip, &name, path, want)?;
    Tensor::f_from_data_size(&bytes, &[s.numel], s.kind)
        .map_err(|e| bad(path, format!("{name}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Step<Value> {
        Machine {
            data: bytes,
            pos: 0,
            stack: Vec::new(),
            memo: BTreeMap::new(),
        }
        .run()
    }

    #[test]
    fn plain_data_reads() {
        // pickle.dumps({"a": [1, -2, 300, 70000], "b": (1.5, True, None)}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffM,\x01J\x70\x11\x01\x00eX\x01\x00\x00\x00bq\x03G?\xf8\x00\x00\x00\x00\x00\x00\x88N\x87q\x04u.";
        let v = run(p).expect("reads");
        assert_eq!(
            v,
            Value::Dict(vec![
                (
                    Value::Str("a".into()),
                    Value::List(vec![
                        Value::Int(1),
                        Value::Int(-2),
                        Value::Int(300),
                        Value::Int(70000)
                    ])
                ),
                (
                    Value::Str("b".into()),
                    Value::Tuple(vec![Value::Float(1.5), Value::Bool(true), Value::None])
                ),
            ])
        );
    }

    #[test]
    fn code_is_refused_not_run() {
        // pickle.dumps of an object whose __reduce__ is (os.system, ("touch pwned",)), protocol 2.
        let p = b"\x80\x02cposix\nsystem\nq\x00X\x0b\x00\x00\x00touch pwnedq\x01\x85q\x02Rq\x03.";
        let e = run(p).expect_err("refused");
        assert!(e.contains("posix.system") && e.contains("refused"), "{e}");
        // builtins.eval through STACK_GLOBAL (protocol 4).
        let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x041+1\x85R.";
        let e = run(p).expect_err("refused");
        assert!(e.contains("builtins.eval"), "{e}");
        // An opcode plain data never needs (INST).
        let e = run(b"\x80\x02i__main__\nX\n.").expect_err("refused");
        assert!(e.contains("opcode 0x69"), "{e}");
    }

    #[test]
    fn lengths_past_the_end_are_errors_not_allocations() {
        // BINUNICODE claiming 4 GiB.
        let e = run(b"\x80\x02X\xff\xff\xff\xff.").expect_err("short");
        assert!(e.contains("ends early"), "{e}");
        let e = run(b"\x80\x02").expect_err("no STOP");
        assert!(e.contains("ends early"), "{e}");
    }

    #[test]
    fn views_outside_their_storage_are_refused() {
        let s = Value::Storage(StorageRef {
            kind: Kind::Float,
            key: "0".into(),
            numel: 6,
        });
        let ints = |v: &[i64]| Value::Tuple(v.iter().map(|&x| Value::Int(x)).collect());
        assert!(rebuild_tensor(&[s.clone(), Value::Int(0), ints(&[2, 3]), ints(&[3, 1])]).is_ok());
        assert!(rebuild_tensor(&[s.clone(), Value::Int(1), ints(&[2, 3]), ints(&[3, 1])]).is_err());
        assert!(rebuild_tensor(&[s.clone(), Value::Int(0), ints(&[3, 3]), ints(&[3, 1])]).is_err());
        assert!(rebuild_tensor(&[s, Value::Int(0), ints(&[2]), ints(&[-1])]).is_err());
    }
}
