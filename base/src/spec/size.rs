//! Byte sizes: `4096`, `512K`, `100M`, `1G`, `2T` (binary multiples; an optional trailing `B`
//! or `iB` is accepted: `1GiB`, `1GB` both mean 2^30 bytes, as in qemu-img).

use super::SpecError;

/// Parses a size in bytes with an optional binary suffix (K, M, G, T, P; optionally followed by
/// `B` or `iB`).
pub fn parse_size(input: &str) -> Result<u64, SpecError> {
    let err = |problem: &str| SpecError::new("size", input, input, problem);
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits_end == 0 {
        return Err(err(
            "expected a number of bytes, optionally with a suffix K, M, G, T or P (for example 512M)",
        ));
    }
    let number: u64 = s[..digits_end]
        .parse()
        .map_err(|_| err("the number is too large"))?;
    let suffix = &s[digits_end..];
    let unit = suffix
        .strip_suffix("iB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(suffix);
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        "P" | "p" => 50,
        _ => {
            return Err(SpecError::new(
                "size",
                input,
                suffix,
                format!("unknown size suffix `{suffix}`; use K, M, G, T or P (powers of 1024)"),
            ));
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| err("the size does not fit in 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("100M").unwrap(), 100 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TB").unwrap(), 2 << 40);
    }

    #[test]
    fn bad_sizes_name_the_part() {
        let e = parse_size("12X").unwrap_err();
        assert_eq!(e.part, "X");
        assert!(e.to_string().contains("unknown size suffix `X`"), "{e}");
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        let e = parse_size("16000000P").unwrap_err();
        assert!(e.to_string().contains("64 bits"), "{e}");
    }
}
