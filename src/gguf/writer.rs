//! Writing GGUF files (version 3): metadata of every value type and aligned tensor data. Used by
//! tests (the hostile-file corpus starts from valid files it writes) and by the synthetic-model
//! generator.

use std::io::Write;
use std::path::Path;

use byteorder::{LittleEndian, WriteBytesExt};
use ggrun_quants::GgmlType;

use super::value::{Array, Value};
use super::DEFAULT_ALIGNMENT;

/// Bytes produced when the file is written (large generated tensors are never all in memory).
pub type LazyData = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

enum Data {
    Bytes(Vec<u8>),
    Lazy(LazyData),
}

/// Collects metadata and tensors, then writes them out in one go.
pub struct GgufWriter {
    pub version: u32,
    pub alignment: u64,
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Data)>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.write_u64::<LittleEndian>(s.len() as u64).unwrap();
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.write_u16::<LittleEndian>(*x).unwrap(),
        Value::I16(x) => out.write_i16::<LittleEndian>(*x).unwrap(),
        Value::U32(x) => out.write_u32::<LittleEndian>(*x).unwrap(),
        Value::I32(x) => out.write_i32::<LittleEndian>(*x).unwrap(),
        Value::F32(x) => out.write_f32::<LittleEndian>(*x).unwrap(),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_str(out, s),
        Value::Array(a) => put_array(out, a),
        Value::U64(x) => out.write_u64::<LittleEndian>(*x).unwrap(),
        Value::I64(x) => out.write_i64::<LittleEndian>(*x).unwrap(),
        Value::F64(x) => out.write_f64::<LittleEndian>(*x).unwrap(),
    }
}

fn put_array(out: &mut Vec<u8>, a: &Array) {
    out.write_u32::<LittleEndian>(a.elem_type() as u32).unwrap();
    out.write_u64::<LittleEndian>(a.len() as u64).unwrap();
    match a {
        Array::U8(v) => out.extend_from_slice(v),
        Array::I8(v) => out.extend(v.iter().map(|&x| x as u8)),
        Array::U16(v) => v
            .iter()
            .for_each(|&x| out.write_u16::<LittleEndian>(x).unwrap()),
        Array::I16(v) => v
            .iter()
            .for_each(|&x| out.write_i16::<LittleEndian>(x).unwrap()),
        Array::U32(v) => v
            .iter()
            .for_each(|&x| out.write_u32::<LittleEndian>(x).unwrap()),
        Array::I32(v) => v
            .iter()
            .for_each(|&x| out.write_i32::<LittleEndian>(x).unwrap()),
        Array::F32(v) => v
            .iter()
            .for_each(|&x| out.write_f32::<LittleEndian>(x).unwrap()),
        Array::U64(v) => v
            .iter()
            .for_each(|&x| out.write_u64::<LittleEndian>(x).unwrap()),
        Array::I64(v) => v
            .iter()
            .for_each(|&x| out.write_i64::<LittleEndian>(x).unwrap()),
        Array::F64(v) => v
            .iter()
            .for_each(|&x| out.write_f64::<LittleEndian>(x).unwrap()),
        Array::Bool(v) => out.extend(v.iter().map(|&x| x as u8)),
        Array::String(v) => v.iter().for_each(|s| put_str(out, s)),
        Array::Array(v) => v.iter().for_each(|a| put_array(out, a)),
    }
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Adds (or, for a key already present, appends a duplicate of) a metadata pair.
    pub fn kv(&mut self, key: &str, v: Value) -> &mut Self {
        self.metadata.push((key.to_string(), v));
        self
    }

    /// Adds a tensor; `data` must be its exact bytes (checked when written).
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, Data::Bytes(data)));
        self
    }

    /// Adds a tensor whose bytes `make` produces while the file is written.
    pub fn tensor_lazy(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        make: LazyData,
    ) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty, Data::Lazy(make)));
        self
    }

    fn size_of(name: &str, dims: &[u64], ty: GgmlType) -> u64 {
        let row = ty.row_bytes(dims[0]).unwrap_or_else(|| {
            panic!("tensor {name}: row of {} is not whole {ty} blocks", dims[0])
        });
        row * dims[1..].iter().product::<u64>()
    }

    /// Adds an F32 tensor from values.
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, GgmlType::F32, data)
    }

    /// The file as bytes. Panics if a tensor's data does not match its shape (a programming
    /// error in the caller, never input-dependent).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to memory");
        out
    }

    /// Streams the file to `w`.
    pub fn write_to<W: Write>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.header()?)?;
        let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        for (name, dims, ty, data) in &self.tensors {
            let made;
            let bytes = match data {
                Data::Bytes(b) => b,
                Data::Lazy(f) => {
                    made = f();
                    &made
                }
            };
            assert_eq!(
                Self::size_of(name, dims, *ty),
                bytes.len() as u64,
                "tensor {name}: data size does not match shape"
            );
            w.write_all(bytes)?;
            let pad = align(bytes.len() as u64) - bytes.len() as u64;
            w.write_all(&vec![0u8; pad as usize])?;
        }
        Ok(())
    }

    /// The header: magic, counts, metadata, the tensor table, padded to the alignment.
    fn header(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.write_u32::<LittleEndian>(self.version)?;
        out.write_u64::<LittleEndian>(self.tensors.len() as u64)?;
        out.write_u64::<LittleEndian>(self.metadata.len() as u64)?;
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.write_u32::<LittleEndian>(v.value_type() as u32)?;
            put_value(&mut out, v);
        }
        let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0u64;
        for (name, dims, ty, _) in &self.tensors {
            put_str(&mut out, name);
            out.write_u32::<LittleEndian>(dims.len() as u32)?;
            for d in dims {
                out.write_u64::<LittleEndian>(*d)?;
            }
            out.write_u32::<LittleEndian>(ty.id())?;
            out.write_u64::<LittleEndian>(offset)?;
            offset = align(offset + Self::size_of(name, dims, *ty));
        }
        out.resize(align(out.len() as u64) as usize, 0);
        Ok(out)
    }

    /// The file's header (metadata and tensor table) with its data left as a hole: the file
    /// has its full size, and no tensor is made (for tools that read only the header).
    pub fn write_skeleton(&self, path: &Path) -> std::io::Result<()> {
        let align = |x: u64| x.div_ceil(self.alignment) * self.alignment;
        let data: u64 = self
            .tensors
            .iter()
            .map(|(name, dims, ty, _)| align(Self::size_of(name, dims, *ty)))
            .sum();
        let out = self.header()?;
        let mut f = std::fs::File::create(path)?;
        f.write_all(&out)?;
        f.set_len(out.len() as u64 + data)
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        self.write_to(&mut f)?;
        f.flush()
    }
}

/// Shorthand constructors for tests and generators.
impl Value {
    pub fn str(s: &str) -> Value {
        Value::String(s.to_string())
    }
    pub fn strs<S: AsRef<str>>(items: &[S]) -> Value {
        Value::Array(Array::String(items.iter().collect()))
    }
    pub fn u32s(items: &[u32]) -> Value {
        Value::Array(Array::U32(items.to_vec()))
    }
    pub fn i32s(items: &[i32]) -> Value {
        Value::Array(Array::I32(items.to_vec()))
    }
    pub fn f32s(items: &[f32]) -> Value {
        Value::Array(Array::F32(items.to_vec()))
    }
}
