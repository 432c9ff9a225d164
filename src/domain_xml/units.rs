//! libvirt scaled integers (`<memory unit='GiB'>4</memory>`), mirroring `virScaleInteger`.
//!
//! Units are case-insensitive: `b`/`byte`/`bytes` are bytes; a single letter (`k`, `M`, `G`,
//! `T`, `P`, `E`) or the letter plus `iB` is a power of 1024; the letter plus `B` (`KB`, `MB`,
//! ...) is a power of 1000. Memory sizes are then rounded up to whole KiB as libvirt does.

use super::XmlError;

/// Bytes per unit, or `None` if libvirt would reject the unit.
fn unit_scale(unit: &str) -> Option<u64> {
    let lower = unit.to_ascii_lowercase();
    if matches!(lower.as_str(), "b" | "byte" | "bytes") {
        return Some(1);
    }
    let mut chars = lower.chars();
    let prefix = chars.next()?;
    let base: u64 = match chars.as_str() {
        "" | "ib" => 1024,
        "b" => 1000,
        _ => return None,
    };
    let power = match prefix {
        'k' => 1,
        'm' => 2,
        'g' => 3,
        't' => 4,
        'p' => 5,
        'e' => 6,
        _ => return None,
    };
    base.checked_pow(power)
}

/// Parses `value` in `unit` (KiB when absent) into KiB, rounding up like libvirt.
/// `element` names the element in errors.
pub(super) fn parse_kib(element: &str, value: &str, unit: Option<&str>) -> Result<u64, XmlError> {
    let number: u64 = value
        .trim()
        .parse()
        .map_err(|source| XmlError::InvalidNumber {
            what: element.to_string(),
            value: super::tree::clip(value, 40),
            source,
        })?;
    let unit = unit
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .unwrap_or("KiB");
    let scale = unit_scale(unit).ok_or_else(|| XmlError::InvalidUnit {
        element: element.to_string(),
        unit: super::tree::clip(unit, 40),
    })?;
    let bytes = number
        .checked_mul(scale)
        .ok_or_else(|| XmlError::SizeOverflow {
            element: element.to_string(),
            value: number,
            unit: unit.to_string(),
        })?;
    Ok(bytes.div_ceil(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_units() {
        assert_eq!(
            parse_kib("memory", "4", Some("GiB")).unwrap(),
            4 * 1024 * 1024
        );
        assert_eq!(
            parse_kib("memory", "4", Some("G")).unwrap(),
            4 * 1024 * 1024
        );
        assert_eq!(
            parse_kib("memory", "4", Some("g")).unwrap(),
            4 * 1024 * 1024
        );
        assert_eq!(
            parse_kib("memory", "2048", Some("MiB")).unwrap(),
            2048 * 1024
        );
        assert_eq!(parse_kib("memory", "2048", Some("M")).unwrap(), 2048 * 1024);
        assert_eq!(parse_kib("memory", "1024", Some("k")).unwrap(), 1024);
        assert_eq!(parse_kib("memory", "1024", Some("KiB")).unwrap(), 1024);
        assert_eq!(parse_kib("memory", "1024", None).unwrap(), 1024);
        assert_eq!(parse_kib("memory", "1", Some("TiB")).unwrap(), 1 << 30);
        // Decimal: 1 MB = 1_000_000 bytes = 976.56 KiB, rounded up.
        assert_eq!(parse_kib("memory", "1", Some("MB")).unwrap(), 977);
        assert_eq!(parse_kib("memory", "1", Some("KB")).unwrap(), 1);
        assert_eq!(parse_kib("memory", "2048", Some("bytes")).unwrap(), 2);
        assert_eq!(parse_kib("memory", "2049", Some("b")).unwrap(), 3);
        assert_eq!(
            parse_kib("memory", " 512 ", Some("MiB")).unwrap(),
            512 * 1024
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            parse_kib("memory", "4", Some("GiG")),
            Err(XmlError::InvalidUnit { .. })
        ));
        assert!(matches!(
            parse_kib("memory", "4", Some("x")),
            Err(XmlError::InvalidUnit { .. })
        ));
        assert!(matches!(
            parse_kib("memory", "-4", None),
            Err(XmlError::InvalidNumber { .. })
        ));
        assert!(matches!(
            parse_kib("memory", "", None),
            Err(XmlError::InvalidNumber { .. })
        ));
        assert!(matches!(
            parse_kib("memory", "18446744073709551615", Some("EiB")),
            Err(XmlError::SizeOverflow { .. })
        ));
    }
}
