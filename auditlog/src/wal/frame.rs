//! CRC-framed records: `len: u32 LE | crc32(body): u32 LE | body[len]`, where `body` is a kind
//! byte and the record's bytes.
//!
//! Invariant: [`FrameDecoder`] never panics on any input, never allocates more than the input,
//! and yields only frames whose CRC matches; it stops at the first frame that does not check out
//! and reports how many leading bytes were good, which is where recovery truncates a torn tail.

/// Largest body accepted; anything bigger is corruption (records are a few KiB, at most a few MiB).
pub const MAX_FRAME_BODY: usize = 64 * 1024 * 1024;

/// Bytes of framing before each body.
pub const FRAME_OVERHEAD: usize = 8;

/// Appends one frame holding `kind` and the concatenation of `parts` to `out`.
pub fn encode_frame(kind: u8, parts: &[&[u8]], out: &mut Vec<u8>) {
    let body_len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[kind]);
    for p in parts {
        crc.update(p);
    }
    out.reserve(FRAME_OVERHEAD + body_len);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.push(kind);
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// One decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub data: &'a [u8],
    /// Offset of the frame's first byte in the input.
    pub offset: usize,
}

/// Why decoding stopped before the end of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// The input ended exactly after a frame.
    Clean,
    /// Bytes after the last good frame do not form a frame (a torn write, or corruption).
    Torn { offset: usize, reason: &'static str },
}

/// Iterates over the good frames at the start of a buffer.
#[derive(Debug)]
pub struct FrameDecoder<'a> {
    buf: &'a [u8],
    pos: usize,
    tail: Option<Tail>,
}

impl<'a> FrameDecoder<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        FrameDecoder { buf, pos: 0, tail: None }
    }

    /// Length of the good prefix so far (after iteration ends: of the whole good prefix).
    pub fn valid_len(&self) -> usize {
        self.pos
    }

    /// How decoding ended; `None` until the iterator has returned `None`.
    pub fn tail(&self) -> Option<&Tail> {
        self.tail.as_ref()
    }

    fn stop(&mut self, reason: &'static str) -> Option<Frame<'a>> {
        self.tail = Some(Tail::Torn { offset: self.pos, reason });
        None
    }
}

impl<'a> Iterator for FrameDecoder<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        if self.tail.is_some() {
            return None;
        }
        let rest = &self.buf[self.pos..];
        if rest.is_empty() {
            self.tail = Some(Tail::Clean);
            return None;
        }
        if rest.len() < FRAME_OVERHEAD {
            return self.stop("partial frame header");
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 || len > MAX_FRAME_BODY {
            return self.stop("impossible frame length");
        }
        if rest.len() - FRAME_OVERHEAD < len {
            return self.stop("partial frame body");
        }
        let body = &rest[FRAME_OVERHEAD..FRAME_OVERHEAD + len];
        if crc32fast::hash(body) != crc {
            return self.stop("CRC mismatch");
        }
        let frame = Frame { kind: body[0], data: &body[1..], offset: self.pos };
        self.pos += FRAME_OVERHEAD + len;
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn frames(bodies: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, b) in bodies {
            encode_frame(*k, &[b], &mut out);
        }
        out
    }

    #[test]
    fn round_trip_and_clean_tail() {
        let input = frames(&[(1, b"a".to_vec()), (2, vec![]), (3, vec![9; 1000])]);
        let mut d = FrameDecoder::new(&input);
        let got: Vec<_> = d.by_ref().map(|f| (f.kind, f.data.to_vec())).collect();
        assert_eq!(got, vec![(1, b"a".to_vec()), (2, vec![]), (3, vec![9; 1000])]);
        assert_eq!(d.tail(), Some(&Tail::Clean));
        assert_eq!(d.valid_len(), input.len());
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut d = FrameDecoder::new(&bytes);
            for f in d.by_ref() {
                // Whatever is returned has a matching CRC.
                let start = f.offset;
                let len = u32::from_le_bytes(bytes[start..start + 4].try_into().unwrap()) as usize;
                let crc = u32::from_le_bytes(bytes[start + 4..start + 8].try_into().unwrap());
                prop_assert_eq!(crc32fast::hash(&bytes[start + 8..start + 8 + len]), crc);
            }
            prop_assert!(d.valid_len() <= bytes.len());
        }

        #[test]
        fn corrupted_frames_are_never_returned(
            bodies in proptest::collection::vec((1u8..4, proptest::collection::vec(any::<u8>(), 0..200)), 1..20),
            flip_at in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let input = frames(&bodies);
            let mut corrupted = input.clone();
            let i = flip_at.index(corrupted.len());
            corrupted[i] ^= 1 << bit;
            let decoded: Vec<_> = FrameDecoder::new(&corrupted).map(|f| (f.kind, f.data.to_vec(), f.offset)).collect();
            // Every frame returned is byte-identical to one that was written at that offset, and
            // none at or after the flipped frame is returned.
            let originals: Vec<_> = FrameDecoder::new(&input).map(|f| (f.kind, f.data.to_vec(), f.offset)).collect();
            for d in &decoded {
                prop_assert!(originals.contains(d));
                let end = d.2 + FRAME_OVERHEAD + 1 + d.1.len();
                prop_assert!(end <= i, "frame covering the flipped byte was returned");
            }
        }

        #[test]
        fn truncation_yields_a_prefix(
            bodies in proptest::collection::vec((1u8..4, proptest::collection::vec(any::<u8>(), 0..200)), 1..20),
            cut in any::<prop::sample::Index>(),
        ) {
            let input = frames(&bodies);
            let cut = cut.index(input.len() + 1);
            let mut d = FrameDecoder::new(&input[..cut]);
            let n = d.by_ref().count();
            prop_assert!(n <= bodies.len());
            let complete = FrameDecoder::new(&input).take_while(|f| f.offset + FRAME_OVERHEAD + 1 + f.data.len() <= cut).count();
            prop_assert_eq!(n, complete);
        }
    }
}
