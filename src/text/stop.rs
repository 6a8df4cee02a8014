//! Stop strings over streamed text. Text is released as soon as no stop
//! string can still begin in it; the answer is cut at the first stop string
//! to be completed (the earliest end; at equal ends, the longest), whatever
//! pieces the text arrives in.
//!
//! Every cut is at a character boundary: a stop string's own first byte is
//! the first byte of a character, so the text is only ever cut where one
//! begins (the old scanner cut at `released - longest stop`, inside a
//! Chinese character, and panicked).

/// Holds back text that might be the start of a stop string.
#[derive(Debug, Clone)]
pub struct StopScanner {
    stops: Vec<String>,
    text: String,
    /// Bytes of `text` already released.
    released: usize,
}

impl StopScanner {
    /// Empty stop strings are ignored (they would match everywhere).
    pub fn new(stops: &[String]) -> Self {
        StopScanner { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), text: String::new(), released: 0 }
    }

    /// Add text; return what can be released and whether a stop string ended it.
    pub fn push(&mut self, s: &str) -> (String, bool) {
        // Text before `released` holds no stop string and begins none, so a
        // new match starts at `released` or later.
        let from = self.released;
        self.text.push_str(s);
        let window = &self.text[from..];
        // (end, start) of the first match to complete.
        let hit = self
            .stops
            .iter()
            .filter_map(|st| window.find(st.as_str()).map(|i| (from + i + st.len(), from + i)))
            .min_by_key(|&(end, start)| (end, start));
        if let Some((_, at)) = hit {
            let out = self.text[from..at].to_string();
            self.released = at;
            return (out, true);
        }
        let end = self.text.len() - self.held();
        let out = self.text[from..end].to_string();
        self.released = end;
        (out, false)
    }

    /// Bytes at the end of the text that begin some stop string.
    fn held(&self) -> usize {
        let tail = &self.text.as_bytes()[self.released..];
        self.stops
            .iter()
            .map(|st| {
                let st = st.as_bytes();
                (1..st.len().min(tail.len() + 1)).rev().find(|&k| tail.ends_with(&st[..k])).unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    /// The held text, at the end of generation.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }
}

/// Where the whole of `text` is cut by `stops` (the reference the streaming
/// scanner is tested against): the first match to complete.
pub fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    let b = text.as_bytes();
    (1..=b.len()).find_map(|end| {
        stops.iter().filter(|s| !s.is_empty() && s.len() <= end && b[..end].ends_with(s.as_bytes())).map(|s| end - s.len()).min()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopScanner::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = s.push(p);
            out += &t;
            if hit {
                return (out, true);
            }
        }
        out += &s.flush();
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut() {
        assert_eq!(run(&["</end>"], &["hello </e", "nd> more"]), ("hello ".to_string(), true));
    }

    #[test]
    fn near_misses_are_released() {
        assert_eq!(run(&["STOP"], &["STO", "STO"]), ("STOSTO".to_string(), false));
        assert_eq!(run(&[], &["a", "é", "b"]), ("aéb".to_string(), false));
        assert_eq!(run(&["ab", "b!"], &["xa", "b!"]), ("x".to_string(), true));
    }

    #[test]
    fn chinese_text_with_an_ascii_stop_does_not_panic() {
        // The reported crash: the search began `longest stop` bytes before
        // the released text, inside a three-byte character.
        let pieces = ["你好", "，世界", "。我们", "今天", "xy", "z后面"];
        assert_eq!(run(&["xyz"], &pieces), ("你好，世界。我们今天".to_string(), true));
        assert_eq!(run(&["xyz", "界。"], &pieces), ("你好，世".to_string(), true));
        assert_eq!(run(&["abcdefgh"], &pieces), ("你好，世界。我们今天xyz后面".to_string(), false));
    }

    #[test]
    fn the_first_stop_to_complete_wins() {
        assert_eq!(run(&["abcd", "bc"], &["abcd"]), ("a".to_string(), true));
        assert_eq!(run(&["abcd", "bc"], &["ab", "cd"]), ("a".to_string(), true));
        assert_eq!(first_stop("abcd", &["abcd".into(), "bc".into()]), Some(1));
        assert_eq!(first_stop("xbc", &["bc".into(), "xbc".into()]), Some(0));
    }

    /// Characters that stress byte offsets: ASCII, CJK, emoji joined by
    /// ZWJ, skin tones, combining marks, a four-byte CJK extension character.
    fn piece_char() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec!["a", "b", "x", " ", "\n", "<", "/", ">"]).prop_map(String::from),
            prop::sample::select(vec!["你", "好", "世", "界", "。", "，", "中", "文"]).prop_map(String::from),
            prop::sample::select(vec!["👩\u{200D}💻", "👨\u{200D}👩\u{200D}👧", "👍🏽", "🏳\u{FE0F}\u{200D}🌈", "😀"]).prop_map(String::from),
            prop::sample::select(vec!["e\u{0301}", "a\u{0308}", "\u{0301}", "n\u{0303}\u{0323}", "𠀀", "é"]).prop_map(String::from),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(piece_char(), 0..40).prop_map(|v| v.concat())
    }

    /// Cut `text` at character boundaries chosen by `cuts` (fractions).
    fn pieces(text: &str, cuts: &[f64]) -> Vec<String> {
        let bounds: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
        let mut at: Vec<usize> = cuts.iter().map(|f| bounds[((bounds.len() - 1) as f64 * f) as usize]).collect();
        at.push(0);
        at.push(text.len());
        at.sort_unstable();
        at.dedup();
        at.windows(2).map(|w| text[w[0]..w[1]].to_string()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        /// The released text is always a prefix of the whole, and is cut
        /// exactly at the first stop string, however the text is split.
        #[test]
        fn output_is_a_prefix_cut_at_the_first_stop(
            text in text(),
            cuts in prop::collection::vec(0.0f64..1.0, 0..12),
            // Stops taken from the text itself (so they hit) and made up.
            taken in prop::collection::vec((0.0f64..1.0, 1usize..6), 0..3),
            made in prop::collection::vec(text(), 0..3),
        ) {
            let chars: Vec<&str> = {
                let mut v = vec![];
                let mut rest = text.as_str();
                while let Some(c) = rest.chars().next() {
                    v.push(&rest[..c.len_utf8()]);
                    rest = &rest[c.len_utf8()..];
                }
                v
            };
            let mut stops: Vec<String> = made;
            for (f, n) in taken {
                if !chars.is_empty() {
                    let i = ((chars.len() - 1) as f64 * f) as usize;
                    stops.push(chars[i..(i + n).min(chars.len())].concat());
                }
            }
            let mut s = StopScanner::new(&stops);
            let mut out = String::new();
            let mut hit = false;
            for p in pieces(&text, &cuts) {
                let (t, h) = s.push(&p);
                out += &t;
                prop_assert!(text.starts_with(&out), "released {out:?} is not a prefix of {text:?}");
                if h {
                    hit = true;
                    break;
                }
            }
            if !hit {
                out += &s.flush();
            }
            match first_stop(&text, &stops) {
                Some(at) => {
                    prop_assert!(hit, "stop at {at} in {text:?} missed ({stops:?})");
                    prop_assert_eq!(out.as_str(), &text[..at]);
                }
                None => {
                    prop_assert!(!hit);
                    prop_assert_eq!(&out, &text);
                }
            }
        }
    }
}
