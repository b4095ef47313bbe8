//! Parsing one GGUF file: header, metadata and tensor infos are read from the memory map and
//! validated against the file before any tensor byte is touched. Every count is checked against
//! the bytes left before anything is allocated, so a hostile file cannot make us allocate more
//! than its own size.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian};
use ggrun_quants::GgmlType;
use memmap2::Mmap;

use super::value::{Array, Strings, Value, ValueType};
use super::{GgufError, Metadata, TensorInfo, DEFAULT_ALIGNMENT, MAX_DIMS};

const MAGIC: &[u8; 4] = b"GGUF";
/// Arrays nest at most this deep (real files use 1; the format allows more).
const MAX_ARRAY_DEPTH: usize = 8;
/// At most this many metadata pairs (real files have about a hundred).
const MAX_KEYS: u64 = 1 << 16;
/// At most this many tensors (real files have a few thousand).
const MAX_TENSORS: u64 = 1 << 20;

/// One parsed GGUF file: its mapping, metadata and tensor table.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Offset of the data section from the start of the file.
    pub data_offset: u64,
    pub alignment: u64,
    backing: Backing,
}

/// Where the file's bytes live.
enum Backing {
    /// Not attached yet (inside `parse`).
    None,
    Mapped(Mmap),
    /// Bytes already in memory (tests, fuzzing, generated models).
    Owned(Vec<u8>),
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        // Opening a FIFO would wait for a writer, a directory cannot be mapped: say so first.
        let meta = std::fs::metadata(path).map_err(|e| GgufError::io(path, e))?;
        if meta.is_dir() {
            return Err(GgufError::io(
                path,
                std::io::Error::other("a directory, not a GGUF file"),
            ));
        }
        if !meta.is_file() {
            return Err(GgufError::io(
                path,
                std::io::Error::other("not a regular file (a pipe or a device?)"),
            ));
        }
        let file = File::open(path).map_err(|e| GgufError::io(path, e))?;
        let len = file.metadata().map_err(|e| GgufError::io(path, e))?.len();
        if len == 0 {
            return Err(GgufError::Format(format!(
                "{}: empty (0 bytes), not a GGUF file",
                path.display()
            )));
        }
        // SAFETY: the mapping is read-only and private to this process; if another process
        // truncates the file while it is mapped, reads may fault (SIGBUS), which is the accepted
        // risk of mmap-based loaders (llama.cpp has the same). We never write through it.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| GgufError::io(path, e))?;
        // Metadata is copied out as it is parsed; the pages it was read from leave the resident
        // set as the parse goes, so a huge array never costs its size twice.
        let release = |r: std::ops::Range<usize>| release_pages(&mmap, r);
        let mut g = parse_with(&mmap, path, Some(&release))?;
        g.backing = Backing::Mapped(mmap);
        Ok(g)
    }

    /// Parses a file held in memory; `path` names it in messages.
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<GgufFile, GgufError> {
        let mut g = parse(&bytes, path)?;
        g.backing = Backing::Owned(bytes);
        Ok(g)
    }

    /// The whole file as bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::None => &[],
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }

    /// Tells the OS that this process no longer needs the pages lying wholly inside `range`
    /// (byte offsets into the file), so they leave its resident set; they stay in the page
    /// cache and fault back in, unchanged, if read again. Does nothing for owned bytes.
    pub fn release(&self, range: std::ops::Range<usize>) {
        if let Backing::Mapped(m) = &self.backing {
            release_pages(m, range);
        }
    }

    /// The bytes of tensor `t` (which must come from this file's table).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.bytes()[start..start + t.size_bytes as usize]
    }
}

/// Drops the pages lying wholly inside `range` from this process's resident set (see
/// [`GgufFile::release`]).
fn release_pages(m: &Mmap, range: std::ops::Range<usize>) {
    let page = 4096;
    let start = range.start.div_ceil(page) * page;
    let end = range.end.min(m.len()) / page * page;
    if end > start {
        // SAFETY: the mapping is read-only and file-backed, so MADV_DONTNEED only drops this
        // process's page-table entries: a later read faults the same bytes back in from the
        // file, and no reference into the mapping is invalidated. Failure is harmless (the
        // pages simply stay resident), so the result is ignored.
        let _ = unsafe {
            m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}

/// Bytes read between two releases of the pages behind the cursor.
const RELEASE_STEP: usize = 8 << 20;

/// A little-endian cursor over the mapped bytes that never reads past the end.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Where the pages already read from end, and how to drop them from memory (mapped files).
    released: usize,
    release: Option<&'a dyn Fn(std::ops::Range<usize>)>,
}

impl<'a> Cursor<'a> {
    /// Releases the pages read since the last release, every [`RELEASE_STEP`] bytes.
    fn release_read(&mut self) {
        if let Some(release) = self.release {
            if self.pos >= self.released + RELEASE_STEP {
                release(self.released..self.pos);
                self.released = self.pos;
            }
        }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Format(format!(
                "{what} at byte {} needs {n} bytes but the file ends after {}",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, GgufError> {
        Ok(LittleEndian::read_u16(self.take(2, what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(LittleEndian::read_u32(self.take(4, what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(LittleEndian::read_u64(self.take(8, what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// A name (key or tensor name): must be valid UTF-8.
    fn name(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError::Format(format!("{what} is not valid UTF-8")))
    }

    /// Checks that `count` items of at least `min` bytes each can fit in what is left.
    fn check_count(&self, count: u64, min: u64, what: &str) -> Result<(), GgufError> {
        match count.checked_mul(min) {
            Some(need) if need <= self.remaining() => Ok(()),
            _ => Err(GgufError::Format(format!(
                "{what}: count {count} cannot fit in the {} bytes left in the file",
                self.remaining()
            ))),
        }
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> Result<Value, GgufError> {
        let w = key;
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(w)?),
            ValueType::I8 => Value::I8(self.u8(w)? as i8),
            ValueType::U16 => Value::U16(self.u16(w)?),
            ValueType::I16 => Value::I16(self.u16(w)? as i16),
            ValueType::U32 => Value::U32(self.u32(w)?),
            ValueType::I32 => Value::I32(self.u32(w)? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32(w)?)),
            ValueType::Bool => match self.u8(w)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::Format(format!(
                        "{key}: bool byte is {b}, not 0 or 1"
                    )))
                }
            },
            ValueType::String => Value::String(self.string(w)?),
            ValueType::U64 => Value::U64(self.u64(w)?),
            ValueType::I64 => Value::I64(self.u64(w)? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64(w)?)),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Format(format!(
                        "{key}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let id = self.u32(w)?;
                let et = ValueType::from_id(id).ok_or_else(|| {
                    GgufError::Format(format!("{key}: unknown array element type {id}"))
                })?;
                let count = self.u64(w)?;
                Value::Array(self.array(et, count, key, depth)?)
            }
        })
    }

    /// The `count` elements of an array of `et`, each kind in a vector of its own: no more
    /// memory than the file gives them, but for arrays of arrays, which are checked against
    /// their size in memory (no real file has them; a hostile one could use their 12-byte
    /// headers to make us allocate 32 bytes each).
    fn array(
        &mut self,
        et: ValueType,
        count: u64,
        key: &str,
        depth: usize,
    ) -> Result<Array, GgufError> {
        let min = match et {
            ValueType::Array => std::mem::size_of::<Array>() as u64,
            t => t.min_size(),
        };
        self.check_count(count, min, key)?;
        let n = count as usize;
        // Fixed-size elements are read in chunks, releasing the pages behind them as they go.
        macro_rules! plain {
            ($variant:ident, $t:ty, $read:expr) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                let mut v: Vec<$t> = Vec::with_capacity(n);
                while v.len() < n {
                    let k = (n - v.len()).min(RELEASE_STEP / SIZE);
                    let bytes = self.take((k * SIZE) as u64, key)?;
                    v.extend(bytes.chunks_exact(SIZE).map($read));
                    self.release_read();
                }
                Array::$variant(v)
            }};
        }
        Ok(match et {
            ValueType::U8 => plain!(U8, u8, |b| b[0]),
            ValueType::I8 => plain!(I8, i8, |b| b[0] as i8),
            ValueType::U16 => plain!(U16, u16, LittleEndian::read_u16),
            ValueType::I16 => plain!(I16, i16, LittleEndian::read_i16),
            ValueType::U32 => plain!(U32, u32, LittleEndian::read_u32),
            ValueType::I32 => plain!(I32, i32, LittleEndian::read_i32),
            ValueType::F32 => plain!(F32, f32, LittleEndian::read_f32),
            ValueType::U64 => plain!(U64, u64, LittleEndian::read_u64),
            ValueType::I64 => plain!(I64, i64, LittleEndian::read_i64),
            ValueType::F64 => plain!(F64, f64, LittleEndian::read_f64),
            ValueType::Bool => {
                let Array::U8(bytes) = plain!(U8, u8, |b| b[0]) else {
                    unreachable!("a u8 array")
                };
                if let Some(b) = bytes.iter().find(|&&b| b > 1) {
                    return Err(GgufError::Format(format!(
                        "{key}: bool byte is {b}, not 0 or 1"
                    )));
                }
                Array::Bool(bytes.iter().map(|&b| b == 1).collect())
            }
            ValueType::String => {
                let mut v = Strings::with_capacity(n);
                for _ in 0..n {
                    let len = self.u64(key)?;
                    v.push(&String::from_utf8_lossy(self.take(len, key)?));
                    self.release_read();
                }
                Array::String(v)
            }
            ValueType::Array => {
                if depth + 1 >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Format(format!(
                        "{key}: arrays nested deeper than {MAX_ARRAY_DEPTH}"
                    )));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = self.u32(key)?;
                    let et = ValueType::from_id(id).ok_or_else(|| {
                        GgufError::Format(format!("{key}: unknown array element type {id}"))
                    })?;
                    let count = self.u64(key)?;
                    v.push(self.array(et, count, key, depth + 1)?);
                }
                Array::Array(v)
            }
        })
    }
}

/// Parses GGUF bytes (the whole file) into a table with no bytes attached (use
/// [`GgufFile::open`] or [`GgufFile::from_bytes`] to read tensors). `path` is used in messages.
pub fn parse(buf: &[u8], path: &Path) -> Result<GgufFile, GgufError> {
    parse_with(buf, path, None)
}

/// [`parse`], releasing the pages behind the cursor with `release` as it reads.
fn parse_with(
    buf: &[u8],
    path: &Path,
    release: Option<&dyn Fn(std::ops::Range<usize>)>,
) -> Result<GgufFile, GgufError> {
    let mut c = Cursor {
        buf,
        pos: 0,
        released: 0,
        release,
    };
    let magic = c.take(4, "magic").map_err(|_| {
        GgufError::Format(format!(
            "file is {} bytes, too short for a GGUF header",
            buf.len()
        ))
    })?;
    if magic != MAGIC {
        return Err(GgufError::Format(format!(
            "not a GGUF file (magic {:02x?}, expected \"GGUF\")",
            magic
        )));
    }
    let version = c.u32("version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(GgufError::Format(
                "GGUF version 1 is obsolete and not supported".into(),
            ))
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(GgufError::Format(
                "big-endian GGUF files are not supported".into(),
            ))
        }
        v => {
            return Err(GgufError::Format(format!(
                "unsupported GGUF version {v} (expected 2 or 3)"
            )))
        }
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // A key-value pair takes at least 8 + 1 + 4 + 1 bytes, a tensor info 8 + 4 + 4 + 8.
    c.check_count(n_kv, 14, "metadata count")?;
    c.check_count(n_tensors, 24, "tensor count")?;
    // Far above any real file, and what keeps the tables' memory near the file's size (an entry
    // costs us more than its smallest form in a file).
    for (count, max, what) in [
        (n_kv, MAX_KEYS, "metadata keys"),
        (n_tensors, MAX_TENSORS, "tensors"),
    ] {
        if count > max {
            return Err(GgufError::Format(format!(
                "{count} {what} (at most {max} are read)"
            )));
        }
    }

    let mut metadata = Metadata::default();
    for i in 0..n_kv {
        let key = c.name(&format!("metadata key #{i}"))?;
        let id = c.u32(&key)?;
        let ty = ValueType::from_id(id)
            .ok_or_else(|| GgufError::Format(format!("{key}: unknown value type {id}")))?;
        let v = c.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), v).is_some() {
            return Err(GgufError::Format(format!("duplicate metadata key {key}")));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(Value::U32(a)) => {
            return Err(GgufError::Format(format!(
                "general.alignment: {a} is not a power of two"
            )))
        }
        Some(v) => {
            return Err(GgufError::Format(format!(
                "general.alignment: expected u32, found {}",
                v.type_description()
            )))
        }
    };

    let mut names = HashSet::new();
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.name(&format!("tensor name #{i}"))?;
        let n_dims = c.u32(&name)?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::Format(format!(
                "tensor {name}: {n_dims} dimensions (at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = c.u64(&name)?;
            if d > i64::MAX as u64 {
                return Err(GgufError::Format(format!(
                    "tensor {name}: dimension {d} is negative"
                )));
            }
            dims.push(d);
        }
        let type_id = c.u32(&name)?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| {
            GgufError::Format(format!("tensor {name}: unknown tensor type id {type_id}"))
        })?;
        let offset = c.u64(&name)?;
        let info = TensorInfo::new(name, dims, ty, offset)?;
        if !names.insert(info.name.clone()) {
            return Err(GgufError::Format(format!(
                "duplicate tensor name {}",
                info.name
            )));
        }
        tensors.push(info);
    }

    let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
    if !tensors.is_empty() && data_offset > buf.len() as u64 {
        return Err(GgufError::Format(format!(
            "the data section would start at byte {data_offset}, past the end of the file ({} bytes)",
            buf.len()
        )));
    }
    let data_len = (buf.len() as u64).saturating_sub(data_offset);
    validate_layout(&tensors, alignment, data_len)?;
    Ok(GgufFile {
        path: path.to_path_buf(),
        version,
        metadata,
        tensors,
        data_offset,
        alignment,
        backing: Backing::None,
    })
}

/// Offsets aligned, every tensor inside the data section, no two overlapping.
fn validate_layout(tensors: &[TensorInfo], alignment: u64, data_len: u64) -> Result<(), GgufError> {
    let mut spans: BTreeMap<u64, (u64, &str)> = BTreeMap::new();
    for t in tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::Format(format!(
                "tensor {}: offset {} is not a multiple of the alignment {alignment}",
                t.name, t.offset
            )));
        }
        let end = t.offset.checked_add(t.size_bytes).filter(|e| *e <= data_len).ok_or_else(|| {
            GgufError::Format(format!(
                "tensor {}: bytes {}..{} lie past the end of the data section ({data_len} bytes; file truncated?)",
                t.name,
                t.offset,
                t.offset as u128 + t.size_bytes as u128
            ))
        })?;
        if t.size_bytes == 0 {
            continue;
        }
        // The span starting last before `end` is the only one that can overlap, since the
        // spans already accepted do not overlap one another.
        if let Some((_, &(e, other))) = spans.range(..end).next_back() {
            if e > t.offset {
                return Err(GgufError::Format(format!(
                    "tensors {other} and {} overlap in the file",
                    t.name
                )));
            }
        }
        spans.insert(t.offset, (end, &t.name));
    }
    Ok(())
}
