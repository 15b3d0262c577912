//! Names of CAs, groups, profiles and key stores, and the kinds of CA.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaKind {
    Root,
    Issuing,
}

pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Whether `c` may appear in human-readable text that approvers read
/// (device names, locations, comments): no control characters, no bidi
/// overrides or isolates (which can make `evil` display as `live`), and no
/// zero-width or invisible characters (which make two names look equal).
pub fn is_display_safe(c: char) -> bool {
    !(c.is_control()
        || matches!(
            c,
            '\u{00AD}'                  // soft hyphen
            | '\u{034F}'                // combining grapheme joiner
            | '\u{061C}'                // arabic letter mark
            | '\u{115F}' | '\u{1160}'   // hangul fillers
            | '\u{17B4}' | '\u{17B5}'   // khmer inherent vowels
            | '\u{180E}'                // mongolian vowel separator
            | '\u{200B}'..='\u{200F}'   // zero-width space/joiners, LRM, RLM
            | '\u{202A}'..='\u{202E}'   // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}'   // word joiner, invisible operators
            | '\u{2066}'..='\u{206F}'   // bidi isolates, deprecated format chars
            | '\u{3164}'                // hangul filler
            | '\u{FE00}'..='\u{FE0F}'   // variation selectors
            | '\u{FEFF}'                // zero-width no-break space / BOM
            | '\u{FFA0}'                // halfwidth hangul filler
            | '\u{FFF9}'..='\u{FFFB}'   // interlinear annotation
            | '\u{E0000}'..='\u{E007F}' // tag characters
        ))
}

/// Text for approvers: 1..=`max` characters, not blank, every character
/// display-safe. Newlines are allowed only where `multiline`.
pub fn valid_display_text(s: &str, max: usize, multiline: bool) -> bool {
    !s.trim().is_empty()
        && s.chars().count() <= max
        && s.chars()
            .all(|c| (multiline && c == '\n') || is_display_safe(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_text_refuses_invisible_and_bidi_characters() {
        assert!(valid_display_text("sensor-7 (hall B)", 128, false));
        assert!(valid_display_text("Küche – Gerät 3", 128, false));
        for bad in [
            "evil\u{202E}gnp.exe",
            "a\u{2066}b",
            "ad\u{200B}min",
            "x\u{FEFF}",
            "tab\there",
            "  ",
            "",
            "a\u{E0041}",
        ] {
            assert!(!valid_display_text(bad, 128, false), "{bad:?} accepted");
        }
        assert!(valid_display_text("line 1\nline 2", 128, true));
        assert!(!valid_display_text("line 1\nline 2", 128, false));
        assert!(!valid_display_text(&"x".repeat(129), 128, false));
    }
}
