//! Standard (RFC 4648, padded) base64, as produced by glib's `g_base64_encode`, which qemu-ga
//! uses for `guest-file-read` and `guest-exec-status` payloads: the `base64` crate's standard
//! engine, which decodes strictly (padding required and in place, no trailing bits set, no
//! whitespace), as input from an untrusted guest should be.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use thiserror::Error;

/// Why a base64 string was rejected: the decoder's reason, with the offset and byte where it
/// has one.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{0}")]
pub struct Base64Error(#[from] base64::DecodeError);

/// Decodes padded standard base64. The output is at most `3/4` of the input length, so bounding
/// the input bounds the allocation.
pub fn decode(text: &str) -> Result<Vec<u8>, Base64Error> {
    Ok(STANDARD.decode(text)?)
}

/// Encodes bytes as padded standard base64 (`guest-file-write` payloads; tests build agent
/// replies with it).
pub fn encode(data: &[u8]) -> String {
    STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::DecodeError;

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
    fn rejects_malformed_input_naming_where() {
        let err = |t: &str| decode(t).unwrap_err().0;
        assert_eq!(err("Zm9"), DecodeError::InvalidPadding);
        assert_eq!(err("Zm9*"), DecodeError::InvalidByte(3, b'*'));
        assert_eq!(err("Zg==Zm9v"), DecodeError::InvalidByte(2, b'='));
        assert_eq!(err("Z==="), DecodeError::InvalidByte(1, b'='));
        assert_eq!(err("Z=g="), DecodeError::InvalidByte(1, b'='));
        // Trailing bits set: glib never writes it, so it is refused, not rounded.
        assert_eq!(err("Zh=="), DecodeError::InvalidLastSymbol(1, b'h'));
        assert!(decode("Zm9v\n").is_err());
        assert_eq!(
            Base64Error(DecodeError::InvalidByte(3, b'*')).to_string(),
            "Invalid symbol 42, offset 3."
        );
    }
}
