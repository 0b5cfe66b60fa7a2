//! A small, fast baseline JPEG encoder for the synthetic corpus's images.
//!
//! The `image` crate's encoder spends about 0.2 ms on a 64x64 image, which capped generation at a
//! few thousand samples a second; this one does the same job several times faster. It writes plain
//! baseline JFIF that every decoder reads: 4:4:4 YCbCr (no chroma subsampling, so the colours of
//! small objects stay clean), the quantisation tables of the JPEG standard (Annex K) scaled by
//! quality as libjpeg does, the standard Huffman tables, and the float AAN forward DCT. Output is a
//! pure function of the pixels and the quality.

/// Natural (row-major) index of each zigzag position.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// [`ZIGZAG`] for transposed blocks: the transposed-layout index of each zigzag position.
const ZIGZAG_T: [usize; 64] = {
    let mut t = [0usize; 64];
    let mut k = 0;
    while k < 64 {
        let n = ZIGZAG[k];
        t[k] = (n % 8) * 8 + n / 8;
        k += 1;
    }
    t
};

/// Annex K.1 luminance quantisation table, natural order.
const LUMA_Q: [u16; 64] = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113,
    92, 49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
];

/// Annex K.1 chrominance quantisation table, natural order.
const CHROMA_Q: [u16; 64] = [
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
];

const DC_LUMA_BITS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
const DC_CHROMA_BITS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
const DC_VALUES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];

const AC_LUMA_BITS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
const AC_LUMA_VALUES: [u8; 162] = [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52, 0xd1, 0xf0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
    0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5,
    0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2,
    0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
    0xf9, 0xfa,
];

const AC_CHROMA_BITS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
const AC_CHROMA_VALUES: [u8; 162] = [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33, 0x52, 0xf0,
    0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18, 0x19, 0x1a, 0x26,
    0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5,
    0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3,
    0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda,
    0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8,
    0xf9, 0xfa,
];

/// AAN scale factors: the float DCT's output is the true DCT times `8 * AAN[u] * AAN[v]`.
const AAN: [f32; 8] = [
    1.0,
    1.387_039_8,
    1.306_563,
    1.175_875_6,
    1.0,
    0.785_694_96,
    0.541_196_1,
    0.275_899_38,
];

/// Huffman code table: `(code, length)` per symbol.
struct Huffman {
    codes: [(u16, u8); 256],
}

impl Huffman {
    /// Annex C: canonical codes from the count of codes of each length.
    fn new(bits: &[u8; 16], values: &[u8]) -> Huffman {
        let mut codes = [(0u16, 0u8); 256];
        let mut code: u16 = 0;
        let mut k = 0;
        for (len_minus_1, &count) in bits.iter().enumerate() {
            for _ in 0..count {
                if let Some(&v) = values.get(k) {
                    codes[v as usize] = (code, len_minus_1 as u8 + 1);
                }
                code = code.wrapping_add(1);
                k += 1;
            }
            code <<= 1;
        }
        Huffman { codes }
    }
}

/// The four standard Huffman tables, built once.
struct Tables {
    dc: [Huffman; 2],
    ac: [Huffman; 2],
}

fn huffman_tables() -> &'static Tables {
    static TABLES: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| Tables {
        dc: [
            Huffman::new(&DC_LUMA_BITS, &DC_VALUES),
            Huffman::new(&DC_CHROMA_BITS, &DC_VALUES),
        ],
        ac: [
            Huffman::new(&AC_LUMA_BITS, &AC_LUMA_VALUES),
            Huffman::new(&AC_CHROMA_BITS, &AC_CHROMA_VALUES),
        ],
    })
}

/// Scaled quantisation table (libjpeg's quality scaling), natural order.
fn quant_table(base: &[u16; 64], quality: u8) -> [u16; 64] {
    let q = u32::from(quality.clamp(1, 100));
    let scale = if q < 50 { 5000 / q } else { 200 - 2 * q };
    base.map(|b| ((u32::from(b) * scale + 50) / 100).clamp(1, 255) as u16)
}

/// Entropy-coded segment writer with 0xFF byte stuffing.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    /// Pending bits in the low `nbits` bits (higher bits are stale and never read).
    acc: u64,
    nbits: u32,
}

impl BitWriter<'_> {
    /// Append the low `len` bits of `code` (`len` <= 32).
    #[inline]
    fn put(&mut self, code: u32, len: u32) {
        self.acc = (self.acc << len) | u64::from(code & (((1u64 << len) - 1) as u32));
        self.nbits += len;
        if self.nbits >= 32 {
            let word = (self.acc >> (self.nbits - 32)) as u32;
            self.nbits -= 32;
            let bytes = word.to_be_bytes();
            if bytes.contains(&0xFF) {
                for b in bytes {
                    self.out.push(b);
                    if b == 0xFF {
                        self.out.push(0);
                    }
                }
            } else {
                self.out.extend_from_slice(&bytes);
            }
        }
    }

    /// A Huffman code followed by `s` magnitude bits of `v` (JPEG's one's-complement form).
    #[inline]
    fn put_coded(&mut self, (code, len): (u16, u8), v: i32, s: u32) {
        let bits = (if v < 0 { v - 1 } else { v }) as u32 & ((1u32 << s) - 1);
        self.put((u32::from(code) << s) | bits, u32::from(len) + s);
    }

    /// Flush whole bytes, padding the last one with 1 bits.
    fn finish(&mut self) {
        while self.nbits >= 8 {
            let b = (self.acc >> (self.nbits - 8)) as u8;
            self.nbits -= 8;
            self.out.push(b);
            if b == 0xFF {
                self.out.push(0);
            }
        }
        if self.nbits > 0 {
            let pad = 8 - self.nbits;
            let b = ((self.acc << pad) as u8) | ((1u8 << pad) - 1);
            self.nbits = 0;
            self.out.push(b);
            if b == 0xFF {
                self.out.push(0);
            }
        }
    }
}

/// Number of bits of |v| (JPEG's magnitude category).
#[inline]
fn category(v: i32) -> u32 {
    32 - v.unsigned_abs().leading_zeros()
}

/// One 1-D AAN DCT applied down the columns of `v` (eight rows of eight lanes): every operation is
/// element-wise over a row, so the compiler turns it into SIMD.
#[inline]
fn aan_columns(v: &mut [[f32; 8]; 8]) {
    let mut o = [[0f32; 8]; 8];
    for j in 0..8 {
        let (t0, t7) = (v[0][j] + v[7][j], v[0][j] - v[7][j]);
        let (t1, t6) = (v[1][j] + v[6][j], v[1][j] - v[6][j]);
        let (t2, t5) = (v[2][j] + v[5][j], v[2][j] - v[5][j]);
        let (t3, t4) = (v[3][j] + v[4][j], v[3][j] - v[4][j]);
        // Even part.
        let (t10, t13) = (t0 + t3, t0 - t3);
        let (t11, t12) = (t1 + t2, t1 - t2);
        o[0][j] = t10 + t11;
        o[4][j] = t10 - t11;
        let z1 = (t12 + t13) * 0.707_106_77;
        o[2][j] = t13 + z1;
        o[6][j] = t13 - z1;
        // Odd part.
        let t10 = t4 + t5;
        let t11 = t5 + t6;
        let t12 = t6 + t7;
        let z5 = (t10 - t12) * 0.382_683_43;
        let z2 = 0.541_196_1 * t10 + z5;
        let z4 = 1.306_563 * t12 + z5;
        let z3 = t11 * 0.707_106_77;
        let z11 = t7 + z3;
        let z13 = t7 - z3;
        o[5][j] = z13 + z2;
        o[3][j] = z13 - z2;
        o[1][j] = z11 + z4;
        o[7][j] = z11 - z4;
    }
    *v = o;
}

#[inline]
fn transpose(v: &[[f32; 8]; 8]) -> [[f32; 8]; 8] {
    let mut t = [[0f32; 8]; 8];
    for (i, row) in v.iter().enumerate() {
        for (j, x) in row.iter().enumerate() {
            t[j][i] = *x;
        }
    }
    t
}

/// Float AAN forward DCT of an 8x8 block, AAN-scaled, returned TRANSPOSED (`out[v][u]` holds
/// coefficient `(u, v)`): the DCT is separable, so the columns are transformed in place, then the
/// rows as the columns of the transpose, and the caller reads the result through transposed tables.
fn fdct_transposed(block: &[[f32; 8]; 8]) -> [[f32; 8]; 8] {
    let mut v = *block;
    aan_columns(&mut v);
    let mut t = transpose(&v);
    aan_columns(&mut t);
    t
}

/// Encode packed RGB pixels (`width * height * 3` bytes) as a baseline JPEG.
pub fn encode_rgb(pixels: &[u8], width: u32, height: u32, quality: u8) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    assert!(w > 0 && h > 0 && w <= 65535 && h <= 65535 && pixels.len() >= w * h * 3);
    let qtables = [
        quant_table(&LUMA_Q, quality),
        quant_table(&CHROMA_Q, quality),
    ];
    // Reciprocal divisors for the AAN output, natural order.
    let mut recip = [[0f32; 64]; 2];
    for (t, q) in qtables.iter().enumerate() {
        for u in 0..8 {
            for v in 0..8 {
                // Transposed layout, as `fdct_transposed` returns it.
                recip[t][v * 8 + u] = 1.0 / (f32::from(q[u * 8 + v]) * AAN[u] * AAN[v] * 8.0);
            }
        }
    }
    let tables = huffman_tables();

    let mut out = Vec::with_capacity(1024 + w * h / 2);
    out.extend_from_slice(&[0xFF, 0xD8]); // SOI
    out.extend_from_slice(&[
        0xFF, 0xE0, 0, 16, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0,
    ]); // APP0 JFIF 1.1, aspect 1:1, no thumbnail
    for (id, q) in qtables.iter().enumerate() {
        out.extend_from_slice(&[0xFF, 0xDB, 0, 67, id as u8]);
        out.extend(ZIGZAG.iter().map(|&n| q[n] as u8));
    }
    out.extend_from_slice(&[0xFF, 0xC0, 0, 17, 8]);
    out.extend_from_slice(&(height as u16).to_be_bytes());
    out.extend_from_slice(&(width as u16).to_be_bytes());
    out.extend_from_slice(&[3, 1, 0x11, 0, 2, 0x11, 1, 3, 0x11, 1]);
    for (class_id, bits, values) in [
        (0x00u8, &DC_LUMA_BITS, &DC_VALUES[..]),
        (0x10, &AC_LUMA_BITS, &AC_LUMA_VALUES[..]),
        (0x01, &DC_CHROMA_BITS, &DC_VALUES[..]),
        (0x11, &AC_CHROMA_BITS, &AC_CHROMA_VALUES[..]),
    ] {
        let len = 2 + 1 + 16 + values.len();
        out.extend_from_slice(&[0xFF, 0xC4]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.push(class_id);
        out.extend_from_slice(bits);
        out.extend_from_slice(values);
    }
    out.extend_from_slice(&[0xFF, 0xDA, 0, 12, 3, 1, 0x00, 2, 0x11, 3, 0x11, 0, 63, 0]);

    let mut bw = BitWriter {
        out: &mut out,
        acc: 0,
        nbits: 0,
    };
    // Colour conversion to three level-shifted planes, padded to whole blocks by edge replication.
    let (pw, ph) = (w.div_ceil(8) * 8, h.div_ceil(8) * 8);
    let mut planes = vec![vec![0f32; pw * ph]; 3];
    for y in 0..ph {
        let src = &pixels[y.min(h - 1) * w * 3..][..w * 3];
        let (yp, rest) = planes.split_at_mut(1);
        let (cb, cr) = rest.split_at_mut(1);
        let row = y * pw..(y + 1) * pw;
        let (yr, cbr, crr) = (
            &mut yp[0][row.clone()],
            &mut cb[0][row.clone()],
            &mut cr[0][row],
        );
        for (x, px) in src.chunks_exact(3).enumerate() {
            let (r, g, b) = (f32::from(px[0]), f32::from(px[1]), f32::from(px[2]));
            yr[x] = 0.299 * r + 0.587 * g + 0.114 * b - 128.0;
            cbr[x] = -0.168_736 * r - 0.331_264 * g + 0.5 * b;
            crr[x] = 0.5 * r - 0.418_688 * g - 0.081_312 * b;
        }
        for x in w..pw {
            yr[x] = yr[w - 1];
            cbr[x] = cbr[w - 1];
            crr[x] = crr[w - 1];
        }
    }

    let mut prev_dc = [0i32; 3];
    for by in (0..ph).step_by(8) {
        for bx in (0..pw).step_by(8) {
            for c in 0..3 {
                let t = usize::from(c > 0);
                let mut block = [[0f32; 8]; 8];
                for (y, row) in block.iter_mut().enumerate() {
                    row.copy_from_slice(&planes[c][(by + y) * pw + bx..][..8]);
                }
                let coef = fdct_transposed(&block);
                // Quantise (a loop the compiler vectorises: round to nearest with the
                // 1.5 * 2^23 trick and read the integer from the float's bits, no libm call),
                // then reorder to zigzag and note the non-zeros.
                let mut nat = [0i32; 64];
                for ((dst, &v), &r) in nat.iter_mut().zip(coef.as_flattened()).zip(&recip[t]) {
                    const MAGIC: f32 = 12_582_912.0;
                    *dst = ((v * r + MAGIC).to_bits() as i32) - 0x4B40_0000;
                }
                let mut q = [0i32; 64];
                let mut nonzero: u64 = 0;
                for (k, &n) in ZIGZAG_T.iter().enumerate() {
                    q[k] = nat[n];
                    nonzero |= u64::from(nat[n] != 0) << k;
                }
                let diff = q[0] - prev_dc[c];
                prev_dc[c] = q[0];
                let s = category(diff);
                bw.put_coded(tables.dc[t].codes[s as usize], diff, s);
                // AC coefficients: jump from one non-zero to the next.
                let mut rest = nonzero & !1;
                let mut last = 0u32;
                while rest != 0 {
                    let k = rest.trailing_zeros();
                    rest &= rest - 1;
                    let mut run = k - last - 1;
                    last = k;
                    while run > 15 {
                        let (code, len) = tables.ac[t].codes[0xF0];
                        bw.put(u32::from(code), u32::from(len));
                        run -= 16;
                    }
                    let v = q[k as usize];
                    let s = category(v);
                    bw.put_coded(tables.ac[t].codes[((run << 4) | s) as usize], v, s);
                }
                let run = 63 - last;
                if run > 0 {
                    let (code, len) = tables.ac[t].codes[0x00];
                    bw.put(u32::from(code), u32::from(len));
                }
            }
        }
    }
    bw.finish();
    out.extend_from_slice(&[0xFF, 0xD9]); // EOI
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10()
    }

    fn test_image(w: usize, h: usize) -> Vec<u8> {
        let mut px = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let i = (y * w + x) * 3;
                px[i] = (x * 255 / w.max(1)) as u8;
                px[i + 1] = (y * 255 / h.max(1)) as u8;
                px[i + 2] = if (x / 6 + y / 6) % 2 == 0 { 220 } else { 30 };
            }
        }
        px
    }

    #[test]
    fn decodes_with_the_image_crate_at_good_quality() {
        for (w, h) in [(64, 64), (48, 48), (37, 21), (8, 8), (1, 1)] {
            let px = test_image(w, h);
            for q in [50u8, 90, 100] {
                let bytes = encode_rgb(&px, w as u32, h as u32, q);
                let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
                    .expect("decodes")
                    .to_rgb8();
                assert_eq!(img.dimensions(), (w as u32, h as u32));
                let p = psnr(img.as_raw(), &px);
                // As good as the `image` crate's own encoder at the same quality.
                let mut theirs = Vec::new();
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut theirs, q)
                    .encode(&px, w as u32, h as u32, image::ExtendedColorType::Rgb8)
                    .expect("reference encode");
                let reference = image::load_from_memory(&theirs).expect("decodes").to_rgb8();
                let p_ref = psnr(reference.as_raw(), &px);
                // (A lone pixel's error is a rounding detail, not compression quality.)
                assert!(
                    w * h < 64 || p > p_ref - 0.5,
                    "{w}x{h} q{q}: PSNR {p:.1} vs image crate {p_ref:.1}"
                );
                if q >= 90 {
                    assert!(p > 30.0, "{w}x{h} q{q}: PSNR {p:.1}");
                }
            }
        }
    }

    #[test]
    fn flat_colour_survives_exactly_enough() {
        let px: Vec<u8> = std::iter::repeat_n([220u8, 30, 35], 64 * 64)
            .flatten()
            .collect();
        let bytes = encode_rgb(&px, 64, 64, 90);
        let img = image::load_from_memory(&bytes).expect("decodes").to_rgb8();
        for p in img.pixels() {
            for (a, b) in p.0.iter().zip([220u8, 30, 35]) {
                assert!((i32::from(*a) - i32::from(b)).abs() <= 2, "{p:?}");
            }
        }
    }

    #[test]
    fn huffman_codes_are_prefix_free() {
        for (bits, values) in [
            (&DC_LUMA_BITS, &DC_VALUES[..]),
            (&DC_CHROMA_BITS, &DC_VALUES[..]),
            (&AC_LUMA_BITS, &AC_LUMA_VALUES[..]),
            (&AC_CHROMA_BITS, &AC_CHROMA_VALUES[..]),
        ] {
            assert_eq!(
                bits.iter().map(|b| *b as usize).sum::<usize>(),
                values.len()
            );
            let h = Huffman::new(bits, values);
            let codes: Vec<(u16, u8)> = values.iter().map(|v| h.codes[*v as usize]).collect();
            for (i, a) in codes.iter().enumerate() {
                assert!(a.1 > 0 && a.1 <= 16);
                assert!(u32::from(a.0) < (1 << a.1), "code fits its length");
                for b in &codes[i + 1..] {
                    let (short, long) = if a.1 <= b.1 { (a, b) } else { (b, a) };
                    assert_ne!(long.0 >> (long.1 - short.1), short.0, "prefix");
                }
            }
        }
    }
}

#[cfg(test)]
mod bench {
    /// Nanoseconds this thread has run on a CPU (Linux), so a loaded machine does not inflate it.
    fn cpu_ns() -> f64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
            .unwrap_or(0.0)
    }

    fn time<F: FnMut(usize) -> usize>(n: usize, mut f: F) -> (f64, usize) {
        let (c, t) = (cpu_ns(), std::time::Instant::now());
        let mut bytes = 0;
        for i in 0..n {
            bytes += f(i);
        }
        let cpu = (cpu_ns() - c) / n as f64 / 1e3;
        let wall = t.elapsed().as_secs_f64() / n as f64 * 1e6;
        (if cpu > 0.0 { cpu } else { wall }, bytes)
    }

    /// `cargo test -p hq-data --release --lib synth::jpeg::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_encoders() {
        use crate::synth::scene::Scene;
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let scenes: Vec<Scene> = (0..200).map(|_| Scene::random(&mut rng)).collect();
        let canvases: Vec<_> = scenes
            .iter()
            .map(|s| crate::synth::render::render(s, 64))
            .collect();
        let n = 5000;
        let (ours, _) = time(n, |i| {
            super::encode_rgb(&canvases[i % 200].pixels, 64, 64, 90).len()
        });
        let (theirs, _) = time(n, |i| {
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
                .encode(
                    &canvases[i % 200].pixels,
                    64,
                    64,
                    image::ExtendedColorType::Rgb8,
                )
                .map(|_| out.len())
                .unwrap_or(0)
        });
        let (png, _) = time(n, |i| {
            crate::synth::render::encode(&canvases[i % 200], super::super::ImageFormat::Png, 90)
                .map(|b| b.len())
                .unwrap_or(0)
        });
        let (render, _) = time(n, |i| {
            crate::synth::render::render(&scenes[i % 200], 64)
                .pixels
                .len()
        });
        let cfg = crate::synth::SynthConfig::default();
        let (sample, _) = time(2000, |i| {
            crate::synth::train_sample(&cfg, i as u64)
                .map(|g| g.sample.raw_text.len())
                .unwrap_or(0)
        });
        println!(
            "CPU time per 64x64 image: JPEG ours {ours:.1} us, JPEG image crate {theirs:.1} us, \
             PNG {png:.1} us, render {render:.1} us; whole training sample {sample:.1} us"
        );
    }
}
