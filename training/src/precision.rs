//! bf16 autocast on CUDA.
//!
//! tch exposes libtorch's autocast switch (`tch::autocast`) but not the autocast dtype, which
//! libtorch defaults to fp16 on CUDA; fp16 would need loss scaling. CLIP training uses bf16, so the
//! dtype is set through libtorch's own `at::autocast::set_autocast_dtype(DeviceType, ScalarType)`,
//! an exported C++ function taking two `int8_t`-backed enums (passed as C `int8_t`s under the
//! x86-64 and AArch64 C ABIs).

use crate::TrainError;

/// `c10::DeviceType::CUDA`.
const DEVICE_TYPE_CUDA: i8 = 1;
/// `c10::ScalarType::BFloat16`.
const SCALAR_TYPE_BF16: i8 = 15;

extern "C" {
    #[link_name = "_ZN2at8autocast18set_autocast_dtypeEN3c1010DeviceTypeENS1_10ScalarTypeE"]
    fn at_autocast_set_autocast_dtype(device_type: i8, dtype: i8);
    #[link_name = "_ZN2at8autocast18get_autocast_dtypeEN3c1010DeviceTypeE"]
    fn at_autocast_get_autocast_dtype(device_type: i8) -> i8;
}

/// Makes CUDA autocast regions compute in bf16 (process-wide, as in PyTorch).
pub fn use_bf16_autocast_on_cuda() -> Result<(), TrainError> {
    // SAFETY: plain functions of the loaded libtorch taking/returning enum values.
    unsafe { at_autocast_set_autocast_dtype(DEVICE_TYPE_CUDA, SCALAR_TYPE_BF16) };
    let got = unsafe { at_autocast_get_autocast_dtype(DEVICE_TYPE_CUDA) };
    if got != SCALAR_TYPE_BF16 {
        return Err(TrainError::Device {
            spec: "cuda".into(),
            reason: format!("libtorch did not switch CUDA autocast to bf16 (dtype code {got})"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_autocast_dtype_switch_is_linked_and_works() {
        // Setting the CUDA autocast dtype needs no GPU; it is a process-wide setting.
        super::use_bf16_autocast_on_cuda().expect("bf16 autocast");
    }
}
