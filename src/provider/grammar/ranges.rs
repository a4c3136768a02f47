//! The integers of a range as GBNF: digit patterns that match exactly the numbers in it,
//! without leading zeros or `-0`.

use super::{literal, MAX_DIGITS};

/// The integers in `[lo, hi]` (a side `None` = unbounded, then at most [`MAX_DIGITS`] digits),
/// written without leading zeros or `-0`.
pub(super) fn int_range(lo: Option<i64>, hi: Option<i64>) -> String {
    let mut alts = Vec::new();
    // Negative part: -|v| for v in [lo, min(hi, -1)].
    let neg_hi = hi.map_or(-1, |h| h.min(-1));
    if lo.is_none_or(|l| l <= neg_hi) {
        let abs_lo = neg_hi.unsigned_abs();
        let abs_hi = lo.map(i64::unsigned_abs);
        alts.push(format!(r#""-" {}"#, group(&uint_range(abs_lo, abs_hi))));
    }
    // Non-negative part: [max(lo, 0), hi].
    if hi.is_none_or(|h| h >= 0) {
        let l = lo.map_or(0, |l| l.max(0)) as u64;
        alts.push(uint_range(l, hi.map(|h| h as u64)));
    }
    alts.join(" | ")
}

fn group(s: &str) -> String {
    if s.contains(" | ") {
        format!("({s})")
    } else {
        s.to_string()
    }
}

fn digits(n: u64) -> u32 {
    n.checked_ilog10().unwrap_or(0) + 1
}

/// The non-negative integers in `[lo, hi]`, as GBNF alternatives.
fn uint_range(lo: u64, hi: Option<u64>) -> String {
    let lo_len = digits(lo);
    let hi_len = hi.map_or(MAX_DIGITS.max(lo_len), digits);
    let mut alts = Vec::new();
    for len in lo_len..=hi_len {
        let floor = if len == 1 { 0 } else { 10u64.pow(len - 1) };
        let ceil = 10u64.checked_pow(len).map_or(u64::MAX, |p| p - 1);
        let a = lo.max(floor);
        let b = hi.map_or(ceil, |h| h.min(ceil));
        if a > b {
            continue;
        }
        if hi.is_none() && len > lo_len {
            // Every longer length is whole: one alternative for all of them.
            alts.push(format!("[1-9] [0-9]{{{},{}}}", len - 1, hi_len - 1));
            break;
        }
        alts.push(same_len(&a.to_string(), &b.to_string()));
    }
    alts.join(" | ")
}

/// Numbers of one length between `x` and `y` (digit strings, `x <= y`).
fn same_len(x: &str, y: &str) -> String {
    debug_assert_eq!(x.len(), y.len());
    if x.is_empty() {
        return String::new();
    }
    if x == y {
        return literal(x);
    }
    let (x0, xs) = (x.as_bytes()[0], &x[1..]);
    let (y0, ys) = (y.as_bytes()[0], &y[1..]);
    let n = xs.len();
    let any = |n: usize| -> String {
        match n {
            0 => String::new(),
            1 => " [0-9]".into(),
            n => format!(" [0-9]{{{n}}}"),
        }
    };
    let class = |a: u8, b: u8| -> String {
        if a == b {
            format!("\"{}\"", a as char)
        } else {
            format!("[{}-{}]", a as char, b as char)
        }
    };
    if x0 == y0 {
        return format!("\"{}\" {}", x0 as char, group(&same_len(xs, ys)));
    }
    let zeros = "0".repeat(n);
    let nines = "9".repeat(n);
    if xs == zeros && ys == nines {
        return format!("{}{}", class(x0, y0), any(n));
    }
    let mut alts = Vec::new();
    let (mut from, mut to) = (x0, y0);
    if xs != zeros {
        alts.push(format!(
            "\"{}\" {}",
            x0 as char,
            group(&same_len(xs, &nines))
        ));
        from += 1;
    }
    if ys != nines {
        to -= 1;
    }
    if from <= to {
        alts.push(format!("{}{}", class(from, to), any(n)));
    }
    if ys != nines {
        alts.push(format!(
            "\"{}\" {}",
            y0 as char,
            group(&same_len(&zeros, ys))
        ));
    }
    alts.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_ranges_are_exact() {
        assert_eq!(uint_range(0, Some(9)), "[0-9]");
        assert_eq!(uint_range(1, Some(5)), "[1-5]");
        assert_eq!(uint_range(0, Some(100)), r#"[0-9] | [1-9] [0-9] | "100""#);
        assert_eq!(
            uint_range(17, Some(342)),
            r#""1" [7-9] | [2-9] [0-9] | [1-2] [0-9]{2} | "3" ([0-3] [0-9] | "4" [0-2])"#
        );
        assert_eq!(uint_range(5, None), "[5-9] | [1-9] [0-9]{1,15}");
        assert_eq!(int_range(Some(1), Some(5)), "[1-5]");
        assert_eq!(int_range(Some(-3), Some(2)), r#""-" [1-3] | [0-2]"#);
        assert_eq!(
            int_range(None, Some(-10)),
            r#""-" ([1-9] [0-9] | [1-9] [0-9]{2,15})"#
        );
        assert_eq!(int_range(Some(-5), Some(-2)), r#""-" [2-5]"#);
        // Brute force: every number a range's regex form matches is in the range.
        for (lo, hi) in [
            (0u64, 0u64),
            (3, 47),
            (10, 99),
            (99, 1000),
            (123, 4567),
            (0, 20000),
        ] {
            let re = regex::Regex::new(&format!(
                "^(?:{})$",
                gbnf_to_regex(&uint_range(lo, Some(hi)))
            ))
            .unwrap();
            for v in 0..=(hi * 2 + 20) {
                assert_eq!(
                    re.is_match(&v.to_string()),
                    (lo..=hi).contains(&v),
                    "{lo}..{hi}: {v}"
                );
            }
            assert!(!re.is_match(&format!("0{lo}")), "leading zero");
        }
    }

    /// Just enough of GBNF → regex for the digit ranges above.
    fn gbnf_to_regex(g: &str) -> String {
        g.replace([' ', '"'], "")
    }
}
