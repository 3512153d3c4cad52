//! CRC-framed records: `len: u32 LE | crc32(body): u32 LE | body[len]`, where `body` is a kind
//! byte and the record's bytes.
//!
//! Invariant: [`FrameDecoder`] never panics on any input, never allocates more than the input,
//! and yields only frames whose CRC matches; it stops at the first frame that does not check out
//! and reports how many leading bytes were good, which is where recovery truncates a torn tail.
//! Zeros where the next frame would start, to the end of the input, are space the writer
//! preallocated and never wrote ([`Tail::Unwritten`]): not a frame, and not damage either (a real
//! frame never starts with a zero length).
//! [`encode_frame`] never writes a frame the decoder would refuse ([`MAX_FRAME_BODY`] bounds both).

use crate::error::AuditError;

/// The largest frame body (kind byte and record), one bound for both sides: the writer refuses
/// to write a larger frame ([`encode_frame`] fails, the record is refused, nothing is lost
/// silently), and the reader treats a larger length as corruption. Records are a few KiB; this
/// bound is what lets a configuration allow bodies of tens of MiB (see
/// [`MAX_AUDITED_EXCHANGE_BYTES`]).
pub const MAX_FRAME_BODY: usize = 256 * 1024 * 1024;

/// Room a frame keeps beside the recorded bodies: the record's columns and chain links, the
/// headers, the payload document's framing.
pub const RECORD_HEADROOM: usize = 4 * 1024 * 1024;

/// The most bytes of request body, response body and headers together that one exchange may
/// carry and still be framed: half of what [`MAX_FRAME_BODY`] leaves after [`RECORD_HEADROOM`],
/// because redaction may re-encode a body larger than it came (masked values, form pairs as
/// JSON) before it is compressed. keygate's configuration refuses limits above this.
pub const MAX_AUDITED_EXCHANGE_BYTES: u64 = ((MAX_FRAME_BODY - RECORD_HEADROOM) / 2) as u64;

/// Bytes of framing before each body.
pub const FRAME_OVERHEAD: usize = 8;

/// How much of a zeroed tail [`FrameReader`] holds at once while it checks that the tail is
/// zeros to the end.
const ZERO_CHECK_CHUNK: usize = 64 * 1024;

/// Appends one frame holding `kind` and the concatenation of `parts` to `out`, or refuses (and
/// leaves `out` as it was) when the body would be larger than [`MAX_FRAME_BODY`].
pub fn encode_frame(kind: u8, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), AuditError> {
    let body_len = parts.iter().try_fold(1usize, |n, p| n.checked_add(p.len())).unwrap_or(usize::MAX);
    if body_len > MAX_FRAME_BODY {
        return Err(AuditError::RecordTooLarge { bytes: body_len, max: MAX_FRAME_BODY });
    }
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
    Ok(())
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
    /// From `offset` to the end, the input is zeros: space the WAL writer preallocated ahead of
    /// its writes (so that `fdatasync` need not also record a new file size) and never wrote.
    Unwritten { offset: usize },
}

/// Why zeros where a frame should start are not the preallocated rest of a segment: something
/// was written after them (a torn write, or corruption).
const DATA_AFTER_ZEROS: &str = "data after zeroed space";

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
        if rest[..rest.len().min(FRAME_OVERHEAD)].iter().all(|b| *b == 0) {
            if rest.iter().all(|b| *b == 0) {
                self.tail = Some(Tail::Unwritten { offset: self.pos });
                return None;
            }
            return self.stop(DATA_AFTER_ZEROS);
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

/// [`FrameDecoder`]'s frames read from a file instead of a buffer, holding one frame at a time:
/// the shipper reads sealed segments of tens of MiB this way, so that its memory does not grow
/// with the segment (issue 21). Same rules as the decoder: a frame is returned only when its
/// length is possible and its CRC matches, and reading stops for good at the first that is not.
/// A length past the end of the input is refused before anything is allocated for it.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    /// Bytes of input from `pos` on (the file's length when it was opened, minus what was read).
    remaining: u64,
    pos: u64,
    buf: Vec<u8>,
    tail: Option<Tail>,
}

impl<R: std::io::Read> FrameReader<R> {
    /// Reads frames from `inner`, which holds `len` bytes.
    pub fn new(inner: R, len: u64) -> Self {
        FrameReader { inner, remaining: len, pos: 0, buf: Vec::new(), tail: None }
    }

    /// Offset of the next frame (after the end: the length of the good prefix).
    pub fn valid_len(&self) -> u64 {
        self.pos
    }

    /// How reading ended; `None` until [`FrameReader::next_frame`] has returned `None`.
    pub fn tail(&self) -> Option<&Tail> {
        self.tail.as_ref()
    }

    fn stop(&mut self, reason: &'static str) -> Option<Frame<'_>> {
        self.tail = Some(Tail::Torn { offset: usize::try_from(self.pos).unwrap_or(usize::MAX), reason });
        None
    }

    /// After `read` zeros where a frame should start: reads on (a chunk at a time, the
    /// buffer never larger than [`ZERO_CHECK_CHUNK`]) to tell preallocated space from damage.
    fn zeros_to_the_end(&mut self, read: u64) -> std::io::Result<Option<Frame<'_>>> {
        let mut left = self.remaining - read;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(ZERO_CHECK_CHUNK);
            self.buf.resize(n, 0);
            self.inner.read_exact(&mut self.buf)?;
            if self.buf.iter().any(|b| *b != 0) {
                return Ok(self.stop(DATA_AFTER_ZEROS));
            }
            left -= n as u64;
        }
        self.tail = Some(Tail::Unwritten { offset: usize::try_from(self.pos).unwrap_or(usize::MAX) });
        Ok(None)
    }

    /// The next good frame (its `data` valid until the next call), or `None` at the end of the
    /// good frames. Errors are the reader's own (a failed `read`), not the input's.
    pub fn next_frame(&mut self) -> std::io::Result<Option<Frame<'_>>> {
        if self.tail.is_some() {
            return Ok(None);
        }
        if self.remaining == 0 {
            self.tail = Some(Tail::Clean);
            return Ok(None);
        }
        let mut head = [0u8; FRAME_OVERHEAD];
        let head_len = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(FRAME_OVERHEAD);
        self.inner.read_exact(&mut head[..head_len])?;
        if head[..head_len].iter().all(|b| *b == 0) {
            return self.zeros_to_the_end(head_len as u64);
        }
        if head_len < FRAME_OVERHEAD {
            return Ok(self.stop("partial frame header"));
        }
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || len > MAX_FRAME_BODY {
            return Ok(self.stop("impossible frame length"));
        }
        if self.remaining - (FRAME_OVERHEAD as u64) < len as u64 {
            return Ok(self.stop("partial frame body"));
        }
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf)?;
        if crc32fast::hash(&self.buf) != crc {
            return Ok(self.stop("CRC mismatch"));
        }
        let offset = usize::try_from(self.pos).unwrap_or(usize::MAX);
        let step = (FRAME_OVERHEAD + len) as u64;
        self.pos += step;
        self.remaining -= step;
        Ok(Some(Frame { kind: self.buf[0], data: &self.buf[1..], offset }))
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
            encode_frame(*k, &[b], &mut out).unwrap();
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

    #[test]
    fn writer_and_reader_share_the_frame_bound() {
        // One byte over the bound: refused before anything is written (the parts are 257 views of
        // one MiB, so the test allocates no 256 MiB buffer).
        let mib = vec![7u8; 1024 * 1024];
        let parts: Vec<&[u8]> = (0..MAX_FRAME_BODY / mib.len()).map(|_| mib.as_slice()).collect();
        let mut out = b"earlier frames".to_vec();
        let err = encode_frame(2, &parts, &mut out).unwrap_err();
        assert!(
            matches!(err, AuditError::RecordTooLarge { bytes, max } if bytes == MAX_FRAME_BODY + 1 && max == MAX_FRAME_BODY),
            "{err}"
        );
        assert!(err.is_unavailable(), "the record is refused, the request fails closed");
        assert_eq!(out, b"earlier frames", "nothing of a refused frame is written");
        // The reader takes a length at the bound as a frame still being written, and one byte
        // more as impossible: exactly what the writer may and may not write.
        let header = |len: usize| {
            let mut h = (len as u32).to_le_bytes().to_vec();
            h.extend_from_slice(&[0; 4]);
            h.push(2);
            h
        };
        let at_bound = header(MAX_FRAME_BODY);
        let mut d = FrameDecoder::new(&at_bound);
        assert!(d.next().is_none());
        assert_eq!(d.tail(), Some(&Tail::Torn { offset: 0, reason: "partial frame body" }));
        let over = header(MAX_FRAME_BODY + 1);
        let mut d = FrameDecoder::new(&over);
        assert!(d.next().is_none());
        assert_eq!(d.tail(), Some(&Tail::Torn { offset: 0, reason: "impossible frame length" }));
        // Sizes the audit tolerates fit: the exchange bound leaves room for headers and growth.
        const { assert!(2 * MAX_AUDITED_EXCHANGE_BYTES as usize + RECORD_HEADROOM <= MAX_FRAME_BODY) };
        assert!(MAX_FRAME_BODY <= u32::MAX as usize, "the length field holds it");
    }

    /// (kind, data, offset) of each frame, the good prefix's length, and how reading ended.
    type Read = (Vec<(u8, Vec<u8>, usize)>, u64, Option<Tail>);

    /// Every frame the decoder yields from `bytes`, and how it ended, as the reader sees them.
    fn read_all(bytes: &[u8]) -> Read {
        let mut r = FrameReader::new(std::io::Cursor::new(bytes), bytes.len() as u64);
        let mut got = Vec::new();
        while let Some(f) = r.next_frame().unwrap() {
            got.push((f.kind, f.data.to_vec(), f.offset));
        }
        (got, r.valid_len(), r.tail().cloned())
    }

    #[test]
    fn the_reader_reads_what_the_decoder_decodes() {
        let mut input = frames(&[(1, b"header".to_vec()), (2, vec![5; 3000]), (4, vec![])]);
        for cut in [input.len(), input.len() - 1, 9, 8, 3, 0] {
            let bytes = &input[..cut];
            let mut d = FrameDecoder::new(bytes);
            let want: Vec<_> = d.by_ref().map(|f| (f.kind, f.data.to_vec(), f.offset)).collect();
            assert_eq!(read_all(bytes), (want, d.valid_len() as u64, d.tail().cloned()), "cut at {cut}");
        }
        // A flipped byte stops both at the same frame, and a length far past the end is refused
        // before the reader allocates for it.
        input[20] ^= 1;
        let mut d = FrameDecoder::new(&input);
        let want: Vec<_> = d.by_ref().map(|f| (f.kind, f.data.to_vec(), f.offset)).collect();
        assert_eq!(read_all(&input), (want, d.valid_len() as u64, d.tail().cloned()));
        let mut huge = (MAX_FRAME_BODY as u32).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 5]);
        assert_eq!(read_all(&huge).2, Some(Tail::Torn { offset: 0, reason: "partial frame body" }));
    }

    #[test]
    fn preallocated_zeros_end_the_frames_and_anything_written_after_them_is_damage() {
        let written = frames(&[(1, b"header".to_vec()), (2, vec![5; 300])]);
        let mut input = written.clone();
        input.resize(written.len() + 4096, 0);
        let mut d = FrameDecoder::new(&input);
        assert_eq!(d.by_ref().count(), 2);
        assert_eq!(d.tail(), Some(&Tail::Unwritten { offset: written.len() }));
        assert_eq!(d.valid_len(), written.len());
        // Fewer zeros than a frame header are unwritten space too.
        for extra in [1, 7, 8, 9] {
            let bytes = &input[..written.len() + extra];
            assert_eq!(read_all(bytes).2, Some(Tail::Unwritten { offset: written.len() }), "{extra} zeros");
        }
        // A byte written past the zeros (a torn write, corruption): the zeros are not the end.
        // (A byte inside the would-be header makes it a frame header of an impossible or partial
        // frame instead: torn all the same.)
        let mut in_header = input.clone();
        in_header[written.len() + 3] = 1;
        assert!(matches!(read_all(&in_header).2, Some(Tail::Torn { offset, .. }) if offset == written.len()));
        for at in [written.len() + 8, written.len() + 9, input.len() - 1] {
            let mut damaged = input.clone();
            damaged[at] = 1;
            let mut d = FrameDecoder::new(&damaged);
            assert_eq!(d.by_ref().count(), 2);
            let want = Tail::Torn { offset: written.len(), reason: DATA_AFTER_ZEROS };
            assert_eq!(d.tail(), Some(&want), "byte at {at}");
            assert_eq!(read_all(&damaged).2, Some(want), "byte at {at}");
        }
        // The reader checks a zeroed tail longer than its chunk to the end.
        let mut long = written.clone();
        long.resize(written.len() + 3 * ZERO_CHECK_CHUNK + 5, 0);
        assert_eq!(
            read_all(&long),
            (read_all(&written).0, written.len() as u64, Some(Tail::Unwritten { offset: written.len() }))
        );
        *long.last_mut().unwrap() = 9;
        assert_eq!(read_all(&long).2, Some(Tail::Torn { offset: written.len(), reason: DATA_AFTER_ZEROS }));
    }

    proptest! {
        #[test]
        fn the_reader_agrees_with_the_decoder_on_frames_then_zeros_then_anything(
            bodies in proptest::collection::vec((1u8..4, proptest::collection::vec(any::<u8>(), 0..100)), 0..6),
            zeros in 0usize..40,
            after in proptest::collection::vec(any::<u8>(), 0..12),
        ) {
            let mut bytes = frames(&bodies);
            bytes.resize(bytes.len() + zeros, 0);
            bytes.extend_from_slice(&after);
            let mut d = FrameDecoder::new(&bytes);
            let want: Vec<_> = d.by_ref().map(|f| (f.kind, f.data.to_vec(), f.offset)).collect();
            prop_assert_eq!(want.len(), bodies.len());
            prop_assert_eq!(read_all(&bytes), (want, d.valid_len() as u64, d.tail().cloned()));
        }

        #[test]
        fn the_reader_agrees_with_the_decoder_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut d = FrameDecoder::new(&bytes);
            let want: Vec<_> = d.by_ref().map(|f| (f.kind, f.data.to_vec(), f.offset)).collect();
            prop_assert_eq!(read_all(&bytes), (want, d.valid_len() as u64, d.tail().cloned()));
        }

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
