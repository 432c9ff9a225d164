//! Standard (RFC 4648, padded) base64, as produced by glib's `g_base64_encode`, which qemu-ga
//! uses for `guest-file-read` and `guest-exec-status` payloads. Written here to avoid a crate for
//! a few dozen lines; decoding is strict because the input comes from an untrusted guest.

use thiserror::Error;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Why a base64 string was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Base64Error {
    /// The text length is not a multiple of four (padding is mandatory).
    #[error("base64 length {len} is not a multiple of 4")]
    InvalidLength {
        /// Length of the rejected text in bytes.
        len: usize,
    },
    /// A byte outside the standard alphabet.
    #[error("invalid base64 byte 0x{byte:02x} at offset {offset}")]
    InvalidByte {
        /// Offset of the byte in the text.
        offset: usize,
        /// The offending byte.
        byte: u8,
    },
    /// `=` padding somewhere other than the last one or two positions.
    #[error("misplaced base64 padding at offset {offset}")]
    MisplacedPadding {
        /// Offset of the misplaced `=`.
        offset: usize,
    },
}

fn sextet(offset: usize, byte: u8) -> Result<u8, Base64Error> {
    match byte {
        b'A'..=b'Z' => Ok(byte - b'A'),
        b'a'..=b'z' => Ok(byte - b'a' + 26),
        b'0'..=b'9' => Ok(byte - b'0' + 52),
        b'+' => Ok(62),
        b'/' => Ok(63),
        _ => Err(Base64Error::InvalidByte { offset, byte }),
    }
}

/// Decodes padded standard base64. The output is at most `3/4` of the input length, so bounding
/// the input bounds the allocation.
pub fn decode(text: &str) -> Result<Vec<u8>, Base64Error> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return Err(Base64Error::InvalidLength { len: bytes.len() });
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, chunk) in bytes.chunks_exact(4).enumerate() {
        let base = q * 4;
        let last = q + 1 == quads;
        let pad = chunk.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            let first_pad = chunk.iter().position(|&b| b == b'=').unwrap_or(0);
            return Err(Base64Error::MisplacedPadding {
                offset: base + first_pad,
            });
        }
        let mut acc: u32 = 0;
        for (i, &b) in chunk.iter().enumerate() {
            let v = if i >= 4 - pad {
                0
            } else if b == b'=' {
                return Err(Base64Error::MisplacedPadding { offset: base + i });
            } else {
                sextet(base + i, b)?
            };
            acc = (acc << 6) | u32::from(v);
        }
        let [_, b0, b1, b2] = acc.to_be_bytes();
        out.push(b0);
        if pad < 2 {
            out.push(b1);
        }
        if pad < 1 {
            out.push(b2);
        }
    }
    Ok(out)
}

/// Encodes bytes as padded standard base64 (`guest-file-write` payloads; tests build agent
/// replies with it).
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let acc = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(
                    ALPHABET[((acc >> (18 - 6 * i)) & 0x3f) as usize],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors_round_trip() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, enc) in vectors {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(&encode(&all)).unwrap(), all);
    }

    #[test]
    fn rejects_malformed_input() {
        assert_eq!(decode("Zm9"), Err(Base64Error::InvalidLength { len: 3 }));
        assert_eq!(
            decode("Zm9*"),
            Err(Base64Error::InvalidByte {
                offset: 3,
                byte: b'*'
            })
        );
        assert_eq!(
            decode("Zg==Zm9v"),
            Err(Base64Error::MisplacedPadding { offset: 2 })
        );
        assert_eq!(
            decode("Z==="),
            Err(Base64Error::MisplacedPadding { offset: 1 })
        );
        assert_eq!(
            decode("Z=g="),
            Err(Base64Error::MisplacedPadding { offset: 1 })
        );
        assert!(decode("Zm9v\n").is_err());
    }
}
