//! Reading one `.npy` array (NumPy format 1.0-3.0), as webdataset stores multi-label targets and
//! WILDS / fairness metadata: booleans, integers or floats, little- or big-endian, any shape (the
//! values come back flat, C order).

/// The values of an `.npy` file as `f64`, with its shape.
pub fn read_npy(bytes: &[u8]) -> Result<(Vec<f64>, Vec<usize>), String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy array (missing the \\x93NUMPY magic)".into());
    }
    let major = bytes[6];
    let (header_len, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(".npy header is cut".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or(".npy header is cut")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| ".npy header is not text")?;
    let descr = dict_value(header, "descr").ok_or(".npy header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = dict_value(header, "fortran_order")
        .map(|v| v.starts_with("True"))
        .unwrap_or(false);
    let shape_text = dict_value(header, "shape").ok_or(".npy header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim_start_matches('(')
        .split(')')
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad .npy shape {shape_text:?}"))
        })
        .collect::<Result<_, _>>()?;
    // Checked: the shape is outside input, and a product that overflows would wrap (release) or
    // panic (debug) before the length check below could reject it.
    let count = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!(".npy shape {shape_text:?} has more values than fit in memory"))?;
    let data = &bytes[end..];
    let (order, kind, size) = parse_descr(descr)?;
    let need = count
        .checked_mul(size)
        .ok_or_else(|| format!(".npy shape {shape_text:?} has more bytes than fit in memory"))?;
    if data.len() < need {
        return Err(format!(
            ".npy data is cut: {count} values of {size} bytes need {need} bytes, found {}",
            data.len()
        ));
    }
    let mut values = Vec::with_capacity(count);
    for chunk in data.chunks(size).take(count) {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(chunk);
        if order == Order::Big {
            b[..size].reverse();
        }
        let v = match (kind, size) {
            ('b', 1) => f64::from(u8::from(b[0] != 0)),
            ('u', 1) => f64::from(b[0]),
            ('i', 1) => f64::from(b[0] as i8),
            ('u', 2) => f64::from(u16::from_le_bytes([b[0], b[1]])),
            ('i', 2) => f64::from(i16::from_le_bytes([b[0], b[1]])),
            ('u', 4) => f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ('i', 4) => f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ('f', 4) => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ('u', 8) => u64::from_le_bytes(b) as f64,
            ('i', 8) => i64::from_le_bytes(b) as f64,
            ('f', 8) => f64::from_le_bytes(b),
            _ => return Err(format!(".npy dtype {descr:?} is not supported")),
        };
        values.push(v);
    }
    if fortran && shape.len() > 1 {
        values = fortran_to_c(&values, &shape);
    }
    Ok((values, shape))
}

#[derive(PartialEq)]
enum Order {
    Little,
    Big,
}

fn parse_descr(descr: &str) -> Result<(Order, char, usize), String> {
    let mut chars = descr.chars();
    let (order, rest) = match chars.next() {
        Some('<') | Some('|') | Some('=') => (Order::Little, chars.as_str()),
        Some('>') => (Order::Big, chars.as_str()),
        _ => (Order::Little, descr),
    };
    let mut rc = rest.chars();
    let kind = rc
        .next()
        .ok_or_else(|| format!("bad .npy dtype {descr:?}"))?;
    let size: usize = rc
        .as_str()
        .parse()
        .map_err(|_| format!("bad .npy dtype {descr:?}"))?;
    if !matches!(kind, 'b' | 'u' | 'i' | 'f') || !matches!(size, 1 | 2 | 4 | 8) {
        return Err(format!(".npy dtype {descr:?} is not supported"));
    }
    Ok((order, kind, size))
}

/// The text after `'key':` in a Python dict literal, up to the next top-level comma.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat_single = format!("'{key}'");
    let pat_double = format!("\"{key}\"");
    let at = header
        .find(&pat_single)
        .map(|i| i + pat_single.len())
        .or_else(|| header.find(&pat_double).map(|i| i + pat_double.len()))?;
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth <= 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

fn fortran_to_c(values: &[f64], shape: &[usize]) -> Vec<f64> {
    let n = values.len();
    let mut out = vec![0f64; n];
    let mut idx = vec![0usize; shape.len()];
    for v in values {
        // Fortran order: the first index varies fastest.
        let mut c = 0usize;
        for (d, &i) in idx.iter().enumerate() {
            c = c * shape[d] + i;
        }
        out[c] = *v;
        for (d, i) in idx.iter_mut().enumerate() {
            *i += 1;
            if *i < shape[d] {
                break;
            }
            *i = 0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_ints_floats_bools() {
        let mut d = Vec::new();
        for v in [3i64, -1, 7] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        let (v, s) = read_npy(&npy("<i8", "(3,)", &d)).unwrap_or_default();
        assert_eq!((v, s), (vec![3.0, -1.0, 7.0], vec![3]));
        let (v, _) = read_npy(&npy("|b1", "(2,)", &[1, 0])).unwrap_or_default();
        assert_eq!(v, vec![1.0, 0.0]);
        let (v, _) = read_npy(&npy("<f4", "(1,)", &1.5f32.to_le_bytes())).unwrap_or_default();
        assert_eq!(v, vec![1.5]);
        assert!(read_npy(b"garbage").is_err());
        assert!(read_npy(&npy("<i8", "(3,)", &[0; 8])).is_err());
    }

    /// Regression (hq-fuzz `npy`): a shape whose element count overflows `usize` panicked with
    /// "attempt to multiply with overflow" instead of being rejected.
    #[test]
    fn overflowing_shape_is_an_error() {
        for (descr, shape) in [
            ("<f8", "(4611686018427387904, 4)"),
            ("<f8", "(2305843009213693952,)"),
        ] {
            let e = read_npy(&npy(descr, shape, &[0; 16])).expect_err("overflow");
            assert!(e.contains("fit in memory"), "{e}");
        }
    }
}
