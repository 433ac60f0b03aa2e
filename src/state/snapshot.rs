//! Snapshots of the in-memory store: windows, profiles and idempotency
//! records written to one file and read back at start, so a restart keeps
//! the fraud memory.
//!
//! # Format (v1)
//!
//! All integers little-endian; `var` is LEB128, `zig` a zigzag LEB128 (i64),
//! `str` a `var` length and UTF-8 bytes.
//!
//! ```text
//! header   "RGSNAP\0\x1a"  version:u32  saved_at_ms:i64            20 bytes
//! section  tag:u8 (1 windows, 2 profiles, 3 requests)  clock:u64
//!          { 0x01 record }*  0x00                       (any number)
//! end      0xff
//! trailer  windows:u64 profiles:u64 requests:u64  body_len:u64
//!          checksum:u64  "RGSNAPOK"                                48 bytes
//! ```
//!
//! Every record starts with its key (`str`; a window key as its shared
//! prefix `sym` and the rest `str`) and its age (`var`, see below). `sym`,
//! `def`, `region` and `place` are back-references: written in full the
//! first time (`0` or `1` and the value), then as the `var` index of that
//! first time (see [`Enc`]); `time` is a `zig` from the header's time.
//!
//! ```text
//! window key  windows:var, each  def (sig:u64 span_ms:zig kind:u8), then
//!             series: n:var (bucket delta:zig, value:zig)*   (the first delta from the header time's bucket)
//!             distinct: n:var (value:u64, seen:time)*
//! profile     n:var (time delta:zig, region)*  flags:u8  [last point time lat:f64 lon:f64]  [last login time]
//! request     fingerprint:u64 created:time outcomes:u8 settled:u8, when settled:
//!             decision (request id only when it is not the key; reasons as syms),
//!             facts (user, ip, device, target as str; channel, product, currency as sym), place
//! ```
//!
//! `body_len` is the offset of the trailer; `checksum` covers every byte
//! before it (a 64-bit multiply-xorshift over 8-byte words: any change to one
//! word is always caught). A file whose end marker is missing is truncated,
//! one whose checksum, length or record counts disagree is corrupt, one with
//! another version is refused as such; each says so, naming the file.
//! Records carry each key's recency as an age against the section's clock,
//! so least-recently-used eviction picks the same keys after a restart.
//!
//! Writing goes to `FILE.tmp` in the same folder, buffered, then fsync,
//! rename over `FILE`, fsync of the folder: a crash leaves the old snapshot
//! or the new one, never half of one. Reading checks the end marker and the
//! checksum in a first pass before anything is loaded.
//!
//! The walk over the store (in `memory.rs`) holds one shard's read lock at a
//! time, so requests keep being served while a snapshot is written (one
//! touching the shard being walked waits for it: a few ms at a million
//! users). The snapshot is not one point in time across shards: a key touched
//! during the walk may be saved before or after the touch.

use std::collections::HashMap as StdHashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::profile::Profile;
use crate::decision::{Action, Decision, Reason};
use crate::geo::Location;
use crate::model::Facts;
use crate::state::kept::KeptFacts;

/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: [u8; 8] = *b"RGSNAP\0\x1a";
const END_MAGIC: [u8; 8] = *b"RGSNAPOK";
const HEADER_LEN: u64 = 20;
const TRAILER_LEN: u64 = 48;
const END_OF_SECTIONS: u8 = 0xff;
const RECORD: u8 = 1;
const END_OF_SECTION: u8 = 0;
const BUFFER: usize = 1 << 20;

/// What a snapshot holds, by kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Windows = 1,
    Profiles = 2,
    Requests = 3,
}

impl Section {
    fn from_tag(tag: u8) -> Option<Section> {
        Some(match tag {
            1 => Section::Windows,
            2 => Section::Profiles,
            3 => Section::Requests,
            _ => return None,
        })
    }

    fn index(self) -> usize {
        self as usize - 1
    }
}

/// What a save or a load moved, and how long it took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotStats {
    pub window_keys: u64,
    pub profiles: u64,
    pub idempotency_records: u64,
    pub bytes: u64,
    pub millis: u64,
    /// Records dropped on load to respect the store's caps.
    pub evicted: u64,
}

impl SnapshotStats {
    pub fn records(&self) -> u64 {
        self.window_keys + self.profiles + self.idempotency_records
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot {} is not a riskgate snapshot (wrong magic bytes)", path.display())]
    NotSnapshot { path: PathBuf },
    #[error("snapshot {} is format v{found}, this build reads v{FORMAT_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("snapshot {} is truncated ({len} bytes, {detail})", path.display())]
    Truncated {
        path: PathBuf,
        len: u64,
        detail: &'static str,
    },
    #[error("snapshot {} is corrupt ({detail})", path.display())]
    Corrupt { path: PathBuf, detail: String },
}

impl SnapshotError {
    /// The file does not exist (a first start).
    pub fn is_missing(&self) -> bool {
        matches!(self, SnapshotError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }

    /// The file was read but cannot be loaded: truncated, corrupt, not a
    /// snapshot or another version (as opposed to an I/O error).
    pub fn is_bad_file(&self) -> bool {
        !matches!(self, SnapshotError::Io { .. })
    }
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The checksum: a multiply-xorshift over little-endian 8-byte words, the
/// tail zero-padded, the length folded in. Each step is a bijection of the
/// state, so a change confined to one word always changes the result.
#[derive(Clone)]
struct Sum {
    h: u64,
    tail: [u8; 8],
    n: usize,
    len: u64,
}

impl Default for Sum {
    fn default() -> Self {
        Sum {
            h: 0xcbf2_9ce4_8422_2325,
            tail: [0; 8],
            n: 0,
            len: 0,
        }
    }
}

impl Sum {
    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.h ^= self.h >> 29;
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.n > 0 {
            let take = (8 - self.n).min(data.len());
            self.tail[self.n..self.n + take].copy_from_slice(&data[..take]);
            self.n += take;
            data = &data[take..];
            if self.n < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.tail));
            self.n = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in words.by_ref() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.n = rest.len();
    }

    fn finish(&self) -> u64 {
        let mut s = self.clone();
        if s.n > 0 {
            s.tail[s.n..].fill(0);
            s.word(u64::from_le_bytes(s.tail));
        }
        s.word(s.len);
        // A final avalanche (murmur3's fmix64).
        let mut h = s.h;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// A file that sums what passes through it.
struct Summing {
    file: File,
    sum: Sum,
}

impl Write for Summing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Encoding into a record buffer.
pub trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u64(&mut self, v: u64);
    fn put_var(&mut self, v: u64);
    fn put_i64(&mut self, v: i64);
    fn put_f64(&mut self, v: f64);
    fn put_str(&mut self, v: &str);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }

    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }

    fn put_var(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.push(v as u8);
    }

    fn put_i64(&mut self, v: i64) {
        self.put_var(((v << 1) ^ (v >> 63)) as u64);
    }

    fn put_f64(&mut self, v: f64) {
        self.put_u64(v.to_bits());
    }

    fn put_str(&mut self, v: &str) {
        self.put_var(v.len() as u64);
        self.extend_from_slice(v.as_bytes());
    }
}

/// The encoder's tables: a fast hash (the keys come from our own store).
type HashMap<K, V> = StdHashMap<K, V, foldhash::fast::RandomState>;

/// Most entries of each back-reference table (strings, places, window
/// definitions, regions); past it, new values are written out in full.
const TABLE_MAX: usize = 1 << 16;

/// Encodes one record. Values that repeat across records (channels, pack
/// versions, rule ids and messages, locations, window definitions, regions)
/// are written in full once, then as back-references; times are relative to
/// the snapshot's own time, so they are short.
pub struct Enc {
    pub b: Vec<u8>,
    base: i64,
    strs: HashMap<Box<str>, u32>,
    places: HashMap<u64, (u32, Location)>,
    /// Places written in full so far (the reader's table length).
    places_written: usize,
    defs: HashMap<(u64, i64, u8), u32>,
    regions: HashMap<u64, u32>,
}

/// Writes `var` index + 1 when `key` was written before and returns true;
/// otherwise writes `0`, remembers `key` and returns false (the caller then
/// writes the value out).
fn back_ref<K: std::hash::Hash + Eq>(table: &mut HashMap<K, u32>, key: K, b: &mut Vec<u8>) -> bool {
    if let Some(&i) = table.get(&key) {
        b.put_var(u64::from(i) + 1);
        return true;
    }
    b.put_var(0);
    if table.len() < TABLE_MAX {
        let n = table.len() as u32;
        table.insert(key, n);
    }
    false
}

impl Enc {
    fn new(base: i64) -> Enc {
        Enc {
            b: Vec::with_capacity(4096),
            base,
            strs: HashMap::default(),
            places: HashMap::default(),
            places_written: 0,
            defs: HashMap::default(),
            regions: HashMap::default(),
        }
    }

    /// The time times are written relative to (the snapshot's).
    pub fn base(&self) -> i64 {
        self.base
    }

    /// A string many records share: `0 str` the first time, then `var`
    /// index + 1.
    pub fn sym(&mut self, s: &str) {
        if let Some(&i) = self.strs.get(s) {
            self.b.put_var(u64::from(i) + 1);
            return;
        }
        self.b.put_var(0);
        self.b.put_str(s);
        if self.strs.len() < TABLE_MAX {
            let n = self.strs.len() as u32;
            self.strs.insert(s.into(), n);
        }
    }

    /// A time in ms, as `zig` from the snapshot's time.
    pub fn time(&mut self, ms: i64) {
        self.b.put_i64(ms.wrapping_sub(self.base));
    }

    /// A window definition: signature, span, kind (`var` reference or
    /// `0 sig:u64 span:zig kind:u8`).
    pub fn def(&mut self, sig: u64, span_ms: i64, kind: u8) {
        if !back_ref(&mut self.defs, (sig, span_ms, kind), &mut self.b) {
            self.b.put_u64(sig);
            self.b.put_i64(span_ms);
            self.b.put_u8(kind);
        }
    }

    /// A region key (`var` reference or `0 u64`).
    pub fn region(&mut self, key: u64) {
        if !back_ref(&mut self.regions, key, &mut self.b) {
            self.b.put_u64(key);
        }
    }

    /// An optional location: `0` none, `1` and the location in full, or
    /// `var` index + 2.
    pub fn place(&mut self, l: Option<&Location>) {
        let Some(l) = l else {
            self.b.put_var(0);
            return;
        };
        let h = super::fnv1a(&[
            l.country.as_bytes(),
            l.region.as_bytes(),
            l.city.as_bytes(),
            &l.latitude.to_bits().to_le_bytes(),
            &l.longitude.to_bits().to_le_bytes(),
            &l.region_key.to_le_bytes(),
        ]);
        if let Some((i, known)) = self.places.get(&h) {
            if known == l {
                self.b.put_var(u64::from(*i) + 2);
                return;
            }
        }
        self.b.put_var(1);
        self.sym(&l.country);
        self.sym(&l.region);
        self.sym(&l.city);
        self.b.put_f64(l.latitude);
        self.b.put_f64(l.longitude);
        self.b.put_u64(l.region_key);
        // Every place written in full takes the next index, as the reader
        // counts them, even one that cannot be found by its hash.
        if self.places_written < TABLE_MAX {
            let i = self.places_written as u32;
            self.places.entry(h).or_insert_with(|| (i, l.clone()));
            self.places_written += 1;
        }
    }
}

/// Writes one snapshot file: `FILE.tmp`, then fsync and rename over `FILE`.
/// Dropped before [`Writer::finish`], it removes the temp file.
pub struct Writer {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<Summing>>,
    enc: Enc,
    written: u64,
    counts: [u64; 3],
    section: Option<Section>,
}

impl Writer {
    pub fn create(path: &Path) -> Result<Writer, SnapshotError> {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let tmp = path.with_file_name(name);
        let file = File::create(&tmp).map_err(io_error(&tmp))?;
        let now = crate::now_ms();
        let mut w = Writer {
            path: path.to_path_buf(),
            tmp,
            out: Some(BufWriter::with_capacity(
                BUFFER,
                Summing {
                    file,
                    sum: Sum::default(),
                },
            )),
            enc: Enc::new(now),
            written: 0,
            counts: [0; 3],
            section: None,
        };
        let mut head = Vec::with_capacity(HEADER_LEN as usize);
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        head.extend_from_slice(&now.to_le_bytes());
        w.write(&head)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let out = self.out.as_mut().ok_or_else(|| SnapshotError::Io {
            path: self.tmp.clone(),
            source: io::Error::other("snapshot writer already finished"),
        })?;
        out.write_all(bytes).map_err(io_error(&self.tmp))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Starts a section of records; `clock` is the map's recency clock.
    pub fn section(&mut self, section: Section, clock: u64) -> Result<(), SnapshotError> {
        if self.section.take().is_some() {
            self.write(&[END_OF_SECTION])?;
        }
        let mut head = [0u8; 9];
        head[0] = section as u8;
        head[1..].copy_from_slice(&clock.to_le_bytes());
        self.write(&head)?;
        self.section = Some(section);
        Ok(())
    }

    /// Appends one record of the current section, encoded by `encode`.
    pub fn record(&mut self, encode: impl FnOnce(&mut Enc)) -> Result<(), SnapshotError> {
        let Some(section) = self.section else {
            return Err(SnapshotError::Io {
                path: self.tmp.clone(),
                source: io::Error::other("snapshot record outside a section"),
            });
        };
        self.enc.b.clear();
        self.enc.b.push(RECORD);
        encode(&mut self.enc);
        let rec = std::mem::take(&mut self.enc.b);
        let written = self.write(&rec);
        self.enc.b = rec;
        written?;
        self.counts[section.index()] += 1;
        Ok(())
    }

    /// Ends the file, syncs it and renames it over the snapshot; returns
    /// the record counts and the file's size.
    pub fn finish(mut self) -> Result<SnapshotStats, SnapshotError> {
        if self.section.take().is_some() {
            self.write(&[END_OF_SECTION])?;
        }
        self.write(&[END_OF_SECTIONS])?;
        let body_len = self.written;
        let mut tail = Vec::with_capacity(32);
        for n in self.counts {
            tail.put_u64(n);
        }
        tail.put_u64(body_len);
        self.write(&tail)?;
        let out = self.out.take().ok_or_else(|| SnapshotError::Io {
            path: self.tmp.clone(),
            source: io::Error::other("snapshot writer already finished"),
        })?;
        if let Err(e) = seal(out, &self.tmp, &self.path) {
            let _ = std::fs::remove_file(&self.tmp);
            return Err(e);
        }
        Ok(SnapshotStats {
            window_keys: self.counts[0],
            profiles: self.counts[1],
            idempotency_records: self.counts[2],
            bytes: body_len + TRAILER_LEN,
            ..SnapshotStats::default()
        })
    }
}

/// Appends the checksum and the end marker, syncs, renames `tmp` over
/// `path` and syncs the folder.
fn seal(out: BufWriter<Summing>, tmp: &Path, path: &Path) -> Result<(), SnapshotError> {
    let mut summing = out.into_inner().map_err(|e| SnapshotError::Io {
        path: tmp.to_path_buf(),
        source: e.into_error(),
    })?;
    let mut end = Vec::with_capacity(16);
    end.put_u64(summing.sum.finish());
    end.extend_from_slice(&END_MAGIC);
    summing.file.write_all(&end).map_err(io_error(tmp))?;
    summing.file.sync_all().map_err(io_error(tmp))?;
    drop(summing);
    std::fs::rename(tmp, path).map_err(io_error(path))?;
    sync_dir(path).map_err(io_error(path))
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.out.is_some() {
            self.out = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Makes a rename in `path`'s folder durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Reads one snapshot file. [`Reader::open`] checks the header, the end
/// marker and the checksum before a single record is handed out.
pub struct Reader {
    path: PathBuf,
    src: BufReader<File>,
    len: u64,
    /// Body bytes not read yet.
    left: u64,
    expect: [u64; 3],
    seen: [u64; 3],
    section: Option<Section>,
    /// The snapshot's time (see [`Enc::time`]) and back-reference tables.
    base: i64,
    strs: Vec<Arc<str>>,
    places: Vec<Arc<Location>>,
    defs: Vec<(u64, i64, u8)>,
    regions: Vec<u64>,
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, SnapshotError> {
        let err = io_error(path);
        let mut file = File::open(path).map_err(&err)?;
        let len = file.metadata().map_err(&err)?.len();
        let truncated = |detail| SnapshotError::Truncated {
            path: path.to_path_buf(),
            len,
            detail,
        };
        let corrupt = |detail: &str| SnapshotError::Corrupt {
            path: path.to_path_buf(),
            detail: detail.to_string(),
        };
        let mut head = [0u8; HEADER_LEN as usize];
        let got = read_up_to(&mut file, &mut head).map_err(&err)?;
        let magic = got.min(MAGIC.len());
        if head[..magic] != MAGIC[..magic] {
            return Err(SnapshotError::NotSnapshot {
                path: path.to_path_buf(),
            });
        }
        if got < HEADER_LEN as usize {
            return Err(truncated("shorter than the header"));
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&head[8..12]);
        let found = u32::from_le_bytes(v);
        let base = le_u64(&head[12..]) as i64;
        if found != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                path: path.to_path_buf(),
                found,
            });
        }
        if len < HEADER_LEN + 1 + TRAILER_LEN {
            return Err(truncated("the end marker is missing"));
        }
        let mut trailer = [0u8; TRAILER_LEN as usize];
        file.seek(SeekFrom::Start(len - TRAILER_LEN))
            .map_err(&err)?;
        file.read_exact(&mut trailer).map_err(&err)?;
        if trailer[40..] != END_MAGIC {
            return Err(truncated("the end marker is missing"));
        }
        let expect = [
            le_u64(&trailer[0..]),
            le_u64(&trailer[8..]),
            le_u64(&trailer[16..]),
        ];
        let body_len = le_u64(&trailer[24..]);
        let checksum = le_u64(&trailer[32..]);

        // First pass: the checksum over everything before it.
        file.seek(SeekFrom::Start(0)).map_err(&err)?;
        let mut sum = Sum::default();
        let mut buf = vec![0u8; BUFFER];
        let mut left = len - 16;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = read_up_to(&mut file, &mut buf[..want]).map_err(&err)?;
            if n == 0 {
                return Err(truncated("the file shrank while it was read"));
            }
            sum.update(&buf[..n]);
            left -= n as u64;
        }
        if sum.finish() != checksum {
            return Err(corrupt("checksum mismatch"));
        }
        if body_len != len - TRAILER_LEN {
            return Err(corrupt("length mismatch"));
        }
        file.seek(SeekFrom::Start(HEADER_LEN)).map_err(&err)?;
        Ok(Reader {
            path: path.to_path_buf(),
            src: BufReader::with_capacity(BUFFER, file),
            len,
            left: body_len - HEADER_LEN,
            expect,
            seen: [0; 3],
            section: None,
            base,
            strs: Vec::new(),
            places: Vec::new(),
            defs: Vec::new(),
            regions: Vec::new(),
        })
    }

    /// A "corrupt" error naming the file.
    pub fn corrupt(&self, detail: impl Into<String>) -> SnapshotError {
        SnapshotError::Corrupt {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    pub fn take(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        if (buf.len() as u64) > self.left {
            return Err(self.corrupt("a record runs past the end"));
        }
        self.left -= buf.len() as u64;
        self.src.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                SnapshotError::Truncated {
                    path: self.path.clone(),
                    len: self.len,
                    detail: "the file shrank while it was read",
                }
            } else {
                io_error(&self.path)(e)
            }
        })
    }

    /// The next section and its clock, or `None` after the last one.
    pub fn section(&mut self) -> Result<Option<(Section, u64)>, SnapshotError> {
        if self.section.is_some() {
            return Err(self.corrupt("a section was not read to its end"));
        }
        let tag = self.u8()?;
        if tag == END_OF_SECTIONS {
            return Ok(None);
        }
        let section = Section::from_tag(tag)
            .ok_or_else(|| self.corrupt(format!("unknown section tag {tag}")))?;
        let clock = self.u64()?;
        self.section = Some(section);
        Ok(Some((section, clock)))
    }

    /// True when another record of the current section follows.
    pub fn record(&mut self) -> Result<bool, SnapshotError> {
        let Some(section) = self.section else {
            return Err(self.corrupt("a record outside a section"));
        };
        match self.u8()? {
            RECORD => {
                self.seen[section.index()] += 1;
                Ok(true)
            }
            END_OF_SECTION => {
                self.section = None;
                Ok(false)
            }
            other => Err(self.corrupt(format!("unknown record marker {other}"))),
        }
    }

    /// Checks that the body was read to its end and the record counts match
    /// the trailer's.
    pub fn finish(self) -> Result<(), SnapshotError> {
        if self.left != 0 {
            return Err(self.corrupt(format!("{} bytes after the last section", self.left)));
        }
        if self.seen != self.expect {
            return Err(self.corrupt(format!(
                "record counts {:?} differ from the trailer's {:?}",
                self.seen, self.expect
            )));
        }
        Ok(())
    }

    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        let mut b = [0u8; 1];
        self.take(&mut b)?;
        Ok(b[0])
    }

    pub fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn var(&mut self) -> Result<u64, SnapshotError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.corrupt("a number longer than 10 bytes"))
    }

    pub fn i64(&mut self) -> Result<i64, SnapshotError> {
        let v = self.var()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    pub fn f64(&mut self) -> Result<f64, SnapshotError> {
        Ok(f64::from_bits(self.u64()?))
    }

    /// A count of items, each at least `min_bytes` long: refused when they
    /// could not fit in what is left of the body (no huge allocations).
    pub fn count(&mut self, min_bytes: u64) -> Result<usize, SnapshotError> {
        let n = self.var()?;
        if n.saturating_mul(min_bytes.max(1)) > self.left {
            return Err(self.corrupt("a length runs past the end"));
        }
        Ok(n as usize)
    }

    pub fn string(&mut self) -> Result<String, SnapshotError> {
        let n = self.count(1)?;
        let mut b = vec![0u8; n];
        self.take(&mut b)?;
        String::from_utf8(b).map_err(|_| self.corrupt("a string is not UTF-8"))
    }

    /// A back-reference (`var` index + `offset`) into `table`.
    fn entry<T: Clone>(&self, table: &[T], v: u64, offset: u64) -> Result<T, SnapshotError> {
        usize::try_from(v - offset)
            .ok()
            .and_then(|i| table.get(i))
            .cloned()
            .ok_or_else(|| self.corrupt("a back-reference to nothing"))
    }

    /// See [`Enc::sym`].
    pub fn sym(&mut self) -> Result<Arc<str>, SnapshotError> {
        let v = self.var()?;
        if v > 0 {
            return self.entry(&self.strs, v, 1);
        }
        let s: Arc<str> = Arc::from(self.string()?);
        if self.strs.len() < TABLE_MAX {
            self.strs.push(s.clone());
        }
        Ok(s)
    }

    /// See [`Enc::time`].
    pub fn time(&mut self) -> Result<i64, SnapshotError> {
        Ok(self.i64()?.wrapping_add(self.base))
    }

    pub fn base(&self) -> i64 {
        self.base
    }

    /// See [`Enc::def`].
    pub fn def(&mut self) -> Result<(u64, i64, u8), SnapshotError> {
        let v = self.var()?;
        if v > 0 {
            return self.entry(&self.defs, v, 1);
        }
        let def = (self.u64()?, self.i64()?, self.u8()?);
        if self.defs.len() < TABLE_MAX {
            self.defs.push(def);
        }
        Ok(def)
    }

    /// See [`Enc::region`].
    pub fn region(&mut self) -> Result<u64, SnapshotError> {
        let v = self.var()?;
        if v > 0 {
            return self.entry(&self.regions, v, 1);
        }
        let key = self.u64()?;
        if self.regions.len() < TABLE_MAX {
            self.regions.push(key);
        }
        Ok(key)
    }

    /// See [`Enc::place`].
    pub fn place(&mut self) -> Result<Option<Arc<Location>>, SnapshotError> {
        match self.var()? {
            0 => Ok(None),
            1 => {
                let l = Arc::new(Location {
                    country: self.sym()?.to_string(),
                    region: self.sym()?.to_string(),
                    city: self.sym()?.to_string(),
                    latitude: self.f64()?,
                    longitude: self.f64()?,
                    region_key: self.u64()?,
                });
                if self.places.len() < TABLE_MAX {
                    self.places.push(l.clone());
                }
                Ok(Some(l))
            }
            v => self.entry(&self.places, v, 2).map(Some),
        }
    }
}

fn get_action(r: &mut Reader) -> Result<Action, SnapshotError> {
    let code = r.u8()?;
    Action::from_code(code).ok_or_else(|| r.corrupt(format!("unknown action {code}")))
}

/// Facts: the high-cardinality fields as strings, the rest as shared ones.
pub fn put_facts(e: &mut Enc, f: &KeptFacts<'_>) {
    let [user_id, ip_text, device_id, target, channel, product, currency] = f.texts();
    for s in [user_id, ip_text, device_id, target] {
        e.b.put_str(s);
    }
    for s in [channel, product, currency] {
        e.sym(s);
    }
    e.b.put_i64(f.amount);
    e.time(f.timestamp_ms);
}

pub fn get_facts(r: &mut Reader) -> Result<Facts, SnapshotError> {
    Ok(Facts {
        user_id: r.string()?,
        ip_text: r.string()?,
        device_id: r.string()?,
        target: r.string()?,
        channel: r.sym()?.to_string(),
        product: r.sym()?.to_string(),
        currency: r.sym()?.to_string(),
        amount: r.i64()?,
        timestamp_ms: r.time()?,
    })
}

fn put_reasons(e: &mut Enc, reasons: &[Reason]) {
    e.b.put_var(reasons.len() as u64);
    for r in reasons {
        e.sym(&r.rule_id);
        e.sym(&r.code);
        e.sym(&r.message);
        e.b.put_u8(r.action.code());
        e.b.put_i64(r.score);
        e.sym(&r.challenge);
    }
}

fn get_reasons(r: &mut Reader) -> Result<Vec<Reason>, SnapshotError> {
    // A reason is at least 6 bytes: four references, action, score.
    let n = r.count(6)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Reason {
            rule_id: r.sym()?,
            code: r.sym()?.to_string(),
            message: r.sym()?.to_string(),
            action: get_action(r)?,
            score: r.i64()?,
            challenge: r.sym()?.to_string(),
        });
    }
    Ok(out)
}

/// A decision; its request id is left out when it is the record's key.
pub fn put_decision(e: &mut Enc, d: &Decision, key: &str) {
    e.b.put_str(if d.request_id == key {
        ""
    } else {
        &d.request_id
    });
    e.b.put_u8(d.action.code());
    e.sym(&d.challenge);
    e.b.put_i64(d.score);
    put_reasons(e, &d.reasons);
    put_reasons(e, &d.shadow_reasons);
    e.sym(&d.ruleset_version);
}

pub fn get_decision(r: &mut Reader, key: &str) -> Result<Decision, SnapshotError> {
    let mut request_id = r.string()?;
    if request_id.is_empty() {
        request_id = key.to_string();
    }
    Ok(Decision {
        request_id,
        action: get_action(r)?,
        challenge: r.sym()?.to_string(),
        score: r.i64()?,
        reasons: get_reasons(r)?,
        shadow_reasons: get_reasons(r)?,
        ruleset_version: r.sym()?,
    })
}

/// A profile: its recent located events (times as deltas, regions as
/// references), then what it knows of the last located event and login.
pub fn put_profile(e: &mut Enc, p: &Profile) {
    let parts = p.parts();
    e.b.put_var(parts.recent.len() as u64);
    let mut prev = e.base();
    for &(t, region) in parts.recent {
        e.b.put_i64(t.wrapping_sub(prev));
        e.region(region);
        prev = t;
    }
    let flags = u8::from(parts.last_point.is_some())
        | u8::from(parts.last_login.is_some()) << 1
        | u8::from(parts.last_login.is_some_and(|(_, new)| new)) << 2;
    e.b.put_u8(flags);
    if let Some((t, lat, lon)) = parts.last_point {
        e.time(t);
        e.b.put_f64(lat);
        e.b.put_f64(lon);
    }
    if let Some((t, _)) = parts.last_login {
        e.time(t);
    }
}

pub fn get_profile(r: &mut Reader) -> Result<Profile, SnapshotError> {
    let n = r.count(2)?;
    let mut recent = Vec::with_capacity(n);
    let mut prev = r.base();
    for _ in 0..n {
        let t = prev.wrapping_add(r.i64()?);
        recent.push((t, r.region()?));
        prev = t;
    }
    let flags = r.u8()?;
    if flags > 7 {
        return Err(r.corrupt(format!("profile flags {flags}")));
    }
    let last_point = if flags & 1 != 0 {
        Some((r.time()?, r.f64()?, r.f64()?))
    } else {
        None
    };
    let last_login = if flags & 2 != 0 {
        Some((r.time()?, flags & 4 != 0))
    } else {
        None
    };
    Ok(Profile::from_parts(recent, last_point, last_login))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Field, Login, OutcomeKind, Recharge};
    use crate::state::memory::OutcomeMark;
    use crate::state::memory::{KeptDecision, MemoryLimits, Settled};
    use crate::state::window::Shape;
    use crate::state::{Aggregate, Counts, KeyGroup, MemoryStore, Window, WindowPlan};

    const MIN: i64 = 60_000;
    const DAY: i64 = 86_400_000;

    fn window(name: &str, sig: u64, span_ms: i64, aggregate: Aggregate, group: usize) -> Window {
        Window {
            name: name.into(),
            sig,
            shape: Shape::new(span_ms),
            aggregate,
            counts: Counts::Attempts,
            min_amount: 0,
            group,
        }
    }

    /// Per user: a count, a sum and distinct devices; per device: a count;
    /// per user and target (an order): a count.
    fn plan() -> WindowPlan {
        WindowPlan {
            windows: vec![
                window("user_10m", 11, 10 * MIN, Aggregate::Count, 0),
                window("user_sum_24h", 12, DAY, Aggregate::Sum, 0),
                window(
                    "user_devices_1h",
                    13,
                    60 * MIN,
                    Aggregate::Distinct(Field::DeviceId),
                    0,
                ),
                window("device_10m", 14, 10 * MIN, Aggregate::Count, 1),
                window("order_10m", 15, 10 * MIN, Aggregate::Count, 2),
            ],
            groups: vec![
                KeyGroup {
                    fields: vec![Field::UserId],
                    prefix: "user_id".into(),
                    windows: vec![0, 1, 2],
                },
                KeyGroup {
                    fields: vec![Field::DeviceId],
                    prefix: "device_id".into(),
                    windows: vec![3],
                },
                // Kept in the user's key (see `memory::Home`).
                KeyGroup {
                    fields: vec![Field::UserId, Field::Target],
                    prefix: "user_id+target".into(),
                    windows: vec![4],
                },
            ],
            profile_span_ms: 30 * DAY,
        }
    }

    fn recharge(id: &str, user: &str, device: &str, amount: i64, ts: i64) -> Recharge {
        Recharge {
            request_id: id.into(),
            facts: Facts {
                user_id: user.into(),
                ip_text: "192.0.2.1".into(),
                device_id: device.into(),
                target: "13800000000".into(),
                channel: "wechat".into(),
                product: "phone_credit".into(),
                currency: "CNY".into(),
                amount,
                timestamp_ms: ts,
            },
            ip: "192.0.2.1".parse().unwrap(),
            account: Default::default(),
            attributes: Default::default(),
            dry_run: false,
        }
    }

    fn beijing() -> Location {
        Location::new("CN".into(), "Beijing".into(), "Beijing".into(), 39.9, 116.4)
    }

    fn decision(id: &str, action: Action) -> Decision {
        let reason = Reason {
            rule_id: Arc::from("burst_user"),
            code: "BURST_FREQUENCY".into(),
            message: "Too many large recharges in a short time.".into(),
            action,
            score: 100,
            challenge: String::new(),
        };
        Decision {
            request_id: id.into(),
            action,
            challenge: "sms".into(),
            score: 100,
            reasons: vec![reason.clone()],
            shadow_reasons: vec![Reason {
                code: "LOCATION_UNUSUAL".into(),
                challenge: "captcha".into(),
                ..reason
            }],
            ruleset_version: Arc::from("fa2d461803e4d116"),
        }
    }

    /// A store with windows, profiles, settled and unsettled records.
    fn filled(t0: i64) -> MemoryStore {
        let store = MemoryStore::new(MemoryLimits::default());
        let plan = plan();
        let loc = beijing();
        for i in 0..5 {
            let r = recharge(
                &format!("r{i}"),
                "u1",
                &format!("d{}", i % 2),
                50_000,
                t0 + i * MIN,
            );
            store.begin(&plan, &r, Some(&loc), true);
            store.settle(&plan, &r.facts, Action::Allow, true, Some(&loc));
            let claim = store.claim(&r.request_id, 1000 + i as u64).unwrap();
            let settled = Settled {
                decision: Arc::new(decision(&r.request_id, Action::Allow)),
                facts: r.facts.clone(),
                location: Some(Arc::new(loc.clone())),
            };
            claim
                .entry
                .settled
                .set(KeptDecision::new(&settled))
                .unwrap();
        }
        store.record_login(
            &plan,
            &Login {
                event_id: "e1".into(),
                user_id: "u2".into(),
                succeeded: true,
                ip: None,
                ip_text: "192.0.2.1".into(),
                device_id: "d9".into(),
                timestamp_ms: t0,
            },
            Some(&loc),
        );
        // An event id (never settles) and a request still being decided.
        store.claim("\u{1e}event\u{1f}e1", 7).unwrap();
        store.claim("in-flight", 8).unwrap();
        let r2 = store.find("r2").unwrap();
        assert_eq!(
            r2.mark_outcome(OutcomeKind::Succeeded, false),
            OutcomeMark::Fresh { release: false }
        );
        store
    }

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn round_trip_keeps_windows_profiles_and_records() {
        let t0 = crate::now_ms() - 30 * MIN;
        let a = filled(t0);
        let dir = tmp();
        let path = dir.path().join("state.snap");
        let saved = a.save_snapshot(&path).unwrap();
        assert_eq!(
            (saved.window_keys, saved.profiles, saved.idempotency_records),
            (3, 2, 7),
            "{saved:?}"
        );
        assert!(!dir.path().join("state.snap.tmp").exists());

        let b = MemoryStore::new(MemoryLimits::default());
        let loaded = b.load_snapshot(&path).unwrap();
        assert_eq!(
            (
                loaded.window_keys,
                loaded.profiles,
                loaded.idempotency_records
            ),
            (3, 2, 7)
        );
        assert_eq!(loaded.bytes, saved.bytes);
        // Keys: the three window keys and u2's key, which holds only a profile.
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!((sb.window_keys, sb.profiles), (4, 2));
        assert_eq!((sb.window_keys, sb.profiles), (sa.window_keys, sa.profiles));

        // Windows: the next request sees exactly what it saw before.
        let plan = plan();
        let loc = beijing();
        let next = recharge("r5", "u1", "d2", 60_000, t0 + 5 * MIN);
        let before = a.begin(&plan, &next, Some(&loc), false);
        let after = b.begin(&plan, &next, Some(&loc), false);
        assert_eq!(after.windows, [6, 310_000, 3, 1, 6]);
        assert_eq!(after.windows, before.windows);
        // The order window came back in u1's key; another order is new.
        let mut other = next.clone();
        other.facts.target = "13900000000".into();
        assert_eq!(b.begin(&plan, &other, None, false).windows[4], 1);
        assert_eq!(after.profile, before.profile);
        assert_eq!(after.profile.located_events, 5);
        assert!(after.profile.usual_region);
        let device = recharge("r6", "u3", "d0", 100, t0 + 6 * MIN);
        assert_eq!(b.begin(&plan, &device, None, true).windows[3], 4);
        // The login's profile, and a profile of nobody stays empty.
        let login_view = b.begin(
            &plan,
            &recharge("x", "u2", "", 1, t0 + MIN),
            Some(&loc),
            false,
        );
        assert_eq!(login_view.profile.secs_since_login, 60);

        // Idempotency: the decision replays, outcomes stay applied, the
        // fingerprint still guards the id.
        let entry = b.find("r2").unwrap();
        let settled = entry.settled.get().unwrap();
        assert_eq!(settled.decision(), decision("r2", Action::Allow));
        assert_eq!(settled.facts().timestamp_ms, t0 + 2 * MIN);
        assert_eq!(settled.facts().facts().device_id, "d0");
        assert_eq!(settled.location.as_deref(), Some(&loc));
        assert_eq!(
            entry.mark_outcome(OutcomeKind::Succeeded, false),
            OutcomeMark::Seen,
            "already applied"
        );
        assert_eq!(
            entry.mark_outcome(OutcomeKind::Failed, true),
            OutcomeMark::Contradicts(OutcomeKind::Succeeded),
            "the mark came back with the record"
        );
        assert_eq!(
            entry.mark_outcome(OutcomeKind::Chargeback, false),
            OutcomeMark::Fresh { release: false }
        );
        let claim = b.claim("r3", 1003).unwrap();
        assert!(!claim.fresh);
        assert!(claim.entry.settled.get().is_some());
        assert!(b.claim("r3", 42).is_err(), "another request under r3");
        // Bare claims: the event id replays; the one in flight decides anew.
        assert!(!b.claim("\u{1e}event\u{1f}e1", 7).unwrap().fresh);
        let in_flight = b.claim("in-flight", 8).unwrap();
        assert!(in_flight.fresh, "its decider is gone: this claim decides");
        assert!(in_flight.entry.settled.get().is_none());
    }

    #[test]
    fn state_of_windows_no_longer_in_the_pack_is_kept() {
        let t0 = crate::now_ms() - 30 * MIN;
        let a = filled(t0);
        let dir = tmp();
        let path = dir.path().join("s");
        a.save_snapshot(&path).unwrap();
        let b = MemoryStore::new(MemoryLimits::default());
        b.load_snapshot(&path).unwrap();
        // A pack without the device window, then with it again (same sig).
        let mut smaller = plan();
        smaller.windows.truncate(3);
        smaller.groups.truncate(1);
        let r = recharge("n", "u1", "d0", 1, t0 + 7 * MIN);
        assert_eq!(b.begin(&smaller, &r, None, false).windows[0], 6);
        assert_eq!(b.begin(&plan(), &r, None, false).windows[3], 4);
    }

    #[test]
    fn caps_hold_on_load_and_recent_keys_stay() {
        let t0 = crate::now_ms() - 30 * MIN;
        let a = MemoryStore::new(MemoryLimits::default());
        let plan = plan();
        for i in 0..200 {
            let r = recharge(&format!("r{i}"), &format!("u{i}"), "", 1, t0 + i);
            a.begin(&plan, &r, None, true);
        }
        let dir = tmp();
        let path = dir.path().join("s");
        a.save_snapshot(&path).unwrap();
        let b = MemoryStore::new(MemoryLimits {
            max_tracked_keys: 50,
            ..MemoryLimits::default()
        });
        let loaded = b.load_snapshot(&path).unwrap();
        assert!(b.stats().window_keys <= 50, "{:?}", b.stats());
        assert!(loaded.evicted >= 150, "{loaded:?}");
        // The most recently touched user survived. Records load in the file's
        // order, not by age, so a few old ones loaded after the last eviction
        // round (a tenth of the cap) may stay too, but no more.
        let read = |u: &str| b.begin(&plan, &recharge("x", u, "", 1, t0 + 1000), None, false);
        assert_eq!(read("u199").windows[0], 2);
        let old = (0..150)
            .filter(|i| read(&format!("u{i}")).windows[0] == 2)
            .count();
        assert!(old <= 5, "{old} of the 150 oldest users stayed");
    }

    fn saved() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tmp();
        let path = dir.path().join("state.snap");
        filled(crate::now_ms()).save_snapshot(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        (dir, path, bytes)
    }

    fn load_err(path: &Path) -> SnapshotError {
        let store = MemoryStore::new(MemoryLimits::default());
        let err = store.load_snapshot(path).expect_err("refused");
        assert_eq!(store.stats().window_keys, 0, "nothing loaded: {err}");
        assert_eq!(
            store.stats().idempotency_records,
            0,
            "nothing loaded: {err}"
        );
        err
    }

    #[test]
    fn a_truncated_snapshot_is_refused() {
        let (_dir, path, bytes) = saved();
        for cut in [
            bytes.len() - 1,
            bytes.len() - 30,
            bytes.len() / 2,
            21,
            12,
            0,
        ] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = load_err(&path);
            assert!(err.is_bad_file());
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("snapshot {} is truncated", path.display())),
                "cut at {cut}: {msg}"
            );
        }
    }

    #[test]
    fn a_flipped_byte_is_refused() {
        let (_dir, path, bytes) = saved();
        let mut bad = bytes.clone();
        bad[bytes.len() / 2] ^= 0x10;
        std::fs::write(&path, &bad).unwrap();
        let msg = load_err(&path).to_string();
        assert_eq!(
            msg,
            format!("snapshot {} is corrupt (checksum mismatch)", path.display())
        );
        // A bit flip anywhere in the file is caught.
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 1 << (at % 8);
            std::fs::write(&path, &bad).unwrap();
            let store = MemoryStore::new(MemoryLimits::default());
            assert!(store.load_snapshot(&path).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn another_version_is_refused() {
        let (_dir, path, mut bytes) = saved();
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let msg = load_err(&path).to_string();
        assert_eq!(
            msg,
            format!(
                "snapshot {} is format v2, this build reads v1",
                path.display()
            )
        );
        std::fs::write(&path, b"user_id,count\nu1,3\n").unwrap();
        let msg = load_err(&path).to_string();
        assert!(msg.contains("is not a riskgate snapshot"), "{msg}");
    }

    #[test]
    fn a_missing_file_is_told_apart() {
        let dir = tmp();
        let err = load_err(&dir.path().join("none"));
        assert!(err.is_missing() && !err.is_bad_file(), "{err}");
    }

    #[test]
    fn a_failed_write_keeps_the_old_snapshot() {
        let (dir, path, bytes) = saved();
        // The temp file's name is taken by a folder: the write fails.
        std::fs::create_dir(dir.path().join("state.snap.tmp")).unwrap();
        let err = filled(crate::now_ms()).save_snapshot(&path).unwrap_err();
        assert!(!err.is_bad_file(), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        std::fs::remove_dir(dir.path().join("state.snap.tmp")).unwrap();
        // And the next write replaces it whole.
        MemoryStore::new(MemoryLimits::default())
            .save_snapshot(&path)
            .unwrap();
        let store = MemoryStore::new(MemoryLimits::default());
        let loaded = store.load_snapshot(&path).unwrap();
        assert_eq!(loaded.records(), 0);
    }

    #[test]
    fn back_references_stay_in_step_past_the_tables() {
        let n = TABLE_MAX + 100;
        let place =
            |i: usize| Location::new("CN".into(), format!("r{i}"), "c".into(), i as f64, f64::NAN);
        let dir = tmp();
        let path = dir.path().join("t");
        let mut w = Writer::create(&path).unwrap();
        w.section(Section::Requests, 0).unwrap();
        for i in 0..n {
            w.record(|e| {
                let s = format!("s{i}");
                e.sym(&s);
                e.sym(&s);
                e.sym("s7");
                e.place(Some(&place(i)));
                e.place(Some(&place(i)));
                e.place(Some(&place(3)));
                e.def(i as u64, 1000, 0);
                e.def(i as u64, 1000, 0);
                e.region(i as u64);
                e.region(5);
            })
            .unwrap();
        }
        w.finish().unwrap();
        let mut r = Reader::open(&path).unwrap();
        r.section().unwrap();
        for i in 0..n {
            assert!(r.record().unwrap());
            let s = format!("s{i}");
            assert_eq!(&*r.sym().unwrap(), s);
            assert_eq!(&*r.sym().unwrap(), s);
            assert_eq!(&*r.sym().unwrap(), "s7");
            for want in [i, i, 3] {
                let got = r.place().unwrap().unwrap();
                assert_eq!(
                    (got.region.as_str(), got.latitude),
                    (&*format!("r{want}"), want as f64)
                );
                assert!(got.longitude.is_nan());
            }
            assert_eq!(r.def().unwrap(), (i as u64, 1000, 0));
            assert_eq!(r.def().unwrap(), (i as u64, 1000, 0));
            assert_eq!(r.region().unwrap(), i as u64);
            assert_eq!(r.region().unwrap(), 5);
        }
        assert!(!r.record().unwrap());
        assert_eq!(r.section().unwrap(), None);
        r.finish().unwrap();
    }

    #[test]
    fn numbers_round_trip() {
        let mut b = Vec::new();
        let ints = [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            i64::MAX,
            i64::MIN,
            1_795_391_314_566,
        ];
        for v in ints {
            b.put_i64(v);
        }
        b.put_var(u64::MAX);
        b.put_str("用户");
        let dir = tmp();
        let path = dir.path().join("n");
        // Wrap the bytes in a valid file to read them back with a Reader.
        let mut w = Writer::create(&path).unwrap();
        w.section(Section::Windows, 0).unwrap();
        w.record(|e| e.b.extend_from_slice(&b)).unwrap();
        w.finish().unwrap();
        let mut r = Reader::open(&path).unwrap();
        assert_eq!(r.section().unwrap(), Some((Section::Windows, 0)));
        assert!(r.record().unwrap());
        for v in ints {
            assert_eq!(r.i64().unwrap(), v);
        }
        assert_eq!(r.var().unwrap(), u64::MAX);
        assert_eq!(r.string().unwrap(), "用户");
        assert!(!r.record().unwrap());
        assert_eq!(r.section().unwrap(), None);
        r.finish().unwrap();
    }
}
