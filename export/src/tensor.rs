//! Tensors for initializers and attributes, and the f16 conversion they need.
//!
//! Data goes into `raw_data` as little-endian bytes (what ONNX specifies for raw data): it is the
//! compact encoding, and the one exporters such as PyTorch's use for weights. f16 is stored as its
//! IEEE binary16 bits; the conversion is here rather than in a dependency because it is twenty lines
//! and its rounding (to nearest, ties to even, like numpy and PyTorch) is tested exhaustively.

use crate::error::{ExportError, Result};
use crate::onnx::{tensor_proto::DataType, TensorProto};

/// Element types the builder declares for inputs, outputs and value infos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    /// 32-bit float.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// 64-bit signed integer (token ids, shapes, indices).
    I64,
    /// 32-bit signed integer.
    I32,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer (images).
    U8,
    /// Boolean (masks).
    Bool,
}

impl ElemType {
    /// The `TensorProto.DataType` value.
    pub fn data_type(self) -> DataType {
        match self {
            ElemType::F32 => DataType::Float,
            ElemType::F16 => DataType::Float16,
            ElemType::BF16 => DataType::Bfloat16,
            ElemType::F64 => DataType::Double,
            ElemType::I64 => DataType::Int64,
            ElemType::I32 => DataType::Int32,
            ElemType::I8 => DataType::Int8,
            ElemType::U8 => DataType::Uint8,
            ElemType::Bool => DataType::Bool,
        }
    }

    /// The integer stored in protobuf fields and used by `Cast`'s `to` attribute.
    pub fn code(self) -> i64 {
        i64::from(self.data_type() as i32)
    }
}

fn element_count(name: &str, dims: &[usize], actual: usize) -> Result<()> {
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .unwrap_or(usize::MAX);
    if expected != actual {
        return Err(ExportError::DataLength {
            name: name.to_string(),
            dims: dims.to_vec(),
            expected,
            actual,
        });
    }
    Ok(())
}

fn raw_tensor(name: &str, dims: &[usize], ty: ElemType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(ty.data_type() as i32),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// An f32 tensor from row-major `data` with shape `dims`.
pub fn tensor_f32(name: &str, dims: &[usize], data: &[f32]) -> Result<TensorProto> {
    element_count(name, dims, data.len())?;
    let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(raw_tensor(name, dims, ElemType::F32, raw))
}

/// An f16 tensor from binary16 bit patterns (see [`f32_to_f16_bits`]).
pub fn tensor_f16_bits(name: &str, dims: &[usize], bits: &[u16]) -> Result<TensorProto> {
    element_count(name, dims, bits.len())?;
    let raw = bits.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(raw_tensor(name, dims, ElemType::F16, raw))
}

/// An f16 tensor from f32 values, rounded to nearest (ties to even).
pub fn tensor_f16(name: &str, dims: &[usize], data: &[f32]) -> Result<TensorProto> {
    let bits: Vec<u16> = data.iter().map(|&v| f32_to_f16_bits(v)).collect();
    tensor_f16_bits(name, dims, &bits)
}

/// An i64 tensor (shapes for Reshape, starts/ends for Slice, indices for Gather).
pub fn tensor_i64(name: &str, dims: &[usize], data: &[i64]) -> Result<TensorProto> {
    element_count(name, dims, data.len())?;
    let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(raw_tensor(name, dims, ElemType::I64, raw))
}

/// An i32 tensor (indices and comparisons kept in 32 bits for TensorRT).
pub fn tensor_i32(name: &str, dims: &[usize], data: &[i32]) -> Result<TensorProto> {
    element_count(name, dims, data.len())?;
    let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(raw_tensor(name, dims, ElemType::I32, raw))
}

/// Converts f32 to IEEE binary16 bits, rounding to nearest with ties to even; overflow gives
/// infinity, NaN stays NaN (quiet), tiny values become subnormals or signed zero.
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x007f_ffff;
    if exp == 0xff {
        let nan = if man != 0 {
            0x0200 | (man >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    // Exponent re-biased from 127 to 15.
    let e = exp - 112;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal half (or zero): value = m * 2^(exp-150) = k * 2^-24 with k = m >> (14 - e).
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let mut k = m >> shift;
        let rem = m & ((1u32 << shift) - 1);
        let half = 1u32 << (shift - 1);
        if rem > half || (rem == half && k & 1 == 1) {
            k += 1;
        }
        return sign | k as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        // A carry out of the mantissa correctly bumps the exponent, up to infinity.
        h += 1;
    }
    sign | h as u16
}

/// Converts IEEE binary16 bits to f32 (exact).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x03ff);
    match exp {
        0 => {
            // Zero or subnormal: man * 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            if sign != 0 {
                -v
            } else {
                v
            }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(sign | ((exp + 112) << 23) | (man << 13)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        assert_eq!(f32_to_f16_bits(1.0), 0x3c00);
        assert_eq!(f32_to_f16_bits(-2.0), 0xc000);
        assert_eq!(f32_to_f16_bits(0.0), 0x0000);
        assert_eq!(f32_to_f16_bits(-0.0), 0x8000);
        assert_eq!(f32_to_f16_bits(65504.0), 0x7bff);
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00); // rounds up to infinity
        assert_eq!(f32_to_f16_bits(65519.0), 0x7bff);
        assert_eq!(f32_to_f16_bits(f32::INFINITY), 0x7c00);
        assert_eq!(f32_to_f16_bits(f32::NEG_INFINITY), 0xfc00);
        assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
        assert_eq!(f32_to_f16_bits(2f32.powi(-24)), 0x0001); // smallest subnormal
        assert_eq!(f32_to_f16_bits(2f32.powi(-25)), 0x0000); // tie to even (0)
        assert_eq!(f32_to_f16_bits(1.5 * 2f32.powi(-24)), 0x0002); // tie to even (2)
        assert_eq!(f32_to_f16_bits(2f32.powi(-14)), 0x0400); // smallest normal
        assert_eq!(f32_to_f16_bits(0.1), 0x2e66);
        assert_eq!(f16_bits_to_f32(0x3555), 0.333_251_95);
    }

    #[test]
    fn every_half_round_trips_and_midpoints_round_to_even() {
        for h in 0u16..=0xffff {
            let v = f16_bits_to_f32(h);
            if v.is_nan() {
                assert!(f16_bits_to_f32(f32_to_f16_bits(v)).is_nan());
                continue;
            }
            assert_eq!(f32_to_f16_bits(v), h, "{h:#06x}");
            // Midpoint to the next half of the same sign (exact in f32), and just off it.
            let next = h.wrapping_add(1);
            if h & 0x7fff >= 0x7c00 || next & 0x7fff >= 0x7c00 || (next ^ h) & 0x8000 != 0 {
                continue;
            }
            let w = f16_bits_to_f32(next);
            let mid = ((f64::from(v) + f64::from(w)) / 2.0) as f32;
            let even = if h & 1 == 0 { h } else { next };
            assert_eq!(f32_to_f16_bits(mid), even, "midpoint after {h:#06x}");
            let above = f32::from_bits(mid.to_bits() + 1); // away from zero
            let below = f32::from_bits(mid.to_bits() - 1); // toward zero
            assert_eq!(
                f32_to_f16_bits(above),
                next,
                "above midpoint after {h:#06x}"
            );
            assert_eq!(f32_to_f16_bits(below), h, "below midpoint after {h:#06x}");
        }
    }

    #[test]
    fn data_length_is_checked() {
        assert!(matches!(
            tensor_f32("w", &[2, 3], &[0.0; 5]),
            Err(ExportError::DataLength {
                expected: 6,
                actual: 5,
                ..
            })
        ));
        assert!(matches!(
            tensor_i64("s", &[usize::MAX, 2], &[1]),
            Err(ExportError::DataLength {
                expected: usize::MAX,
                ..
            })
        ));
        assert!(tensor_f32("scalar", &[], &[1.0]).is_ok());
    }
}
