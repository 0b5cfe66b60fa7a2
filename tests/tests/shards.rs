//! webdataset shards (`hq_data::shards`): round trips, determinism, shard specifications, every
//! kind of damaged input, killed writers, the side-car join, and compatibility with Python's
//! `webdataset` package in both directions.

use hq_data::shards::{
    expand_shard_spec, expand_shards, expand_shards_with, open_shard, read_parallel, ExpandOptions,
    ImageCheck, JoinOptions, ParallelOptions, ReadOptions, ShardReader, ShardWriter,
    ShardWriterOptions, Sidecar, SidecarJoin, TarSamples,
};
use hq_data::{ImageBytes, RefinedTexts, Sample, SampleError};
use image::{ImageEncoder, RgbImage};
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// Fixtures

fn jpeg(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 + seed * 13) as u8,
            (y * 5 + seed) as u8,
            ((x ^ y) + seed * 3) as u8,
        ])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .expect("encode jpeg");
    out
}

fn png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, seed as u8]));
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .expect("encode png");
    out
}

fn refined(i: usize) -> RefinedTexts {
    RefinedTexts {
        long_positive: format!("The image shows a striped pattern number {i}, in red and blue."),
        long_negative: format!("The image shows a dotted pattern number {i}, in green."),
        tags_positive: vec!["stripes".into(), format!("pattern {i}")],
        tags_negative: vec!["dots".into()],
        source: if matches!(i % 4, 0) {
            Some("oracle".into())
        } else {
            None
        },
    }
}

fn sample(i: usize) -> Sample {
    let (ext, bytes) = if i % 5 == 3 {
        ("png", png(12 + (i % 7) as u32, 9, i as u32))
    } else {
        ("jpg", jpeg(16 + (i % 3) as u32 * 8, 16, i as u32))
    };
    let mut s = Sample::new(
        format!("{i:06}"),
        ImageBytes {
            ext: ext.into(),
            bytes,
        },
        format!("alt-text {i}: café — 日本 {}", "z".repeat(i % 11)),
    );
    s.meta.insert("uid".into(), json!(format!("uid{i:05}")));
    s.meta
        .insert("url".into(), json!(format!("https://example.com/{i}.jpg")));
    s.meta.insert("width".into(), json!(16));
    s.meta
        .insert("similarity".into(), json!(0.25 + i as f64 / 8.0));
    s.meta
        .insert("extra".into(), json!({"list": [1, null, "x"]}));
    if matches!(i % 2, 0) {
        s.refined = Some(refined(i));
    }
    s
}

fn samples(n: usize) -> Vec<Sample> {
    (0..n).map(sample).collect()
}

fn write_all(prefix: &Path, items: &[Sample], opts: ShardWriterOptions) -> Vec<PathBuf> {
    let mut w = ShardWriter::new(prefix, opts).expect("writer");
    for s in items {
        w.write(s).expect("write sample");
    }
    w.finish().expect("finish")
}

fn per_shard(n: u64) -> ShardWriterOptions {
    ShardWriterOptions {
        max_samples: Some(n),
        ..Default::default()
    }
}

fn split(items: Vec<Result<Sample, SampleError>>) -> (Vec<Sample>, Vec<SampleError>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for it in items {
        match it {
            Ok(s) => good.push(s),
            Err(e) => bad.push(e),
        }
    }
    (good, bad)
}

fn read_bytes(bytes: &[u8], opts: ReadOptions) -> (Vec<Sample>, Vec<SampleError>, u64, u64) {
    let mut it = TarSamples::new(bytes, "mem.tar", opts);
    let items: Vec<_> = it.by_ref().collect();
    let (good, bad) = split(items);
    let st = it.stats();
    (good, bad, st.good, st.bad)
}

/// (name, header offset, data offset, size) of every member of an uncompressed ustar archive.
fn layout(bytes: &[u8]) -> Vec<(String, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 512 <= bytes.len() {
        let h = &bytes[off..off + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = String::from_utf8_lossy(&h[..name_end]).into_owned();
        let size_text = String::from_utf8_lossy(&h[124..136]);
        let size = usize::from_str_radix(size_text.trim_matches(|c| c == '\0' || c == ' '), 8)
            .expect("octal size");
        out.push((name, off, off + 512, size));
        off += 512 + size.div_ceil(512) * 512;
    }
    out
}

fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.into_inner().expect("finish")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Round trips and determinism

#[test]
fn round_trip_write_then_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = samples(25);
    let shards = write_all(&dir.path().join("out/train"), &items, per_shard(10));
    let names: Vec<String> = shards
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    );

    let spec = format!("{}/out/train-{{00000..00002}}.tar", dir.path().display());
    let mut reader = ShardReader::from_specs(&[spec], ReadOptions::default()).expect("specs");
    let (good, bad) = split(reader.by_ref().collect());
    assert!(bad.is_empty(), "{bad:?}");
    assert_eq!(good, items, "read back exactly what was written");
    assert!(good.iter().any(|s| s.refined.is_some()) && good.iter().any(|s| s.refined.is_none()));
    let stats = reader.stats();
    assert_eq!((stats.good, stats.bad, stats.shards.len()), (25, 0, 3));
    assert_eq!(stats.shards[2].good, 5);
    assert_eq!(stats.shards_ended_early(), 0);
    let line = stats.to_string();
    assert!(
        line.contains("3 shard(s), 25 samples: 25 good, 0 bad"),
        "{line}"
    );

    // Fully decoding every image finds nothing wrong either.
    let opts = ReadOptions {
        image_check: ImageCheck::Decode,
        ..Default::default()
    };
    let (good, bad) = split(ShardReader::new(shards, opts).collect());
    assert_eq!((good.len(), bad.len()), (25, 0));
}

#[test]
fn members_are_in_layout_order_with_deterministic_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shards = write_all(&dir.path().join("s"), &samples(4), per_shard(100));
    let bytes = fs::read(&shards[0]).expect("read");
    let names: Vec<String> = layout(&bytes).into_iter().map(|m| m.0).collect();
    assert_eq!(
        &names[..6],
        [
            "000000.jpg",
            "000000.txt",
            "000000.json",
            "000001.jpg",
            "000001.txt",
            "000001.json"
        ]
    );
    assert_eq!(names[9], "000003.png");
    for (_, off, _, _) in layout(&bytes) {
        let h = &bytes[off..off + 512];
        assert_eq!(&h[100..107], b"0000644", "mode");
        assert_eq!(&h[136..147], b"00000000000", "mtime 0");
        assert_eq!(&h[257..263], b"ustar\0", "ustar magic");
        assert_eq!(h[156], b'0', "regular file");
    }
}

#[test]
fn same_samples_give_byte_identical_shards() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let items = samples(23);
    let sa = write_all(&a.path().join("x"), &items, per_shard(7));
    std::thread::sleep(std::time::Duration::from_millis(1100)); // a later mtime must not matter
    let sb = write_all(&b.path().join("x"), &items, per_shard(7));
    assert_eq!(sa.len(), 4);
    for (pa, pb) in sa.iter().zip(&sb) {
        assert_eq!(
            fs::read(pa).expect("a"),
            fs::read(pb).expect("b"),
            "{}",
            pa.display()
        );
    }
}

#[test]
fn max_bytes_starts_new_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = samples(30);
    let limit = 16 * 1024;
    let shards = write_all(
        &dir.path().join("b"),
        &items,
        ShardWriterOptions {
            max_samples: None,
            max_bytes: Some(limit),
            first_index: 3,
        },
    );
    assert!(shards.len() > 2, "{shards:?}");
    assert!(shards[0].ends_with("b-00003.tar"));
    for p in &shards {
        let len = fs::metadata(p).expect("meta").len();
        assert!(len <= limit, "{} is {len} bytes", p.display());
    }
    let (good, bad) = split(ShardReader::new(shards, ReadOptions::default()).collect());
    assert!(bad.is_empty());
    assert_eq!(good, items);
}

#[test]
fn writer_rejects_keys_webdataset_would_regroup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = ShardWriter::new(dir.path().join("k"), per_shard(10)).expect("writer");
    let mut s = sample(1);
    s.key = "has.dot".into();
    assert!(w.write(&s).is_err());
    s.key = "ok/key".into();
    w.write(&s).expect("folder keys are fine");
    assert!(w.write(&s).is_err(), "same key twice in a row");
    s.key = "other".into();
    s.image.as_mut().expect("image").ext = "gif".into();
    assert!(w.write(&s).is_err(), "unknown image extension");
}

#[test]
fn parallel_reader_reads_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = samples(57);
    let shards = write_all(&dir.path().join("p"), &items, per_shard(8));
    assert_eq!(shards.len(), 8);
    let mut all = shards.clone();
    all.push(dir.path().join("missing-shard.tar"));
    let mut reader = read_parallel(
        all,
        ReadOptions::default(),
        ParallelOptions {
            threads: 3,
            capacity: 4,
        },
    );
    let (mut good, bad) = split(reader.by_ref().collect());
    good.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(good, items);
    assert_eq!(bad.len(), 1);
    assert!(bad[0].reason.contains("cannot open"), "{}", bad[0]);
    let st = reader.stats();
    assert_eq!((st.good, st.bad, st.shards.len()), (57, 1, 9));

    // Dropping it half-way stops the workers without a hang.
    let mut early = read_parallel(
        shards,
        ReadOptions::default(),
        ParallelOptions {
            threads: 2,
            capacity: 1,
        },
    );
    assert!(early.next().is_some());
    drop(early);
}

#[test]
fn gzipped_shards_are_read_and_their_truncation_reported() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let items = samples(6);
    let shards = write_all(&dir.path().join("g"), &items, per_shard(10));
    let raw = fs::read(&shards[0]).expect("read");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&raw).expect("gz");
    let gz = enc.finish().expect("gz");
    let path = dir.path().join("g.tar.gz");
    fs::write(&path, &gz).expect("write");
    let (good, bad) = split(ShardReader::new(vec![path.clone()], ReadOptions::default()).collect());
    assert_eq!((good, bad.len()), (items, 0));

    fs::write(&path, &gz[..gz.len() * 2 / 3]).expect("write");
    let mut s = open_shard(&path, &ReadOptions::default()).expect("open");
    let (good, bad) = split(s.by_ref().collect());
    assert!(good.len() < 6);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(
        bad[0].reason.contains("truncated") || bad[0].reason.contains("read error"),
        "{}",
        bad[0]
    );
}

// ---------------------------------------------------------------------------------------------
// Shard specifications

fn touch(p: &Path) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).expect("mkdir");
    }
    fs::write(p, b"").expect("touch");
}

#[test]
fn brace_glob_list_and_multi_specs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for i in 0..12 {
        touch(&d.join(format!("a/shard-{i:05}.tar")));
    }
    touch(&d.join("b/train.tar"));
    touch(&d.join("b/val.tar"));
    let root = d.display().to_string();

    let v = expand_shard_spec(&format!("{root}/a/shard-{{00000..00009}}.tar")).expect("range");
    assert_eq!(v.len(), 10);
    assert_eq!(v[0], d.join("a/shard-00000.tar"));
    assert_eq!(v[9], d.join("a/shard-00009.tar"));

    let v = expand_shard_spec(&format!("{root}/b/{{train,val}}.tar")).expect("list");
    assert_eq!(v, [d.join("b/train.tar"), d.join("b/val.tar")]);

    let v = expand_shard_spec(&format!("{root}/a/shard-0001?.tar")).expect("glob");
    assert_eq!(
        v,
        [d.join("a/shard-00010.tar"), d.join("a/shard-00011.tar")]
    );

    let v = expand_shard_spec(&format!(
        "{root}/b/val.tar::{root}/a/shard-{{00010..00011}}.tar"
    ))
    .expect("::");
    assert_eq!(v.len(), 3);
    assert_eq!(v[0], d.join("b/val.tar"));

    let v = expand_shards(&[
        format!("{root}/a/shard-0000[0-1].tar"),
        format!("{root}/b/*.tar"),
    ])
    .expect("several specs");
    assert_eq!(v.len(), 4);

    // A list file: comments, blank lines, relative paths (from the list's folder), and specs.
    fs::write(
        d.join("list.txt"),
        "# training shards\n\na/shard-00003.tar\n  a/shard-{00004..00005}.tar  \n# b/train.tar\nb/v*.tar\n",
    )
    .expect("list");
    let v = expand_shard_spec(&format!("{root}/list.txt")).expect("list file");
    assert_eq!(
        v,
        [
            d.join("a/shard-00003.tar"),
            d.join("a/shard-00004.tar"),
            d.join("a/shard-00005.tar"),
            d.join("b/val.tar")
        ]
    );
    fs::write(d.join("names"), "b/train.tar\n").expect("list");
    let v = expand_shard_spec(&format!("@{root}/names")).expect("@list");
    assert_eq!(v, [d.join("b/train.tar")]);

    std::env::set_var("WDS_HQ_SHARDS_TEST_ROOT", &root);
    let v = expand_shard_spec("${HQ_SHARDS_TEST_ROOT}/b/train.tar").expect("env");
    assert_eq!(v, [d.join("b/train.tar")]);
}

#[test]
fn specs_that_match_nothing_are_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    touch(&d.join("shard-00000.tar"));
    touch(&d.join("shard-00002.tar"));
    let root = d.display().to_string();
    let err = |spec: &str| expand_shard_spec(spec).expect_err(spec).to_string();

    let e = err(&format!("{root}/nothing-{{00000..00003}}.tar"));
    assert!(e.contains("matches nothing"), "{e}");
    let e = err(&format!("{root}/*.parquet"));
    assert!(e.contains("matches no file"), "{e}");
    let e = err(&format!("{root}/shard-{{00000..00002}}.tar"));
    assert!(e.contains("1 of its 3 path(s) do not exist"), "{e}");
    let e = err(&format!("{root}/shard-{{00000..00002.tar"));
    assert!(e.contains("unbalanced"), "{e}");
    let e = err(&format!("{root}/shard-00000.tar::"));
    assert!(e.contains("empty"), "{e}");
    let e = err("${HQ_SHARDS_TEST_SURELY_UNSET}/x.tar");
    assert!(e.contains("WDS_HQ_SHARDS_TEST_SURELY_UNSET"), "{e}");
    fs::write(d.join("empty.txt"), "# nothing here\n").expect("list");
    let e = err(&format!("{root}/empty.txt"));
    assert!(e.contains("names no shard"), "{e}");
    assert!(expand_shards::<&str>(&[]).is_err());

    // img2dataset leaves gaps; allow_missing skips them but still wants at least one shard.
    let opts = ExpandOptions {
        allow_missing: true,
    };
    let v = expand_shards_with(&[format!("{root}/shard-{{00000..00002}}.tar")], opts)
        .expect("allow missing");
    assert_eq!(v.len(), 2);
    assert!(expand_shards_with(&[format!("{root}/none-{{0..3}}.tar")], opts).is_err());
}

// ---------------------------------------------------------------------------------------------
// Damaged input

#[test]
fn truncation_at_every_offset_keeps_what_came_before() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items: Vec<Sample> = samples(6)
        .into_iter()
        .map(|mut s| {
            // Small images keep the archive short enough to cut at every single byte.
            s.image = Some(ImageBytes {
                ext: "jpg".into(),
                bytes: jpeg(8, 8, s.raw_text.len() as u32),
            });
            s
        })
        .collect();
    let shards = write_all(&dir.path().join("t"), &items, per_shard(100));
    let bytes = fs::read(&shards[0]).expect("read");
    let members = layout(&bytes);
    assert_eq!(members.len(), 18);
    let first_header: Vec<usize> = (0..6).map(|i| members[3 * i].1).collect();
    let json_end: Vec<usize> = (0..6)
        .map(|i| members[3 * i + 2].2 + members[3 * i + 2].3)
        .collect();
    let last = &members[17];
    let marker = last.2 + last.3.div_ceil(512) * 512;
    assert_eq!(bytes.len(), marker + 1024);

    let mut checked_mid_header = 0;
    let mut checked_mid_data = 0;
    for cut in 0..=bytes.len() {
        let (good, bad, n_good, n_bad) = read_bytes(&bytes[..cut], ReadOptions::default());
        assert_eq!(
            (n_good, n_bad),
            (good.len() as u64, bad.len() as u64),
            "cut {cut}"
        );
        if cut >= marker + 512 {
            assert!(bad.is_empty(), "cut {cut}: {bad:?}");
            assert_eq!(good, items, "cut {cut}");
            continue;
        }
        // Every sample whose members all lie before the cut is returned, intact and in order.
        let complete = json_end.iter().filter(|&&e| e <= cut).count();
        assert_eq!(good.len(), complete, "cut {cut}: {bad:?}");
        assert_eq!(good[..], items[..complete], "cut {cut}");
        // One record says the shard was truncated, and it names the cut sample when its first
        // header survived.
        assert_eq!(bad.len(), 1, "cut {cut}: {bad:?}");
        assert!(bad[0].reason.contains("truncated"), "cut {cut}: {}", bad[0]);
        let started = first_header.iter().filter(|&&h| h + 512 <= cut).count();
        if started > complete {
            assert_eq!(bad[0].key, items[complete].key, "cut {cut}: {}", bad[0]);
        } else {
            assert_eq!(bad[0].key, "", "cut {cut}: {}", bad[0]);
        }
        // good + bad accounts for every sample the cut left a trace of.
        let accounted = complete + usize::from(!bad[0].key.is_empty());
        assert_eq!(accounted, started, "cut {cut}");
        if members.iter().any(|m| cut > m.1 && cut < m.2) {
            checked_mid_header += 1;
        }
        if members.iter().any(|m| cut > m.2 && cut < m.2 + m.3) {
            checked_mid_data += 1;
        }
    }
    assert!(checked_mid_header > 1000 && checked_mid_data > 1000);
}

#[test]
fn truncated_shard_ends_and_the_next_shard_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = samples(20);
    let shards = write_all(&dir.path().join("n"), &items, per_shard(10));
    let bytes = fs::read(&shards[0]).expect("read");
    let members = layout(&bytes);
    // Cut in the middle of sample 4's image data.
    let (_, _, data, size) = members[12];
    fs::write(&shards[0], &bytes[..data + size / 2]).expect("cut");
    let mut reader = ShardReader::new(shards, ReadOptions::default());
    let (good, bad) = split(reader.by_ref().collect());
    let keys: Vec<&str> = good.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(keys.len(), 14);
    assert_eq!(&keys[..4], ["000000", "000001", "000002", "000003"]);
    assert_eq!(keys[4], "000010");
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].key, "000004");
    assert!(
        bad[0]
            .reason
            .contains("truncated tar: member 000004.jpg cut short"),
        "{}",
        bad[0]
    );
    let st = reader.stats();
    assert_eq!((st.good, st.bad), (14, 1));
    assert_eq!(st.shards_ended_early(), 1);
    let full = format!("{st:#}");
    assert!(full.contains("ended early: truncated tar"), "{full}");
}

#[test]
fn corrupted_members_of_a_good_shard_are_per_sample_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let items = samples(8);
    let shards = write_all(&dir.path().join("c"), &items, per_shard(100));
    let mut bytes = fs::read(&shards[0]).expect("read");
    let members = layout(&bytes);
    let find = |name: &str| {
        members
            .iter()
            .find(|m| m.0 == name)
            .map(|m| (m.2, m.3))
            .expect(name)
    };
    // Garbage image bytes (same length, so the archive stays well-formed).
    let (off, len) = find("000001.jpg");
    bytes[off..off + len].fill(b'X');
    // Invalid JSON.
    let (off, _) = find("000002.json");
    bytes[off] = b'[';
    // Invalid UTF-8 in the text.
    let (off, _) = find("000004.txt");
    bytes[off + 3] = 0xff;
    // Refined texts of the wrong shape.
    let (off, len) = find("000006.json");
    let text = String::from_utf8(bytes[off..off + len].to_vec()).expect("utf8");
    let broken = text.replacen("\"long_positive\"", "\"long_pozitive\"", 1);
    assert_eq!(broken.len(), text.len());
    bytes[off..off + len].copy_from_slice(broken.as_bytes());
    // A damaged header checksum ends the shard after sample 6.
    let (name, hoff, _, _) = &members[21];
    assert_eq!(name, "000007.jpg");
    bytes[hoff + 3] ^= 0x20;

    let (good, bad, n_good, n_bad) = read_bytes(&bytes, ReadOptions::default());
    let good_keys: Vec<&str> = good.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(good_keys, ["000000", "000003", "000005"]);
    assert_eq!((n_good, n_bad), (3, 5));
    let reason = |key: &str| {
        bad.iter()
            .find(|e| e.key == key)
            .map(|e| e.reason.clone())
            .unwrap_or_else(|| panic!("no error for {key}: {bad:?}"))
    };
    assert!(
        reason("000001").contains("bad image .jpg: not an image"),
        "{}",
        reason("000001")
    );
    assert!(
        reason("000002").contains("not a JSON object") || reason("000002").contains("invalid JSON")
    );
    assert!(
        reason("000004").contains(".txt is not valid UTF-8"),
        "{}",
        reason("000004")
    );
    assert!(
        reason("000006").contains("invalid refined texts"),
        "{}",
        reason("000006")
    );
    let last = bad.last().expect("corrupt record");
    assert_eq!(last.key, "");
    assert!(
        last.reason
            .contains("corrupt tar: header checksum mismatch"),
        "{last}"
    );

    // Without image checks the garbage image passes.
    let opts = ReadOptions {
        image_check: ImageCheck::None,
        ..Default::default()
    };
    let (good, ..) = read_bytes(&bytes, opts);
    assert!(good.iter().any(|s| s.key == "000001"));
}

#[test]
fn missing_and_odd_members() {
    let img = jpeg(16, 16, 1);
    // A noisy picture, so that most of the file is entropy-coded data, not tables.
    let noisy = RgbImage::from_fn(64, 64, |x, y| {
        let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)).wrapping_mul(97);
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    });
    let mut body = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut body, 90)
        .write_image(noisy.as_raw(), 64, 64, image::ExtendedColorType::Rgb8)
        .expect("encode jpeg");
    let cut = body.len() * 2 / 3;
    body.truncate(cut); // a JPEG whose data ends early: passes the header probe
    let json = br#"{"uid": "u"}"#;
    let bytes = tar_of(&[
        ("000000.jpg", &img),
        ("000000.txt", b"ok"),
        ("000000.json", json),
        ("000001.txt", b"no image"),
        ("000001.json", json),
        ("000002.jpg", &img),
        ("000002.json", json),
        ("000003.JPG", &img), // extensions are lower-cased
        ("000003.TXT", b"upper"),
        ("000004.png", b"\x89PNG\r\n\x1a\n garbage"),
        ("000004.txt", b"t"),
        ("000005.jpg", &img),
        ("000005.txt", b"one"),
        ("000005.txt", b"two"),
        ("__meta__", b"skipped"),
        ("noextension", b"skipped"),
        ("000006.jpg", &img),
        ("000006.txt", b"no json is fine"),
        ("000006.cls", b"3"),
        ("sub/dir/000007.webp", b"RIFF\x10\0\0\0WEBPVP8 "),
        ("sub/dir/000007.txt", b"bad webp"),
        ("000008.jpg", &body),
        ("000008.txt", b"damaged jpeg body"),
        ("000009.json", b"{\"x\": 1}"),
        ("000009.jpg", &img),
        ("000009.txt", b"members in any order"),
    ]);
    let (good, bad, ..) = read_bytes(&bytes, ReadOptions::default());
    let good_keys: Vec<&str> = good.iter().map(|s| s.key.as_str()).collect();
    assert_eq!(
        good_keys,
        ["000000", "000003", "000006", "000008", "000009"]
    );
    assert_eq!(good[0].meta.get("uid"), Some(&json!("u")));
    assert_eq!(good[1].raw_text, "upper");
    assert_eq!(good[1].image.as_ref().expect("image").ext, "jpg");
    assert!(good[2].meta.is_empty());
    let bad_keys: Vec<&str> = bad.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        bad_keys,
        ["000001", "000002", "000004", "000005", "sub/dir/000007"]
    );
    assert!(bad[0].reason.contains("missing image member"), "{}", bad[0]);
    assert!(bad[1].reason.contains("missing .txt member"), "{}", bad[1]);
    assert!(bad[2].reason.contains("bad image .png"), "{}", bad[2]);
    assert!(
        bad[3].reason.contains("duplicate member 000005.txt"),
        "{}",
        bad[3]
    );
    assert!(bad[4].reason.contains("bad image .webp"), "{}", bad[4]);

    // A full decode catches the damaged JPEG body (or decodes it as grey: never a panic).
    let opts = ReadOptions {
        image_check: ImageCheck::Decode,
        ..Default::default()
    };
    let (good, ..) = read_bytes(&bytes, opts);
    assert!(good.len() <= 5);

    // Oversized members are skipped, not held, and the next sample is read.
    let opts = ReadOptions {
        max_member_bytes: 100,
        image_check: ImageCheck::None,
        ..Default::default()
    };
    let small = tar_of(&[
        ("a.jpg", &img),
        ("a.txt", b"x"),
        ("b.jpg", b"tiny"),
        ("b.txt", b"y"),
    ]);
    let (good, bad, ..) = read_bytes(&small, opts);
    assert_eq!(good.len(), 1);
    assert_eq!(good[0].key, "b");
    assert!(bad[0].reason.contains("over the limit"), "{}", bad[0]);
}

#[test]
fn garbage_files_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write_all(&dir.path().join("ok"), &samples(3), per_shard(10));
    let mut paths = Vec::new();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty.tar", Vec::new()),
        ("zeros.tar", vec![0u8; 4096]),
        (
            "text.tar",
            b"this is not a tar file at all, just some words\n".repeat(40),
        ),
        (
            "bytes.tar",
            (0..5000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
        ("gzip-garbage.tar", vec![0x1f, 0x8b, 8, 0, 1, 2, 3, 4, 5]),
    ];
    for (name, bytes) in cases {
        let p = dir.path().join(name);
        fs::write(&p, bytes).expect("write");
        paths.push(p);
    }
    paths.push(dir.path().join("absent.tar"));
    paths.extend(good);
    let mut reader = ShardReader::new(paths, ReadOptions::default());
    let (good, bad) = split(reader.by_ref().collect());
    assert_eq!(
        good.len(),
        3,
        "the good shard after the bad ones is read: {bad:?}"
    );
    // zeros.tar is a valid empty archive; every other file gives exactly one record.
    assert_eq!(bad.len(), 5, "{bad:#?}");
    assert_eq!(reader.stats().shards.len(), 7);
}

// ---------------------------------------------------------------------------------------------
// Killed writers

#[test]
fn dropped_writer_leaves_only_finished_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut w = ShardWriter::new(dir.path().join("d"), per_shard(10)).expect("writer");
        for s in samples(25) {
            w.write(&s).expect("write");
        }
        assert_eq!(w.finished_shards().len(), 2);
        // Dropped without finish(): the third shard must not appear.
    }
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["d-00000.tar", "d-00001.tar"]);
}

const ABORT_ENV: &str = "HQ_SHARDS_TEST_ABORT_DIR";

/// Not a test on its own: the child process of `killed_writer_leaves_no_half_shard`, which aborts
/// (no destructors, like a SIGKILL) half-way through its second shard.
#[test]
fn helper_child_writer_that_aborts() {
    let Some(dir) = std::env::var_os(ABORT_ENV) else {
        return;
    };
    let mut w = ShardWriter::new(Path::new(&dir).join("k"), per_shard(10)).expect("writer");
    for i in 0..18u32 {
        // 200 kB members, so the unfinished shard's temporary file really holds data.
        let bytes: Vec<u8> = (0..200_000u32)
            .map(|j| (j.wrapping_mul(2_654_435_761).wrapping_add(i) >> 7) as u8)
            .collect();
        let s = Sample::new(
            format!("{i:06}"),
            ImageBytes {
                ext: "jpg".into(),
                bytes,
            },
            "x",
        );
        w.write(&s).expect("write");
    }
    std::process::abort();
}

#[test]
fn killed_writer_leaves_no_half_shard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "helper_child_writer_that_aborts",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ABORT_ENV, dir.path())
        .output()
        .expect("spawn child");
    assert!(!child.status.success(), "the child must die by abort");
    assert!(dir.path().join("k-00000.tar").exists());
    assert!(
        !dir.path().join("k-00001.tar").exists(),
        "no half shard under a final name"
    );
    let leftovers: Vec<(String, u64)> = fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().expect("meta").len(),
            )
        })
        .filter(|(n, _)| n != "k-00000.tar")
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    assert!(
        leftovers[0].0.starts_with(".k-00001.tar.tmp-"),
        "{leftovers:?}"
    );
    assert!(leftovers[0].1 > 0);
    // A glob over the shards sees only the complete one, which reads cleanly.
    let spec = format!("{}/k-*.tar", dir.path().display());
    let shards = expand_shard_spec(&spec).expect("glob");
    assert_eq!(shards.len(), 1);
    let opts = ReadOptions {
        image_check: ImageCheck::None,
        ..Default::default()
    };
    let (good, bad) = split(ShardReader::new(shards, opts).collect());
    assert_eq!((good.len(), bad.len()), (10, 0));
}

// ---------------------------------------------------------------------------------------------
// Side-car join

#[test]
fn sidecar_join_attaches_and_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut items = samples(10);
    for s in &mut items {
        s.refined = None;
    }
    items[9].meta.remove("uid"); // falls back to its key
    let shards = write_all(&dir.path().join("j"), &items, per_shard(4));

    let mut lines = Vec::new();
    for i in [0usize, 2, 3, 5] {
        let r = refined(i + 100);
        lines.push(
            json!({
                "uid": format!("uid{i:05}"),
                "long_positive": r.long_positive,
                "long_negative": r.long_negative,
                "tags_positive": r.tags_positive,
                "tags_negative": r.tags_negative,
                "source": r.source,
            })
            .to_string(),
        );
    }
    lines.push(
        json!({"uid": "uid00007", "hq_clip": {"long_positive": "nested", "long_negative": "n",
               "tags_positive": "a, b", "tags_negative": [], "source": "model:x"}})
        .to_string(),
    );
    lines.push(
        json!({"uid": "000009", "long_positive": "by key", "long_negative": "k",
               "tags_positive": [], "tags_negative": []})
        .to_string(),
    );
    lines.push("{\"uid\": \"broken\", ".to_string());
    lines.push(
        json!({"uid": "uid99999", "long_positive": "never used", "long_negative": "u",
               "tags_positive": [], "tags_negative": []})
        .to_string(),
    );
    let side = dir.path().join("annotations.jsonl");
    fs::write(&side, lines.join("\n") + "\n").expect("write side-car");

    let sidecar = Sidecar::load(&side).expect("load");
    assert_eq!(sidecar.len(), 7);
    assert_eq!(sidecar.errors().len(), 1);
    assert!(
        sidecar.errors()[0].reason.contains("line 7: invalid JSON"),
        "{}",
        sidecar.errors()[0]
    );

    let mut join = SidecarJoin::new(sidecar, JoinOptions::default());
    let reader = ShardReader::new(shards.clone(), ReadOptions::default());
    let (joined, bad) = split(join.join_iter(reader).collect());
    assert!(bad.is_empty());
    assert_eq!(joined.len(), 10);
    assert_eq!(joined[0].refined, Some(refined(100)));
    assert_eq!(joined[5].refined, Some(refined(105)));
    assert!(joined[1].refined.is_none());
    let nested = joined[7].refined.as_ref().expect("nested record");
    assert_eq!(nested.tags_positive, ["a", "b"]);
    assert_eq!(nested.source.as_deref(), Some("model:x"));
    assert_eq!(
        joined[9].refined.as_ref().expect("by key").long_positive,
        "by key"
    );

    let report = join.report();
    assert_eq!(report.samples, 10);
    assert_eq!(report.joined, 6);
    assert_eq!(report.unannotated, 4);
    assert_eq!(
        report.unannotated_examples,
        ["uid00001", "uid00004", "uid00006", "uid00008"]
    );
    assert_eq!(report.unused, 1);
    assert_eq!(report.unused_examples, ["uid99999"]);
    assert_eq!(report.sidecar_errors, 1);
    let text = format!("{report:#}");
    assert!(
        text.contains("6 annotated") && text.contains("uid99999"),
        "{text}"
    );

    // Keyed by sample key only: the uid-keyed records go unused.
    let sidecar = Sidecar::load(&side).expect("load");
    let mut join = SidecarJoin::new(
        sidecar,
        JoinOptions {
            id_field: None,
            ..Default::default()
        },
    );
    let reader = ShardReader::new(shards, ReadOptions::default());
    let n = join
        .join_iter(reader)
        .filter_map(Result::ok)
        .filter(|s| s.refined.is_some())
        .count();
    assert_eq!(n, 1);
    assert_eq!(join.report().unused, 6);
}

// ---------------------------------------------------------------------------------------------
// Compatibility with Python's webdataset

fn python() -> Option<String> {
    match std::env::var("HQ_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            eprintln!(
                "HQ_PYTHON is not set (source tools/env.sh): skipping the webdataset comparison"
            );
            None
        }
    }
}

fn reference(py: &str, args: &[&str]) -> serde_json::Value {
    let out = hq_tests::run_python_script(Path::new(py), "shards_reference.py", args);
    serde_json::from_str(&out).expect("reference JSON")
}

/// Our view of a sample in the reference script's JSON shape.
fn as_reference(s: &Sample) -> serde_json::Value {
    let mut members = serde_json::Map::new();
    if let Some(img) = &s.image {
        members.insert(img.ext.clone(), json!(hex(&img.bytes)));
    }
    members.insert("txt".into(), json!(s.raw_text));
    members.insert("json".into(), s.json());
    json!({"key": s.key, "members": members})
}

#[test]
fn python_webdataset_reads_our_shards() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut items = samples(12);
    items[4].key = "folder/sub/000004".into();
    items[7].key = format!("{}/000007", "p".repeat(130)); // needs the ustar prefix field
    items[9].key = format!("{}000009", "q".repeat(120)); // needs a GNU long name
    let shards = write_all(&dir.path().join("ours"), &items, per_shard(5));
    let paths: Vec<String> = shards.iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["read"];
    args.extend(paths.iter().map(String::as_str));
    let theirs = reference(&py, &args);
    let ours: Vec<serde_json::Value> = items.iter().map(as_reference).collect();
    assert_eq!(theirs, serde_json::Value::Array(ours));
}

#[test]
fn we_read_shards_written_by_python_webdataset() {
    let Some(py) = python() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("py-00000.tar");
    let expected = reference(&py, &["write", &path.display().to_string(), "9"]);
    let opts = ReadOptions {
        image_check: ImageCheck::Decode,
        ..Default::default()
    };
    let (good, bad) = split(ShardReader::new(vec![path], opts).collect());
    assert!(bad.is_empty(), "{bad:?}");
    let ours: Vec<serde_json::Value> = good.iter().map(as_reference).collect();
    assert_eq!(serde_json::Value::Array(ours), expected);
    assert!(good[0].refined.is_some() && good[1].refined.is_none());
    assert_eq!(good[3].key, "sub/000003");
    assert!(good[5].key.ends_with("/000005"));
}
