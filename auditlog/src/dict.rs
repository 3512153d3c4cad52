//! The zstd dictionaries record payloads are compressed with, and the one function that
//! decompresses a payload.
//!
//! A payload is a few KiB of JSON whose keys, header names and Stripe object shapes repeat from
//! record to record; alone, each is too small for zstd to learn them, so every payload is
//! compressed against a dictionary trained on Stripe-shaped records
//! (`examples/train_zstd_dictionary.rs` wrote `dict/stripe-v1.zdict`). Measured on the writer
//! benchmark's records: lake bytes per raw payload byte 0.539 without it (docs/benchmarks.md).
//!
//! Invariants:
//! * Every zstd frame compressed with a dictionary names it (the dictionary id in the frame
//!   header); [`decompress`] picks the dictionary by that id, so payloads written without one
//!   (by versions before the dictionary, or recovery's placeholders) read as before.
//! * A dictionary, once shipped, never changes and is never removed: lake files outlive
//!   versions. A new dictionary gets a new file and a new id, and [`KNOWN`] keeps the old ones.
//! * A frame naming a dictionary this build does not have is an error that says so; it is
//!   never decoded against another dictionary.

use std::sync::LazyLock;

use crate::error::AuditError;

/// The dictionary trained on Stripe-shaped records (16 KiB), the one new payloads use.
pub static STRIPE_V1: &[u8] = include_bytes!("../dict/stripe-v1.zdict");

/// Every dictionary a payload may name, by id.
pub static KNOWN: LazyLock<Vec<(u32, &'static [u8])>> =
    LazyLock::new(|| [STRIPE_V1].into_iter().filter_map(|d| Some((dict_id(d)?, d))).collect());

/// Prepared for decompression once per process (a dictionary is digested into tables on load).
static DECODERS: LazyLock<Vec<(u32, zstd::dict::DecoderDictionary<'static>)>> =
    LazyLock::new(|| KNOWN.iter().map(|(id, d)| (*id, zstd::dict::DecoderDictionary::copy(d))).collect());

/// The id in a dictionary's header; `None` for raw content without one.
pub fn dict_id(dictionary: &[u8]) -> Option<u32> {
    zstd::zstd_safe::get_dict_id(dictionary).map(std::num::NonZeroU32::get)
}

/// The dictionary new payloads are compressed with.
pub fn current() -> &'static [u8] {
    STRIPE_V1
}

/// The id of [`current`], written in each lake file's metadata (`keygate.zstd_dictionaries`).
pub fn current_id() -> Option<u32> {
    dict_id(current())
}

/// Decompresses one payload (a zstd frame), with the dictionary its frame names if any. `what`
/// names the payload in errors.
pub fn decompress(compressed: &[u8], what: &'static str) -> Result<Vec<u8>, AuditError> {
    use std::io::Read as _;
    let zstd_err = |e: std::io::Error| AuditError::corrupt(what, format!("zstd: {e}"));
    let Some(id) = zstd::zstd_safe::get_dict_id_from_frame(compressed).map(std::num::NonZeroU32::get) else {
        return zstd::stream::decode_all(compressed).map_err(zstd_err);
    };
    let Some((_, dict)) = DECODERS.iter().find(|(known, _)| *known == id) else {
        return Err(AuditError::corrupt(
            what,
            format!(
                "compressed with zstd dictionary {id}, which this build of keygate does not have; read it with the version that wrote it or a newer one"
            ),
        ));
    };
    let mut out = Vec::new();
    zstd::stream::read::Decoder::with_prepared_dictionary(compressed, dict)
        .and_then(|mut d| d.read_to_end(&mut out))
        .map_err(zstd_err)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_shipped_dictionary_has_an_id_and_is_known_by_it() {
        let id = current_id().expect("a trained dictionary has an id in its header");
        assert!(KNOWN.iter().any(|(k, d)| *k == id && d.as_ptr() == STRIPE_V1.as_ptr()));
        assert_eq!(KNOWN.len(), DECODERS.len());
    }

    #[test]
    fn payloads_with_and_without_a_dictionary_read_back_and_an_unknown_one_is_named() {
        let json = br#"{"request":{"start_line":"POST /v1/payment_intents HTTP/1.1","headers":[["content-type","application/x-www-form-urlencoded"]],"body_bytes":0},"response":null}"#;
        let with = zstd::bulk::Compressor::with_dictionary(3, current()).unwrap().compress(json).unwrap();
        assert_eq!(zstd::zstd_safe::get_dict_id_from_frame(&with).map(std::num::NonZeroU32::get), current_id());
        assert_eq!(decompress(&with, "payload").unwrap(), json);
        let without = zstd::bulk::compress(json, 3).unwrap();
        assert_eq!(decompress(&without, "payload").unwrap(), json, "payloads of earlier versions");
        // A frame naming a dictionary this build does not ship (trained here, on other samples).
        let samples: Vec<Vec<u8>> = (0..400)
            .map(|i| format!(r#"{{"object":"thing","id":"thing_{i:08}","n":{}}}"#, i * 7919).into_bytes())
            .collect();
        let other = zstd::dict::from_samples(&samples, 2048).unwrap();
        let other_id = dict_id(&other).unwrap();
        let foreign = zstd::bulk::Compressor::with_dictionary(3, &other).unwrap().compress(json).unwrap();
        assert_ne!(Some(other_id), current_id());
        let err = decompress(&foreign, "payload").unwrap_err().to_string();
        assert!(err.contains(&format!("zstd dictionary {other_id}")) && err.contains("does not have"), "{err}");
    }
}
