//! Checkpoints: store → safetensors file → store round trips, the exact byte layout of
//! the format, atomic writes, and malformed or corrupted files rejected with errors that
//! name the problem (never a panic).

mod common;

use common::gpu;
use masnet_wgpu::autograd::{ParamKind, ParamStore};
use masnet_wgpu::checkpoint::{
    file_shape, Checkpoint, CheckpointTensor, KEY_CHECKSUM, KEY_CONFIG, KEY_FORMAT_VERSION,
    OPTIMIZER_PREFIX,
};
use masnet_wgpu::rng::Rng;
use masnet_wgpu::{Error, GpuContext, Shape5};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A fresh, empty folder for one test.
fn dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("checkpoint")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The specification of FNV-1a 64, written out independently of the library.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 14695981039346656037;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(1099511628211);
    }
    h
}

fn t(name: &str, shape: &[usize], seed: u64) -> CheckpointTensor {
    let n = shape.iter().product();
    CheckpointTensor {
        name: name.to_string(),
        shape: shape.to_vec(),
        data: Rng::new(seed).vec_f32(n, -2.0, 2.0),
    }
}

fn sample() -> Checkpoint {
    let mut metadata = BTreeMap::new();
    metadata.insert(KEY_CONFIG.to_string(), r#"{"classes": 4}"#.to_string());
    metadata.insert("note".to_string(), "héllo \"quoted\"\n".to_string());
    Checkpoint {
        tensors: vec![
            t("conv.weight", &[2, 3, 3, 3, 3], 1),
            t("bn.weight", &[2], 2),
            t("bn.running_var", &[2], 3),
            t("up.weight", &[2, 1, 2, 2, 2], 4),
        ],
        metadata,
    }
}

/// A file from a raw header text (padded to a multiple of 8) and data bytes.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    let pad = (8 - h.len() % 8) % 8;
    h.extend(std::iter::repeat_n(b' ', pad));
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn err_of(bytes: &[u8]) -> String {
    match Checkpoint::from_bytes(bytes, "test.safetensors") {
        Ok(c) => panic!("expected an error, got {} tensors", c.tensors.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, words: &[&str], what: &str) {
    for w in words {
        assert!(msg.contains(w), "{what}: '{msg}' does not mention '{w}'");
    }
}

#[test]
fn header_layout_is_exact_safetensors() {
    let d = dir("layout");
    let path = d.join("m.safetensors");
    let ck = sample();
    ck.write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header length {n} is not a multiple of 8");
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    assert!(header.starts_with('{'));
    let json_end = header.trim_end_matches(' ').len();
    assert!(n - json_end < 8, "padding is more than 7 spaces");
    let v: Value = serde_json::from_str(header).unwrap();
    let obj = v.as_object().unwrap();

    // Offsets contiguous from 0, in the order the tensors were given, covering the buffer.
    let data = &bytes[8 + n..];
    let mut pos = 0u64;
    for tensor in &ck.tensors {
        let e = obj[&tensor.name].as_object().unwrap();
        assert_eq!(e.len(), 3, "{}: extra fields", tensor.name);
        assert_eq!(e["dtype"], "F32");
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, tensor.shape);
        let off = e["data_offsets"].as_array().unwrap();
        let (b, end) = (off[0].as_u64().unwrap(), off[1].as_u64().unwrap());
        assert_eq!(b, pos, "{}: not contiguous", tensor.name);
        assert_eq!(end - b, tensor.data.len() as u64 * 4);
        let le: Vec<u8> = tensor.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(&data[b as usize..end as usize], &le[..], "{}", tensor.name);
        pos = end;
    }
    assert_eq!(bytes.len() as u64, 8 + n as u64 + pos, "file length");
    assert_eq!(obj.len(), ck.tensors.len() + 1, "unexpected header entries");

    // Metadata: all strings, the caller's keys plus version and checksum.
    let meta = obj["__metadata__"].as_object().unwrap();
    assert!(meta.values().all(Value::is_string));
    assert_eq!(meta[KEY_FORMAT_VERSION], "1");
    assert_eq!(meta[KEY_CONFIG], ck.metadata[KEY_CONFIG].as_str());
    assert_eq!(meta["note"], ck.metadata["note"].as_str());
    let sum = meta[KEY_CHECKSUM].as_str().unwrap();
    assert_eq!(sum.len(), 16);
    assert_eq!(sum, format!("{:016x}", fnv1a64(data)));

    // to_bytes produces the same file; reading gives everything back.
    assert_eq!(ck.to_bytes().unwrap(), bytes);
    let back = Checkpoint::read(&path).unwrap();
    assert_eq!(back.tensors, ck.tensors);
    for (k, v) in &ck.metadata {
        assert_eq!(back.metadata.get(k), Some(v), "metadata {k}");
    }
    assert_eq!(back.metadata.len(), ck.metadata.len() + 2);
}

#[test]
fn file_shape_follows_pytorch_layout() {
    let s = |a: [usize; 5]| Shape5(a);
    assert_eq!(
        file_shape(s([8, 4, 3, 3, 3]), ParamKind::ConvWeight),
        vec![8, 4, 3, 3, 3]
    );
    // A 1x1x1 kernel with one output channel stays 5-D.
    assert_eq!(
        file_shape(s([1, 4, 1, 1, 1]), ParamKind::ConvWeight),
        vec![1, 4, 1, 1, 1]
    );
    assert_eq!(file_shape(s([1, 4, 1, 1, 1]), ParamKind::Affine), vec![4]);
    assert_eq!(file_shape(s([1, 4, 1, 1, 1]), ParamKind::Buffer), vec![4]);
    assert_eq!(file_shape(s([1, 4, 1, 1, 1]), ParamKind::Other), vec![4]);
    assert_eq!(
        file_shape(s([2, 4, 1, 1, 1]), ParamKind::Affine),
        vec![2, 4, 1, 1, 1]
    );
}

#[test]
fn writes_are_atomic_and_failures_are_errors() {
    let d = dir("atomic");
    let path = d.join("m.safetensors");
    let tmp = d.join("m.safetensors.tmp");
    // A stale temporary file from a crashed run is replaced and removed.
    std::fs::write(&tmp, b"stale").unwrap();
    let ck = sample();
    ck.write(&path).unwrap();
    assert!(!tmp.exists(), ".tmp left behind");
    let first = std::fs::read(&path).unwrap();

    // Overwriting works and leaves nothing behind.
    let mut ck2 = sample();
    ck2.tensors.pop();
    ck2.write(&path).unwrap();
    assert!(!tmp.exists());
    assert_eq!(Checkpoint::read(&path).unwrap().tensors, ck2.tensors);

    // Invalid content: error, target untouched.
    ck.write(&path).unwrap();
    let mut bad = sample();
    bad.tensors[1].data.pop();
    let e = bad.write(&path).unwrap_err().to_string();
    assert_mentions(&e, &["bn.weight"], "bad tensor");
    let mut dup = sample();
    dup.tensors.push(t("bn.weight", &[2], 9));
    let e = dup.write(&path).unwrap_err().to_string();
    assert_mentions(&e, &["bn.weight", "twice"], "duplicate");
    assert_eq!(std::fs::read(&path).unwrap(), first);
    assert!(!tmp.exists());

    // Missing folder: an IO error naming the file.
    let missing = d.join("no_such_dir").join("m.safetensors");
    match ck.write(&missing) {
        Err(Error::Io { path, .. }) => assert!(path.contains("no_such_dir"), "{path}"),
        other => panic!("expected an IO error, got {other:?}"),
    }
    assert!(!missing.exists());

    // Target is a folder: the rename fails, the temporary file is removed.
    let folder = d.join("folder.safetensors");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("keep"), b"x").unwrap();
    assert!(ck.write(&folder).is_err());
    assert!(!d.join("folder.safetensors.tmp").exists());
    assert!(folder.join("keep").exists());

    // Reading a missing file is an IO error naming it.
    let e = Checkpoint::read(&d.join("absent.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert_mentions(&e.to_string(), &["absent.safetensors"], "missing file");
}

#[test]
fn corrupted_data_fails_the_checksum() {
    let d = dir("corrupt");
    let path = d.join("m.safetensors");
    let ck = sample();
    ck.write(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

    // One flipped bit in the file on disk.
    let mut bytes = good.clone();
    let mid = 8 + n + (good.len() - 8 - n) / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let e = Checkpoint::read(&path).unwrap_err().to_string();
    assert_mentions(
        &e,
        &["checksum mismatch: file is corrupted", "m.safetensors"],
        "flipped bit",
    );

    // Every byte of the data buffer, each changed once: always detected.
    for i in 8 + n..good.len() {
        let mut b = good.clone();
        b[i] = b[i].wrapping_add(0x5b);
        let e = err_of(&b);
        assert_mentions(&e, &["checksum mismatch"], &format!("byte {i}"));
    }
    // Every byte of the header, changed: never a panic (some changes stay valid).
    for i in 0..8 + n {
        for delta in [0x01u8, 0x80, 0x2f] {
            let mut b = good.clone();
            b[i] ^= delta;
            let _ = Checkpoint::from_bytes(&b, "fuzz");
        }
    }
    // Every truncation is an error.
    for len in 0..good.len() {
        assert!(
            Checkpoint::from_bytes(&good[..len], "cut").is_err(),
            "{len} bytes"
        );
    }
    // A malformed checksum value is a mismatch too.
    let h = r#"{"__metadata__":{"masnet.checksum":"zz"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    assert_mentions(
        &err_of(&raw_file(h, &[0; 4])),
        &["checksum mismatch"],
        "bad checksum text",
    );
}

#[test]
fn malformed_files_are_rejected_with_named_problems() {
    let f32s = |n: usize| vec![0u8; 4 * n];
    let entry = |name: &str, dtype: &str, shape: &str, off: &str| {
        format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{off}}}"#)
    };
    let one =
        |dtype: &str, shape: &str, off: &str| format!("{{{}}}", entry("w", dtype, shape, off));

    let good = raw_file(&one("F32", "[2]", "[0,8]"), &f32s(2));
    let c = Checkpoint::from_bytes(&good, "ok").unwrap();
    assert_eq!(c.tensors[0].shape, vec![2]);
    assert!(c.metadata.is_empty(), "files without metadata load");

    let mut huge_len = (1u64 << 60).to_le_bytes().to_vec();
    huge_len.extend_from_slice(&good[8..]);
    let mut over_len = good.clone();
    over_len[..8].copy_from_slice(&(good.len() as u64 - 7).to_le_bytes());
    let mut bad_utf8 = good.clone();
    bad_utf8[12] = 0xff;

    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("empty file", vec![], vec!["truncated"]),
        ("5 bytes", vec![1, 0, 0, 0, 0], vec!["truncated"]),
        (
            "cut in the header",
            good[..good.len() - 8 - 5].to_vec(),
            vec!["header length"],
        ),
        (
            "cut in the data",
            good[..good.len() - 3].to_vec(),
            vec!["'w'", "truncated"],
        ),
        ("header length 2^60", huge_len, vec!["header length"]),
        (
            "header length past the end",
            over_len,
            vec!["header length"],
        ),
        ("invalid UTF-8", bad_utf8, vec!["UTF-8"]),
        (
            "bad JSON",
            raw_file(r#"{"w": {"dtype": "F32""#, &f32s(1)),
            vec!["JSON"],
        ),
        (
            "not an object",
            raw_file("[1, 2]", &[]),
            vec!["not a JSON object"],
        ),
        (
            "F16 dtype",
            raw_file(&one("F16", "[2]", "[0,4]"), &f32s(1)),
            vec!["'w'", "F16"],
        ),
        (
            "I64 dtype",
            raw_file(&one("I64", "[1]", "[0,8]"), &f32s(2)),
            vec!["'w'", "I64"],
        ),
        (
            "shape/offset mismatch",
            raw_file(&one("F32", "[3]", "[0,8]"), &f32s(2)),
            vec!["'w'", "shape [3]", "12 bytes"],
        ),
        (
            "negative dimension",
            raw_file(&one("F32", "[-1]", "[0,4]"), &f32s(1)),
            vec!["'w'", "shape dimension -1"],
        ),
        (
            "fractional dimension",
            raw_file(&one("F32", "[1.5]", "[0,4]"), &f32s(1)),
            vec!["'w'", "shape dimension 1.5"],
        ),
        (
            "overflowing shape",
            raw_file(
                &one(
                    "F32",
                    "[1099511627776,1099511627776,1099511627776]",
                    "[0,4]",
                ),
                &f32s(1),
            ),
            vec!["'w'", "too many elements"],
        ),
        (
            "shape beyond u64",
            raw_file(&one("F32", "[1e30]", "[0,4]"), &f32s(1)),
            vec!["'w'", "shape dimension"],
        ),
        (
            "offsets past the end",
            raw_file(
                &one("F32", "[2305843009213693952]", "[0,9223372036854775808]"),
                &f32s(1),
            ),
            vec!["'w'", "past the end"],
        ),
        (
            "begin after end",
            raw_file(&one("F32", "[1]", "[8,4]"), &f32s(2)),
            vec!["'w'", "data_offsets"],
        ),
        (
            "negative offset",
            raw_file(&one("F32", "[1]", "[-4,0]"), &f32s(1)),
            vec!["'w'", "data_offsets"],
        ),
        (
            "overlapping offsets",
            raw_file(
                &format!(
                    "{{{},{}}}",
                    entry("a", "F32", "[2]", "[0,8]"),
                    entry("b", "F32", "[2]", "[4,12]")
                ),
                &f32s(3),
            ),
            vec!["overlap", "'a'", "'b'"],
        ),
        (
            "gap between tensors",
            raw_file(
                &format!(
                    "{{{},{}}}",
                    entry("a", "F32", "[1]", "[0,4]"),
                    entry("b", "F32", "[1]", "[8,12]")
                ),
                &f32s(3),
            ),
            vec!["gap", "'b'"],
        ),
        (
            "unused bytes at the end",
            raw_file(&one("F32", "[1]", "[0,4]"), &f32s(2)),
            vec!["gap", "4..8"],
        ),
        (
            "duplicate name",
            raw_file(
                &format!(
                    "{{{},{}}}",
                    entry("a", "F32", "[1]", "[0,4]"),
                    entry("a", "F32", "[1]", "[4,8]")
                ),
                &f32s(2),
            ),
            vec!["'a'", "twice"],
        ),
        (
            "missing dtype",
            raw_file(r#"{"w":{"shape":[1],"data_offsets":[0,4]}}"#, &f32s(1)),
            vec!["'w'", "dtype is missing"],
        ),
        (
            "unknown field",
            raw_file(
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
                &f32s(1),
            ),
            vec!["'w'", "unknown field 'x'"],
        ),
        (
            "non-string metadata",
            raw_file(r#"{"__metadata__":{"epoch":3}}"#, &[]),
            vec!["'epoch'", "not a string"],
        ),
        (
            "unknown format version",
            raw_file(r#"{"__metadata__":{"masnet.format_version":"2"}}"#, &[]),
            vec!["format_version", "'2'"],
        ),
    ];
    for (what, bytes, words) in cases {
        let msg = err_of(&bytes);
        assert_mentions(&msg, &words, what);
        assert_mentions(&msg, &["test.safetensors"], what);
    }

    // Through the file path as well.
    let d = dir("malformed");
    let p = d.join("bad.safetensors");
    std::fs::write(&p, raw_file(&one("BF16", "[2]", "[0,4]"), &f32s(1))).unwrap();
    let e = Checkpoint::read(&p).unwrap_err().to_string();
    assert_mentions(&e, &["bad.safetensors", "'w'", "BF16"], "read BF16");
}

/// A small store like a MASNet block: conv, BN (params and buffers), a transposed conv
/// and a 1x1x1 single-output conv (stays 5-D in the file).
fn store(ctx: &GpuContext, seed: u64, zero: bool) -> ParamStore {
    let mut s = ParamStore::new();
    let mut rng = Rng::new(seed);
    let mut add = |name: &str, shape: [usize; 5], kind: ParamKind| {
        let n = shape.iter().product();
        let v = if zero {
            vec![0.0; n]
        } else {
            rng.vec_f32(n, -1.0, 1.0)
        };
        s.add(ctx, name, Shape5(shape), &v, kind).unwrap();
    };
    add(
        "dense1.layers.0.conv.weight",
        [4, 3, 3, 3, 3],
        ParamKind::ConvWeight,
    );
    add(
        "dense1.layers.0.bn.weight",
        [1, 4, 1, 1, 1],
        ParamKind::Affine,
    );
    add(
        "dense1.layers.0.bn.bias",
        [1, 4, 1, 1, 1],
        ParamKind::Affine,
    );
    add(
        "dense1.layers.0.bn.running_mean",
        [1, 4, 1, 1, 1],
        ParamKind::Buffer,
    );
    add(
        "dense1.layers.0.bn.running_var",
        [1, 4, 1, 1, 1],
        ParamKind::Buffer,
    );
    add("up.weight", [4, 2, 2, 2, 2], ParamKind::ConvWeight);
    add("up.bias", [1, 2, 1, 1, 1], ParamKind::Affine);
    add("head.weight", [1, 2, 1, 1, 1], ParamKind::ConvWeight);
    s
}

fn values(ctx: &GpuContext, s: &ParamStore) -> Vec<(String, Vec<f32>)> {
    s.iter()
        .map(|(id, e)| (e.name.clone(), s.read(ctx, id).unwrap()))
        .collect()
}

#[test]
fn store_round_trip_through_a_file() {
    let ctx = gpu();
    let src = store(&ctx, 7, false);
    let mut meta = BTreeMap::new();
    meta.insert(KEY_CONFIG.to_string(), r#"{"growth": 4}"#.to_string());
    let ck = Checkpoint::from_store(&ctx, &src, meta.clone()).unwrap();
    let shapes: Vec<(&str, &[usize])> = ck
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.shape.as_slice()))
        .collect();
    assert_eq!(
        shapes[0],
        ("dense1.layers.0.conv.weight", &[4, 3, 3, 3, 3][..])
    );
    assert_eq!(shapes[1], ("dense1.layers.0.bn.weight", &[4][..]));
    assert_eq!(shapes[3], ("dense1.layers.0.bn.running_mean", &[4][..]));
    assert_eq!(shapes[5], ("up.weight", &[4, 2, 2, 2, 2][..]));
    assert_eq!(shapes[6], ("up.bias", &[2][..]));
    assert_eq!(shapes[7], ("head.weight", &[1, 2, 1, 1, 1][..]));

    let d = dir("roundtrip");
    let path = d.join("model.safetensors");
    ck.write(&path).unwrap();
    let back = Checkpoint::read(&path).unwrap();
    assert_eq!(back.tensors, ck.tensors);
    assert_eq!(back.metadata[KEY_CONFIG], meta[KEY_CONFIG]);
    assert_eq!(back.metadata[KEY_FORMAT_VERSION], "1");

    let dst = store(&ctx, 0, true);
    back.load_into(&ctx, &dst).unwrap();
    let (a, b) = (values(&ctx, &src), values(&ctx, &dst));
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(va), bits(vb), "{na} differs after the round trip");
    }

    // Per-channel tensors written 5-D (by another tool) load too.
    let mut five = back.clone();
    for t in &mut five.tensors {
        if t.shape.len() == 1 {
            t.shape = vec![1, t.shape[0], 1, 1, 1];
        }
    }
    let dst2 = store(&ctx, 0, true);
    five.load_into(&ctx, &dst2).unwrap();
    assert_eq!(values(&ctx, &dst2), a);
}

#[test]
fn load_reports_every_mismatch_and_changes_nothing() {
    let ctx = gpu();
    let src = store(&ctx, 3, false);
    let mut ck = Checkpoint::from_store(&ctx, &src, BTreeMap::new()).unwrap();
    ck.tensors.retain(|t| t.name != "up.bias"); // missing
    ck.tensors
        .push(t("dense9.conv.weight", &[2, 2, 1, 1, 1], 5)); // extra
    let bn = ck
        .tensors
        .iter_mut()
        .find(|t| t.name == "dense1.layers.0.bn.bias")
        .unwrap();
    *bn = t("dense1.layers.0.bn.bias", &[5], 6); // wrong shape

    let dst = store(&ctx, 11, false);
    let before = values(&ctx, &dst);
    let e = ck.load_into(&ctx, &dst).unwrap_err().to_string();
    assert_mentions(
        &e,
        &[
            "3 problems",
            "missing tensor 'up.bias'",
            "unexpected tensor 'dense9.conv.weight'",
            "shape mismatch for 'dense1.layers.0.bn.bias'",
            "[5]",
            "nothing was loaded",
        ],
        "load_into",
    );
    assert_eq!(values(&ctx, &dst), before, "store changed by a failed load");

    // Optimiser state is extra tensors that a filtered load skips.
    let mut with_opt = Checkpoint::from_store(&ctx, &src, BTreeMap::new()).unwrap();
    with_opt.tensors.push(t(
        &format!("{OPTIMIZER_PREFIX}adam_m.up.weight"),
        &[4, 2, 2, 2, 2],
        8,
    ));
    let e = with_opt.load_into(&ctx, &dst).unwrap_err().to_string();
    assert_mentions(&e, &["optimizer.adam_m.up.weight"], "unfiltered");
    assert_eq!(values(&ctx, &dst), before);
    with_opt
        .load_into_filtered(&ctx, &dst, &[OPTIMIZER_PREFIX])
        .unwrap();
    assert_eq!(values(&ctx, &dst), values(&ctx, &src));
}

#[test]
fn reads_a_file_written_by_python_safetensors() {
    // `safetensors.numpy.save({"b.bias": [1.5, -2.0], "a.weight": arange(6).reshape(1, 2,
    // 1, 1, 3)}, metadata={"masnet.format_version": "1", "note": "py"})`, safetensors
    // 0.8.0: no checksum, keys sorted, header padded with 5 spaces.
    let mut bytes = 0xc0u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(
        br#"{"__metadata__":{"masnet.format_version":"1","note":"py"},"a.weight":{"dtype":"F32","shape":[1,2,1,1,3],"data_offsets":[0,24]},"b.bias":{"dtype":"F32","shape":[2],"data_offsets":[24,32]}}     "#,
    );
    for v in [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 1.5, -2.0] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(bytes.len(), 232);
    let c = Checkpoint::from_bytes(&bytes, "python.safetensors").unwrap();
    assert_eq!(c.tensors.len(), 2);
    assert_eq!(c.tensors[0].name, "a.weight");
    assert_eq!(c.tensors[0].shape, vec![1, 2, 1, 1, 3]);
    assert_eq!(c.tensors[0].data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(c.get("b.bias").unwrap().data, vec![1.5, -2.0]);
    assert_eq!(c.metadata["note"], "py");
    // Written back by us, the same tensors come out again.
    let again = Checkpoint::from_bytes(&c.to_bytes().unwrap(), "again").unwrap();
    assert_eq!(again.tensors, c.tensors);
}
