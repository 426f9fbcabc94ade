//! Primitive wire types shared by the decoder and the encoder: the bounded reader, variable
//! byte integers, UTF-8 strings and binary data.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{DecodeError, EncodeError};

/// The largest value a Variable Byte Integer can carry (four bytes).
pub(crate) const VARINT_MAX: u32 = 268_435_455;

/// Number of bytes of the Variable Byte Integer for `value` (at most [`VARINT_MAX`]).
pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes `value` (at most [`VARINT_MAX`], checked by the length pass) as a Variable Byte
/// Integer.
pub(crate) fn put_varint(buf: &mut BytesMut, value: usize) {
    let mut value = value;
    loop {
        // Truncation is the point: the low seven bits go out first.
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Encoded size of a UTF-8 string field (two length bytes + the string).
pub(crate) fn str_len(s: &str) -> Result<usize, EncodeError> {
    if s.len() > usize::from(u16::MAX) {
        return Err(EncodeError::TooLarge(
            "a UTF-8 string field is longer than 65,535 bytes",
        ));
    }
    Ok(2 + s.len())
}

/// Encoded size of a binary data field (two length bytes + the data).
pub(crate) fn bin_len(b: &[u8]) -> Result<usize, EncodeError> {
    if b.len() > usize::from(u16::MAX) {
        return Err(EncodeError::TooLarge(
            "a binary data field is longer than 65,535 bytes",
        ));
    }
    Ok(2 + b.len())
}

/// Writes a string whose length [`str_len`] has already checked.
pub(crate) fn put_str(buf: &mut BytesMut, s: &str) {
    put_bin(buf, s.as_bytes());
}

/// Writes binary data whose length [`bin_len`] has already checked.
pub(crate) fn put_bin(buf: &mut BytesMut, b: &[u8]) {
    // The length pass rejected anything longer than u16::MAX.
    buf.put_u16(u16::try_from(b.len()).unwrap_or(u16::MAX));
    buf.put_slice(b);
}

/// Reads fields from a frame without copying it; every read is bounds-checked against `end`,
/// so a short packet is a `Malformed` error and never a panic.
pub(crate) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `data[pos..end]` (callers pass `pos <= end <= data.len()`).
    pub(crate) fn new(data: &'a Bytes, pos: usize, end: usize) -> Self {
        let end = end.min(data.len());
        Self {
            data,
            pos: pos.min(end),
            end,
        }
    }

    /// Bytes left to read.
    pub(crate) fn remaining(&self) -> usize {
        self.end - self.pos
    }

    /// True when everything has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.end
    }

    /// Fails unless every byte has been read: the remaining length must match the contents.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(what))
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Malformed(
                "packet shorter than its fields (remaining length too small)",
            ));
        }
        let start = self.pos;
        self.pos += n;
        // In bounds: start + n <= end <= data.len().
        Ok(&self.data[start..self.pos])
    }

    /// A sub-reader over the next `n` bytes (property lists), which this reader skips.
    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader<'a>, DecodeError> {
        if n > self.remaining() {
            return Err(DecodeError::Malformed(
                "property length runs past the end of the packet",
            ));
        }
        let start = self.pos;
        self.pos += n;
        Ok(Reader {
            data: self.data,
            pos: start,
            end: self.pos,
        })
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A Variable Byte Integer: at most four bytes, minimal encoding [MQTT-1.5.5-1].
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4u32 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7F) << (7 * i);
            if byte & 0x80 == 0 {
                if i > 0 && byte == 0 {
                    return Err(DecodeError::Malformed(
                        "variable byte integer not in its shortest form [MQTT-1.5.5-1]",
                    ));
                }
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed(
            "variable byte integer longer than 4 bytes",
        ))
    }

    /// Binary data: two length bytes, then the bytes, sliced out of the frame.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = usize::from(self.u16()?);
        let start = self.pos;
        self.take(n)?;
        Ok(self.data.slice(start..self.pos))
    }

    /// A UTF-8 string that may contain U+0000 (topics check it themselves, to report 0x90).
    pub(crate) fn str_allow_nul(&mut self) -> Result<&'a str, DecodeError> {
        let n = usize::from(self.u16()?);
        let b = self.take(n)?;
        std::str::from_utf8(b).map_err(|_| {
            DecodeError::Malformed("UTF-8 string is not well-formed UTF-8 [MQTT-1.5.4-1]")
        })
    }

    /// A UTF-8 string: well-formed (no surrogates) and without U+0000 [MQTT-1.5.4-1]
    /// [MQTT-1.5.4-2].
    pub(crate) fn str(&mut self) -> Result<&'a str, DecodeError> {
        let s = self.str_allow_nul()?;
        if s.as_bytes().contains(&0) {
            return Err(DecodeError::Malformed(
                "UTF-8 string contains U+0000 [MQTT-1.5.4-2]",
            ));
        }
        Ok(s)
    }

    /// [`Reader::str`] as an owned `String`.
    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        self.str().map(str::to_owned)
    }

    /// Everything left (the PUBLISH payload), sliced out of the frame.
    pub(crate) fn rest(&mut self) -> Bytes {
        let start = self.pos;
        self.pos = self.end;
        self.data.slice(start..self.end)
    }
}
