//! A small streaming tar reader that owns its input and reports damage precisely.
//!
//! The `tar` crate's reader borrows its archive (so an owning iterator over shards cannot hold
//! one) and does not say *where* a stream was cut. This reader handles what webdataset shards
//! contain: POSIX ustar (with the `prefix` field), GNU (`L` long names, base-256 sizes) and pax
//! (`x` records for `path` and `size`; `g` global records are skipped) headers. It reads one member
//! at a time, so memory holds at most one member's data, and it checks every header's checksum.
//! Directories, links and other non-file entries are skipped, as webdataset skips them.

use std::io::{self, Read};

pub(crate) const BLOCK: u64 = 512;

/// Largest GNU long-name or pax extension record accepted (they hold a path, not data).
const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// One regular file of the archive.
#[derive(Debug)]
pub(crate) enum TarEvent {
    Member {
        name: String,
        data: Vec<u8>,
    },
    /// A member bigger than the reader's limit: its data was skipped, not read.
    Oversized {
        name: String,
        size: u64,
    },
}

/// Why a stream cannot go on. After a fault the reader yields nothing more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TarFault {
    /// Human-readable, starts with `truncated tar`, `corrupt tar` or `read error`.
    pub message: String,
    /// The member whose data the fault cut short, when it was inside a member's data.
    pub in_member: Option<String>,
}

pub(crate) struct TarStream<R> {
    inner: R,
    offset: u64,
    done: bool,
    max_member_bytes: u64,
    /// A fault found after a complete member was read (a cut in its padding): reported on the
    /// next call, so the member itself is still delivered.
    deferred: Option<TarFault>,
}

fn truncated(message: String, in_member: Option<String>) -> TarFault {
    TarFault {
        message: format!("truncated tar: {message}"),
        in_member,
    }
}

fn corrupt(message: String) -> TarFault {
    TarFault {
        message: format!("corrupt tar: {message}"),
        in_member: None,
    }
}

fn io_fault(e: &io::Error, offset: u64, in_member: Option<String>) -> TarFault {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        truncated(
            format!("the stream ends early at offset {offset} ({e})"),
            in_member,
        )
    } else {
        TarFault {
            message: format!("read error at offset {offset}: {e}"),
            in_member,
        }
    }
}

/// Fill `buf` as far as the stream allows; returns how many bytes were read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// The bytes of a NUL-terminated header field.
fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(i) => &field[..i],
        None => field,
    }
}

/// A numeric header field: octal text (what Python's `tarfile.nti` accepts) or GNU base-256.
fn parse_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] == 0xff {
            return None; // negative
        }
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let text = std::str::from_utf8(cstr(field)).ok()?.trim();
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn checksum_ok(block: &[u8; 512]) -> bool {
    let Some(stored) = parse_number(&block[148..156]) else {
        return false;
    };
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    stored == unsigned || i64::try_from(stored).is_ok_and(|s| s == signed)
}

fn header_name(block: &[u8; 512]) -> String {
    let name = cstr(&block[0..100]);
    // POSIX ustar ("ustar\0"): a non-empty prefix goes in front. GNU ("ustar  \0") has no prefix
    // field (those bytes hold times).
    if &block[257..263] == b"ustar\0" {
        let prefix = cstr(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(name);
            return String::from_utf8_lossy(&full).into_owned();
        }
    }
    String::from_utf8_lossy(name).into_owned()
}

/// pax extended header records: `"<len> <key>=<value>\n"`.
fn parse_pax(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or("pax record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("pax record with an invalid length")?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err("malformed pax record".into());
        }
        let record = &rest[sp + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("pax record without '='")?;
        out.push((
            String::from_utf8_lossy(&record[..eq]).into_owned(),
            String::from_utf8_lossy(&record[eq + 1..]).into_owned(),
        ));
        rest = &rest[len..];
    }
    Ok(out)
}

impl<R: Read> TarStream<R> {
    pub(crate) fn new(inner: R, max_member_bytes: u64) -> Self {
        TarStream {
            inner,
            offset: 0,
            done: false,
            max_member_bytes,
            deferred: None,
        }
    }

    /// Bytes consumed so far.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// The next member; `None` at the end of the archive (or after a fault).
    pub(crate) fn next_event(&mut self) -> Option<Result<TarEvent, TarFault>> {
        if self.done {
            return None;
        }
        if let Some(f) = self.deferred.take() {
            self.done = true;
            return Some(Err(f));
        }
        match self.read_event() {
            Ok(Some(e)) => Some(Ok(e)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(f) => {
                self.done = true;
                Some(Err(f))
            }
        }
    }

    /// Read `size` bytes of member data (and its padding).
    fn read_data(&mut self, size: u64, name: &str) -> Result<Vec<u8>, TarFault> {
        let start = self.offset;
        let mut data = Vec::with_capacity(size.min(8 << 20) as usize);
        let got = (&mut self.inner)
            .take(size)
            .read_to_end(&mut data)
            .map_err(|e| io_fault(&e, start + data.len() as u64, Some(name.to_string())))?;
        self.offset += got as u64;
        if (got as u64) < size {
            return Err(truncated(
                format!(
                    "member {name} cut short: {got} of {size} bytes (data starts at offset {start})"
                ),
                Some(name.to_string()),
            ));
        }
        self.skip_padding(size, name);
        Ok(data)
    }

    /// Skip the zero padding after `size` bytes of data; a cut here is reported on the next call.
    fn skip_padding(&mut self, size: u64, name: &str) {
        let pad = padding(size) as usize;
        if pad == 0 {
            return;
        }
        let mut buf = [0u8; 512];
        match read_full(&mut self.inner, &mut buf[..pad]) {
            Ok(n) => {
                self.offset += n as u64;
                if n < pad {
                    self.deferred = Some(truncated(
                        format!(
                            "the stream ends at offset {} inside the padding after member {name}",
                            self.offset
                        ),
                        None,
                    ));
                }
            }
            Err(e) => self.deferred = Some(io_fault(&e, self.offset, None)),
        }
    }

    /// Skip `size` bytes of data plus padding without keeping them.
    fn skip_data(&mut self, size: u64, name: &str) -> Result<(), TarFault> {
        let start = self.offset;
        let skipped = io::copy(&mut (&mut self.inner).take(size), &mut io::sink())
            .map_err(|e| io_fault(&e, start, Some(name.to_string())))?;
        self.offset += skipped;
        if skipped < size {
            return Err(truncated(
                format!(
                    "member {name} cut short: {skipped} of {size} bytes (data starts at offset {start})"
                ),
                Some(name.to_string()),
            ));
        }
        self.skip_padding(size, name);
        if let Some(f) = self.deferred.take() {
            return Err(f);
        }
        Ok(())
    }

    fn read_extension(&mut self, size: u64, what: &str, at: u64) -> Result<Vec<u8>, TarFault> {
        if size > MAX_EXTENSION_BYTES {
            return Err(corrupt(format!(
                "{what} header at offset {at} claims {size} bytes"
            )));
        }
        let data = self.read_data(size, what)?;
        if let Some(f) = self.deferred.take() {
            return Err(f);
        }
        Ok(data)
    }

    fn read_event(&mut self) -> Result<Option<TarEvent>, TarFault> {
        let mut long_name: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        loop {
            let at = self.offset;
            let mut block = [0u8; 512];
            let n = read_full(&mut self.inner, &mut block).map_err(|e| io_fault(&e, at, None))?;
            self.offset += n as u64;
            let extension_pending = long_name.is_some() || pax_path.is_some() || pax_size.is_some();
            if n == 0 {
                let what = if extension_pending {
                    "after an extended header, before the member it describes"
                } else {
                    "where the next header or the end-of-archive marker should be"
                };
                return Err(truncated(
                    format!("the file ends at offset {at}, {what}"),
                    None,
                ));
            }
            if n < block.len() {
                return Err(truncated(
                    format!("header at offset {at} cut short ({n} of 512 bytes)"),
                    None,
                ));
            }
            if block.iter().all(|&b| b == 0) {
                if extension_pending {
                    return Err(corrupt(format!(
                        "end-of-archive marker at offset {at} right after an extended header"
                    )));
                }
                return Ok(None);
            }
            if !checksum_ok(&block) {
                return Err(corrupt(format!(
                    "header checksum mismatch at offset {at} (not a tar file, or damaged here)"
                )));
            }
            let size = parse_number(&block[124..136])
                .ok_or_else(|| corrupt(format!("invalid size field in header at offset {at}")))?;
            match block[156] {
                b'L' => {
                    let data = self.read_extension(size, "GNU long name", at)?;
                    long_name = Some(String::from_utf8_lossy(cstr(&data)).into_owned());
                }
                b'x' => {
                    let data = self.read_extension(size, "pax", at)?;
                    let records = parse_pax(&data)
                        .map_err(|e| corrupt(format!("pax header at offset {at}: {e}")))?;
                    for (k, v) in records {
                        match k.as_str() {
                            "path" => pax_path = Some(v),
                            "size" => {
                                pax_size = Some(v.trim().parse().map_err(|_| {
                                    corrupt(format!(
                                        "pax header at offset {at}: invalid size {v:?}"
                                    ))
                                })?)
                            }
                            _ => {}
                        }
                    }
                }
                b'g' | b'K' => self.skip_data(size, "extended header")?,
                b'0' | 0 | b'7' => {
                    let name = pax_path
                        .take()
                        .or(long_name.take())
                        .unwrap_or_else(|| header_name(&block));
                    let size = pax_size.take().unwrap_or(size);
                    if size > self.max_member_bytes {
                        self.skip_data(size, &name)?;
                        return Ok(Some(TarEvent::Oversized { name, size }));
                    }
                    let data = self.read_data(size, &name)?;
                    return Ok(Some(TarEvent::Member { name, data }));
                }
                _ => {
                    // Directories, links, devices, FIFOs, sparse files: not sample members.
                    let size = pax_size.take().unwrap_or(size);
                    let name = pax_path
                        .take()
                        .or(long_name.take())
                        .unwrap_or_else(|| header_name(&block));
                    self.skip_data(size, &name)?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_ustar();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.into_inner().expect("finish")
    }

    fn events(bytes: &[u8]) -> Vec<Result<(String, Vec<u8>), TarFault>> {
        let mut s = TarStream::new(bytes, u64::MAX);
        let mut out = Vec::new();
        while let Some(e) = s.next_event() {
            out.push(e.map(|e| match e {
                TarEvent::Member { name, data } => (name, data),
                TarEvent::Oversized { name, .. } => (name, b"<oversized>".to_vec()),
            }));
        }
        out
    }

    #[test]
    fn reads_members_and_long_names() {
        let long = format!("{}/k.txt", "d".repeat(150));
        let longer = format!("{}.txt", "n".repeat(300));
        let bytes = build(&[
            ("a.txt", b"hello"),
            (&long, b"x"),
            (&longer, b""),
            ("e.bin", &[7u8; 1024]),
        ]);
        let ev = events(&bytes);
        assert_eq!(ev.len(), 4);
        let names: Vec<String> = ev.iter().map(|e| e.clone().expect("ok").0).collect();
        assert_eq!(
            names,
            vec!["a.txt".to_string(), long, longer, "e.bin".into()]
        );
        assert_eq!(ev[0].clone().expect("ok").1, b"hello");
        assert_eq!(ev[3].clone().expect("ok").1, vec![7u8; 1024]);
    }

    #[test]
    fn pax_path_and_size_override_the_header() {
        // What Python's tarfile writes in its default (pax) format for a non-ASCII name.
        let name = "dossier/ünïcødé.txt";
        let record = {
            let body = format!(" path={name}\n");
            let mut n = body.len() + 1;
            while body.len() + n.to_string().len() != n {
                n = body.len() + n.to_string().len();
            }
            format!("{n}{body}")
        };
        let mut b = tar::Builder::new(Vec::new());
        let mut x = tar::Header::new_ustar();
        x.set_path("PaxHeader/x").expect("path");
        x.set_size(record.len() as u64);
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_cksum();
        b.append(&x, record.as_bytes()).expect("pax");
        let mut h = tar::Header::new_ustar();
        h.set_path("placeholder.txt").expect("path");
        h.set_size(3);
        h.set_cksum();
        b.append(&h, &b"abc"[..]).expect("member");
        let mut d = tar::Header::new_ustar();
        d.set_path("somedir/").expect("dir");
        d.set_entry_type(tar::EntryType::Directory);
        d.set_size(0);
        d.set_cksum();
        b.append(&d, &b""[..]).expect("dir");
        let bytes = b.into_inner().expect("finish");
        let ev = events(&bytes);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            ev[0].clone().expect("ok"),
            (name.to_string(), b"abc".to_vec())
        );
    }

    #[test]
    fn base256_and_octal_sizes() {
        assert_eq!(parse_number(b"0000000012\0 "), Some(10));
        assert_eq!(parse_number(b"   \0"), Some(0));
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 5;
        f[10] = 1;
        assert_eq!(parse_number(&f), Some(261));
        f[0] = 0xff;
        assert_eq!(parse_number(&f), None);
        assert_eq!(parse_number(b"9z"), None);
    }

    #[test]
    fn every_cut_is_a_fault_not_a_panic() {
        let bytes = build(&[("a.txt", b"hello world"), ("b.txt", &[1u8; 700])]);
        // Two members (header + padded data each); a cut before the first full zero block of the
        // end-of-archive marker is a fault, any later cut is a complete archive.
        let end_of_data = 512 + 512 + 512 + 1024 + 512;
        for cut in 0..end_of_data {
            let ev = events(&bytes[..cut]);
            let faults = ev.iter().filter(|e| e.is_err()).count();
            assert_eq!(faults, 1, "cut {cut}: {ev:?}");
            assert!(ev.last().is_some_and(|e| e.is_err()), "cut {cut}");
        }
        for cut in end_of_data..=bytes.len() {
            let ev = events(&bytes[..cut]);
            assert!(ev.iter().all(|e| e.is_ok()), "cut {cut}: {ev:?}");
            assert_eq!(ev.len(), 2);
        }
    }

    #[test]
    fn checksum_damage_is_corrupt() {
        let mut bytes = build(&[("a.txt", b"hi")]);
        bytes[10] ^= 0x55;
        let ev = events(&bytes);
        let e = ev[0].clone().expect_err("corrupt");
        assert!(e.message.contains("checksum"), "{}", e.message);
    }

    #[test]
    fn pax_records_parse() {
        let rec = |k: &str, v: &str| {
            let body = format!(" {k}={v}\n");
            let mut n = body.len() + 1;
            loop {
                let m = body.len() + n.to_string().len();
                if m == n {
                    break;
                }
                n = m;
            }
            format!("{n}{body}")
        };
        let data = format!("{}{}", rec("path", "some/long/name.jpg"), rec("size", "42"));
        let recs = parse_pax(data.as_bytes()).expect("pax");
        assert_eq!(recs[0], ("path".into(), "some/long/name.jpg".into()));
        assert_eq!(recs[1], ("size".into(), "42".into()));
        assert!(parse_pax(b"99 path=x\n").is_err());
        assert!(parse_pax(b"zz").is_err());
    }
}
