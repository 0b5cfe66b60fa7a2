//! `qwen2vl.plan`: the recaptioner as one deployable file (`hq-recap-trt build`, then
//! `hq-recap-trt --engine qwen2vl.plan`).
//!
//! An inference cluster copies one file to its nodes and runs it; a plan built for one GPU and
//! library set must not silently run (or crash, or rebuild for minutes) on another. So a plan is a
//! tar archive whose first member is `manifest.json`:
//!
//! - what it was built for: the provider (cpu, cuda, tensorrt), fp16, the TensorRT profile shapes;
//! - the machine it was built on: ONNX Runtime's build string, and for GPU plans the GPU's name and
//!   compute capability, the CUDA driver version and TensorRT's library version;
//! - every other member's size and SHA-256.
//!
//! The other members are the model folder (`model/`: the ONNX files, tokenizer, configs, the
//! prompt template) and, for TensorRT, `model/trt_cache/`: the engines (and timing cache) that
//! ONNX Runtime's TensorRT provider built for the profile shapes during `build`, which it loads
//! instead of building when the shapes, the GPU and the libraries match. (ONNX Runtime's
//! EP-context models are the other way to ship engines; the engine cache needs no second export
//! of the ONNX files and is what `--trt-cache` already uses.)
//!
//! Opening a plan extracts it once into a cache folder named by the manifest's hash (next to the
//! plan, or `HQ_PLAN_CACHE`), checking every member against the manifest as it is written: a
//! truncated plan, a member whose bytes differ, an extra or missing member, or a manifest that
//! does not fit this machine is refused with what differs and what to do.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Result, RuntimeError};
use crate::qwen2vl::TrtProfile;

/// The manifest's `format` value.
pub const PLAN_FORMAT: &str = "hq-recap-plan-1";
const MANIFEST: &str = "manifest.json";
/// Folder of the model inside a plan.
pub const MODEL_PREFIX: &str = "model/";

fn io_err(action: &'static str, path: &Path, source: std::io::Error) -> RuntimeError {
    RuntimeError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn plan_err(path: &Path, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Plan {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// One member's size and SHA-256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub bytes: u64,
    pub sha256: String,
}

/// The GPU a plan was built on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuFacts {
    pub name: String,
    /// `major.minor`, e.g. `9.0` for an H100.
    pub compute_capability: String,
    /// The CUDA driver's version (`cuDriverGetVersion`, e.g. 13000).
    pub driver: i32,
}

/// The facts of a machine that decide whether a plan's engines run there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MachineFacts {
    /// ONNX Runtime's build string (`ort::info()`: branch, commit, build type).
    pub onnxruntime: String,
    pub gpu: Option<GpuFacts>,
    /// TensorRT's library version (`getInferLibVersion`), when libnvinfer loads.
    pub tensorrt: Option<i32>,
}

/// What a plan holds and was built for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanManifest {
    pub format: String,
    /// `cpu`, `cuda:N` or `tensorrt:N` as [`crate::ExecutionProvider`] writes it.
    pub provider: String,
    pub fp16: bool,
    /// The TensorRT profile shapes the engines were built for.
    pub trt_profile: Option<TrtProfile>,
    /// When it was built (RFC 3339, UTC).
    pub built: String,
    pub built_on: MachineFacts,
    /// Every member but the manifest, by path inside the plan.
    pub members: BTreeMap<String, Member>,
}

impl PlanManifest {
    /// Whether this plan's engines can run on `here`. Only TensorRT plans hold engines, which are
    /// tied to the GPU architecture, TensorRT and ONNX Runtime that built them; CPU and CUDA plans
    /// hold only ONNX files and run anywhere their provider exists.
    pub fn check_machine(&self, here: &MachineFacts) -> std::result::Result<(), String> {
        if !self.provider.starts_with("tensorrt") {
            return Ok(());
        }
        let mut diffs = Vec::new();
        match (&self.built_on.gpu, &here.gpu) {
            (Some(a), Some(b)) if a.compute_capability != b.compute_capability => {
                diffs.push(format!(
                    "GPU compute capability {} ({}) here, {} ({}) in the plan",
                    b.compute_capability, b.name, a.compute_capability, a.name
                ))
            }
            (Some(_), None) => diffs.push("no GPU here".into()),
            _ => {}
        }
        if self.built_on.tensorrt != here.tensorrt {
            diffs.push(format!(
                "TensorRT {} here, {} in the plan",
                trt_version(here.tensorrt),
                trt_version(self.built_on.tensorrt)
            ));
        }
        if self.built_on.onnxruntime != here.onnxruntime {
            diffs.push(format!(
                "ONNX Runtime '{}' here, '{}' in the plan",
                here.onnxruntime, self.built_on.onnxruntime
            ));
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "this TensorRT plan was built for another machine: {}; its engines would not load \
                 here. Build one on this machine kind: hq-recap-trt build --model MODEL_DIR \
                 --provider {} --out qwen2vl.plan",
                diffs.join("; "),
                self.provider
            ))
        }
    }
}

fn trt_version(v: Option<i32>) -> String {
    match v {
        Some(v) => format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100),
        None => "absent".into(),
    }
}

/// This machine's facts for a plan on `provider` (GPU facts only for GPU providers).
pub fn machine_facts(gpu_ordinal: Option<usize>) -> MachineFacts {
    MachineFacts {
        onnxruntime: onnxruntime_build(),
        gpu: gpu_ordinal.and_then(gpu_facts),
        tensorrt: gpu_ordinal.and_then(|_| tensorrt_version()),
    }
}

/// `ort::info()` without its compile flags (the branch, commit and build type identify a build).
fn onnxruntime_build() -> String {
    if crate::env::init().is_err() {
        return "not loaded".into();
    }
    ort::info()
        .split(", cmake")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn gpu_facts(ordinal: usize) -> Option<GpuFacts> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    // SAFETY: only tries to load the driver library (cudarc would panic on first use without it).
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    let ctx = cudarc::driver::CudaContext::new(ordinal).ok()?;
    let major = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .ok()?;
    let minor = ctx
        .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        .ok()?;
    let mut driver = 0;
    // SAFETY: writes one int; the driver library is present (checked above).
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
    Some(GpuFacts {
        name: ctx.name().ok()?,
        compute_capability: format!("{major}.{minor}"),
        driver,
    })
}

/// TensorRT's version from `libnvinfer` (`getInferLibVersion`), when it loads.
fn tensorrt_version() -> Option<i32> {
    ["libnvinfer.so.10", "libnvinfer.so"]
        .iter()
        .find_map(|name| {
            // SAFETY: loading TensorRT's library runs no initialiser with preconditions; the symbol
            // is `int32_t getInferLibVersion()` (NvInferRuntimeBase.h), called with no arguments.
            unsafe {
                let lib = libloading::Library::new(*name).ok()?;
                let f: libloading::Symbol<unsafe extern "C" fn() -> i32> =
                    lib.get(b"getInferLibVersion").ok()?;
                Some(f())
            }
        })
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every file under `dir` (sorted), by its path relative to `dir` with `/` separators.
fn files_under(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).map_err(|e| io_err("listing", &d, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("listing", &d, e))?;
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                let rel = p
                    .strip_prefix(dir)
                    .map(|r| r.to_string_lossy().replace('\\', "/"))
                    .unwrap_or_default();
                out.push((rel, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes a plan of `model_dir` to `out`, atomically (a temporary file renamed into place); its
/// `trt_cache/` (the built engines) goes in only with `include_trt_cache`.
pub fn write_plan(
    model_dir: &Path,
    include_trt_cache: bool,
    provider: String,
    fp16: bool,
    trt_profile: Option<TrtProfile>,
    built_on: MachineFacts,
    out: &Path,
) -> Result<PlanManifest> {
    let files: Vec<_> = files_under(model_dir)?
        .into_iter()
        .filter(|(rel, _)| include_trt_cache || !rel.starts_with("trt_cache/"))
        .collect();
    let io = |path: &Path, e| io_err("writing the plan", path, e);
    let mut members = BTreeMap::new();
    for (rel, path) in &files {
        let bytes = fs::read(path).map_err(|e| io(path, e))?;
        members.insert(
            format!("{MODEL_PREFIX}{rel}"),
            Member {
                bytes: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
            },
        );
    }
    let manifest = PlanManifest {
        format: PLAN_FORMAT.into(),
        provider,
        fp16,
        trt_profile,
        built: now_rfc3339(),
        built_on,
        members,
    };
    let tmp = out.with_extension("plan.partial");
    let file = fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| plan_err(out, e.to_string()))?;
    append(&mut tar, MANIFEST, &json).map_err(|e| io(&tmp, e))?;
    for (rel, path) in &files {
        let bytes = fs::read(path).map_err(|e| io(path, e))?;
        append(&mut tar, &format!("{MODEL_PREFIX}{rel}"), &bytes).map_err(|e| io(&tmp, e))?;
    }
    let mut w = tar.into_inner().map_err(|e| io(&tmp, e))?;
    w.flush().map_err(|e| io(&tmp, e))?;
    w.into_inner()
        .map_err(|e| io(&tmp, e.into_error()))?
        .sync_all()
        .map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, out).map_err(|e| io(out, e))?;
    Ok(manifest)
}

/// Builds a plan of the model in `model_dir` for `opts.provider` into `out`. For TensorRT the
/// engines are built here, for `opts.trt_profile`'s shapes: the model is copied into a staging
/// folder beside `out`, loaded with the engine cache there, and run once on a synthetic image (the
/// provider builds its engines on the first run); the staging folder then becomes the plan.
pub fn build_plan(
    model_dir: &Path,
    opts: &crate::qwen2vl::EngineOptions,
    out: &Path,
) -> Result<PlanManifest> {
    use crate::ExecutionProvider;
    let gpu = match &opts.provider {
        ExecutionProvider::Cuda { device_id } | ExecutionProvider::TensorRt { device_id, .. } => {
            Some(*device_id as usize)
        }
        _ => None,
    };
    let fp16 = matches!(
        &opts.provider,
        ExecutionProvider::TensorRt { fp16: true, .. }
    );
    // The spec `--provider` takes (no fp16 or cache annotations): the plan's own are separate.
    let provider = match &opts.provider {
        ExecutionProvider::Cpu => "cpu".to_string(),
        ExecutionProvider::Cuda { device_id } => format!("cuda:{device_id}"),
        ExecutionProvider::TensorRt { device_id, .. } => format!("tensorrt:{device_id}"),
    };
    if !matches!(opts.provider, ExecutionProvider::TensorRt { .. }) {
        // Loading checks the folder (files, configs, ONNX inputs) before anything is written.
        crate::qwen2vl::Qwen2Vl::load(model_dir, opts)?;
        return write_plan(
            model_dir,
            false,
            provider,
            fp16,
            None,
            machine_facts(gpu),
            out,
        );
    }
    let staging = out.with_extension("plan.build");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| io_err("clearing", &staging, e))?;
    }
    for (rel, path) in files_under(model_dir)? {
        if rel.starts_with("trt_cache/") {
            continue;
        }
        let to = staging.join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| io_err("staging", parent, e))?;
        }
        fs::copy(&path, &to).map_err(|e| io_err("staging", &to, e))?;
    }
    let mut build_opts = opts.clone();
    build_opts.provider = opts
        .provider
        .clone()
        .with_cache_dir(staging.join("trt_cache"));
    warm_up(&staging, &build_opts)?;
    let manifest = write_plan(
        &staging,
        true,
        provider,
        fp16,
        Some(opts.trt_profile.clone()),
        machine_facts(gpu),
        out,
    )?;
    fs::remove_dir_all(&staging).map_err(|e| io_err("clearing", &staging, e))?;
    Ok(manifest)
}

/// One short generation on a synthetic image, so that the provider builds what it builds on first
/// use.
fn warm_up(model_dir: &Path, opts: &crate::qwen2vl::EngineOptions) -> Result<()> {
    use crate::recaption::{ExemplarSet, GenInput, Generator, Qwen2VlGenerator};
    let engine = crate::qwen2vl::Qwen2Vl::load(model_dir, opts)?;
    let mut generator = Qwen2VlGenerator::new(engine, 8, None);
    let prompt = crate::recaption::prompt::PromptTemplate::for_model_dir(model_dir)?;
    let exemplars = ExemplarSet::builtin();
    let rgb = image::RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 128]));
    let image = generator.processor().process_rgb(&rgb)?;
    let input = GenInput {
        key: "plan-warm-up",
        image: &image,
        messages: prompt.messages(exemplars.pick(0), "a test image"),
        seed: 0,
        sampling: crate::qwen2vl::Sampling::Greedy,
        attempt: 0,
    };
    generator.generate(&[input])?;
    Ok(())
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    tar.append_data(&mut h, name, bytes)
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// A plan opened for running: its manifest and the extracted model folder.
#[derive(Debug, Clone)]
pub struct OpenedPlan {
    pub manifest: PlanManifest,
    pub model_dir: PathBuf,
}

/// Reads only the manifest (the first member).
pub fn read_manifest(plan: &Path) -> Result<PlanManifest> {
    let file = fs::File::open(plan).map_err(|e| plan_err(plan, format!("cannot open: {e}")))?;
    let mut archive = tar::Archive::new(file);
    let mut entries = archive
        .entries()
        .map_err(|e| plan_err(plan, format!("not a plan (not a tar archive): {e}")))?;
    let mut first = entries
        .next()
        .ok_or_else(|| plan_err(plan, "empty: not a plan"))?
        .map_err(|e| plan_err(plan, format!("not a plan: {e}")))?;
    let name = first
        .path()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name != MANIFEST || first.size() > 64 << 20 {
        return Err(plan_err(
            plan,
            "not a plan: its first member is not manifest.json",
        ));
    }
    let mut json = Vec::new();
    first
        .read_to_end(&mut json)
        .map_err(|e| plan_err(plan, format!("manifest.json is truncated: {e}")))?;
    let manifest: PlanManifest = serde_json::from_slice(&json)
        .map_err(|e| plan_err(plan, format!("manifest.json is not a plan manifest: {e}")))?;
    if manifest.format != PLAN_FORMAT {
        return Err(plan_err(
            plan,
            format!(
                "format {:?}; this hq-recap-trt reads {PLAN_FORMAT}",
                manifest.format
            ),
        ));
    }
    Ok(manifest)
}

/// Opens `plan` for running on `here`: checks the manifest against the machine, then extracts the
/// model (once per plan content) into `cache_root/<manifest hash>/`, verifying every member.
pub fn open_plan(plan: &Path, cache_root: &Path, here: &MachineFacts) -> Result<OpenedPlan> {
    let manifest = read_manifest(plan)?;
    manifest
        .check_machine(here)
        .map_err(|reason| plan_err(plan, reason))?;
    let key = sha256_hex(&serde_json::to_vec(&manifest).unwrap_or_default());
    let dest = cache_root.join(&key[..16]);
    let done = dest.join(".complete");
    if !done.is_file() {
        extract_verified(plan, &manifest, &dest)?;
    } else if let Err(reason) = verify_extracted(&manifest, &dest) {
        // The plan is the source of truth: a cache changed since extraction (a file edited,
        // deleted or cut short) is replaced, never run.
        eprintln!(
            "hq-recap-trt: the extracted plan in {} no longer matches its manifest ({reason}); \
             extracting it again",
            dest.display()
        );
        extract_verified(plan, &manifest, &dest)?;
    }
    Ok(OpenedPlan {
        manifest,
        model_dir: dest.join(MODEL_PREFIX.trim_end_matches('/')),
    })
}

/// Checks an extracted plan against its manifest: every member present with its size and SHA-256.
/// Run at every open, so that "the plan runs or is refused" holds for the cache too. Cost: sha2
/// 0.10 hashes 1.0 GB/s on one core of the development machine (Intel Xeon, measured 2026-12-06 on
/// 512 MiB), about 4 s for a 2B-parameter fp16 model, small next to loading it into sessions.
fn verify_extracted(manifest: &PlanManifest, dest: &Path) -> std::result::Result<(), String> {
    for (name, want) in &manifest.members {
        let path = dest.join(name);
        let mut file = fs::File::open(&path).map_err(|e| format!("{name}: {e}"))?;
        let mut hasher = Sha256::new();
        let bytes = std::io::copy(&mut file, &mut hasher).map_err(|e| format!("{name}: {e}"))?;
        if bytes != want.bytes {
            return Err(format!("{name} is {bytes} bytes, not {}", want.bytes));
        }
        let got: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if got != want.sha256 {
            return Err(format!("{name} differs from its SHA-256"));
        }
    }
    Ok(())
}

fn extract_verified(plan: &Path, manifest: &PlanManifest, dest: &Path) -> Result<()> {
    let io = |path: &Path, e| io_err("extracting the plan", path, e);
    let partial = dest.with_extension("partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(|e| io(&partial, e))?;
    }
    let file = fs::File::open(plan).map_err(|e| io(plan, e))?;
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries()
        .map_err(|e| plan_err(plan, format!("not a plan: {e}")))?;
    let mut seen = BTreeMap::new();
    for (i, entry) in entries.enumerate() {
        let mut entry = entry.map_err(|e| plan_err(plan, format!("truncated or damaged: {e}")))?;
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .map_err(|e| plan_err(plan, format!("a member name: {e}")))?;
        if i == 0 {
            continue; // the manifest, read already
        }
        let want = manifest.members.get(&name).ok_or_else(|| {
            plan_err(
                plan,
                format!("{name} is in the plan but not in its manifest"),
            )
        })?;
        // Member names come from our own writer; anything that could leave the folder is refused.
        if !name.starts_with(MODEL_PREFIX)
            || name.contains("..")
            || name.starts_with('/')
            || entry.header().entry_type() != tar::EntryType::Regular
        {
            return Err(plan_err(
                plan,
                format!("{name}: not a plain file inside model/"),
            ));
        }
        if entry.size() != want.bytes {
            return Err(plan_err(
                plan,
                format!(
                    "{name} is {} bytes, the manifest says {}",
                    entry.size(),
                    want.bytes
                ),
            ));
        }
        let mut bytes = Vec::with_capacity(want.bytes as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| plan_err(plan, format!("{name} is truncated: {e}")))?;
        if bytes.len() as u64 != want.bytes {
            return Err(plan_err(plan, format!("{name} is truncated")));
        }
        if sha256_hex(&bytes) != want.sha256 {
            return Err(plan_err(
                plan,
                format!(
                    "{name} differs from its manifest (SHA-256): the plan was altered or damaged"
                ),
            ));
        }
        let path = partial.join(&name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        fs::write(&path, &bytes).map_err(|e| io(&path, e))?;
        seen.insert(name, ());
    }
    let missing: Vec<&String> = manifest
        .members
        .keys()
        .filter(|k| !seen.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        return Err(plan_err(
            plan,
            format!(
                "truncated: {} member(s) of the manifest are missing, e.g. {}",
                missing.len(),
                missing[0]
            ),
        ));
    }
    fs::write(partial.join(".complete"), b"").map_err(|e| io(&partial, e))?;
    if dest.exists() {
        fs::remove_dir_all(dest).map_err(|e| io(dest, e))?;
    }
    fs::rename(&partial, dest).map_err(|e| io(dest, e))?;
    Ok(())
}

/// Where plans are extracted: `HQ_PLAN_CACHE`, else `<plan>.d` beside the plan.
pub fn default_cache_root(plan: &Path) -> PathBuf {
    match std::env::var_os("HQ_PLAN_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let mut s = plan.as_os_str().to_owned();
            s.push(".d");
            PathBuf::from(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trt_manifest(cc: &str, trt: Option<i32>, ort: &str) -> PlanManifest {
        PlanManifest {
            format: PLAN_FORMAT.into(),
            provider: "tensorrt:0".into(),
            fp16: true,
            trt_profile: None,
            built: "2026-12-06T00:00:00Z".into(),
            built_on: MachineFacts {
                onnxruntime: ort.into(),
                gpu: Some(GpuFacts {
                    name: "NVIDIA H100 80GB HBM3".into(),
                    compute_capability: cc.into(),
                    driver: 13000,
                }),
                tensorrt: trt,
            },
            members: BTreeMap::new(),
        }
    }

    #[test]
    fn a_tensorrt_plan_runs_only_where_it_was_built() {
        let plan = trt_manifest("9.0", Some(100900), "git-branch=rel-1.31.1");
        assert!(plan.check_machine(&plan.built_on.clone()).is_ok());
        let mut here = plan.built_on.clone();
        here.gpu = Some(GpuFacts {
            name: "NVIDIA A100".into(),
            compute_capability: "8.0".into(),
            driver: 13000,
        });
        let e = plan.check_machine(&here).expect_err("another GPU");
        assert!(
            e.contains("8.0") && e.contains("9.0") && e.contains("hq-recap-trt build"),
            "{e}"
        );
        let mut here = plan.built_on.clone();
        here.tensorrt = Some(101000);
        let e = plan.check_machine(&here).expect_err("another TensorRT");
        assert!(e.contains("10.10.0") && e.contains("10.9.0"), "{e}");
        let mut here = plan.built_on.clone();
        here.gpu = None;
        assert!(plan.check_machine(&here).is_err());
        // CPU and CUDA plans carry no engines: any machine.
        let mut cpu = plan.clone();
        cpu.provider = "cpu".into();
        assert!(cpu.check_machine(&MachineFacts::default()).is_ok());
    }

    #[test]
    fn dates_are_rfc3339() {
        let s = now_rfc3339();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z'), "{s}");
    }
}
