//! Counts in words: "1 rule", "2 rules", "0 penalties". One helper for
//! every human-facing line (CLI output, API messages, errors, logs), so none
//! says "1 rules".

use std::fmt::Display;

/// `n` and the noun that agrees with it: `count(1, "rule", "rules")` is
/// "1 rule", `count(0, "rule", "rules")` is "0 rules".
pub fn count<N>(n: N, one: &str, many: &str) -> String
where
    N: Display + PartialEq + From<u8>,
{
    let noun = if n == N::from(1) { one } else { many };
    format!("{n} {noun}")
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(count(1_usize, "rule", "rules"), "1 rule");
        assert_eq!(count(0_usize, "rule", "rules"), "0 rules");
        assert_eq!(count(2_u32, "penalty", "penalties"), "2 penalties");
        assert_eq!(count(1_u64, "penalty", "penalties"), "1 penalty");
        assert_eq!(
            count(11_u64, "pinned link", "pinned links"),
            "11 pinned links"
        );
    }
}
