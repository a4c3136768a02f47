//! The bytes rows are known by: lower-case hex, the 128-bit fingerprint's text form, and the
//! fingerprint older outputs recorded. At the bottom so the ledger, the models cache and the
//! request builder share one spelling of each.

use sha2::{Digest, Sha256};

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// The inverse of [`hex`] for a 128-bit fingerprint; `None` for anything else.
pub fn fingerprint_bytes(hex: &str) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The fingerprint promptmill recorded before rows were keyed by request identity: 128 bits of
/// the request body's SHA-256. Read only to recognise records of older outputs.
pub fn legacy_fingerprint(body: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&Sha256::digest(body)[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_a_fingerprint() {
        let b: [u8; 16] = core::array::from_fn(|i| (i * 17) as u8);
        assert_eq!(fingerprint_bytes(&hex(&b)), Some(b));
        assert_eq!(fingerprint_bytes("abc"), None);
        assert_eq!(fingerprint_bytes(&"zz".repeat(16)), None);
    }
}
