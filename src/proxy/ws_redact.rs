//! Redaction of reflected credentials in WebSocket messages (I4 for a relayed upgrade): an
//! upstream that echoes the upgrade request's credential in a message must not hand it to the
//! agent, any more than in a response body.
//!
//! The upstream's frames are read, not copied blind: each data message's payload goes through
//! the request's `Redactor` (which holds back a tail only until the message's next frame or its
//! end), each control frame's payload is redacted whole, and the frames are written out again
//! with their new lengths. A message that arrives whole goes out as one frame at once; one
//! that arrives in pieces goes out as fragments of the same message (RFC 6455 §5.4 lets an
//! intermediary re-fragment). keyward removes `Sec-WebSocket-Extensions` from a credentialed
//! upgrade, so no extension (compression) can hide a message from the redactor; a frame with a
//! reserved bit, a masked frame, an unknown opcode or a broken fragment sequence ends the relay.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::redact::Redactor;

/// RFC 6455 §5.5: a control frame's payload is at most 125 bytes.
const MAX_CONTROL: usize = 125;

/// How much is read from the upstream at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why the upstream's frames could not be relayed (RFC 6455 §5.2, §5.4, §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A frame from a server must not be masked.
    Masked,
    /// A reserved bit is set: an extension keyward did not let the two sides agree on.
    Reserved,
    UnknownOpcode,
    /// A control frame that is fragmented or longer than 125 bytes.
    BadControl,
    /// A continuation outside a message, or a new message inside one.
    BadSequence,
    /// A 64-bit length with its top bit set.
    BadLength,
}

/// A frame whose payload is being read.
struct Frame {
    fin: bool,
    opcode: u8,
    remaining: u64,
}

/// Rewrites a server's frames with every reflected credential replaced.
pub struct FrameRedactor {
    redactor: Box<Redactor>,
    /// Bytes read and not yet used: at most a frame header or a control frame's payload.
    input: BytesMut,
    frame: Option<Frame>,
    /// The data message in progress: its opcode, and whether a fragment of it went out (the
    /// later ones carry opcode 0, continuation).
    message: Option<(u8, bool)>,
}

impl FrameRedactor {
    pub fn new(redactor: Box<Redactor>) -> FrameRedactor {
        FrameRedactor {
            redactor,
            input: BytesMut::new(),
            frame: None,
            message: None,
        }
    }

    /// Occurrences replaced so far.
    pub fn found(&self) -> u64 {
        self.redactor.found()
    }

    /// Feeds bytes read from the upstream; appends the frames to send the agent to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), FrameError> {
        self.input.extend_from_slice(data);
        loop {
            let Some(frame) = self.frame.as_mut() else {
                let Some((header_len, frame)) = parse_header(&self.input)? else {
                    return Ok(());
                };
                self.input.advance(header_len);
                match (frame.opcode, self.message) {
                    (0, None) | (1 | 2, Some(_)) => return Err(FrameError::BadSequence),
                    (1 | 2, None) => self.message = Some((frame.opcode, false)),
                    _ => {}
                }
                self.frame = Some(frame);
                continue;
            };
            if frame.opcode >= 8 {
                // (At most 125 bytes: wait for all of it.)
                let len = frame.remaining as usize;
                if self.input.len() < len {
                    return Ok(());
                }
                let opcode = frame.opcode;
                self.frame = None;
                let payload = self.input.split_to(len);
                match self.redactor.whole(&payload) {
                    Some(redacted) => {
                        let cut = redacted.get(..MAX_CONTROL).unwrap_or(&redacted);
                        write_frame(out, true, opcode, cut);
                    }
                    None => write_frame(out, true, opcode, &payload),
                }
                continue;
            }
            let take = usize::try_from(frame.remaining)
                .unwrap_or(usize::MAX)
                .min(self.input.len());
            if take == 0 && frame.remaining > 0 {
                return Ok(());
            }
            frame.remaining -= take as u64;
            let done = frame.remaining == 0;
            let fin = done && frame.fin;
            if done {
                self.frame = None;
            }
            let [held, safe] = self.redactor.push(self.input.split_to(take).freeze());
            let mut payload = BytesMut::with_capacity(held.len() + safe.len());
            payload.extend_from_slice(&held);
            payload.extend_from_slice(&safe);
            if fin {
                payload.extend_from_slice(&self.redactor.finish());
            }
            if let Some((opcode, started)) = self.message.as_mut() {
                if !payload.is_empty() || fin {
                    let op = if *started { 0 } else { *opcode };
                    write_frame(out, fin, op, &payload);
                    *started = true;
                }
            }
            if fin {
                self.message = None;
            }
            if self.input.is_empty() {
                return Ok(());
            }
        }
    }
}

/// The header at the start of `buf` and its length; `None` until all of it is there.
fn parse_header(buf: &[u8]) -> Result<Option<(usize, Frame)>, FrameError> {
    let &[b0, b1, ref rest @ ..] = buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    let (len, header_len) = match b1 & 0x7f {
        126 => match rest.get(..2) {
            Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 4),
            _ => return Ok(None),
        },
        127 => match rest.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => (u64::from_be_bytes(b), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len >> 63 != 0 {
        return Err(FrameError::BadLength);
    }
    match opcode {
        0..=2 => {}
        8..=10 if fin && len <= MAX_CONTROL as u64 => {}
        8..=10 => return Err(FrameError::BadControl),
        _ => return Err(FrameError::UnknownOpcode),
    }
    Ok(Some((
        header_len,
        Frame {
            fin,
            opcode,
            remaining: len,
        },
    )))
}

/// Appends an unmasked frame (a server's) with the shortest length encoding.
fn write_frame(out: &mut BytesMut, fin: bool, opcode: u8, payload: &[u8]) {
    out.reserve(payload.len() + 10);
    out.put_u8(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n @ 0..=125 => out.put_u8(n as u8),
        n @ 126..=0xffff => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.extend_from_slice(payload);
}

/// What a relay's reads saw, for its record.
#[derive(Default)]
pub struct Seen {
    pub found: AtomicU64,
    pub broken: AtomicBool,
}

/// The upstream side of a relay: reads come out redacted (see `FrameRedactor`), writes pass
/// through. A protocol violation is a read error once the frames before it are out (the relay
/// ends), and is noted in `seen`.
pub struct RedactedReads<T> {
    io: T,
    frames: FrameRedactor,
    ready: BytesMut,
    seen: Arc<Seen>,
    eof: bool,
    failed: bool,
}

impl<T> RedactedReads<T> {
    pub fn new(io: T, redactor: Box<Redactor>, seen: Arc<Seen>) -> RedactedReads<T> {
        RedactedReads {
            io,
            frames: FrameRedactor::new(redactor),
            ready: BytesMut::new(),
            seen,
            eof: false,
            failed: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for RedactedReads<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "upstream WebSocket frame not relayed",
                )));
            }
            if this.eof {
                // (A message cut off by the close is dropped with what it held back.)
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                continue;
            }
            let fed = this.frames.feed(read.filled(), &mut this.ready);
            this.seen
                .found
                .store(this.frames.found(), Ordering::Relaxed);
            if let Err(e) = fed {
                // (The frames before it still go out.)
                tracing::debug!(error = ?e, "upstream WebSocket frame not relayed");
                this.seen.broken.store(true, Ordering::Relaxed);
                this.failed = true;
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for RedactedReads<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::CredentialValue;
    use crate::secret::Secret;

    const KEY: &str = "sk-live-0123456789abcdef";

    fn redactor() -> FrameRedactor {
        let value = Arc::new(CredentialValue::new(Secret::new(KEY.into())));
        FrameRedactor::new(Box::new(Redactor::new(value, None)))
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_frame(&mut out, fin, opcode, payload);
        out.to_vec()
    }

    /// Parses a stream of server frames into (fin, opcode, payload), checking it is whole.
    fn frames(mut bytes: &[u8]) -> Vec<(bool, u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (len, f) = parse_header(bytes).unwrap().expect("a whole header");
            let end = len + f.remaining as usize;
            out.push((f.fin, f.opcode, bytes[len..end].to_vec()));
            bytes = &bytes[end..];
        }
        out
    }

    fn run(r: &mut FrameRedactor, pieces: &[&[u8]]) -> Result<Vec<u8>, FrameError> {
        let mut out = BytesMut::new();
        for p in pieces {
            r.feed(p, &mut out)?;
        }
        Ok(out.to_vec())
    }

    #[test]
    fn a_clean_message_goes_out_as_it_came() {
        let msg = frame(true, 1, b"{\"delta\":\"hello\"}");
        let mut r = redactor();
        assert_eq!(run(&mut r, &[&msg]).unwrap(), msg);
        assert_eq!(r.found(), 0);
    }

    #[test]
    fn a_credential_in_a_message_is_replaced_and_the_length_rewritten() {
        let text = format!("your header was Bearer {KEY}, ok");
        let mut r = redactor();
        let out = run(&mut r, &[&frame(true, 1, text.as_bytes())]).unwrap();
        let got = frames(&out);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0, got[0].1), (true, 1));
        assert_eq!(got[0].2, b"your header was Bearer [redacted], ok");
        assert_eq!(r.found(), 1);
    }

    #[test]
    fn a_credential_split_across_reads_fragments_or_frames_is_found() {
        let text = format!("{}{KEY}{}", "a".repeat(300), "b".repeat(200));
        let bytes = text.as_bytes();
        let cut = 300 + KEY.len() / 2;
        let mut wire = frame(false, 2, &bytes[..cut]);
        wire.extend(frame(true, 0, &bytes[cut..]));
        // Every way of cutting the wire into two reads.
        for at in 0..wire.len() {
            let mut r = redactor();
            let out = run(&mut r, &[&wire[..at], &wire[at..]]).unwrap();
            let got = frames(&out);
            assert_eq!(got[0].1, 2, "cut at {at}");
            assert!(got[1..].iter().all(|f| f.1 == 0), "cut at {at}");
            assert!(got.iter().rev().skip(1).all(|f| !f.0), "cut at {at}");
            assert!(got.last().unwrap().0, "cut at {at}");
            let payload: Vec<u8> = got.iter().flat_map(|f| f.2.clone()).collect();
            let want = format!("{}[redacted]{}", "a".repeat(300), "b".repeat(200));
            assert_eq!(payload, want.as_bytes(), "cut at {at}");
        }
    }

    #[test]
    fn control_frames_are_redacted_whole_and_may_come_between_fragments() {
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(format!("bad key {KEY}").as_bytes());
        let mut wire = frame(false, 1, format!("start {}", &KEY[..5]).as_bytes());
        wire.extend(frame(true, 9, KEY.as_bytes()));
        wire.extend(frame(true, 0, format!("{} end", &KEY[5..]).as_bytes()));
        wire.extend(frame(true, 8, &close));
        let mut r = redactor();
        let got = frames(&run(&mut r, &[&wire]).unwrap());
        let ping = got.iter().find(|f| f.1 == 9).unwrap();
        assert_eq!(ping.2, b"[redacted]");
        let text: Vec<u8> = got
            .iter()
            .filter(|f| f.1 < 8)
            .flat_map(|f| f.2.clone())
            .collect();
        assert_eq!(text, b"start [redacted] end");
        let close_out = got.iter().find(|f| f.1 == 8).unwrap();
        assert_eq!(&close_out.2[..2], &1000u16.to_be_bytes());
        assert_eq!(&close_out.2[2..], b"bad key [redacted]");
        assert_eq!(r.found(), 3);
    }

    #[test]
    fn a_long_message_streams_as_fragments_without_waiting_for_its_end() {
        let payload = vec![b'x'; 100_000];
        let wire = frame(true, 2, &payload);
        let mut r = redactor();
        let mut out = BytesMut::new();
        r.feed(&wire[..50_000], &mut out).unwrap();
        let first = frames(&out);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].0, first[0].1), (false, 2));
        // All but the held tail (shorter than the longest spelling) is out already.
        let came = 50_000 - 10;
        assert!(first[0].2.len() < came && first[0].2.len() > came - 100);
        let mut rest = BytesMut::new();
        r.feed(&wire[50_000..], &mut rest).unwrap();
        let second = frames(&rest);
        assert_eq!((second[0].0, second[0].1), (true, 0));
        assert_eq!(first[0].2.len() + second[0].2.len(), payload.len());
    }

    #[test]
    fn frames_keyward_cannot_read_end_the_relay() {
        let masked = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
        let deflated = [0xc1, 0x01, b'x'];
        let unknown = [0x83, 0x00];
        let long_ping = {
            let mut f = vec![0x89, 126, 0, 126];
            f.extend([0u8; 126]);
            f
        };
        let cut_ping = [0x09, 0x00];
        let stray_continuation = frame(true, 0, b"x");
        let mut nested = frame(false, 1, b"a");
        nested.extend(frame(true, 1, b"b"));
        let huge = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        for (wire, want) in [
            (&masked[..], FrameError::Masked),
            (&deflated[..], FrameError::Reserved),
            (&unknown[..], FrameError::UnknownOpcode),
            (&long_ping[..], FrameError::BadControl),
            (&cut_ping[..], FrameError::BadControl),
            (&stray_continuation[..], FrameError::BadSequence),
            (&nested[..], FrameError::BadSequence),
            (&huge[..], FrameError::BadLength),
        ] {
            assert_eq!(run(&mut redactor(), &[wire]), Err(want));
        }
    }

    #[test]
    fn lengths_are_written_in_the_shortest_form() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let f = frame(true, 2, &vec![0; len]);
            assert_eq!(f.len(), header + len);
            let (h, parsed) = parse_header(&f).unwrap().unwrap();
            assert_eq!((h, parsed.remaining), (header, len as u64));
        }
    }
}
