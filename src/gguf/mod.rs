//! The GGUF container: reading (memory-mapped, validated, zero-copy tensor views), split files
//! opened as one model, typed metadata access, and a writer for tests and synthetic models.

mod reader;
mod value;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ggrun_quants::GgmlType;

pub use reader::{parse, GgufFile};
pub use value::{Array, MetaError, Strings, Value, ValueType};
pub use writer::GgufWriter;

/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
pub const MAX_DIMS: usize = 4;

/// Anything that stops a GGUF model from opening. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// (The I/O error is a plain field, not a `source`: the one-line message already holds it,
    /// and a chained report would print it twice.)
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Format(String),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

impl GgufError {
    fn io(path: &Path, err: std::io::Error) -> GgufError {
        GgufError::Io {
            path: path.to_path_buf(),
            err,
        }
    }
}

/// A tensor record: name, shape (ne0 first, the contiguous dimension), type, offset in its file's
/// data section, and its size in bytes (validated: no overflow, whole blocks per row).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
    pub size_bytes: u64,
}

impl TensorInfo {
    /// Builds and validates a record: rows must be whole blocks and sizes must not overflow.
    pub fn new(
        name: String,
        dims: Vec<u64>,
        ty: GgmlType,
        offset: u64,
    ) -> Result<TensorInfo, GgufError> {
        let overflow = || GgufError::Format(format!("tensor {name}: dimensions {dims:?} overflow"));
        let ne0 = dims.first().copied().unwrap_or(1);
        let row = ty.row_bytes(ne0).ok_or_else(|| {
            GgufError::Format(format!(
                "tensor {name}: row length {ne0} is not a multiple of the {ty} block size {}",
                ty.block_size()
            ))
        })?;
        let mut size = row;
        let mut elements = ne0;
        for &d in dims.iter().skip(1) {
            size = size.checked_mul(d).ok_or_else(overflow)?;
            elements = elements.checked_mul(d).ok_or_else(overflow)?;
        }
        if elements > i64::MAX as u64 {
            return Err(overflow());
        }
        Ok(TensorInfo {
            name,
            dims,
            ty,
            offset,
            size_bytes: size,
        })
    }

    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Elements per row (ne0).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (ne1 · ne2 · ne3).
    pub fn rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }
}

/// A zero-copy view of a tensor's bytes in the mapping.
#[derive(Clone, Copy)]
pub struct TensorView<'a> {
    pub info: &'a TensorInfo,
    pub data: &'a [u8],
    file: &'a GgufFile,
    derived: &'a Derived,
}

/// A copy of a tensor re-arranged for a backend (made at most once, kept as long as the model).
type Derived = std::sync::OnceLock<Option<Box<[u8]>>>;

impl<'a> TensorView<'a> {
    /// The tensor's derived copy (a backend's re-arranged layout), made by `make` on first use;
    /// `make` returning None records that there is none. The mapping stays the source of truth,
    /// but once a copy exists its pages leave the resident set (they fault back in if read).
    pub fn derived(&self, make: impl FnOnce(&TensorView) -> Option<Box<[u8]>>) -> Option<&'a [u8]> {
        self.derived
            .get_or_init(|| {
                let copy = make(self);
                if copy.is_some() {
                    let start = self.data.as_ptr() as usize - self.file.bytes().as_ptr() as usize;
                    self.file.release(start..start + self.data.len());
                }
                copy
            })
            .as_deref()
    }

    /// Bytes of row `i` (rows of ne0 elements).
    pub fn row(&self, i: usize) -> &'a [u8] {
        let rb = self.data.len() / self.info.rows().max(1) as usize;
        &self.data[i * rb..(i + 1) * rb]
    }

    /// The whole tensor as f32 (dequantized); `None` for types without a float meaning here.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let f = ggrun_quants::dequantize_fn(self.info.ty)?;
        let mut out = vec![0f32; self.info.elements() as usize];
        f(self.data, &mut out);
        Some(out)
    }
}

/// Metadata keys in file order of sorting (BTreeMap), with typed accessors.
#[derive(Clone, Debug, Default)]
pub struct Metadata {
    map: BTreeMap<String, Value>,
}

impl Metadata {
    pub fn insert(&mut self, key: String, v: Value) -> Option<Value> {
        self.map.insert(key, v)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn require(&self, key: &str) -> Result<&Value, MetaError> {
        self.get(key)
            .ok_or_else(|| MetaError::Missing { key: key.into() })
    }

    fn wrong(key: &str, expected: &'static str, v: &Value) -> MetaError {
        MetaError::WrongType {
            key: key.into(),
            expected,
            found: v.type_description(),
        }
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Result<&str, MetaError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::wrong(key, "string", v))
    }

    /// Exactly a u32.
    pub fn get_u32(&self, key: &str) -> Result<u32, MetaError> {
        match self.require(key)? {
            Value::U32(x) => Ok(*x),
            v => Err(Self::wrong(key, "u32", v)),
        }
    }

    /// Any non-negative integer that fits a usize (writers disagree on widths: u32, i32, u64).
    pub fn get_usize(&self, key: &str) -> Result<usize, MetaError> {
        let v = self.require(key)?;
        let i = v
            .as_integer()
            .ok_or_else(|| Self::wrong(key, "integer", v))?;
        usize::try_from(i).map_err(|_| MetaError::OutOfRange {
            key: key.into(),
            value: i.to_string(),
            why: "must be a non-negative size",
        })
    }

    /// Any float or integer as f32; NaN and infinities are errors (no hyperparameter is one).
    pub fn get_f32(&self, key: &str) -> Result<f32, MetaError> {
        let v = self.require(key)?;
        let x = v
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| Self::wrong(key, "number", v))?;
        if !x.is_finite() {
            return Err(MetaError::OutOfRange {
                key: key.into(),
                value: x.to_string(),
                why: "must be a finite number",
            });
        }
        Ok(x)
    }

    /// [`Metadata::get_f32`] of a key that may be absent (None); present, it must be valid.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>, MetaError> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.get_f32(key).map(Some),
        }
    }

    /// A scale or factor that may be absent: finite and not negative when present (0 keeps
    /// the meaning the format gives it: off, or the default).
    pub fn opt_scale(&self, key: &str) -> Result<Option<f32>, MetaError> {
        match self.opt_f32(key)? {
            Some(x) if x < 0.0 => Err(MetaError::OutOfRange {
                key: key.into(),
                value: x.to_string(),
                why: "must not be negative",
            }),
            x => Ok(x),
        }
    }

    /// A finite number above zero (epsilons, RoPE bases).
    pub fn get_positive_f32(&self, key: &str) -> Result<f32, MetaError> {
        let x = self.get_f32(key)?;
        if x <= 0.0 {
            return Err(MetaError::OutOfRange {
                key: key.into(),
                value: x.to_string(),
                why: "must be above zero",
            });
        }
        Ok(x)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, MetaError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(Self::wrong(key, "bool", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, MetaError> {
        match self.require(key)? {
            Value::Array(Array::String(items)) => Ok(items.iter().collect()),
            v => Err(Self::wrong(key, "array of string", v)),
        }
    }

    /// A per-layer integer: either a scalar (same for every layer) or an array of `n` integers.
    pub fn get_per_layer(&self, key: &str, n: usize) -> Result<Vec<usize>, MetaError> {
        let v = self.require(key)?;
        match v {
            Value::Array(items) => {
                if items.len() != n {
                    return Err(MetaError::OutOfRange {
                        key: key.into(),
                        value: format!("{} entries", items.len()),
                        why: "must have one entry per layer",
                    });
                }
                (0..n)
                    .map(|i| {
                        items
                            .integer(i)
                            .and_then(|i| usize::try_from(i).ok())
                            .ok_or_else(|| Self::wrong(key, "array of non-negative integers", v))
                    })
                    .collect()
            }
            _ => Ok(vec![self.get_usize(key)?; n]),
        }
    }

    /// The number of elements of an array value (without materialising anything).
    pub fn array_len(&self, key: &str) -> Result<usize, MetaError> {
        match self.require(key)? {
            Value::Array(items) => Ok(items.len()),
            v => Err(Self::wrong(key, "array", v)),
        }
    }
}

/// A model: one GGUF file, or all parts of a split model opened as one (metadata from the first
/// part, tensors from all parts).
pub struct Model {
    pub parts: Vec<GgufFile>,
    /// Tensor name → (part index, index in that part's table), in file order.
    index: Vec<(usize, usize)>,
    by_name: std::collections::HashMap<String, (usize, usize)>,
    /// Derived copies per tensor, by part and index in that part's table.
    derived: Vec<Vec<Derived>>,
}

/// `(stem, part, count)` when `path` is named like `stem-00001-of-00003.gguf`.
pub fn split_name(path: &Path) -> Option<(String, u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let base = name.strip_suffix(".gguf")?;
    let (rest, count) = base.rsplit_once("-of-")?;
    let (stem, part) = rest.rsplit_once('-')?;
    if part.len() != 5 || count.len() != 5 {
        return None;
    }
    Some((stem.to_string(), part.parse().ok()?, count.parse().ok()?))
}

impl Model {
    /// Opens `path`; a split part (any of them) opens the whole set.
    pub fn open(path: &Path) -> Result<Model, GgufError> {
        let first = GgufFile::open(&Self::first_part(path))?;
        let count = match first.metadata.get("split.count") {
            None => 1,
            Some(_) => first.metadata.get_usize("split.count")?,
        };
        let mut parts = vec![first];
        if count > 1 {
            let (stem, _, named) = split_name(&parts[0].path).ok_or_else(|| {
                GgufError::Format(format!(
                    "{}: split.count is {count} but the name is not NAME-00001-of-{count:05}.gguf",
                    parts[0].path.display()
                ))
            })?;
            if named as usize != count {
                return Err(GgufError::Format(format!(
                    "split.count is {count} but the file name says {named} parts"
                )));
            }
            let dir = parts[0]
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default();
            for i in 2..=count {
                let p = dir.join(format!("{stem}-{i:05}-of-{count:05}.gguf"));
                let part = GgufFile::open(&p)?;
                let no = part.metadata.get_usize("split.no")?;
                if no != i - 1 {
                    return Err(GgufError::Format(format!(
                        "{}: split.no is {no}, expected {}",
                        p.display(),
                        i - 1
                    )));
                }
                parts.push(part);
            }
        }
        Self::from_parts(parts)
    }

    fn first_part(path: &Path) -> PathBuf {
        match split_name(path) {
            Some((stem, part, count)) if part != 1 => {
                path.with_file_name(format!("{stem}-00001-of-{count:05}.gguf"))
            }
            _ => path.to_path_buf(),
        }
    }

    /// Indexes the tensors of already-opened parts (duplicate names across parts are an error).
    pub fn from_parts(parts: Vec<GgufFile>) -> Result<Model, GgufError> {
        let mut index = Vec::new();
        let mut by_name = std::collections::HashMap::new();
        for (p, part) in parts.iter().enumerate() {
            for (i, t) in part.tensors.iter().enumerate() {
                if by_name.insert(t.name.clone(), (p, i)).is_some() {
                    return Err(GgufError::Format(format!(
                        "duplicate tensor name {} across split parts",
                        t.name
                    )));
                }
                index.push((p, i));
            }
        }
        if let Some(want) = parts[0].metadata.get("split.tensors.count") {
            let want = want.as_integer().unwrap_or(-1);
            if want != index.len() as i128 {
                return Err(GgufError::Format(format!(
                    "split.tensors.count is {want} but the parts hold {} tensors",
                    index.len()
                )));
            }
        }
        let derived = parts
            .iter()
            .map(|p| p.tensors.iter().map(|_| Derived::new()).collect())
            .collect();
        Ok(Model {
            parts,
            index,
            by_name,
            derived,
        })
    }

    pub fn metadata(&self) -> &Metadata {
        &self.parts[0].metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, MetaError> {
        self.metadata().get_str("general.architecture")
    }

    /// All tensor records, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.index.iter().map(|&(p, i)| &self.parts[p].tensors[i])
    }

    pub fn tensor_count(&self) -> usize {
        self.index.len()
    }

    /// A zero-copy view of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let &(p, i) = self.by_name.get(name)?;
        let part = &self.parts[p];
        let info = &part.tensors[i];
        Some(TensorView {
            info,
            data: part.tensor_data(info),
            file: part,
            derived: &self.derived[p][i],
        })
    }

    /// Bytes held by derived copies (memory beyond the mapping).
    pub fn derived_bytes(&self) -> u64 {
        self.derived
            .iter()
            .flatten()
            .filter_map(|d| d.get().and_then(|b| b.as_ref()))
            .map(|b| b.len() as u64)
            .sum()
    }

    /// Total bytes of all parts.
    pub fn file_bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes().len() as u64).sum()
    }
}
